"""Metric functions on tiny arrays whose answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aenode import metrics


def _pair() -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((1, 4, 4), np.uint8)
    pred = np.zeros((1, 4, 4), np.uint8)
    ref[0, 0, :4] = 1  # 4 voxels
    pred[0, 0, :2] = 1  # 2 voxels, both inside
    pred[0, 1, 0] = 1  # 1 false positive
    ref[0, 3, 3] = 2
    return pred, ref


def test_overlap_metrics_by_hand() -> None:
    pred, ref = _pair()
    assert metrics.dice(pred, ref, 1) == pytest.approx(2 * 2 / (3 + 4))
    assert metrics.jaccard(pred, ref, 1) == pytest.approx(2 / 5)
    assert metrics.sensitivity(pred, ref, 1) == pytest.approx(2 / 4)
    assert metrics.specificity(pred, ref, 1) == pytest.approx(11 / 12)
    # label 2: reference has one voxel, prediction none
    assert metrics.dice(pred, ref, 2) == 0.0
    assert metrics.sensitivity(pred, ref, 2) == 0.0


def test_empty_masks_conventions() -> None:
    a = np.zeros((2, 2, 2), np.uint8)
    assert metrics.dice(a, a, 1) == 1.0
    assert metrics.jaccard(a, a, 1) == 1.0
    assert metrics.hausdorff95(a, a, (1, 1, 1), 1) == 0.0
    b = a.copy()
    b[0, 0, 0] = 1
    assert math.isinf(metrics.hausdorff95(b, a, (1, 1, 1), 1))
    assert metrics.volume_error(b, a, (1, 1, 1), 1) == (1.0, float("inf"))


def test_shape_mismatch_is_named() -> None:
    with pytest.raises(ValueError, match=r"shape mismatch: prediction \(2, 2\) vs reference"):
        metrics.dice(np.zeros((2, 2)), np.zeros((3, 3)))


def test_volume_error_uses_spacing() -> None:
    pred, ref = _pair()
    mm3, pct = metrics.volume_error(pred, ref, (2.0, 0.5, 0.5), 1)
    assert mm3 == pytest.approx((3 - 4) * 0.5)
    assert pct == pytest.approx(-25.0)


def test_hausdorff95_shifted_cube_in_mm() -> None:
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[3:8, 3:8, 3:8] = 1
    pred = np.roll(ref, 2, axis=2)  # shifted two voxels along x
    assert metrics.hausdorff95(pred, ref, (1, 1, 1), 1) == pytest.approx(2.0)
    assert metrics.hausdorff95(pred, ref, (1, 1, 1.5), 1) == pytest.approx(3.0)
    assert metrics.hausdorff95(ref, ref, (1, 1, 1), 1) == 0.0


def test_bootstrap_ci_is_seeded_and_brackets_the_mean() -> None:
    values = np.linspace(0.8, 0.95, 40)
    lo, hi = metrics.bootstrap_ci(values, seed=3)
    assert lo < values.mean() < hi
    assert (lo, hi) == metrics.bootstrap_ci(values, seed=3)
    assert metrics.bootstrap_ci([0.9] * 5) == (pytest.approx(0.9), pytest.approx(0.9))
    with pytest.raises(ValueError, match="at least one value"):
        metrics.bootstrap_ci([])


def test_classification_metrics_by_hand() -> None:
    scores = [0.9, 0.8, 0.3, 0.6, 0.1, 0.2]
    truth = [1, 1, 1, 0, 0, 0]
    assert metrics.auc(scores, truth) == pytest.approx(8 / 9)
    m = metrics.classification_metrics(scores, truth, threshold=0.5)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 3)
    p = r = 2 / 3
    assert m["f0.5"] == pytest.approx(1.25 * p * r / (0.25 * p + r))
    assert metrics.f_beta(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="one positive and one negative"):
        metrics.auc([0.1, 0.2], [1, 1])
    assert math.isnan(metrics.classification_metrics([0.1], [1])["auc"])


def _blob(shape: tuple[int, int, int], center: tuple[float, ...], radii: tuple[float, ...]):
    grid = np.indices(shape).astype(float)
    d = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii, strict=True))
    return (d <= 1.0).astype(np.uint8)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.8, 0.8)])
def test_hausdorff95_equals_monai(spacing: tuple[float, float, float]) -> None:
    import torch
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(7)
    ref = _blob((24, 40, 40), (12, 20, 20), (8, 12, 10))
    # An asymmetric error: an extra lobe on one side, so the two directions differ.
    pred = ref | _blob((24, 40, 40), (12, 20, 32), (4, 5, 6))
    pred[rng.random(pred.shape) < 0.01] = 0
    ours = metrics.hausdorff95(pred, ref, spacing, 1)

    def onehot(mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([1 - mask, mask])[None].astype(np.float32))

    theirs = compute_hausdorff_distance(
        onehot(pred), onehot(ref), include_background=False, percentile=95, spacing=spacing
    )
    assert ours == pytest.approx(float(theirs[0, 0]), rel=1e-6)
    # The directed figures differ, and ours is the larger one, not a pooled percentile.
    pooled = np.percentile(
        np.concatenate(
            [
                metrics_directed(pred, ref, spacing),
                metrics_directed(ref, pred, spacing),
            ]
        ),
        95,
    )
    assert ours > pooled


def metrics_directed(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    from scipy import ndimage

    def surface(m: np.ndarray) -> np.ndarray:
        return m.astype(bool) & ~ndimage.binary_erosion(
            m.astype(bool), ndimage.generate_binary_structure(3, 1)
        )

    return ndimage.distance_transform_edt(~surface(b), sampling=spacing)[surface(a)]


def test_bootstrap_ci_is_scipys_percentile_interval() -> None:
    from scipy import stats

    values = [0.81, 0.86, 0.79, 0.9, 0.84, 0.88, 0.77]
    lo, hi = metrics.bootstrap_ci(values, n=3000, seed=11)
    ref = stats.bootstrap(
        (np.asarray(values),),
        np.mean,
        n_resamples=3000,
        method="percentile",
        rng=np.random.default_rng(11),
    ).confidence_interval
    assert (lo, hi) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert lo < float(np.mean(values)) < hi

"""Segmentation and classification metrics as plain numpy/scipy functions.

Segmentation metrics take two label arrays of the same shape and one label value; the
spacing (x, y, z order reversed to the array's (z, y, x)) matters for distances and volumes.
Conventions for empty masks: Dice and Jaccard of two empty masks are 1; the Hausdorff
distance is 0 when both are empty and ``inf`` when exactly one is.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage, stats

__all__ = [
    "auc",
    "bootstrap_ci",
    "classification_metrics",
    "dice",
    "f_beta",
    "hausdorff95",
    "jaccard",
    "sensitivity",
    "specificity",
    "volume_error",
]


def _masks(pred: np.ndarray, ref: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs reference {ref.shape}")
    return np.asarray(pred) == label, np.asarray(ref) == label


def dice(pred: np.ndarray, ref: np.ndarray, label: int = 1) -> float:
    """Dice coefficient 2|P∩R| / (|P|+|R|) of one label (1.0 when both are empty).

    Parameters
    ----------
    pred, ref : numpy.ndarray
        Label arrays of the same shape.
    label : int
        The label value compared.

    Returns
    -------
    float
        In [0, 1].
    """
    p, r = _masks(pred, ref, label)
    total = int(p.sum()) + int(r.sum())
    return 1.0 if total == 0 else 2.0 * int((p & r).sum()) / total


def jaccard(pred: np.ndarray, ref: np.ndarray, label: int = 1) -> float:
    """Jaccard index |P∩R| / |P∪R| of one label (1.0 when both are empty).

    Parameters
    ----------
    pred, ref : numpy.ndarray
        Label arrays of the same shape.
    label : int
        The label value compared.

    Returns
    -------
    float
        In [0, 1].
    """
    p, r = _masks(pred, ref, label)
    union = int((p | r).sum())
    return 1.0 if union == 0 else int((p & r).sum()) / union


def sensitivity(pred: np.ndarray, ref: np.ndarray, label: int = 1) -> float:
    """True positive rate TP / (TP + FN) of one label (1.0 when the reference is empty).

    Parameters
    ----------
    pred, ref : numpy.ndarray
        Label arrays of the same shape.
    label : int
        The label value compared.

    Returns
    -------
    float
        In [0, 1].
    """
    p, r = _masks(pred, ref, label)
    positives = int(r.sum())
    return 1.0 if positives == 0 else int((p & r).sum()) / positives


def specificity(pred: np.ndarray, ref: np.ndarray, label: int = 1) -> float:
    """True negative rate TN / (TN + FP) of one label (1.0 when everything is positive).

    Parameters
    ----------
    pred, ref : numpy.ndarray
        Label arrays of the same shape.
    label : int
        The label value compared.

    Returns
    -------
    float
        In [0, 1].
    """
    p, r = _masks(pred, ref, label)
    negatives = int((~r).sum())
    return 1.0 if negatives == 0 else int((~p & ~r).sum()) / negatives


def volume_error(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], label: int = 1
) -> tuple[float, float]:
    """Signed volume error of one label, predicted minus reference.

    Parameters
    ----------
    pred, ref : numpy.ndarray
        Label arrays of the same shape.
    spacing : sequence of float
        Voxel size in mm, in the arrays' axis order.
    label : int
        The label value compared.

    Returns
    -------
    tuple of float
        (error in mm^3, error in percent of the reference volume; ``inf`` if it is 0 and the
        prediction is not, 0 if both are 0).
    """
    p, r = _masks(pred, ref, label)
    voxel = float(np.prod(spacing))
    vp, vr = float(p.sum()) * voxel, float(r.sum()) * voxel
    if vr == 0:
        return vp - vr, 0.0 if vp == 0 else float("inf")
    return vp - vr, 100.0 * (vp - vr) / vr


def _surface(mask: np.ndarray) -> np.ndarray:
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))
    return np.asarray(mask & ~eroded, dtype=bool)


def hausdorff95(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], label: int = 1
) -> float:
    """95th percentile Hausdorff distance of one label, in mm (the published HD95).

    The larger of the two directed 95th percentiles: of the distances from each surface
    voxel of ``pred`` to the surface of ``ref``, and from ``ref``'s to ``pred``'s (as
    MONAI's ``compute_hausdorff_distance(percentile=95)``; surfaces are the voxels that a
    6-connected erosion removes).

    Parameters
    ----------
    pred, ref : numpy.ndarray
        Label arrays of the same shape (2-D or 3-D).
    spacing : sequence of float
        Voxel size in mm, in the arrays' axis order.
    label : int
        The label value compared.

    Returns
    -------
    float
        ``max(P95(d(pred -> ref)), P95(d(ref -> pred)))``; 0 when both masks are empty,
        ``inf`` when one is.
    """
    p, r = _masks(pred, ref, label)
    if not p.any() and not r.any():
        return 0.0
    if not p.any() or not r.any():
        return float("inf")
    sp, sr = _surface(p), _surface(r)
    to_r = ndimage.distance_transform_edt(~sr, sampling=spacing)
    to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(max(np.percentile(to_r[sp], 95), np.percentile(to_p[sr], 95)))


def bootstrap_ci(
    values: Sequence[float], *, n: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean over cases (``scipy.stats``).

    Parameters
    ----------
    values : sequence of float
        One value per case.
    n : int
        Number of resamples.
    level : float
        Confidence level.
    seed : int
        Seed of the resampling (the interval is reproducible).

    Returns
    -------
    tuple of float
        (low, high).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if v.size == 1 or np.all(v == v[0]):
        return float(v[0]), float(v[0])  # no spread to resample
    result = stats.bootstrap(
        (v,),
        np.mean,
        n_resamples=n,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return float(interval.low), float(interval.high)


def auc(scores: Sequence[float], truth: Sequence[int]) -> float:
    """Area under the ROC curve (Mann-Whitney statistic, ties counted half).

    Parameters
    ----------
    scores : sequence of float
        Predicted probability of the positive class per case.
    truth : sequence of int
        1 for positive cases, 0 for negative.

    Returns
    -------
    float
        In [0, 1].

    Raises
    ------
    ValueError
        If there are no positive or no negative cases.
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth).astype(bool)
    pos, neg = s[t], s[~t]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("auc needs at least one positive and one negative case")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def f_beta(precision: float, recall: float, beta: float = 0.5) -> float:
    """F-beta score from precision and recall (0 when both are 0).

    Parameters
    ----------
    precision, recall : float
        In [0, 1].
    beta : float
        Weight of recall relative to precision (0.5 favours precision).

    Returns
    -------
    float
        In [0, 1].
    """
    b2 = beta * beta
    denom = b2 * precision + recall
    return 0.0 if denom == 0 else (1 + b2) * precision * recall / denom


_CLASSIFIER_METRICS = ("accuracy", "auc", "f0.5", "sensitivity", "specificity")


def _confusion(p: np.ndarray, t: np.ndarray) -> tuple[int, int, int, int]:
    return int((p & t).sum()), int((~p & ~t).sum()), int((p & ~t).sum()), int((~p & t).sum())


def _point(s: np.ndarray, t: np.ndarray, p: np.ndarray) -> dict[str, float]:
    tp, tn, fp, fn = _confusion(p, t)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else float("nan")
    area = float("nan")
    if t.any() and (~t).any():
        area = auc(s.tolist(), t.astype(int).tolist())
    return {
        "accuracy": (tp + tn) / t.size if t.size else float("nan"),
        "auc": area,
        "f0.5": f_beta(precision, 0.0 if math.isnan(recall) else recall, 0.5),
        "sensitivity": recall,
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
    }


def classification_metrics(
    scores: Sequence[float],
    truth: Sequence[int],
    threshold: float = 0.5,
    *,
    predicted: Sequence[int] | None = None,
    intervals: bool = False,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy, AUC, F0.5, sensitivity and specificity of a binary decision, with intervals.

    Parameters
    ----------
    scores : sequence of float
        Predicted probability of the positive class per case (ranks the cases for AUC).
    truth : sequence of int
        1 for positive cases, 0 for negative.
    threshold : float
        Scores at or above it count as positive (a sigmoid head's class threshold).
    predicted : sequence of int or None
        The decision per case when it is not a threshold on ``scores`` (a softmax head:
        1 where this class is the argmax); overrides ``threshold``.
    intervals : bool
        Add ``ci95``: a paired percentile bootstrap (``scipy.stats.bootstrap``) interval
        per metric, resampling cases.
    n_resamples, level, seed : int, float, int
        Bootstrap resamples, confidence level and seed (reproducible intervals).

    Returns
    -------
    dict
        ``accuracy``, ``auc``, ``f0.5``, ``sensitivity``, ``specificity`` (NaN where
        undefined, e.g. AUC with one class present; ``undefined`` then names each with the
        reason), ``n``, ``positives``, and with ``intervals`` ``ci95``: metric -> [low,
        high] (NaN bounds where resamples leave it undefined).
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth).astype(bool)
    if s.shape != t.shape:
        raise ValueError(f"{s.size} scores for {t.size} truth values")
    p = s >= threshold if predicted is None else np.asarray(predicted).astype(bool)
    out: dict[str, Any] = dict(_point(s, t, p))
    undefined = {}
    if not (t.any() and (~t).any()):
        undefined["auc"] = "needs at least one positive and one negative case"
    if not t.any():
        undefined["sensitivity"] = "no positive case"
    if t.all():
        undefined["specificity"] = "no negative case"
    out["n"], out["positives"] = int(t.size), int(t.sum())
    if undefined:
        out["undefined"] = undefined
    if intervals:
        out["ci95"] = _intervals(s, t, p, n_resamples, level, seed)
    return out


def _intervals(
    s: np.ndarray, t: np.ndarray, p: np.ndarray, n: int, level: float, seed: int
) -> dict[str, list[float]]:
    ci: dict[str, list[float]] = {}
    for name in _CLASSIFIER_METRICS:
        point = _point(s, t, p)[name]
        if t.size < 2 or math.isnan(point):
            ci[name] = [point, point] if t.size == 1 else [float("nan"), float("nan")]
            continue

        def statistic(si: np.ndarray, ti: np.ndarray, pi: np.ndarray, key: str = name) -> float:
            return _point(si, ti.astype(bool), pi.astype(bool))[key]

        with warnings.catch_warnings():
            # Resamples without one class leave AUC (or a rate) undefined: NaN, not noise.
            warnings.simplefilter("ignore")
            res = stats.bootstrap(
                (s, t.astype(int), p.astype(int)),
                statistic,
                paired=True,
                vectorized=False,
                n_resamples=n,
                confidence_level=level,
                method="percentile",
                rng=np.random.default_rng(seed),
            )
        dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
        dist = dist[np.isfinite(dist)]
        if dist.size == 0:
            ci[name] = [float("nan"), float("nan")]
        else:
            alpha = (1 - level) / 2
            ci[name] = [float(np.quantile(dist, alpha)), float(np.quantile(dist, 1 - alpha))]
    return ci

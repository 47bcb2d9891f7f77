"""Case lists and seeded splits shared by every recipe (MSD-style ``imagesTr``/``labelsTr``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["paired_cases", "split_names"]


def paired_cases(data: Path, *, more_than: int = 0) -> list[str]:
    """Cases with both an image and a label in an MSD-style folder.

    Parameters
    ----------
    data : pathlib.Path
        Folder with ``imagesTr`` and ``labelsTr`` of ``<case>.nii.gz`` files.
    more_than : int
        Fewest cases accepted minus one (a recipe's validation count).

    Returns
    -------
    list of str
        Sorted case names without ``.nii.gz``.

    Raises
    ------
    FileNotFoundError
        If a folder is missing, an image has no label, or there are too few cases (the
        message names the folder or the cases).
    """
    images, labels = data / "imagesTr", data / "labelsTr"
    for folder in (images, labels):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a folder (expected imagesTr and labelsTr)")
    names = sorted(p.name[: -len(".nii.gz")] for p in images.glob("[!._]*.nii.gz"))
    missing = [n for n in names if not (labels / f"{n}.nii.gz").is_file()]
    if missing:
        raise FileNotFoundError(f"{labels}: no label for {', '.join(missing[:5])}")
    if len(names) <= more_than:
        raise FileNotFoundError(f"{images}: {len(names)} cases, need more than {more_than}")
    return names


def split_names(names: Sequence[str], seed: int, n_val: int) -> tuple[list[str], list[str]]:
    """A fixed seeded split: the first ``n_val`` of a permutation of the sorted names.

    Parameters
    ----------
    names : sequence of str
        Case (or patient) names; their order does not matter.
    seed : int
        Seed of ``numpy.random.default_rng(seed).permutation``.
    n_val : int
        Number of validation names.

    Returns
    -------
    tuple of list of str
        (training names, validation names), each sorted; no name on both sides.
    """
    order = np.random.default_rng(seed).permutation(sorted(names))
    return sorted(str(n) for n in order[n_val:]), sorted(str(n) for n in order[:n_val])

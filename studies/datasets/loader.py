""":func:`load_dataset`, the one entry point: checks the options, dispatches to the built-in
data (:mod:`.digits`, :mod:`.mnist`) or the user's own (:mod:`.user`), and validates the
result for the intended observation model."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from pyro_lvm.studies.datasets.dataset import (COUNT_LIKELIHOODS, LIKELIHOODS, Dataset,
                                               validate_for_likelihood)
from pyro_lvm.studies.datasets.digits import _load_digits
from pyro_lvm.studies.datasets.mnist import _load_mnist
from pyro_lvm.studies.datasets.transforms import _check_split
from pyro_lvm.studies.datasets.user import _load_user, _looks_like_path

BUILTIN_DATASETS = ("digits", "binarized-mnist")


def load_dataset(
    name_or_data: Union[str, os.PathLike, np.ndarray, torch.Tensor, Mapping, Any] = "digits",
    *,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    binarize: bool = False,
    threshold: Optional[float] = None,
    scale: Optional[str] = "auto",
    likelihood: Optional[str] = None,
    mask=None,
    allow_missing: bool = False,
    drop_constant: Optional[bool] = None,
    data_path: Optional[Union[str, os.PathLike]] = None,
    max_rows: Optional[int] = None,
    labels=None,
    label_column: Optional[str] = None,
    name: Optional[str] = None,
    dequantize: bool = False,
) -> Dataset:
    """Load, split, scale and validate a dataset.

    Parameters
    ----------
    name_or_data
        ``"digits"``, ``"binarized-mnist"``, a path to a CSV / ``.npy`` file, an array,
        tensor or DataFrame, or a dict ``{"train": ..., "valid": ..., "test": ...}`` of
        those (``"valid"`` optional) for data with a fixed split.
    split : (train, valid, test) fractions
        Used for data without a fixed split (digits, a single user table); must be
        non-negative and sum to 1. Rows are shuffled with ``seed`` first; the split is
        therefore deterministic given ``seed``.
    seed : int
        Seed of the shuffle (a private ``numpy`` generator; global RNGs are untouched).
    binarize : bool
        Threshold continuous data to {0, 1}: ``x > threshold``.
    threshold : float, optional
        Binarization threshold; default 8 for digits (half of 0..16), 0.5 otherwise.
    scale : {"auto", "standardize", "minmax", None}
        Scaling fitted on the training split: ``(x - mean) / sd`` or ``(x - min) / range``.
        ``"auto"`` standardizes continuous digits and leaves binary and user data as given.
    likelihood : {"bernoulli", "gaussian", "studentt", "poisson", "negbinomial", "binomial", \
"categorical"}, optional
        The observation model the data are meant for, to validate against: Bernoulli and
        categorical need values in {0, 1}; Gaussian and Student-t need no constant column;
        the count models need non-negative integers (and ``scale="auto"`` then leaves digits
        unscaled, as counts 0..16). Whatever is passed, the loaded :class:`Dataset` records
        the detected ``kind`` and its ``suitable_likelihoods``.
    mask : array of bool, optional
        Observed-entry mask of user data (True = observed), same shape as the data.
    allow_missing : bool
        Turn NaN entries of user data into a missing-value mask instead of an error
        (infinite values are still an error).
    drop_constant : bool, optional
        Drop columns that are constant in the training split. Default: True for continuous
        digits; for user data a constant column is an error (naming it) when the
        likelihood is Gaussian / Student-t or the data are scaled, unless this is True.
    data_path : path, optional
        File or directory with binarized MNIST (overrides ``$PYRO_LVM_DATA``).
    max_rows : int, optional
        Keep at most this many rows per split (first rows after the shuffle); for quick
        smoke runs. Checksums are verified on the full files first.
    labels : array, optional
        Class labels of user data (one per row; or a dict per split).
    label_column : str, optional
        Column of a DataFrame / CSV holding labels (removed from the features).
    name : str, optional
        Name of user data (default: file stem or ``"user-data"``).
    dequantize : bool
        Continuous digits only: add independent :math:`U(0, 1)` noise to the integer pixel
        values (seeded by ``seed``) before scaling. A density model of integer-valued data
        can put unbounded density on the integers; a density of the dequantized data is a
        lower bound on the log-probability of the integers (Theis, van den Oord & Bethge
        2016), which makes held-out log-likelihoods of continuous models comparable.

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError
        Unknown dataset name or option; data that fail validation (the message names the
        problem and its rows / columns); a binarized-MNIST file whose checksum differs.
    FileNotFoundError
        Binarized MNIST not found: the message lists every place searched and how to point
        the loader at the file (``data_path=`` / ``--data-path`` / ``$PYRO_LVM_DATA``).
    """
    fractions, scale = _checked_options(name_or_data, split, scale, likelihood, max_rows,
                                        dequantize)
    is_name = isinstance(name_or_data, str)
    if is_name and name_or_data == "digits":
        ds = _load_digits(fractions, seed, binarize, threshold, scale, drop_constant, max_rows,
                          dequantize)
    elif is_name and name_or_data == "binarized-mnist":
        ds = _load_mnist(data_path, binarize, scale, max_rows)
    else:
        ds = _load_user(name_or_data, fractions, seed, binarize, threshold, scale, likelihood,
                        mask, allow_missing, drop_constant, max_rows, labels, label_column, name)
    if likelihood is not None:
        validate_for_likelihood(ds, likelihood)
    return ds


def _checked_options(name_or_data, split, scale, likelihood, max_rows, dequantize
                     ) -> Tuple[Tuple[float, float, float], Optional[str]]:
    """Every option of :func:`load_dataset` checked before any data are read. Returns the
    split fractions and the scale (``"auto"`` becomes None for a count model: counts stay
    counts)."""
    if scale not in ("auto", "standardize", "minmax", None):
        raise ValueError(f"scale must be 'auto', 'standardize', 'minmax' or None, got {scale!r}")
    if likelihood is not None and likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS} or None, got {likelihood!r}")
    if max_rows is not None and (int(max_rows) != max_rows or max_rows < 1):
        raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
    fractions = _check_split(split)
    if likelihood in COUNT_LIKELIHOODS and scale == "auto":
        scale = None  # counts stay counts
    if dequantize and not (isinstance(name_or_data, str) and name_or_data == "digits"):
        raise ValueError("dequantize=True is implemented for the integer-valued 'digits' only")
    if isinstance(name_or_data, str) and name_or_data not in BUILTIN_DATASETS \
            and not _looks_like_path(name_or_data):
        raise ValueError(
            f"unknown dataset {name_or_data!r}: expected one of {list(BUILTIN_DATASETS)}, a path "
            f"to a .csv/.tsv/.txt/.npy file, an array, a DataFrame, or a dict of splits"
        )
    return fractions, scale

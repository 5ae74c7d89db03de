r"""Amputation: make complete data incomplete, with a known mechanism, a seed and a target
missing rate, to test imputation methods against the held-out truth.

Mechanisms (Rubin 1976; the constructions of Schouten, Lugtig & Vink 2018 and of the MIWAE
and "missing data imputation with optimal transport" benchmarks, Muzellec et al. 2020):

* ``"mcar"`` -- missing completely at random: each entry independently with probability
  ``rate``.
* ``"mar"`` -- missing at random: a random ``observed_fraction`` of the columns is always
  observed; each other entry is missing with probability
  :math:`\sigma(\beta_j^\top \tilde x_{i,\text{obs}} + b_j)`, a logistic function of the
  row's (standardized) always-observed columns with random weights :math:`\beta_j`, and
  intercepts :math:`b_j` found by bisection so that the expected missing rate over the whole
  matrix is ``rate``.
* ``"mnar"`` -- missing not at random, self-masking: entry :math:`(i, j)` is missing with
  probability :math:`\sigma(s\, \tilde x_{ij} + b_j)` (large values more often missing for
  ``strength`` :math:`s > 0`), :math:`b_j` by bisection so that the expected rate is ``rate``.

No row is left without an observed entry (models condition on at least one value): in such a
row one entry, chosen at random, is kept, which lowers the realized rate by at most
(number of such rows) / (number of entries).
"""
from __future__ import annotations

import numpy as np

__all__ = ["ampute", "MECHANISMS"]

MECHANISMS = ("mcar", "mar", "mnar")


def _sigmoid(t):
    return 1.0 / (1.0 + np.exp(-t))


def _intercepts(scores: np.ndarray, target: float) -> np.ndarray:
    """Per column ``b_j`` with mean(sigmoid(scores[:, j] + b_j)) = target (bisection)."""
    lo = np.full(scores.shape[1], -50.0)
    hi = np.full(scores.shape[1], 50.0)
    for _ in range(100):
        mid = (lo + hi) / 2
        too_high = _sigmoid(scores + mid).mean(0) > target
        hi = np.where(too_high, mid, hi)
        lo = np.where(too_high, lo, mid)
    return (lo + hi) / 2


def _standardize(x: np.ndarray) -> np.ndarray:
    sd = x.std(0)
    return (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)


def ampute(x, rate: float, mechanism: str = "mcar", *, seed: int = 0,
           observed_fraction: float = 0.3, strength: float = 2.0) -> np.ndarray:
    """Observed-entry mask (bool, True = observed) for complete data ``x`` ``[n, p]``.

    Parameters
    ----------
    x : array-like ``[n, p]``, finite
    rate : float in (0, 1)
        Target fraction of missing entries over the whole matrix (met in expectation).
    mechanism : {"mcar", "mar", "mnar"}
        See the module docstring.
    seed : int
        Seeds a ``numpy.random.Generator``; the same arguments give the same mask.
    observed_fraction : float
        ``"mar"``: fraction of columns that are always observed (at least one); ``rate`` must
        be below ``1 - observed_fraction`` of the matrix.
    strength : float
        ``"mar"``: scale of the logistic weights; ``"mnar"``: the self-masking slope.

    Raises
    ------
    ValueError
        Non-finite or non-2-D data, a rate outside (0, 1) or unreachable for ``"mar"``,
        an unknown mechanism.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 2:
        raise ValueError(f"x must be 2-D with at least 2 columns, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("x must be complete (finite) to be amputed")
    if not 0 < rate < 1:
        raise ValueError(f"rate must be in (0, 1), got {rate!r}")
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    rng = np.random.default_rng(seed)
    n, p = arr.shape
    if mechanism == "mcar":
        missing = rng.random((n, p)) < rate
    elif mechanism == "mnar":
        scores = strength * _standardize(arr)
        missing = rng.random((n, p)) < _sigmoid(scores + _intercepts(scores, rate))
    else:
        n_obs = max(1, int(round(observed_fraction * p)))
        if n_obs >= p:
            raise ValueError(f"observed_fraction={observed_fraction} leaves no column to amputate")
        cols = rng.permutation(p)
        always, others = cols[:n_obs], cols[n_obs:]
        col_rate = rate * p / len(others)
        if col_rate >= 1:
            raise ValueError(f"rate={rate} is unreachable with {n_obs} of {p} columns always "
                             f"observed (at most {len(others) / p:.3f}); lower observed_fraction")
        z = _standardize(arr[:, always])
        weights = rng.normal(size=(n_obs, len(others))) * strength / np.sqrt(n_obs)
        scores = z @ weights
        probs = _sigmoid(scores + _intercepts(scores, col_rate))
        missing = np.zeros((n, p), dtype=bool)
        missing[:, others] = rng.random((n, len(others))) < probs
    empty = np.nonzero(missing.all(1))[0]
    if len(empty):
        missing[empty, rng.integers(0, p, len(empty))] = False
    return ~missing

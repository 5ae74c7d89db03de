"""Datasets for the studies: the embedded default, binarized MNIST, and the user's own data.

Every loader returns a :class:`Dataset` with fixed train / validation / test splits as
``float32`` tensors, validated *before* any model sees them, so a study never dies halfway
through a grid on bad data.

Built-in data
-------------
``"digits"``
    scikit-learn's bundled 8x8 handwritten digits (1797 rows, 64 pixels with values 0..16,
    labels 0..9; Alpaydin & Kaynak 1998). Ships with scikit-learn, so it needs no download
    and is the embedded default. Two views:

    * binarized (``binarize=True``): pixel > 8 (half the 0..16 range) -> 1, else 0; all
      64 pixels kept (a pixel that is always 0 just gets a very negative logit under a
      Bernoulli model). This is the default view of the studies with a Bernoulli model.
    * continuous (default): columns that are constant in the training split are dropped
      (three border pixels are 0 in every image), because a Gaussian / Student-t
      observation model has an unbounded likelihood on a constant column and
      standardization would divide by zero; the remaining columns are standardized with
      the training mean and standard deviation (``scale="standardize"``) or mapped to
      [0, 1] by the training range (``scale="minmax"``). :meth:`Dataset.to_images` undoes
      both steps for pictures.

    There is no fixed split: rows are shuffled with ``seed`` and cut by ``split``
    (default 80 / 10 / 10 %).

``"binarized-mnist"``
    The static binarization of MNIST by Larochelle & Murray (2011), 50000 / 10000 / 10000
    rows of 784 binary pixels, the split used by the IWAE and VampPrior papers. Read from
    ``binarized_mnist.npz`` (keys train/valid/test, rows bit-packed:
    ``np.unpackbits(a, axis=1)[:, :784]``) or the original ``binarized_mnist_{train,valid,
    test}.amat`` text files, found at ``data_path``, the ``PYRO_LVM_DATA`` environment
    variable (a file or a directory) or a few default places (see :func:`mnist_search_paths`).
    Each split is checked against its published SHA-256 (:data:`MNIST_SHA256`).

User data
---------
numpy arrays, torch tensors, pandas DataFrames, CSV paths (``.csv``/``.tsv``/``.txt``) or
``.npy`` files; either one table (split like digits) or a dict with ``"train"``, ``"test"``
and optionally ``"valid"``. Checked for non-numeric columns (named), NaN / infinite values
(row and column), widths that disagree between splits, constant columns (for Gaussian /
Student-t models, or when scaling) and values outside {0, 1} (for a Bernoulli model). With
``allow_missing=True`` NaN entries become a missing-value mask (``Dataset.masks``) instead
of an error; the models then score only the observed entries.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from pyro_lvm.models.validation import (check_binary, check_column_variance, check_counts,
                                        check_data, check_magnitude, constant_columns,
                                        check_mask)
from pyro_lvm.paths import checkout_root

__all__ = [
    "Dataset",
    "load_dataset",
    "load_binarized_mnist_arrays",
    "contaminate",
    "mnist_search_paths",
    "BUILTIN_DATASETS",
    "LIKELIHOODS",
    "COUNT_LIKELIHOODS",
    "SUITABLE_LIKELIHOODS",
    "MNIST_SHA256",
    "ENV_VAR",
]

#: Environment variable naming the binarized-MNIST file or the directory holding it.
ENV_VAR = "PYRO_LVM_DATA"
BUILTIN_DATASETS = ("digits", "binarized-mnist")
#: Observation models the loader knows how to validate for.
LIKELIHOODS = ("bernoulli", "gaussian", "studentt", "poisson", "negbinomial", "binomial",
               "categorical")
#: Observation models of counts (non-negative integers).
COUNT_LIKELIHOODS = ("poisson", "negbinomial", "binomial")
#: What :attr:`Dataset.kind` can be, and the observation models that suit each kind.
SUITABLE_LIKELIHOODS = {
    "binary": ("bernoulli", "categorical"),
    "count": ("poisson", "negbinomial", "binomial"),
    "continuous": ("gaussian", "studentt"),
}
SPLITS = ("train", "valid", "test")
MNIST_FILE = "binarized_mnist.npz"
MNIST_AMAT = {s: f"binarized_mnist_{s}.amat" for s in SPLITS}
MNIST_ROWS = {"train": 50000, "valid": 10000, "test": 10000}
#: SHA-256 of each split as an unpacked ``uint8`` array of 0/1, ``X.tobytes()`` (C order,
#: shape [rows, 784]); the values listed in ../shared/data/README.md.
MNIST_SHA256 = {
    "train": "43490d4d6ac9002727af4426d8748609fdb7e4094fa65ad8d681ea60082a7a5a",
    "valid": "069b4f0beb389b776478c3e872b4df71c95ac4be64d7cbe6d32e24ebac8e6d5e",
    "test": "ca0294c3b8d984c7a1dc891015a8eea6f37bae59a34e35ea0fc8c47110a8dd86",
}
DIGITS_THRESHOLD = 8.0  # pixels are 0..16; > 8 means "more ink than not"

ArrayLike = Union[np.ndarray, torch.Tensor, "pandas.DataFrame", str, os.PathLike]


@dataclass
class Dataset:
    """A dataset cut into train / validation / test splits, ready for a model.

    Attributes
    ----------
    name : str
        Short name (``"digits"``, ``"binarized-mnist"``, a file stem, ``"user-data"``).
    train, valid, test : torch.Tensor
        ``float32`` tensors of shape ``[n_split, data_dim]`` (``valid`` may have 0 rows).
        Missing entries (see ``masks``) hold 0.
    labels : dict of numpy arrays, optional
        Class labels per split (digits: 0..9), used to colour latent-space plots only.
    masks : dict of bool tensors, optional
        Observed-entry masks per split (True = observed) when the data have missing values.
    image_shape : tuple of int, optional
        ``(8, 8)`` for digits, ``(28, 28)`` for MNIST, None for tabular data.
    discrete : bool
        True for binary data (Bernoulli models; bits per dimension make sense).
    kind : {"binary", "count", "continuous"}
        Detected from the values the models see (observed entries): all in {0, 1}; all
        non-negative integers (e.g. digits with ``scale=None``, an integer-valued CSV); anything
        else. :attr:`suitable_likelihoods` lists the observation models for it.
    source : str
        Where the data came from (file path, scikit-learn, array) and what was done to it.
    feature_names : list of str, optional
        Column names of the kept columns.
    kept_columns : numpy int array, optional
        Indices of the kept columns among the original ones (continuous digits drop
        constant pixels); None when every column is kept.
    original_dim : int
        Number of columns before dropping.
    fill_values : numpy array, optional
        Raw values of the dropped columns (used by :meth:`to_images`).
    scaling : dict, optional
        ``{"method": ..., "loc": array, "scale": array}`` with ``x_scaled = (x - loc) / scale``,
        fitted on the training split; None when the data are used as given.
    sha256 : str
        SHA-256 over the split names, shapes and ``float32`` bytes (and masks) of exactly what
        the models see; a study records it so every number can be traced to its data.
    """

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    labels: Optional[Dict[str, np.ndarray]] = None
    masks: Optional[Dict[str, torch.Tensor]] = None
    image_shape: Optional[Tuple[int, ...]] = None
    discrete: bool = False
    source: str = ""
    feature_names: Optional[List[str]] = None
    kept_columns: Optional[np.ndarray] = None
    original_dim: Optional[int] = None
    fill_values: Optional[np.ndarray] = None
    scaling: Optional[Dict[str, Any]] = None
    sha256: str = field(default="", init=False)
    kind: str = field(default="", init=False)

    def __post_init__(self):
        for split in SPLITS:
            x = getattr(self, split)
            if not isinstance(x, torch.Tensor) or x.dim() != 2:
                raise ValueError(f"Dataset.{split} must be a 2-D tensor, got {type(x).__name__}")
        widths = {s: getattr(self, s).shape[1] for s in SPLITS}
        if len(set(widths.values())) != 1:
            raise ValueError(f"splits of {self.name!r} have different widths: {widths}")
        if self.original_dim is None:
            self.original_dim = self.data_dim
        self.sha256 = self._hash()
        self.kind = self._detect_kind()

    def _detect_kind(self) -> str:
        binary, count = True, True
        for split in SPLITS:
            x = getattr(self, split)
            m = self.mask(split)
            if m is not None:
                x = x[m.bool()]
            if x.numel() == 0:
                continue
            binary = binary and bool(((x == 0) | (x == 1)).all())
            count = count and bool(((x >= 0) & (x == torch.round(x))).all())
        return "binary" if binary else "count" if count else "continuous"

    @property
    def suitable_likelihoods(self) -> Tuple[str, ...]:
        """Observation models that suit the data's :attr:`kind` (binary: Bernoulli, or
        categorical when the columns are one-hot groups; counts: Poisson, negative binomial,
        binomial with ``total_count >=`` :attr:`max_count`; continuous: Gaussian, Student-t)."""
        return SUITABLE_LIKELIHOODS[self.kind]

    @property
    def max_count(self) -> Optional[int]:
        """Largest value over all splits for count or binary data (a lower bound for a
        binomial's ``total_count``), None for continuous data."""
        if self.kind == "continuous":
            return None
        return int(max(float(getattr(self, s).max()) for s in SPLITS if getattr(self, s).numel()))

    # ------------------------------------------------------------------ accessors
    @property
    def data_dim(self) -> int:
        return int(self.train.shape[1])

    @property
    def sizes(self) -> Dict[str, int]:
        return {s: int(getattr(self, s).shape[0]) for s in SPLITS}

    def mask(self, split: str) -> Optional[torch.Tensor]:
        """Observed-entry mask of a split, or None when fully observed."""
        return None if self.masks is None else self.masks.get(split)

    def label(self, split: str) -> Optional[np.ndarray]:
        """Labels of a split, or None."""
        return None if self.labels is None else self.labels.get(split)

    def summary(self) -> Dict[str, Any]:
        """JSON-serializable description (for ``study.json``)."""
        return {
            "name": self.name,
            "data_dim": self.data_dim,
            "original_dim": self.original_dim,
            "sizes": self.sizes,
            "shape": {s: list(getattr(self, s).shape) for s in SPLITS},
            "sha256": self.sha256,
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "discrete": self.discrete,
            "kind": self.kind,
            "suitable_likelihoods": list(self.suitable_likelihoods),
            "max_count": self.max_count,
            "has_labels": self.labels is not None,
            "has_missing": self.masks is not None,
            "kept_columns": None if self.kept_columns is None else self.kept_columns.tolist(),
            "scaling": None if self.scaling is None else self.scaling["method"],
            "source": self.source,
        }

    # ------------------------------------------------------------------ pictures
    def inverse_transform(self, x) -> np.ndarray:
        """Undo the scaling: map model-space rows ``[n, data_dim]`` back to raw units."""
        arr = _to_numpy(x).astype(np.float64)
        if self.scaling is not None:
            arr = arr * self.scaling["scale"] + self.scaling["loc"]
        return arr

    def to_images(self, x) -> Optional[np.ndarray]:
        """Rows ``[n, data_dim]`` as images ``[n, *image_shape]`` in raw units (dropped
        constant columns filled with their value), or None for non-image data."""
        if self.image_shape is None:
            return None
        arr = self.inverse_transform(x)
        if self.kept_columns is not None:
            full = np.empty((arr.shape[0], self.original_dim), dtype=np.float64)
            dropped = np.setdiff1d(np.arange(self.original_dim), self.kept_columns)
            full[:, dropped] = self.fill_values
            full[:, self.kept_columns] = arr
            arr = full
        return arr.reshape((arr.shape[0],) + tuple(self.image_shape))

    def _hash(self) -> str:
        h = hashlib.sha256()
        for split in SPLITS:
            x = getattr(self, split).detach().cpu().to(torch.float32).contiguous().numpy()
            h.update(f"{split}:{x.shape}".encode())
            h.update(x.tobytes())
            m = self.mask(split)
            if m is not None:
                h.update(b"mask")
                h.update(m.detach().cpu().numpy().astype(np.uint8).tobytes())
        return h.hexdigest()


# ====================================================================== public loader
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
    if isinstance(name_or_data, str) and name_or_data in BUILTIN_DATASETS:
        if name_or_data == "digits":
            ds = _load_digits(fractions, seed, binarize, threshold, scale, drop_constant, max_rows,
                              dequantize)
        else:
            ds = _load_mnist(data_path, binarize, scale, max_rows)
    elif isinstance(name_or_data, str) and not _looks_like_path(name_or_data):
        raise ValueError(
            f"unknown dataset {name_or_data!r}: expected one of {list(BUILTIN_DATASETS)}, a path "
            f"to a .csv/.tsv/.txt/.npy file, an array, a DataFrame, or a dict of splits"
        )
    else:
        ds = _load_user(name_or_data, fractions, seed, binarize, threshold, scale, likelihood,
                        mask, allow_missing, drop_constant, max_rows, labels, label_column, name)
    if likelihood is not None:
        validate_for_likelihood(ds, likelihood)
    return ds


def validate_for_likelihood(ds: Dataset, likelihood: str, total_count=None) -> None:
    """Check a loaded dataset against an observation model (ValueError naming the problem,
    its split, rows and columns). ``total_count`` bounds the values for a binomial model."""
    if likelihood in COUNT_LIKELIHOODS:
        model = {"poisson": "Poisson", "negbinomial": "negative binomial"}.get(likelihood, likelihood)
        limit = total_count if likelihood == "binomial" else None
        if ds.scaling is not None:
            raise ValueError(f"{ds.name} was scaled ({ds.scaling['method']}); a {model} model needs "
                             f"the raw counts: load it with scale=None")
        for split in SPLITS:
            check_counts(getattr(ds, split), name=f"{ds.name} {split} split", mask=ds.mask(split),
                         total_count=limit, model=model)
    elif likelihood in ("bernoulli", "categorical"):
        for split in SPLITS:
            check_binary(getattr(ds, split), name=f"{ds.name} {split} split", mask=ds.mask(split))
    elif likelihood in ("gaussian", "studentt"):
        check_column_variance(ds.train.double(), ds.mask("train"), name=f"{ds.name} train split",
                              model=likelihood, feature_names=ds.feature_names)
    else:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def contaminate(dataset: Dataset, fraction: float = 0.05, scale: float = 10.0,
                seed: int = 0) -> Dataset:
    """Add gross errors to a fraction of the *training* rows (validation and test untouched).

    Rows :math:`i \\in O` (``round(fraction * n_train)`` of them, chosen with ``seed``)
    become :math:`x_i + s\\,\\varepsilon_i`, :math:`\\varepsilon_i \\sim \\mathcal{N}(0, I)`,
    with :math:`s` = ``scale`` in the units of the (usually standardized) data. Missing
    entries (``dataset.masks``) stay 0. Returns a new :class:`Dataset` whose ``name``,
    ``source`` and ``sha256`` record the change; ``fraction == 0`` returns ``dataset``.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"outlier fraction must be in [0, 1), got {fraction!r}")
    if not scale > 0:
        raise ValueError(f"outlier scale must be positive, got {scale!r}")
    if fraction == 0:
        return dataset
    rng = np.random.default_rng(seed)
    train = dataset.train.clone()
    n = train.shape[0]
    rows = rng.choice(n, size=int(round(fraction * n)), replace=False)
    noise = torch.as_tensor(rng.standard_normal((len(rows), train.shape[1])), dtype=train.dtype)
    mask = dataset.mask("train")
    if mask is not None:
        noise = noise * mask[torch.as_tensor(rows)]
    train[torch.as_tensor(rows, dtype=torch.long)] += scale * noise
    return dataclasses.replace(
        dataset, train=train, name=f"{dataset.name}-contaminated",
        source=f"{dataset.source}; {len(rows)} training rows ({100 * fraction:g}%) with gross "
               f"errors x + {scale:g} * N(0, I) (seed {seed}); validation and test rows clean")


# ====================================================================== digits
def _load_digits(fractions, seed, binarize, threshold, scale, drop_constant, max_rows,
                 dequantize=False) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = bunch.data.astype(np.float64)  # [1797, 64], values 0..16
    y = bunch.target.astype(np.int64)
    idx = _split_indices(raw.shape[0], fractions, seed)
    parts = {s: raw[i] for s, i in idx.items()}
    labels = {s: y[i] for s, i in idx.items()}
    # rows are cut before any statistic (constant columns, scaling) is computed on them
    parts, labels, _ = _limit_rows(parts, labels, max_rows)
    source = "scikit-learn load_digits (UCI optical digits, 8x8, values 0..16)"
    if binarize:
        if dequantize:
            raise ValueError("dequantize applies to continuous digits, not to binarized ones")
        thr = DIGITS_THRESHOLD if threshold is None else float(threshold)
        parts = {s: (a > thr).astype(np.float64) for s, a in parts.items()}
        source += f"; binarized: pixel > {thr:g}"
        if scale not in ("auto", None):
            raise ValueError(f"scale={scale!r} would make binarized digits non-binary; use scale=None")
        ds_name, scaling, kept, fill = "digits-binarized", None, None, None
    else:
        ds_name = "digits"
        if dequantize:
            noise = np.random.default_rng([seed, 1]).random(raw.shape)  # one draw per pixel
            parts = {s: parts[s] + noise[idx[s][:len(parts[s])]] for s in SPLITS}
            source += "; dequantized: pixel + U(0, 1)"
            ds_name = "digits-dequantized"
        drop = True if drop_constant is None else drop_constant
        method = "standardize" if scale == "auto" else scale
        parts, kept, fill, note = _drop_constant_columns(parts, drop, True, None)
        source += note
        parts, scaling = _apply_scaling(parts, method)
        if scaling is not None:
            source += f"; {method} with training-split statistics"
    source += (f"; first {max_rows} rows per split" if max_rows else "") + f"; shuffled with seed {seed}, split {_fmt_split(fractions)}"
    return Dataset(
        name=ds_name, **{s: _float32(parts[s]) for s in SPLITS}, labels=labels,
        image_shape=(8, 8), discrete=bool(binarize), source=source,
        feature_names=[f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
        if kept is None else [f"pixel_{k // 8}_{k % 8}" for k in kept],
        kept_columns=kept, original_dim=64, fill_values=fill, scaling=scaling,
    )


# ====================================================================== binarized MNIST
_MNIST_CACHE: Dict[Tuple, Dict[str, np.ndarray]] = {}


def mnist_search_paths(data_path=None) -> List[Tuple[pathlib.Path, str]]:
    """Where binarized MNIST is looked for, in order, with why each place is searched.

    An explicit ``data_path`` is the only place searched; otherwise ``$PYRO_LVM_DATA``
    (when set) is the only place; otherwise the defaults: when running from a checkout,
    ``../shared/data`` next to it and ``<checkout>/data``; then ``./data`` and ``.``.
    """
    if data_path is not None:
        return [(pathlib.Path(data_path).expanduser(), "data_path argument (--data-path)")]
    env = os.environ.get(ENV_VAR)
    if env:
        return [(pathlib.Path(env).expanduser(), f"${ENV_VAR}")]
    cwd = pathlib.Path.cwd()
    places = []
    root = checkout_root()  # only a checkout has a "next to the repository"; never site-packages
    if root is not None:
        places += [(root.parent / "shared" / "data", "default (../shared/data next to the checkout)"),
                   (root / "data", "default (<checkout>/data)")]
    return places + [
        (cwd / "data", "default (./data)"),
        (cwd, "default (current directory)"),
    ]


def _resolve_mnist_source(data_path=None) -> Tuple[pathlib.Path, str]:
    """Return (path, kind) with kind 'npz' (a file) or 'amat' (a directory)."""
    looked = []
    for place, why in mnist_search_paths(data_path):
        if place.is_file():
            if place.suffix == ".npz":
                return place, "npz"
            if place.suffix == ".amat":  # one of the three files: use its directory
                place = place.parent
            else:
                raise ValueError(
                    f"{place} ({why}) is neither {MNIST_FILE} nor a .amat file of binarized MNIST"
                )
        if place.is_dir():
            if (place / MNIST_FILE).is_file():
                return place / MNIST_FILE, "npz"
            if all((place / f).is_file() for f in MNIST_AMAT.values()):
                return place, "amat"
            looked.append(f"  {place / MNIST_FILE}  [{why}]  (and the .amat files)")
        else:
            looked.append(f"  {place}  [{why}]  (does not exist)")
    raise FileNotFoundError(
        "binarized MNIST not found. Looked in:\n" + "\n".join(looked) + "\n"
        f"Provide {MNIST_FILE} (keys train/valid/test, bit-packed rows) or the three files "
        f"{', '.join(MNIST_AMAT.values())} (Larochelle & Murray 2011) and point to the file or "
        f"its directory with --data-path / load_dataset(..., data_path=...) or the environment "
        f"variable {ENV_VAR}."
    )


def load_binarized_mnist_arrays(data_path=None, *, verify: bool = True) -> Dict[str, np.ndarray]:
    """The three splits of binarized MNIST as ``uint8`` arrays of 0/1, ``[rows, 784]``.

    Verifies each split's SHA-256 against :data:`MNIST_SHA256` (of ``X.tobytes()``).
    Results are cached per file (path, size, modification time).
    """
    path, kind = _resolve_mnist_source(data_path)
    stat_of = [path] if kind == "npz" else [path / f for f in MNIST_AMAT.values()]
    key = (str(path.resolve()), kind, tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in stat_of),
           tuple(sorted(MNIST_SHA256.items())) if verify else None)
    if key in _MNIST_CACHE:
        return _MNIST_CACHE[key]
    arrays = {}
    if kind == "npz":
        try:
            with np.load(path) as z:
                missing = [s for s in SPLITS if s not in z.files]
                if missing:
                    raise ValueError(f"{path} lacks key(s) {missing}; expected train/valid/test")
                for s in SPLITS:
                    packed = z[s]
                    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != 98:
                        raise ValueError(
                            f"{path}[{s!r}] has dtype {packed.dtype}, shape {packed.shape}; expected "
                            f"bit-packed uint8 rows of shape [rows, 98] (784 pixels)"
                        )
                    arrays[s] = np.ascontiguousarray(np.unpackbits(packed, axis=1)[:, :784])
        except ValueError:
            raise
        except Exception as exc:  # bad zip, truncated file, pickled objects, ...
            raise ValueError(f"could not read {path} as a .npz file: {exc}") from None
    else:
        import pandas as pd

        for s, fname in MNIST_AMAT.items():
            f = path / fname
            try:
                table = pd.read_csv(f, sep=r"\s+", header=None, dtype=np.float64).to_numpy()
            except Exception as exc:
                raise ValueError(f"could not parse {f}: {exc}") from None
            if table.ndim != 2 or table.shape[1] != 784 or not np.isin(table, (0.0, 1.0)).all():
                raise ValueError(f"{f} must hold rows of 784 values in {{0, 1}}; got shape {table.shape}")
            arrays[s] = table.astype(np.uint8)
    if verify:
        for s in SPLITS:
            digest = hashlib.sha256(arrays[s].tobytes()).hexdigest()
            if digest != MNIST_SHA256[s]:
                raise ValueError(
                    f"SHA-256 mismatch for the {s} split of binarized MNIST read from {path}: "
                    f"got {digest}, expected {MNIST_SHA256[s]} ({arrays[s].shape[0]} rows read, "
                    f"{MNIST_ROWS[s]} expected). The file is corrupted or a different "
                    f"binarization; re-download it (see ../shared/data/README.md)."
                )
    _MNIST_CACHE.clear()  # keep at most one copy (~55 MB) in memory
    _MNIST_CACHE[key] = arrays
    return arrays


def _load_mnist(data_path, binarize, scale, max_rows) -> Dataset:
    arrays = load_binarized_mnist_arrays(data_path)
    path, kind = _resolve_mnist_source(data_path)
    parts = {s: a.astype(np.float64) for s, a in arrays.items()}
    source = (f"statically binarized MNIST (Larochelle & Murray 2011) from {path} ({kind}); "
              f"SHA-256 verified")
    scaling = None
    parts, _, _ = _limit_rows(parts, None, max_rows)
    if scale not in ("auto", None):
        parts, scaling = _apply_scaling(parts, scale)
        source += f"; {scale} with training-split statistics"
    if max_rows is not None:
        source += f"; first {max_rows} rows per split"
    return Dataset(name="binarized-mnist", **{s: _float32(parts[s]) for s in SPLITS},
                   image_shape=(28, 28), discrete=scaling is None, source=source, scaling=scaling)


# ====================================================================== user data
def _load_npy(path: pathlib.Path) -> np.ndarray:
    """A numeric ``.npy`` array; never unpickles (``allow_pickle=False``)."""
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic != b"\x93NUMPY":
        raise ValueError(f"not a NumPy .npy file: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ValueError(f"{path} holds Python objects, not numbers (object arrays are never "
                             f"loaded: they could run code); save a numeric array") from None
        raise ValueError(f"could not read {path} as a NumPy .npy file: {exc}") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"could not read {path} as a NumPy .npy file: {exc}") from None


def _looks_like_path(s: str) -> bool:
    return os.sep in s or "/" in s or pathlib.Path(s).suffix != "" or pathlib.Path(s).exists()


def _read_table(obj, label_column, what):
    """Return (float array or object array, column names or None, labels or None, source)."""
    import pandas as pd

    source = what
    if isinstance(obj, (str, os.PathLike)):
        path = pathlib.Path(obj).expanduser()
        if path.is_dir():
            raise ValueError(f"data path {path} is a directory; pass a .csv, .tsv, .txt or .npy "
                             f"file")
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv", ".txt"):
            try:
                obj = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
            except pd.errors.EmptyDataError:
                raise ValueError(f"{path} is empty: 0 data rows") from None
            except Exception as exc:
                raise ValueError(f"could not read {path} as CSV: {exc}") from None
            if len(obj) == 0:
                raise ValueError(f"{path} has 0 data rows (a header line and nothing else)")
            source = f"CSV file {path}"
        elif suffix == ".npy":
            obj = _load_npy(path)
            source = f"numpy file {path}"
        else:
            raise ValueError(f"unsupported data file {path}: use .csv, .tsv, .txt or .npy")
    labels = None
    if isinstance(obj, pd.DataFrame):
        df = obj
        if label_column is not None:
            if label_column not in df.columns:
                raise ValueError(f"label_column {label_column!r} is not a column of the {what}; "
                                 f"columns: {list(df.columns)}")
            labels = df[label_column].to_numpy()
            df = df.drop(columns=[label_column])
        names = [str(c) for c in df.columns]
        bad = [(c, df[c]) for c in df.columns
               if not (pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]))]
        if bad:
            desc = "; ".join(
                f"column {str(c)!r} (dtype {s.dtype}, e.g. {s.dropna().iloc[0]!r})" if s.notna().any()
                else f"column {str(c)!r} (dtype {s.dtype})" for c, s in bad)
            raise ValueError(
                f"the {source} has non-numeric column(s): {desc}; encode them as numbers (e.g. "
                f"pandas.get_dummies), drop them, or pass label_column= (--label-column) for a "
                f"label column"
            )
        arr = df.to_numpy(dtype=np.float64, na_value=np.nan)
        line_offset = 2 if source.startswith("CSV") else None  # header line + 1-based lines
        return arr, names, labels, source, line_offset
    if label_column is not None:
        raise ValueError("label_column= needs a DataFrame or CSV file; pass labels= for arrays")
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    return obj, None, labels, source, None


def _load_user(data, fractions, seed, binarize, threshold, scale, likelihood, mask,
               allow_missing, drop_constant, max_rows, labels, label_column, name) -> Dataset:
    if isinstance(data, Mapping):
        unknown = set(data) - set(SPLITS)
        if unknown or "train" not in data or "test" not in data:
            raise ValueError(f"a dict of splits needs keys 'train' and 'test' (and optionally "
                             f"'valid'); got {sorted(map(str, data))}")
        fixed = True
        pieces = {s: data[s] for s in SPLITS if s in data}
    else:
        fixed = False
        pieces = {"data": data}
    if name is None:
        first = pieces.get("train", pieces.get("data"))
        name = (pathlib.Path(first).stem if isinstance(first, (str, os.PathLike)) else "user-data")

    arrays, masks, label_arrays, sources, names = {}, {}, {}, [], None
    width = None
    for key, obj in pieces.items():
        what = "data" if key == "data" else f"{key} split"
        arr, cols, lab, source, line_offset = _read_table(obj, label_column, what)
        sources.append(source)
        x_mask = None
        if mask is not None:
            if fixed != isinstance(mask, Mapping):
                raise ValueError("pass mask as a dict of splits exactly when the data are a dict of splits")
            x_mask = mask.get(key) if fixed else mask
            if x_mask is not None:
                x_mask = check_mask(x_mask, np.shape(arr), name=f"{name} {what}")
        arr_np = np.asarray(arr)
        # Non-finite values are reported here with column names and CSV lines (check_data
        # would report positional indices only); NaN becomes 'missing' when allowed.
        if arr_np.dtype != object and np.issubdtype(arr_np.dtype, np.number) and arr_np.ndim == 2:
            arr_np = arr_np.astype(np.float64)
            if allow_missing:
                nan_mask = ~np.isnan(arr_np)
                x_mask = nan_mask if x_mask is None else (x_mask & nan_mask)
            _report_nonfinite(arr_np, x_mask, cols, line_offset, source, allow_missing)
        x = check_data(arr_np, width, name=f"{name} {what}", min_rows=1 if fixed else 3,
                       mask=x_mask, dtype=torch.float64)
        if scale in (None, "auto") and not binarize:  # stored as float32 as they are
            check_magnitude(x, torch.float32, name=f"{name} {what}")
        if width is None:
            width = x.shape[1]
            names = cols
        elif cols is not None and names is not None and cols != names:
            raise ValueError(f"the {what} has columns {cols}, the train split {names}")
        if likelihood in COUNT_LIKELIHOODS and not binarize:
            # before the shuffle, so rows in the message are the user's own rows
            check_counts(x, name=f"{name} {what}", model=likelihood,
                         mask=None if x_mask is None else torch.as_tensor(x_mask))
        if likelihood == "bernoulli" and not binarize:
            # before the shuffle, so rows in the message are the user's own rows
            check_binary(x, name=f"{name} {what}", mask=None if x_mask is None else torch.as_tensor(x_mask))
        arrays[key] = x.numpy()
        masks[key] = None if x_mask is None else check_mask(x_mask, x.shape, name=what)
        if lab is not None:
            label_arrays[key] = np.asarray(lab)
    if labels is not None:
        if label_column is not None:
            raise ValueError("pass either labels= or label_column=, not both")
        label_arrays = dict(labels) if isinstance(labels, Mapping) else {"data": np.asarray(labels)}
    for key, lab in label_arrays.items():
        if key not in arrays or len(lab) != arrays[key].shape[0]:
            raise ValueError(f"labels for {key!r} have {len(lab)} entries but the data have "
                             f"{arrays[key].shape[0] if key in arrays else 0} rows")

    if fixed:
        parts = {s: arrays.get(s, np.empty((0, width))) for s in SPLITS}
        part_masks = {s: masks.get(s) for s in SPLITS} if any(m is not None for m in masks.values()) else None
        if part_masks is not None:
            part_masks = {s: (np.ones(parts[s].shape, bool) if m is None else m) for s, m in part_masks.items()}
        part_labels = {s: label_arrays[s] for s in SPLITS if s in label_arrays} or None
        source = "; ".join(f"{s}: {src}" for s, src in zip(pieces, sources)) + "; fixed split"
    else:
        n = arrays["data"].shape[0]
        idx = _split_indices(n, fractions, seed)
        parts = {s: arrays["data"][i] for s, i in idx.items()}
        part_masks = None if masks["data"] is None else {s: masks["data"][i] for s, i in idx.items()}
        part_labels = None if "data" not in label_arrays else {s: label_arrays["data"][i] for s, i in idx.items()}
        source = f"{sources[0]}; shuffled with seed {seed}, split {_fmt_split(fractions)}"
        if part_masks is not None:
            for s in SPLITS:
                if part_masks[s].shape[0]:
                    check_mask(part_masks[s], parts[s].shape, name=f"{name} {s} split")

    parts, part_labels, part_masks = _limit_rows(parts, part_labels, max_rows, part_masks)
    if max_rows:
        source += f"; first {max_rows} rows per split"
    if binarize:
        thr = 0.5 if threshold is None else float(threshold)
        parts = {s: (a > thr).astype(np.float64) for s, a in parts.items()}
        source += f"; binarized: x > {thr:g}"
    method = None if scale == "auto" else scale
    if binarize and method is not None:
        raise ValueError(f"scale={scale!r} would make binarized data non-binary; use scale=None")
    need_nonconstant = method is not None or likelihood in ("gaussian", "studentt")
    kept, fill = None, None
    if drop_constant or need_nonconstant:
        if drop_constant:
            parts, kept, fill, note = _drop_constant_columns(parts, True, True, part_masks, names)
            source += note
            if kept is not None:
                names = None if names is None else [names[k] for k in kept]
                if part_masks is not None:
                    part_masks = {s: m[:, kept] for s, m in part_masks.items()}
        else:
            const = constant_columns(parts["train"], None if part_masks is None else part_masks["train"])
            if len(const):
                why = (f"a {likelihood} observation model has an unbounded likelihood on it"
                       if likelihood in ("gaussian", "studentt") else f"scale={method!r} divides by its spread")
                raise ValueError(
                    f"{name}: column(s) {_name_columns(const, names)} are constant in the training "
                    f"split ({parts['train'].shape[0]} rows); {why}. Drop them (drop_constant=True)."
                )
    parts, scaling = _apply_scaling(parts, method, part_masks)
    if scaling is not None:
        source += f"; {method} with training-split statistics"
        for split in SPLITS:  # e.g. a test value far outside the training range
            check_magnitude(parts[split], torch.float32, name=f"{name} {split} split (scaled)")
    discrete = bool(binarize) or all(np.isin(a, (0.0, 1.0)).all() for a in parts.values())
    return Dataset(
        name=name, **{s: _float32(parts[s]) for s in SPLITS}, labels=part_labels,
        masks=None if part_masks is None else {s: torch.as_tensor(m, dtype=torch.bool) for s, m in part_masks.items()},
        discrete=bool(discrete), source=source, feature_names=names, kept_columns=kept,
        original_dim=width, fill_values=fill, scaling=scaling,
    )


def _report_nonfinite(arr, mask, cols, line_offset, source, allow_missing):
    bad = ~np.isfinite(arr)
    if mask is not None:
        bad &= mask
    if not bad.any():
        return
    rows, cc = np.nonzero(bad)
    where = []
    for r, c in list(zip(rows, cc))[:5]:
        row = f"row {r}" + (f" (line {r + line_offset} of the file)" if line_offset else "")
        col = f"column {c}" + (f" {cols[c]!r}" if cols is not None else "")
        where.append(f"{row}, {col}: {arr[r, c]}")
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    hint = ("infinite values are not missing values; fix or drop them" if allow_missing
            else "pass allow_missing=True (--allow-missing) to treat NaN as missing (a mask), or "
                  "clean the data")
    raise ValueError(f"the {source} contains {len(rows)} non-finite value(s): "
                     f"{'; '.join(where)}{more}; {hint}")


# ====================================================================== helpers
def _check_split(split) -> Tuple[float, float, float]:
    try:
        fr = tuple(float(f) for f in split)
    except TypeError:
        raise ValueError(f"split must be three fractions (train, valid, test), got {split!r}") from None
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1) > 1e-6 or fr[0] == 0 or fr[2] == 0:
        raise ValueError(f"split must be three non-negative fractions (train, valid, test) summing to 1 "
                         f"with train and test > 0, got {split!r}")
    return fr


def _fmt_split(fr) -> str:
    return "/".join(f"{100 * f:g}%" for f in fr)


def _split_indices(n: int, fractions, seed: int) -> Dict[str, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(fractions[2] * n)))
    n_valid = int(round(fractions[1] * n))
    n_train = n - n_test - n_valid
    if n_train < 2:
        raise ValueError(f"{n} rows are too few to split {_fmt_split(fractions)} "
                         f"(train would have {n_train} rows)")
    return {"train": perm[:n_train], "valid": perm[n_train:n_train + n_valid],
            "test": perm[n_train + n_valid:]}


def _name_columns(cols, names) -> str:
    return ", ".join(f"{c}" + (f" {names[c]!r}" if names is not None else "") for c in cols[:10]) + \
        (f" and {len(cols) - 10} more" if len(cols) > 10 else "")


def _drop_constant_columns(parts, drop, needed, masks=None, names=None):
    """Drop training-constant columns. Returns (parts, kept or None, fill values, note)."""
    const = constant_columns(parts["train"], None if masks is None else masks["train"])
    if not len(const) or not (drop and needed):
        return parts, None, None, ""
    p = parts["train"].shape[1]
    kept = np.setdiff1d(np.arange(p), const)
    if len(kept) == 0:
        raise ValueError("every column is constant in the training split; nothing to model")
    fill = parts["train"][0, const].copy() if parts["train"].shape[0] else np.zeros(len(const))
    note = f"; dropped {len(const)} column(s) constant in the training split ({_name_columns(const, names)})"
    return {s: a[:, kept] for s, a in parts.items()}, kept, fill, note


def _apply_scaling(parts, method, masks=None):
    if method is None:
        return parts, None
    train = parts["train"]
    obs = np.ones_like(train, dtype=bool) if masks is None else masks["train"]
    tr = np.where(obs, train, np.nan)
    if method == "standardize":
        loc = np.nanmean(tr, axis=0)
        spread = np.nanstd(tr, axis=0)
    elif method == "minmax":
        loc = np.nanmin(tr, axis=0)
        spread = np.nanmax(tr, axis=0) - loc
    else:
        raise ValueError(f"unknown scale {method!r}")
    if np.any(~(spread > 0)):
        bad = np.nonzero(~(spread > 0))[0]
        raise ValueError(f"column(s) {bad[:10].tolist()} are constant in the training split; "
                         f"scale={method!r} cannot divide by 0 (drop_constant=True drops them)")
    out = {}
    for s, a in parts.items():
        z = (a - loc) / spread
        if masks is not None:
            z = np.where(masks[s], z, 0.0)  # missing entries stay 0, as check_data leaves them
        out[s] = z
    return out, {"method": method, "loc": loc, "scale": spread}


def _limit_rows(parts, labels, max_rows, masks=None):
    """Keep the first ``max_rows`` rows of every split (parts, labels and masks)."""
    if max_rows is not None:
        parts = {s: a[:max_rows] for s, a in parts.items()}
        labels = None if labels is None else {s: a[:max_rows] for s, a in labels.items()}
        masks = None if masks is None else {s: m[:max_rows] for s, m in masks.items()}
    return parts, labels, masks


def _float32(a: np.ndarray) -> torch.Tensor:
    # a fresh, writable, C-contiguous copy (pandas may hand out read-only views)
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C"))


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)

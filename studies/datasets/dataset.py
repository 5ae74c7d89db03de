"""The :class:`Dataset` container every loader returns, the kinds of data it can hold (binary,
count, continuous) and the observation models that suit each, the check of a loaded dataset
against one (:func:`validate_for_likelihood`), and :func:`contaminate` (gross errors in the
training rows, for robustness studies)."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from pyro_lvm.models.validation import check_binary, check_column_variance, check_counts

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



def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)

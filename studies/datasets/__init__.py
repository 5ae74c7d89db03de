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

Modules
-------
:mod:`.loader` (:func:`load_dataset`), :mod:`.dataset` (:class:`Dataset`, data kinds,
:func:`validate_for_likelihood`, :func:`contaminate`), :mod:`.digits`, :mod:`.mnist`,
:mod:`.user` (the user's own data) and :mod:`.transforms` (split, constant columns,
scaling). Every public name is importable from ``pyro_lvm.studies.datasets``.
"""
from pyro_lvm.studies.datasets.dataset import (COUNT_LIKELIHOODS, LIKELIHOODS, SPLITS,
                                               SUITABLE_LIKELIHOODS, Dataset, contaminate,
                                               validate_for_likelihood)
from pyro_lvm.studies.datasets.digits import DIGITS_THRESHOLD
from pyro_lvm.studies.datasets.loader import BUILTIN_DATASETS, load_dataset
from pyro_lvm.studies.datasets.mnist import (ENV_VAR, MNIST_AMAT, MNIST_FILE, MNIST_ROWS,
                                             MNIST_SHA256, load_binarized_mnist_arrays,
                                             mnist_search_paths)
from pyro_lvm.studies.datasets.user import ArrayLike

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

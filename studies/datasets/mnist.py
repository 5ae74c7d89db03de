"""Binarized MNIST (Larochelle & Murray 2011): where the file is looked for, reading the
``.npz`` or ``.amat`` files, and the SHA-256 check of every split."""
from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Dict, List, Tuple

import numpy as np

from pyro_lvm.paths import checkout_root
from pyro_lvm.studies.datasets.dataset import SPLITS, Dataset
from pyro_lvm.studies.datasets.transforms import _apply_scaling, _float32, _limit_rows

#: Environment variable naming the binarized-MNIST file or the directory holding it.
ENV_VAR = "PYRO_LVM_DATA"
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

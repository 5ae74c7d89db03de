import os
import pathlib

import numpy as np
import pyro
import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_MNIST = REPO_ROOT.parent / "shared" / "data" / "binarized_mnist.npz"

pyro.enable_validation(True)


@pytest.fixture(autouse=True)
def _isolated_pyro_state():
    """Each test starts with an empty global param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def mnist_path() -> pathlib.Path:
    env = os.environ.get("PYRO_LVM_DATA")
    if env:
        p = pathlib.Path(env)
        return p / "binarized_mnist.npz" if p.is_dir() else p
    return DEFAULT_MNIST


@pytest.fixture(scope="session")
def binarized_mnist():
    """dict split -> float32 tensor of 0/1 pixels (train 50000, valid 10000, test 10000 x 784)."""
    path = mnist_path()
    if not path.exists():
        pytest.fail(f"binarized MNIST not found at {path}; set PYRO_LVM_DATA")
    with np.load(path) as z:
        return {k: torch.from_numpy(np.unpackbits(z[k], axis=1)[:, :784].astype(np.float32))
                for k in ("train", "valid", "test")}


@pytest.fixture(scope="session")
def digits_standardized():
    """scikit-learn's bundled 8x8 digits, constant columns dropped, standardized (float64 numpy)."""
    from sklearn.datasets import load_digits

    X = load_digits().data.astype(np.float64)
    X = X[:, X.std(axis=0) > 0]
    return (X - X.mean(0)) / X.std(0)


def has_cuda() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# Tiny tensors dominate the suite: a single intra-op thread avoids oversubscription on the
# 2-core CI machine (measured 3-40x faster per step under load) and keeps runs deterministic.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """One intra-op thread in every test, whatever an earlier test left (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_fa(seed: int = 1, n: int = 200, p: int = 8, d: int = 3):
    """A float64 factor-analysis model with known heteroscedastic parameters and ``n`` rows
    drawn from it (its guide can be set to the exact posterior)."""
    from pyro_lvm.models.linear import FactorAnalysis

    g = torch.Generator().manual_seed(seed)
    fa = FactorAnalysis(p, d).to(torch.float64)
    with torch.no_grad():
        fa.loading = torch.randn(p, d, generator=g, dtype=torch.float64)
        fa.mean = torch.randn(p, generator=g, dtype=torch.float64)
        fa.noise_variance = 0.2 + torch.rand(p, generator=g, dtype=torch.float64)
    pyro.set_rng_seed(seed)
    X = fa.sample(n)
    return fa, X

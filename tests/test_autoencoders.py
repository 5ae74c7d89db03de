import numpy as np
import pytest
import scipy.linalg
import torch

from pyro_lvm.models import Autoencoder, DenoisingAutoencoder, LinearAutoencoder


def _pca_basis(X, d):
    return np.linalg.svd(X - X.mean(0), full_matrices=False)[2][:d].T


@pytest.mark.slow
def test_linear_autoencoder_recovers_the_pca_subspace(digits_standardized):
    X, d = digits_standardized, 3
    ae = LinearAutoencoder(X.shape[1], d).double()
    ae.fit(X, epochs=150, batch_size=64, lr=1e-2, final_lr=1e-5)
    angles = scipy.linalg.subspace_angles(ae.decoder_subspace().numpy(), _pca_basis(X, d))
    assert angles.max() < 1e-2, angles
    # the reconstruction error approaches PCA's (the sum of the trailing eigenvalues)
    eig = np.linalg.eigvalsh(np.cov(X.T, bias=True))[::-1]
    assert ae.reconstruction_error(X) == pytest.approx(eig[d:].sum(), rel=1e-3)


def test_subspace_check_rejects_an_undertrained_autoencoder(digits_standardized):
    # positive control: a short run is measurably off the PCA subspace
    X, d = digits_standardized, 3
    ae = LinearAutoencoder(X.shape[1], d).double().fit(X, epochs=2, batch_size=64, lr=1e-2)
    angles = scipy.linalg.subspace_angles(ae.decoder_subspace().numpy(), _pca_basis(X, d))
    assert angles.max() > 1e-2


def test_autoencoder_trains_and_reports_latent_usage(digits_standardized):
    X = torch.from_numpy(digits_standardized).float()
    ae = Autoencoder(X.shape[1], latent_dim=8, hidden=(32,))
    before = ae.reconstruction_error(X)
    ae.fit(X, epochs=10, batch_size=64, lr=3e-3)
    assert ae.reconstruction_error(X) < 0.7 * before
    usage = ae.latent_usage(X)
    assert usage["variance"].shape == (8,) and 1 <= usage["active"] <= 8
    assert ae.reconstruct(X[:5]).shape == (5, X.shape[1])


def test_latent_usage_counts_a_dead_dimension():
    ae = LinearAutoencoder(6, 2)
    with torch.no_grad():
        ae.encoder_weight[1].zero_()
    x = torch.randn(100, 6)
    assert ae.latent_usage(x)["active"] == 1


@pytest.mark.parametrize("noise", ["masking", "gaussian"])
def test_denoising_autoencoder_corrupts_only_training_inputs(noise, binarized_mnist):
    x = binarized_mnist["train"][:300, ::4]
    dae = DenoisingAutoencoder(196, 16, hidden=(64,), loss="bce", noise=noise, noise_level=0.3)
    corrupted = dae.corrupt(x, torch.Generator().manual_seed(0))
    assert not torch.equal(corrupted, x)
    if noise == "masking":
        assert torch.all(corrupted <= x) and 0.2 < 1 - corrupted.sum() / x.sum() < 0.4
    before = dae.reconstruction_error(x)
    dae.fit(x, epochs=5, batch_size=50, lr=3e-3)
    after = dae.reconstruction_error(x)
    assert after < before - 20
    # reconstruction is deterministic: no corruption at evaluation time
    assert torch.equal(dae.reconstruct(x[:4]), dae.reconstruct(x[:4]))


def test_bad_input_named():
    with pytest.raises(ValueError, match="latent_dim"):
        LinearAutoencoder(4, 4)
    with pytest.raises(ValueError, match="noise"):
        DenoisingAutoencoder(4, 2, noise="salt")
    ae = Autoencoder(4, 2, loss="bce")
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        ae.reconstruction_error(torch.full((2, 4), 2.0))

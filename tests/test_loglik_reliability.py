"""log_likelihood flags unreliable estimates: per-row PSIS k-hat of the streamed log weights
(the same k-hat as ArviZ's psislw and as diagnose), the share of rows above the K-aware
threshold in the summary, an honest message for K = 1 and K < 25; and reconstruction_error
takes ``progress`` like every other evaluation entry point."""
import json
import math

import arviz as az
import numpy as np
import pyro
import pytest
import torch

from pyro_lvm.inference import engine, reliability
from pyro_lvm.inference.evaluate import evaluate, log_likelihood, reconstruction_error
from pyro_lvm.models.dlvm import DLVM

from conftest import synthetic_fa

F64 = torch.float64


def _guide(model, scale: float):
    """The exact posterior as guide (scale 1), or a wider / narrower version of it."""
    model.set_guide_to_posterior()
    with torch.no_grad():
        model.guide_scale_tril = model.guide_scale_tril * scale
    return model


def _arviz_khat(log_w: np.ndarray) -> np.ndarray:
    import warnings

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(az.psislw(np.array(log_w, dtype=np.float64))[1], dtype=float)


# ----------------------------------------------------------------------------- psis_khat
def test_psis_khat_is_arviz_khat_and_handles_edge_rows():
    rng = np.random.default_rng(0)
    lw = np.concatenate([rng.standard_t(2, size=(4, 300)), rng.normal(size=(4, 300))])
    np.testing.assert_array_equal(reliability.psis_khat(lw), _arviz_khat(lw))
    edge = np.stack([np.full(300, -3.0),                           # constant: exact guide
                     np.where(np.arange(300) < 150, -np.inf, lw[0]),  # half zero weights
                     np.full(300, -np.inf),                         # every weight zero
                     np.r_[np.nan, lw[1, 1:]]])                     # invalid
    k = reliability.psis_khat(edge)
    assert k[0] == -np.inf
    assert k[1] == pytest.approx(_arviz_khat(edge[1:2])[0])
    assert np.isnan(k[2]) and np.isnan(k[3])
    # too few draws for a tail fit: NaN, no warning, no error (ArviZ fails at S = 1)
    for s in (1, 2, 10, reliability.KHAT_MIN_SAMPLES - 1):
        assert np.isnan(reliability.psis_khat(rng.normal(size=(3, s)))).all()
    assert reliability.psis_khat(rng.normal(size=50)).shape == ()


# ----------------------------------------------------------------------------- oracle
def test_per_row_khat_equals_arviz_on_the_streamed_weights(monkeypatch):
    """Rows and particles both chunked: k-hat is assembled from several particle chunks per
    row chunk, and equals ArviZ's on the very log weights log_likelihood drew."""
    model, X = synthetic_fa(n=13, p=6, d=2)
    _guide(model, 0.6)
    seen = []
    real = engine.stream_log_weights

    def recording(*args, **kwargs):
        for start, stop, lw in real(*args, **kwargs):
            seen.append((start, stop, lw.detach().clone()))
            yield start, stop, lw

    monkeypatch.setattr(engine, "stream_log_weights", recording)
    ll = log_likelihood(model, X, 60, device="cpu", batch_size=5, chunk_size=25, progress=False)
    assert ll.rows_per_chunk == 5 and ll.particles_per_chunk == 25
    full = torch.full((60, 13), math.nan, dtype=F64)
    filled = {}
    for start, stop, lw in seen:
        at = filled.get(start, 0)
        full[at:at + lw.shape[0], start:stop] = lw
        filled[start] = at + lw.shape[0]
    assert set(filled.values()) == {60}
    want = _arviz_khat(full.T.numpy())
    np.testing.assert_allclose(ll.khat, want, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(ll.per_row["khat"].to_numpy(), ll.khat)
    assert isinstance(ll.khat, np.ndarray) and ll.khat.shape == (13,)
    # the same rows flagged as by the package's one threshold rule
    np.testing.assert_array_equal(ll.unreliable, reliability.khat_unreliable(want, 60))


# ----------------------------------------------------------------------------- controls
def test_bad_proposal_is_flagged():
    """A guide far narrower than the posterior: heavy-tailed weights, k-hat > 0.7."""
    model, X = synthetic_fa(n=30, p=6, d=2)
    _guide(model, 0.25)
    ll = log_likelihood(model, X, 200, device="cpu", progress=False)
    assert np.nanmedian(ll.khat) > 0.7
    assert ll.fraction_bad > 0.5 and ll.fraction_unreliable >= ll.fraction_bad
    assert ll.khat_threshold == pytest.approx(reliability.khat_threshold(200))
    text = ll.summary()
    assert f"{100 * ll.fraction_unreliable:.1f}% of rows" in text
    assert "estimates and standard errors are unreliable" in text and "k̂ > 0.7" in text
    d = ll.to_dict()
    json.dumps(d)
    assert d["khat_unreliable_frac"] == pytest.approx(ll.fraction_unreliable)
    assert d["khat_bad_frac"] == pytest.approx(ll.fraction_bad)


def test_exact_and_good_proposals_are_not_flagged():
    model, X = synthetic_fa(n=30, p=6, d=2)
    exact = log_likelihood(_guide(model, 1.0), X, 200, device="cpu", progress=False)
    assert (exact.khat == -np.inf).all()  # constant weights: the guide is the posterior
    assert exact.fraction_unreliable == 0 and exact.fraction_bad == 0
    text = exact.summary()
    assert "unreliable" not in text and "WARNING" not in text
    assert "for every fitted row" in text

    wider = log_likelihood(_guide(model, 1.3), X, 200, device="cpu", progress=False)
    assert np.isfinite(wider.khat).all() and np.median(wider.khat) < 0.3
    assert wider.fraction_unreliable == 0
    assert "unreliable" not in wider.summary()


def test_k_equal_one_and_too_few_draws_say_so():
    model, X = synthetic_fa(n=20, p=6, d=2)
    _guide(model, 1.3)
    one = log_likelihood(model, X, 1, device="cpu", progress=False)
    text = one.summary()
    assert "± nan" not in text and "nan" not in text.lower()
    assert "one sample per row gives no standard error" in text and "num_samples >= 2" in text
    assert "k̂ not computed" in text
    assert np.isnan(one.khat).all() and one.khat_threshold is None
    assert math.isnan(one.fraction_unreliable)
    d = one.to_dict()
    json.dumps(d)
    assert d["khat_unreliable_frac"] is None and d["khat_threshold"] is None

    few = log_likelihood(model, X, 10, device="cpu", progress=False)
    text = few.summary()
    assert "k̂ not computed: 10 draws per row" in text and "unchecked" in text
    assert "MC se" in text and np.isnan(few.khat).all()


def test_k_equal_one_bits_per_dim_explains_missing_se():
    g = torch.Generator().manual_seed(2)
    X = (torch.rand(15, 8, generator=g) < 0.4).float()
    ll = log_likelihood(DLVM(8, 2, hidden=(8,)), X, 1, device="cpu", progress=False)
    text = ll.summary()
    assert "bits/dim" in text and "nan" not in text.lower()
    assert "one sample per row" in text


def test_evaluate_reports_the_khat_shares():
    model, X = synthetic_fa(n=20, p=6, d=2)
    _guide(model, 0.25)
    out = evaluate(model, X, 100, device="cpu", progress=False, reconstruction=False)
    ll = log_likelihood(model, X, 100, device="cpu", progress=False)
    assert out["khat_unreliable_frac"] == pytest.approx(ll.fraction_unreliable)
    assert out["khat_bad_frac"] == pytest.approx(ll.fraction_bad) and out["khat_bad_frac"] > 0


# ----------------------------------------------------------------------------- D5
def test_reconstruction_error_accepts_progress(capsys):
    g = torch.Generator().manual_seed(3)
    X = (torch.rand(40, 8, generator=g) < 0.4).float()
    model = DLVM(8, 2, hidden=(8,))
    base = reconstruction_error(model, X, device="cpu")
    quiet = reconstruction_error(model, X, device="cpu", progress=False)
    np.testing.assert_array_equal(quiet.per_row["mse"], base.per_row["mse"])
    assert capsys.readouterr().err == ""
    shown = reconstruction_error(model, X, device="cpu", progress=True, batch_size=10)
    # other row chunks: the float32 network may round differently
    np.testing.assert_allclose(shown.per_row["mse"], base.per_row["mse"], rtol=1e-6)
    calls = []
    reconstruction_error(model, X, device="cpu", batch_size=15,
                         progress=lambda done, total: calls.append((done, total)))
    assert calls == [(15, 40), (30, 40), (40, 40)]


def test_khat_buffer_stays_within_the_element_budget():
    """With a small explicit chunk_size the row chunk's K log weights (kept for k-hat) are
    bounded by max_elements too; an explicit batch_size is used as given."""
    model, X = synthetic_fa(n=40, p=6, d=2)
    _guide(model, 0.6)
    ll = log_likelihood(model, X, 60, chunk_size=5, max_elements=600, device="cpu",
                        progress=False)
    assert ll.rows_per_chunk * 60 <= 600 and np.isfinite(ll.khat).all()
    given = log_likelihood(model, X, 60, chunk_size=5, batch_size=40, device="cpu",
                           progress=False)
    assert given.rows_per_chunk == 40

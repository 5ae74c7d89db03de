"""Tests of reports/: the statistics (hand-computed answers), the figures and the HTML report.

The report tests build a synthetic study directory in a temporary folder (the layout written by
``studies.runner``), so they do not depend on the runner or on any training.
"""
from __future__ import annotations

import base64
import html.parser
import json
import math
import os
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from pyro_lvm.reports import analysis, figures, render_report
from pyro_lvm.reports import render as render_module

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_URI = "data:image/png;base64,"


def t_quantile_975(df: int) -> float:
    """Closed forms of Student's t 0.975 quantile (independent of scipy): df=1 Cauchy, df=2."""
    p = 0.975
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    raise ValueError(df)


# --------------------------------------------------------------------------- analysis


@pytest.fixture
def small_table() -> pd.DataFrame:
    """Three priors x three seeds; prior c's seed 2 failed (its stale value must be ignored)."""
    rows = [
        ("a", 0, 1.0), ("a", 1, 2.0), ("a", 2, 4.0),
        ("b", 0, 0.0), ("b", 1, 1.5), ("b", 2, 2.5),
        ("c", 0, 10.0), ("c", 1, 12.0), ("c", 2, 1000.0),
    ]
    frame = pd.DataFrame(rows, columns=["prior", "seed", "test_log_likelihood"])
    frame.insert(0, "run_id", [f"r{i}" for i in range(len(frame))])
    frame["latent_dim"] = 2  # constant config column: must not split configurations
    frame["status"] = "ok"
    frame["error"] = ""
    frame.loc[8, ["status", "error"]] = ["failed", "NaN loss at epoch 3"]
    return frame


def test_config_columns_exclude_metrics_and_bookkeeping(small_table):
    assert analysis.config_columns(small_table) == ["prior", "latent_dim"]
    assert analysis.config_columns(small_table, candidates=["prior", "seed", "run_id"]) == ["prior"]
    assert analysis.varying_columns(small_table, ["prior", "latent_dim"]) == ["prior"]


def test_summarize_matches_hand_computation(small_table):
    s = analysis.summarize(small_table, "test_log_likelihood").set_index("prior")
    # a: 1, 2, 4 -> mean 7/3, sample variance 7/3, se = sqrt(7/3 / 3) = sqrt(7)/3
    assert s.loc["a", "n"] == 3
    assert s.loc["a", "mean"] == pytest.approx(7 / 3)
    assert s.loc["a", "se"] == pytest.approx(math.sqrt(7) / 3)
    # b: 0, 1.5, 2.5 -> mean 4/3, sample variance 19/12, se = sqrt(19)/6
    assert s.loc["b", "mean"] == pytest.approx(4 / 3)
    assert s.loc["b", "se"] == pytest.approx(math.sqrt(19) / 6)
    # c: the failed run (1000) is excluded but counted
    assert s.loc["c", "n"] == 2 and s.loc["c", "n_failed"] == 1
    assert s.loc["c", "mean"] == pytest.approx(11.0)
    assert s.loc["c", "se"] == pytest.approx(math.sqrt(2) / math.sqrt(2))
    pooled = analysis.summarize(small_table, "test_log_likelihood", by=[])
    assert pooled["n"].item() == 8 and pooled["n_failed"].item() == 1


def test_summarize_single_seed_has_no_se(small_table):
    one = small_table.loc[small_table["seed"] == 0]
    s = analysis.summarize(one, "test_log_likelihood")
    assert (s["n"] == 1).all() and s["se"].isna().all()


def test_summarize_monte_carlo_se(small_table):
    table = small_table.assign(test_log_likelihood_se=[0.3, 0.4, 1.2, 0, 0, 0, 0, 0, 0])
    s = analysis.summarize(table, "test_log_likelihood").set_index("prior")
    assert s.loc["a", "mc_se"] == pytest.approx(math.sqrt(0.09 + 0.16 + 1.44) / 3)


def test_paired_differences_match_hand_computation(small_table):
    d = analysis.paired_differences(small_table, "prior", "test_log_likelihood")
    d = d.set_index(["level_a", "level_b"])
    # a - b over seeds: 1.0, 0.5, 1.5 -> mean 1, sd 0.5, se 0.5/sqrt(3), t_{2}
    ab = d.loc[("a", "b")]
    se = 0.5 / math.sqrt(3)
    assert ab["n_pairs"] == 3
    assert ab["mean_difference"] == pytest.approx(1.0)
    assert ab["se"] == pytest.approx(se)
    assert ab["ci_low"] == pytest.approx(1.0 - t_quantile_975(2) * se)
    assert ab["ci_high"] == pytest.approx(1.0 + t_quantile_975(2) * se)
    assert not ab["distinguishable"]  # the interval covers 0
    # a - c: only seeds 0, 1 are matched (c's seed 2 failed): -9, -10 -> se 0.5, t_{1}
    ac = d.loc[("a", "c")]
    assert ac["n_pairs"] == 2
    assert ac["mean_difference"] == pytest.approx(-9.5)
    assert ac["ci_high"] == pytest.approx(-9.5 + t_quantile_975(1) * 0.5)
    assert ac["distinguishable"]


def test_paired_differences_pair_on_other_columns_and_seed():
    # objective differs; pairs must match on objective AND seed, never across objectives
    frame = pd.DataFrame({
        "prior": ["a", "b"] * 4,
        "objective": ["elbo", "elbo", "iwae", "iwae"] * 2,
        "seed": [0, 0, 0, 0, 1, 1, 1, 1],
        "test_log_likelihood": [5.0, 4.0, 100.0, 98.0, 6.0, 4.0, 101.0, 100.0],
        "status": "ok",
    })
    d = analysis.paired_differences(frame, "prior").iloc[0]
    assert d["n_pairs"] == 4
    assert d["mean_difference"] == pytest.approx((1 + 2 + 2 + 1) / 4)


def test_paired_differences_rejects_ambiguous_pairs(small_table):
    dup = pd.concat([small_table, small_table.iloc[[0]].assign(run_id="dup")])
    with pytest.raises(ValueError, match="share the level"):
        analysis.paired_differences(dup, "prior")
    with pytest.raises(ValueError, match="not in the results table"):
        analysis.paired_differences(small_table, "likelihood")
    with pytest.raises(ValueError, match="confidence"):
        analysis.paired_differences(small_table, confidence=1.5)


def test_verdict_names_best_with_evidence(small_table):
    v = analysis.verdict(small_table, "test_log_likelihood", num_samples=500)
    assert v.best == {"prior": "c", "latent_dim": 2}
    assert v.best_label == "prior=c"
    assert v.best_mean == pytest.approx(11.0) and v.best_n == 2
    runner_up = v.runner_up
    assert runner_up["configuration"] == "prior=a"
    assert runner_up["mean_difference"] == pytest.approx(9.5)
    assert runner_up["distinguishable"]
    assert v.n_failed == 1
    assert v.failed["run_id"].tolist() == ["r8"]
    assert v.failed["error"].tolist() == ["NaN loss at epoch 3"]
    text = v.text
    assert "IS estimate of log p(x) (IWAE_K, K=500)" in text
    assert "prior=c" in text and "1 of 9 runs failed" in text


def test_verdict_says_not_distinguishable(small_table):
    v = analysis.verdict(small_table.loc[small_table["prior"] != "c"], "test_log_likelihood")
    assert v.best_label == "prior=a"
    assert not v.runner_up["distinguishable"]
    assert "not distinguishable" in v.text


def test_verdict_lower_is_better_and_all_failed(small_table):
    v = analysis.verdict(small_table, "test_log_likelihood", higher_is_better=False)
    assert v.best_label == "prior=b"
    failed = small_table.assign(status="failed")
    v = analysis.verdict(failed, "test_log_likelihood")
    assert v.best is None and v.n_failed == 9
    assert "nothing to compare" in v.text


def test_metric_labels_never_call_a_bound_a_likelihood():
    assert analysis.metric_label("test_log_likelihood", 1000) == \
        "IS estimate of log p(x) (IWAE_K, K=1000)"
    assert analysis.metric_label("test_elbo") == "ELBO (lower bound)"
    for metric in analysis.METRIC_COLUMNS:
        assert analysis.metric_label(metric, 10).lower() != "log-likelihood"
    assert analysis.num_eval_samples(pd.DataFrame({"num_eval_samples": [64, 64]})) == 64
    assert analysis.num_eval_samples(pd.DataFrame(), {"grid": {"num_eval_samples": [32]}}) == 32


# --------------------------------------------------------------------------- figures


def test_pca_projection_recovers_principal_axis():
    rng = np.random.default_rng(0)
    direction = np.array([3.0, 4.0, 0.0]) / 5.0
    points = rng.normal(size=(400, 1)) * 10 * direction + rng.normal(size=(400, 3)) * 0.1
    project, explained = figures.pca_projection(points)
    axis = project(direction[None, :] + points.mean(0)) - project(points.mean(0)[None, :])
    assert abs(axis[0, 0]) == pytest.approx(1.0, abs=1e-2)  # unit vector along PC 1
    assert explained[0] > 0.99


def test_kde_grid_matches_scipy_gaussian_kde():
    from scipy.stats import gaussian_kde

    rng = np.random.default_rng(2)
    points = rng.normal(size=(200, 2)) @ np.array([[1.0, 0.6], [0.0, 0.5]])
    gx, gy, density = figures._kde_grid(points, points, size=20)
    reference = gaussian_kde(points.T)(np.stack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
    np.testing.assert_allclose(density, reference, rtol=1e-10, atol=1e-14)
    # the 50% highest-density region on the grid holds half of the grid's mass
    level = figures._hdr_levels(density, (0.5,))[0]
    assert density[density >= level].sum() / density.sum() == pytest.approx(0.5, abs=0.05)


def test_image_figures_of_large_images_fit_a_1280_px_page():
    rng = np.random.default_rng(2)
    images = {f"c{i}": rng.uniform(size=(40, 28 * 28)) for i in range(5)}
    for uri in (figures.samples_grid(images, (28, 28)),
                figures.reconstructions({k: (v[:10], v[:10]) for k, v in images.items()},
                                        (28, 28))):
        png = base64.b64decode(uri[len(DATA_URI):])
        width = int.from_bytes(png[16:20], "big")
        assert 600 < width <= 1200, width


def test_image_mosaic_places_images():
    images = np.arange(3 * 4, dtype=float).reshape(3, 4)
    mosaic = figures.image_mosaic(images, (2, 2), columns=2)
    assert mosaic.shape == (2 * 3 - 1, 2 * 3 - 1)
    np.testing.assert_array_equal(mosaic[3:5, 0:2], images[2].reshape(2, 2))
    with pytest.raises(ValueError, match="image_shape"):
        figures.image_mosaic(images, (3, 3))


def test_figures_return_png_data_uris_or_none():
    rng = np.random.default_rng(1)
    uri = figures.khat_distribution({"x": rng.uniform(0, 1, 50)}, 100)
    assert uri.startswith(DATA_URI)
    assert base64.b64decode(uri[len(DATA_URI):]).startswith(PNG_MAGIC)
    assert figures.khat_distribution({}, 100) is None
    # one- and two-dimensional latents are drawn without projection
    for dim in (1, 2):
        z = rng.normal(size=(40, dim))
        assert figures.latent_scatter({"c": (z, rng.integers(0, 3, 40))}).startswith(DATA_URI)
        assert figures.prior_vs_aggregate_posterior({"c": (z, z * 0.5)}).startswith(DATA_URI)
    with pytest.raises(ValueError, match="labels for"):
        figures.latent_scatter({"c": (rng.normal(size=(40, 2)), np.zeros(39))})
    assert figures.samples_grid({}, (8, 8)) is None
    assert figures.latent_scatter({}) is None


# --------------------------------------------------------------------------- synthetic study

PRIORS = ["normal", "mixture", "vamp"]
OBJECTIVES = ["elbo", "iwae_5"]
SEEDS = [0, 1, 2]
LATENT_DIM = 4
FAILED_RUN = "vamp-iwae_5-s2"
FAILED_MESSAGE = "ValueError: loss is NaN at epoch 3, step 7 (lr=0.001 too large?) <b>x</b>"


def _write_json(path: pathlib.Path, value) -> None:
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")


def make_study(directory: pathlib.Path, *, all_failed: bool = False, artifacts: bool = True,
               priors=PRIORS, objectives=OBJECTIVES, seeds=SEEDS) -> pathlib.Path:
    """A study dir shaped like the runner's: 3 priors x 2 objectives x 3 seeds on 8x8 images."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / "study.json", {
        "name": "synthetic", "title": "Synthetic prior comparison",
        "description": "fake numbers <for> tests & escaping",
        "command_line": "python studies/compare_priors.py --smoke --seeds 3",
        "dataset": {"name": "digits", "shape": [1797, 64], "sha256": "ab" * 32,
                    "image_shape": [8, 8], "discrete": True},
        "grid": {"prior": list(priors), "objective": list(objectives), "latent_dim": [LATENT_DIM]},
        "seeds": list(seeds),
        "versions": {"python": "3.11.9", "torch": "2.13.0", "pyro": "1.9.2", "arviz": "0.23.4",
                     "numpy": "2.4.0", "pandas": "3.1.1", "platform": "Linux-x86_64"},
        "git_commit": "0123456789abcdef0123456789abcdef01234567", "device": "auto",
        "started": "2025-01-01T10:00:00+00:00", "finished": "2025-01-01T10:02:30+00:00",
    })
    rows = []
    base = {"normal": -30.0, "mixture": -29.0, "vamp": -28.0}
    for prior in priors:
        for objective in objectives:
            for seed in seeds:
                run_id = f"{prior}-{objective}-s{seed}"
                config = {"run_id": run_id, "model": "dlvm", "prior": prior,
                          "likelihood": "bernoulli", "objective": objective,
                          "num_particles": 5 if objective != "elbo" else 1,
                          "gradient": "standard", "latent_dim": LATENT_DIM, "hidden": "[32]",
                          "epochs": 4, "batch_size": 64, "lr": 0.001, "seed": seed,
                          "num_eval_samples": 1000}
                failed = all_failed or run_id == FAILED_RUN
                ll = base[prior] + 0.3 * (objective != "elbo") + 0.2 * seed + rng.normal(0, .05)
                metrics = {} if failed else {
                    "test_log_likelihood": ll, "test_log_likelihood_se": 0.02,
                    "exact_test_log_likelihood": np.nan, "test_elbo": ll - 1.5,
                    "test_elbo_se": 0.05, "kl": 8.0 + seed, "active_units": 3 + (prior == "vamp"),
                    "khat_good_frac": 0.8, "khat_ok_frac": 0.15, "khat_bad_frac": 0.05,
                    "khat_median": 0.3, "khat_num_samples": 1000, "train_time_s": 5.0, "eval_time_s": 1.0,
                    "wall_time_s": 6.5, "device": "cpu"}
                error = (f"{FAILED_MESSAGE} [{run_id}]" if all_failed else FAILED_MESSAGE
                         ) if failed else ""
                rows.append({**config, "status": "failed" if failed else "ok", "error": error,
                             **metrics})
                run_dir = directory / "runs" / run_id
                run_dir.mkdir(parents=True, exist_ok=True)
                _write_json(run_dir / "config.json", config)
                _write_json(run_dir / "result.json", {
                    "status": "failed" if failed else "ok", "error": error or None,
                    "traceback": "Traceback (most recent call last):\n  ...\n" + error
                    if failed else None, "metrics": metrics})
                if failed:
                    continue
                epochs = np.arange(1, 5)
                pd.DataFrame({"epoch": epochs, "step": epochs * 10,
                              "train_objective": ll - 10 / epochs,
                              "valid_objective": ll - 9 / epochs - 0.2,
                              "time_s": epochs * 1.0}).to_csv(run_dir / "history.csv",
                                                              index=False)
                if not artifacts:
                    continue
                n, m = 60, 8
                labels = rng.integers(0, 10, n)
                latent = rng.normal(size=(n, LATENT_DIM)) + labels[:, None] * 0.5
                originals = (rng.uniform(size=(m, 64)) < 0.3).astype(np.float32)
                np.savez(run_dir / "artifacts.npz",
                         samples=rng.uniform(size=(20, 64)).astype(np.float32),
                         originals=originals,
                         reconstructions=np.clip(originals * 0.8 + 0.1, 0, 1),
                         latent_mean=latent, labels=labels,
                         khat=np.concatenate([rng.uniform(0, 0.6, n - 3), [0.75, 0.9, 1.2]]),
                         kl_per_dim=np.array([3.0, 2.0, 0.5, 0.001]) + 0.1 * seed,
                         prior_samples=rng.normal(size=(300, LATENT_DIM)),
                         aggregate_posterior_samples=rng.normal(size=(300, LATENT_DIM)) * 0.7)
    pd.DataFrame(rows).to_csv(directory / "results.csv", index=False)
    return directory


class BalancedTags(html.parser.HTMLParser):
    """Stdlib check that every non-void element is closed in order."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
            "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.problems, self.images, self.links = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for name in ("src", "href", "action", "poster", "data"):
            if name in attrs and tag != "img":
                self.links.append(attrs[name])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def check_html(text: str) -> BalancedTags:
    parser = BalancedTags()
    parser.feed(text)
    parser.close()
    assert not parser.problems, parser.problems[:5]
    assert not parser.stack, f"unclosed tags: {parser.stack}"
    try:
        import html5lib
    except ImportError:  # the stdlib check above still ran
        return parser
    html5lib.HTMLParser(strict=True).parse(text)  # raises ParseError on any HTML5 parse error
    return parser


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    study = make_study(tmp_path_factory.mktemp("study") / "synthetic")
    path = render_report(study)
    return study, path, path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- report


def test_report_written_next_to_results(rendered):
    study, path, _ = rendered
    assert path == study / "index.html" and path.is_file()
    leftovers = [p.name for p in study.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers


def test_report_is_valid_self_contained_html(rendered):
    _, _, text = rendered
    parser = check_html(text)
    assert parser.images, "no figures in the report"
    for src in parser.images:
        assert src.startswith(DATA_URI), src[:60]
        assert base64.b64decode(src[len(DATA_URI):], validate=True).startswith(PNG_MAGIC)
    # only in-page anchors: nothing the page could fetch from elsewhere
    assert all(link.startswith("#") for link in parser.links), parser.links
    assert not re.search(r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text.replace(DATA_URI, ""))
    assert "<link" not in text and "@import" not in text and "url(" not in text
    # every figure the renderer made is embedded, sections in the right order
    sections = re.findall(r'<section id="(fig-[a-z-_]+)"', text)
    assert len(sections) == len(parser.images)
    for expected in ("fig-test_log_likelihood", "fig-test_elbo", "fig-learning-curves",
                     "fig-khat", "fig-latent-usage", "fig-samples", "fig-reconstructions",
                     "fig-latent-space", "fig-prior-vs-aggregate"):
        assert expected in sections


def test_report_content(rendered):
    _, _, text = rendered
    # summary and verdict come first, before any table or figure
    assert text.index('id="verdict"') < text.index('id="results"') < text.index('id="fig-')
    # the verdict answers "which prior" within each objective, Holm-adjusted
    verdict = text[text.index('id="verdict"'):text.index('id="results"')]
    assert "Which prior?" in verdict and "Holm-adjusted" in verdict
    for objective in OBJECTIVES:
        assert f"with objective={objective}" in verdict.lower()
    assert "vamp &gt; normal by" in verdict  # 2 nats/row apart: called
    assert "ELBO (lower bound)" in text
    assert "95% Holm interval" in text
    # the results table is sorted by rank, and the key maps labels to settings
    results = text[text.index('id="results"'):text.index('id="key"')]
    ranks = [int(r) for r in re.findall(r"<tr>\s*<td>(\d+)</td>", results)]
    assert ranks == sorted(ranks) and ranks[0] == 1
    assert re.search(r"<tr>\s*<td>1</td>\s*<td>vamp · iwae_5</td>", results)
    key = text[text.index('id="key"'):text.index('id="paired"')]
    assert re.search(r"<td>vamp · iwae_5</td>\s*<td>vamp</td>\s*<td>iwae_5</td>\s*<td>5</td>",
                     key)
    # captions do not list run ids
    for caption in re.findall(r"<figcaption>(.*?)</figcaption>", text, re.S):
        assert "-s0" not in caption and "Runs:" not in caption
    # every run is listed; the failed one with its message (escaped) and traceback
    for prior in PRIORS:
        for objective in OBJECTIVES:
            for seed in SEEDS:
                assert f"{prior}-{objective}-s{seed}" in text
    assert 'id="failed-vamp-iwae_5-s2"' in text
    assert "loss is NaN at epoch 3, step 7 (lr=0.001 too large?) &lt;b&gt;x&lt;/b&gt;" in text
    assert "<b>x</b>" not in text
    assert "Traceback (most recent call last)" in text
    # user text is escaped, not interpreted
    assert "fake numbers &lt;for&gt; tests &amp; escaping" in text
    # provenance
    for needle in ("0123456789abcdef0123456789abcdef01234567", "ab" * 32,
                   "python studies/compare_priors.py --smoke --seeds 3", "2.13.0", "1.9.2",
                   "0.23.4", "3.11.9", "150.0 s", "1797 × 64", "0, 1, 2"):
        assert needle in text, needle


def test_report_khat_labels_match_diagnostics(rendered):
    _, _, text = rendered
    # the K-aware threshold for K = 1000 draws, 0.67, and 0.7 as the "bad" line
    assert "≥ 0.7" not in text and "≥0.7" not in text and "&gt;= 0.7" not in text
    assert "rows k̂ &gt; 0.67" in text
    assert "k̂ ≤ 0.67 = min(1 − 1/log₁₀ K, 0.7)" in text and "above 0.7 (the dashed" in text


def test_report_paired_differences_between_priors(rendered):
    _, _, text = rendered
    assert "Between levels of <code>prior</code>" in text
    assert "Between levels of <code>objective</code>" in text


def test_report_write_is_atomic(monkeypatch, tmp_path):
    study = make_study(tmp_path / "atomic", priors=PRIORS[:2], objectives=OBJECTIVES[:1],
                       seeds=SEEDS[:2], artifacts=False)
    path = render_report(study)
    before = path.read_bytes()
    files = ["index.html", "results.csv", "runs", "study.json"]

    # a template that fails half-way through rendering: nothing is written
    broken_templates = tmp_path / "templates"
    broken_templates.mkdir()
    (broken_templates / "study.html").write_text(
        "<html>{{ title }} {{ no_such_variable }}</html>", encoding="utf-8")
    monkeypatch.setattr(render_module, "TEMPLATE_DIR", broken_templates)
    with pytest.raises(Exception, match="no_such_variable"):
        render_report(study)
    assert path.read_bytes() == before
    assert sorted(p.name for p in study.iterdir()) == files
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError("disk exploded")

    # a failure during the write itself (after the temporary file has content, and at the
    # final rename) leaves no temporary file and the old report intact
    for name in ("fsync", "replace"):
        monkeypatch.setattr(render_module.os, name, broken)
        with pytest.raises(RuntimeError, match="disk exploded"):
            render_report(study)
        monkeypatch.undo()
        assert path.read_bytes() == before
        assert sorted(p.name for p in study.iterdir()) == files


def test_failing_figure_leaves_a_note_not_a_broken_report(monkeypatch, tmp_path):
    study = make_study(tmp_path / "badfigure", priors=PRIORS[:2], objectives=OBJECTIVES[:1],
                       seeds=SEEDS[:2])
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("figure exploded <b>here</b>")

    monkeypatch.setattr(render_module.figures, "learning_curves", broken)
    text = render_report(study).read_text(encoding="utf-8")
    assert calls, "the monkeypatched figure function was not used"
    parser = check_html(text)
    message = ("figure Learning curves could not be drawn: "
               "RuntimeError: figure exploded &lt;b&gt;here&lt;/b&gt;")
    # in place of the figure, in its own section, and among the notes of the summary
    section = text[text.index('<section id="fig-learning-curves">'):]
    section = section[:section.index("</section>")]
    assert "<img" not in section and message in section
    assert text.count(message) == 2
    assert "<b>here</b>" not in text
    # every other figure is still drawn, and the page counts only the drawn images
    for other in ("fig-test_log_likelihood", "fig-khat", "fig-samples", "fig-latent-space"):
        assert f'<section id="{other}">' in text
    assert len(parser.images) == len(re.findall(r'<section id="fig-', text)) - 1
    assert f'data-figure-count="{len(parser.images)}"' in text


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_report_file_gets_permissions_of_a_new_file(tmp_path, umask):
    study = make_study(tmp_path / "perm", priors=PRIORS[:2], objectives=OBJECTIVES[:1],
                       seeds=SEEDS[:2], artifacts=False)
    previous = os.umask(umask)
    try:
        # twice: a new report, and one replacing an existing report
        for _ in range(2):
            path = render_report(study)
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask
        explicit = render_report(study, tmp_path / "elsewhere" / "report.html")
        assert explicit.stat().st_mode & 0o777 == 0o666 & ~umask
    finally:
        os.umask(previous)
    assert not [p.name for p in study.iterdir() if p.name.endswith(".tmp")]


def test_report_shows_findings_and_run_notes(tmp_path):
    study = make_study(tmp_path / "findings", priors=PRIORS[:2], objectives=OBJECTIVES[:1],
                       seeds=SEEDS[:2], artifacts=False)
    text = render_report(study).read_text(encoding="utf-8")
    assert 'id="findings"' not in text and "<th>notes</th>" not in text  # nothing to show
    meta = json.loads((study / "study.json").read_text())
    meta["findings"] = ["Degradation when 5% of rows are <outliers> & worse:",
                        "  gaussian: 12.3 [10.1, 14.5] over 2 seed(s)"]
    _write_json(study / "study.json", meta)
    results = pd.read_csv(study / "results.csv")
    results["notes"] = None
    results.loc[results["run_id"] == "mixture-elbo-s1", "notes"] = \
        "diagnostics (k-hat, latent usage) failed: ValueError: <bad> rows"
    results.to_csv(study / "results.csv", index=False)
    text = render_report(study).read_text(encoding="utf-8")
    check_html(text)
    # findings right after the verdict, before any table, escaped, indentation kept
    assert text.index('id="verdict"') < text.index('id="findings"') < text.index('id="results"')
    assert "Degradation when 5% of rows are &lt;outliers&gt; &amp; worse:" in text
    assert "<p>  gaussian: 12.3 [10.1, 14.5] over 2 seed(s)</p>" in text
    assert "<outliers>" not in text
    # the run's note in its row of the table of all runs, escaped; the notes column is not
    # mistaken for a configuration column (the runs would split into configurations)
    runs = text[text.index('<section id="runs">'):]
    runs = runs[:runs.index("</section>")]
    assert "with-notes" in runs and "<th>notes</th>" in runs
    row = re.search(r"<tr>\s*<td>mixture-elbo-s1</td>.*?</tr>", runs, re.S).group(0)
    assert "failed: ValueError: &lt;bad&gt; rows" in row
    assert "<bad>" not in text
    assert "1 run(s) left notes" in text
    assert "notes=" not in text


def test_khat_regions_match_reliability_and_labels():
    from pyro_lvm.inference import reliability

    values = np.array([0.0, 0.49, 0.5, 0.6, 0.7, 0.7000001, 1.5, np.inf, np.nan])
    for draws in (25, 100, 1000):
        np.testing.assert_array_equal(figures.khat_regions(values, draws),
                                      reliability.khat_category(values, draws))
    assert list(figures.khat_regions(values, 100)[:4]) == ["good", "good", "good", "ok"]
    assert figures.KHAT_BAD == reliability.KHAT_BAD == 0.7
    assert analysis.metric_label("khat_bad_frac") == "fraction of test rows with k̂ > 0.7"
    assert "khat_unreliable_frac" in analysis.METRIC_COLUMNS
    # the figure copes with undetermined k-hats (all of one configuration's, even)
    uri = figures.khat_distribution({"a": np.array([0.1, np.inf, 0.8, np.nan]),
                                     "b": np.array([np.inf, np.inf])}, 25)
    assert uri.startswith(DATA_URI)


def test_report_to_explicit_output(tmp_path):
    study = make_study(tmp_path / "s", artifacts=False, priors=PRIORS[:2],
                       objectives=OBJECTIVES[:1], seeds=SEEDS[:2])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert render_report(study, out_dir) == out_dir / "index.html"
    assert render_report(study, tmp_path / "r.html").is_file()


def test_report_without_artifacts_omits_their_sections(tmp_path):
    study = make_study(tmp_path / "noart", artifacts=False, objectives=OBJECTIVES[:1])
    text = render_report(study).read_text(encoding="utf-8")
    check_html(text)
    assert 'id="fig-learning-curves"' in text and 'id="fig-test_log_likelihood"' in text
    for omitted in ("fig-samples", "fig-reconstructions", "fig-khat", "fig-latent-space",
                    "fig-prior-vs-aggregate"):
        assert omitted not in text
    shutil.rmtree(study / "runs")
    text = render_report(study).read_text(encoding="utf-8")
    check_html(text)
    assert "fig-learning-curves" not in text and "vamp-elbo-s0" in text
    assert "fig-test_log_likelihood" in text  # from results.csv alone


def test_report_when_every_run_failed(tmp_path):
    study = make_study(tmp_path / "allfailed", all_failed=True)
    text = render_report(study).read_text(encoding="utf-8")
    check_html(text)
    assert "nothing to compare" in text
    assert "<img" not in text
    assert 'id="results"' in text  # every configuration listed, with 0 finished and 3 failed
    assert len(re.findall(r"<td>0</td>\s*<td>3</td>", text)) == len(PRIORS) * len(OBJECTIVES)
    for prior in PRIORS:
        assert f"[{prior}-elbo-s0]" in text  # each run's own message


def test_report_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        render_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="study.json"):
        render_report(tmp_path / "empty")
    _write_json(tmp_path / "empty" / "study.json", {"name": "x"})
    with pytest.raises(FileNotFoundError, match="results.csv"):
        render_report(tmp_path / "empty")


# --------------------------------------------------------------------------- browser


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "/usr/bin/chromium"):
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_args(binary: str, profile: pathlib.Path) -> list[str]:
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            "--virtual-time-budget=10000"]


@pytest.mark.browser
def test_report_renders_in_headless_chromium(rendered, tmp_path):
    binary = find_chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("headless Chromium is required in CI (install Debian's `chromium`)")
        pytest.skip("chromium is not installed")
    _, path, text = rendered
    figure_count = len(re.findall(r"<img ", text))
    completed = subprocess.run(
        [*chromium_args(binary, tmp_path / "profile"), "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    dom = completed.stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None, dom[:500]
    assert 'data-broken-images="0"' in body.group(0), body.group(0)
    assert f'data-loaded-images="{figure_count}"' in body.group(0), body.group(0)
    assert figure_count == int(re.search(r'data-figure-count="(\d+)"', body.group(0)).group(1))


def _browser_layout(binary: str, path: pathlib.Path, profile: pathlib.Path) -> dict[str, str]:
    """Open ``path`` at 1280 px and read the page's own layout self-check from the DOM."""
    completed = subprocess.run(
        [*chromium_args(binary, profile), "--window-size=1280,4000", "--dump-dom",
         path.as_uri()], capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    body = re.search(r"<body[^>]*>", completed.stdout)
    assert body is not None, completed.stdout[:500]
    return dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', body.group(0)))


@pytest.mark.browser
def test_report_fits_1280_px_in_headless_chromium(rendered, tmp_path):
    """No section overflows horizontally and no figure is shrunk below its natural size."""
    binary = find_chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("headless Chromium is required in CI (install Debian's `chromium`)")
        pytest.skip("chromium is not installed")
    _, path, text = rendered
    layout = _browser_layout(binary, path, tmp_path / "profile")
    assert layout["data-overflowing"] == "none", layout
    assert layout["data-shrunk-images"] == "none", layout
    # positive control: a too-wide block and a squeezed figure are caught
    uri = re.search(r'<img src="([^"]+)"', text).group(1)
    broken = text.replace("</main>", '<section id="too-wide"><div style="width:3000px">x</div>'
                          f'</section><section id="squeezed"><img src="{uri}" '
                          'style="width:50px" alt="x"></section></main>')
    bad = tmp_path / "bad.html"
    bad.write_text(broken, encoding="utf-8")
    layout = _browser_layout(binary, bad, tmp_path / "profile2")
    assert "too-wide" in layout["data-overflowing"], layout
    assert "squeezed:50&lt;" in layout["data-shrunk-images"], layout


def test_report_linear_models_study_without_images(tmp_path):
    """Config values missing for some models (FA has no prior), exact log p(x) for some."""
    study = tmp_path / "linear"
    study.mkdir()
    _write_json(study / "study.json", {
        "name": "linear", "dataset": {"name": "digits", "shape": [1797, 61], "sha256": "cd" * 32,
                                      "image_shape": None, "discrete": False}})
    rows = []
    for model, prior, exact, base in (("fa", None, True, -60.0), ("ppca", None, True, -62.0),
                                       ("dlvm", "normal", False, -58.0)):
        for seed in (0, 1):
            ll = base + 0.1 * seed
            rows.append({"run_id": f"{model}-s{seed}", "model": model, "prior": prior,
                         "seed": seed, "status": "ok", "error": None,
                         "test_log_likelihood": ll, "test_log_likelihood_se": 0.01,
                         "exact_test_log_likelihood": ll + 0.005 if exact else None,
                         "test_elbo": ll - (0.0 if exact else 2.0)})
    pd.DataFrame(rows).to_csv(study / "results.csv", index=False)
    text = render_report(study).read_text(encoding="utf-8")
    check_html(text)
    # the DLVM has no exact value: ranked by the IS estimate
    assert "Which model?" in text and "Rank is by" not in text
    assert "by IS estimate of log p(x) (IWAE_K, K as configured)" in text
    assert "<td>dlvm</td>" in text  # prior is a function of the model: not in the label
    assert "Between levels of <code>model</code>" in text
    assert "exact log p(x) (linear models)" in text
    assert "fig-samples" not in text and "fig-reconstructions" not in text


def test_linear_models_verdict_ranks_by_the_exact_value_when_every_run_has_one(tmp_path):
    study = tmp_path / "exact"
    study.mkdir()
    _write_json(study / "study.json", {"name": "linear", "primary_factor": "model",
                                       "primary_metric": "test_log_likelihood"})
    rows = []
    # the IS estimates order fa above ppca; the exact values the other way round
    for model, is_value, exact in (("fa", -60.0, -61.0), ("ppca", -60.5, -60.2)):
        for seed in (0, 1, 2):
            rows.append({"run_id": f"{model}-s{seed}", "model": model, "seed": seed,
                         "status": "ok", "test_log_likelihood": is_value + 0.01 * seed,
                         "exact_test_log_likelihood": exact + 0.01 * seed * (model == "fa")})
    pd.DataFrame(rows).to_csv(study / "results.csv", index=False)
    text = render_report(study).read_text(encoding="utf-8")
    verdict = text[text.index('id="verdict"'):text.index('id="results"')]
    assert "by exact log p(x) (linear models)" in verdict
    assert "ppca &gt; fa by 0.79" in verdict
    results = text[text.index('id="results"'):text.index('id="key"')]
    assert re.search(r"<td>1</td>\s*<td>ppca</td>", results)


def test_report_of_interrupted_study_counts_pending_runs(tmp_path):
    """The runner writes rows with status "pending" for runs not done yet: not failures."""
    study = make_study(tmp_path / "interrupted", artifacts=False, priors=PRIORS[:2],
                       objectives=OBJECTIVES[:1], seeds=SEEDS[:2])
    results = pd.read_csv(study / "results.csv")
    results.loc[results["run_id"] == "mixture-elbo-s1", ["status", "test_log_likelihood"]] = \
        ["pending", np.nan]
    results.to_csv(study / "results.csv", index=False)
    meta = json.loads((study / "study.json").read_text())
    meta.update(status="interrupted", primary_factor="objective")
    _write_json(study / "study.json", meta)
    v = analysis.verdict(results, "test_log_likelihood")
    assert (v.n_ok, v.n_failed, v.n_pending) == (3, 0, 1)
    assert "1 of 4 runs have not run yet" in v.text
    text = render_report(study).read_text(encoding="utf-8")
    check_html(text)
    assert "not run yet" in text and 'id="failed"' not in text
    assert "study is interrupted" in text


def test_report_survives_unreadable_run_files(tmp_path):
    study = make_study(tmp_path / "corrupt", priors=PRIORS[:2], objectives=OBJECTIVES[:1],
                       seeds=SEEDS[:2])
    (study / "runs" / "normal-elbo-s0" / "artifacts.npz").write_bytes(b"not a zip file")
    (study / "runs" / "normal-elbo-s1" / "result.json").write_text("{truncated")
    text = render_report(study).read_text(encoding="utf-8")
    check_html(text)
    assert "artifacts.npz of run normal-elbo-s0 could not be read" in text
    assert "result.json of normal-elbo-s1 could not be read" in text
    assert 'id="fig-samples"' in text  # the other runs' artifacts are still drawn

"""Tests of reports/comparisons.py: Holm-adjusted intervals (hand computations with Student's t
closed forms for 2 degrees of freedom) and comparisons within strata, matched on the seed."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pyro_lvm.reports import comparisons


def t2_two_sided_p(t: float) -> float:
    """P(|T| > |t|) for Student's t with 2 df: 1 - |t| / sqrt(2 + t^2)."""
    return 1.0 - abs(t) / math.sqrt(2.0 + t * t)


def t2_quantile(p: float) -> float:
    """Student's t quantile with 2 df: (2p - 1) / sqrt(2 p (1 - p))."""
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


def test_holm_intervals_match_hand_computation():
    # t = 3, 1, 10 on 2 df; alpha = 0.05
    h = comparisons.holm_intervals([3.0, 1.0, 10.0], [1.0, 1.0, 1.0], [2, 2, 2], 0.95)
    p = [t2_two_sided_p(3.0), t2_two_sided_p(1.0), t2_two_sided_p(10.0)]
    np.testing.assert_allclose(h["p_value"], p, rtol=1e-10)
    # sorted: H3 (0.0098) <= 0.05/3 rejected; H1 (0.0955) > 0.05/2: stop, H1 and H2 accepted
    assert p[2] <= 0.05 / 3 and p[0] > 0.05 / 2
    assert h["rejected"].tolist() == [False, False, True]
    np.testing.assert_allclose(h["p_holm"], [max(3 * p[2], 2 * p[0]), max(2 * p[0], p[1]),
                                             3 * p[2]], rtol=1e-10)
    # interval levels: H3 at its own step 1 - 0.05/3, the rest at the first accepted step
    np.testing.assert_allclose(h["level"], [1 - 0.025, 1 - 0.025, 1 - 0.05 / 3])
    for i, (est, level) in enumerate([(3.0, 0.975), (1.0, 0.975), (10.0, 1 - 0.05 / 3)]):
        half = t2_quantile(0.5 + level / 2)
        assert h["ci_low"][i] == pytest.approx(est - half)
        assert h["ci_high"][i] == pytest.approx(est + half)
    # an interval excludes 0 exactly when Holm rejects
    assert ((h["ci_low"] > 0) == h["rejected"]).all()


def test_holm_is_step_down_not_bonferroni():
    # p = 0.01, 0.02, 0.04: Holm rejects all three (0.01 <= .05/3, 0.02 <= .05/2, 0.04 <= .05);
    # Bonferroni (0.05/3 for each) only the first
    def t_for(p):
        return math.sqrt(2.0) * (1 - p) / math.sqrt(1 - (1 - p) ** 2)

    h = comparisons.holm_intervals([t_for(0.04), t_for(0.01), t_for(0.02)], [1.0] * 3, [2] * 3)
    np.testing.assert_allclose(h["p_value"], [0.04, 0.01, 0.02], rtol=1e-9)
    assert h["rejected"].all()
    np.testing.assert_allclose(h["p_holm"], [0.04, 0.03, 0.04], rtol=1e-9)
    np.testing.assert_allclose(h["level"], [0.95, 1 - 0.05 / 3, 0.975])
    assert (h["ci_low"] > 0).all()
    bonferroni_low = h["estimate"] - t2_quantile(1 - 0.05 / 6) * h["se"]
    assert (bonferroni_low > 0).tolist() == [False, True, False]


def test_holm_intervals_all_rejected_and_untestable_rows():
    h = comparisons.holm_intervals([-50.0, 40.0, 1.0], [1.0, 1.0, np.nan], [2, 2, 2], 0.9)
    p = [t2_two_sided_p(50.0), t2_two_sided_p(40.0)]
    # two testable hypotheses; both rejected at 0.1/2 then 0.1/1
    order = np.argsort(p)
    assert h["rejected"].tolist() == [True, True, False]
    assert h["level"][order[0]] == pytest.approx(1 - 0.05)
    assert h["level"][order[1]] == pytest.approx(1 - 0.1)
    assert math.isnan(h["ci_low"][2]) and math.isnan(h["p_holm"][2])
    # a zero standard error (identical paired differences): known exactly
    h0 = comparisons.holm_intervals([0.8, 0.0], [0.0, 0.0], [2, 2])
    assert h0["rejected"].tolist() == [True, False]
    assert (h0["ci_low"][0], h0["ci_high"][0]) == (0.8, 0.8)
    with pytest.raises(ValueError, match="one length"):
        comparisons.holm_intervals([1.0], [1.0, 2.0], [2])


def _grid():
    """prior a vs b under two objectives with opposite signs; 3 seeds; 4 test rows per run."""
    rows, per_row = [], {}
    rng = np.random.default_rng(0)
    base_rows = rng.normal(size=4)
    for objective, effect in (("elbo", 1.0), ("iwae", -1.0)):
        for prior in ("a", "b"):
            for seed in range(3):
                run_id = f"{prior}-{objective}-{seed}"
                value = -10.0 + (effect if prior == "a" else 0.0) + 0.1 * seed \
                    + 0.02 * (seed == 1 and prior == "a")
                per_row[run_id] = base_rows + value + 0.05 * rng.normal(size=4)
                per_row[run_id] += value - per_row[run_id].mean()  # run mean = value exactly
                rows.append({"run_id": run_id, "prior": prior, "objective": objective,
                             "num_particles": 1 if objective == "elbo" else 5, "seed": seed,
                             "status": "ok", "test_log_likelihood": value,
                             "khat_unreliable_frac": 0.0})
    return pd.DataFrame(rows), per_row


def test_factor_comparisons_within_strata_not_pooled():
    frame, per_row = _grid()
    assert comparisons.strata_columns(frame, "prior", ["prior", "objective", "num_particles"]) \
        == (["objective"], [])
    c = comparisons.factor_comparisons(frame, "prior", columns=["prior", "objective",
                                                                "num_particles"],
                                       per_row=per_row).set_index("stratum")
    elbo, iwae = c.loc["objective=elbo"], c.loc["objective=iwae"]
    assert (elbo["level_a"], elbo["level_b"], elbo["n_pairs"]) == ("a", "b", 3)
    assert (iwae["level_a"], iwae["level_b"]) == ("b", "a")  # the better level first
    d = np.array([1.0, 1.02, 1.0])
    assert elbo["mean_difference"] == pytest.approx(d.mean())
    assert elbo["se_seed"] == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    # test-set se: rows' differences averaged over the matched seeds, sd / sqrt(N)
    e = np.mean([per_row[f"a-elbo-{s}"] - per_row[f"b-elbo-{s}"] for s in range(3)], axis=0)
    assert elbo["se_rows"] == pytest.approx(e.std(ddof=1) / 2.0)
    se = math.hypot(elbo["se_seed"], elbo["se_rows"])
    assert elbo["se"] == pytest.approx(se)
    df = se**4 / (elbo["se_seed"] ** 4 / 2 + elbo["se_rows"] ** 4 / 3)
    assert elbo["df"] == pytest.approx(df)
    assert elbo["called"] and iwae["called"]
    # pooled over objectives, the two effects cancel: the stratified comparison is what differs
    pooled = frame.groupby("prior")["test_log_likelihood"].mean()
    assert abs(pooled["a"] - pooled["b"]) < 0.01


def test_verdict_declines_on_unreliable_estimates():
    frame, per_row = _grid()
    columns = ["prior", "objective", "num_particles"]
    v = comparisons.factor_verdict(frame, "prior", columns=columns, per_row=per_row,
                                   num_khat_samples=1000)
    text = " ".join(v.sentences)
    assert "With objective=elbo: a > b by 1.01 nats/row" in text
    assert "no winner is called" not in text
    frame.loc[frame["prior"] == "b", "khat_unreliable_frac"] = 0.25
    v = comparisons.factor_verdict(frame, "prior", columns=columns, per_row=per_row,
                                   num_khat_samples=1000)
    text = " ".join(v.sentences)
    assert "no winner is called: 0% (a) and 25% (b) of the test rows have k̂ above 0.67" in text
    assert "more importance samples or a better guide" in text
    assert not v.comparisons["called"].any() and v.comparisons["distinguishable"].all()
    assert "between 0% and 25% of the test rows" in v.reliability


def test_levels_split_by_a_setting_that_determines_them():
    """compare_objectives: ELBO (K = 1) vs IWAE with K = 5 and 50; K is part of the level."""
    rows = []
    for objective, k, value in (("elbo", 1, -10.0), ("iwae", 5, -9.5), ("iwae", 50, -9.0)):
        for seed in range(3):
            rows.append({"run_id": f"{objective}{k}-{seed}", "objective": objective,
                         "num_particles": k, "seed": seed, "status": "ok",
                         "test_log_likelihood": value + 0.1 * seed + 0.01 * (seed == 1) * k})
    frame = pd.DataFrame(rows)
    columns = ["objective", "num_particles"]
    assert comparisons.refining_columns(frame, "objective", columns) == ["num_particles"]
    assert comparisons.strata_columns(frame, "objective", columns) == ([], [])
    c = comparisons.factor_comparisons(frame, "objective", columns=columns)
    assert set(zip(c["level_a"], c["level_b"])) == {
        ("iwae (num_particles=5)", "elbo (num_particles=1)"),
        ("iwae (num_particles=50)", "elbo (num_particles=1)"),
        ("iwae (num_particles=50)", "iwae (num_particles=5)")}
    assert (c["n_pairs"] == 3).all()


def test_verdict_without_k_hat_calls_with_a_caveat_and_exact_needs_none():
    frame, per_row = _grid()
    frame["khat_unreliable_frac"] = np.nan
    columns = ["prior", "objective", "num_particles"]
    v = comparisons.factor_verdict(frame, "prior", columns=columns, per_row=per_row)
    assert v.comparisons["called"].all()
    assert "reliable these importance-sampled estimates are is unknown" in " ".join(v.sentences)
    exact = frame.rename(columns={"test_log_likelihood": "exact_test_log_likelihood"})
    exact["khat_unreliable_frac"] = 0.9  # ignored: an exact value is not importance-sampled
    v = comparisons.factor_verdict(exact, "prior", "exact_test_log_likelihood",
                                   columns=columns, num_khat_samples=100)
    assert v.comparisons["called"].all() and v.reliability is None
    assert "unknown" not in " ".join(v.sentences)

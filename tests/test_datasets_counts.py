"""Loaders recognise count data and say which observation models suit them."""
import numpy as np
import pandas as pd
import pytest

from pyro_lvm.studies.datasets import load_dataset, validate_for_likelihood


def test_digits_kinds_and_suitable_likelihoods():
    counts = load_dataset("digits", scale=None, max_rows=60)
    assert counts.kind == "count" and counts.max_count == 16
    assert counts.suitable_likelihoods == ("poisson", "negbinomial", "binomial")
    assert counts.summary()["kind"] == "count"
    assert load_dataset("digits", max_rows=60).kind == "continuous"  # standardized
    assert load_dataset("digits", binarize=True, max_rows=60).kind == "binary"
    # a count likelihood keeps the digits as counts
    ds = load_dataset("digits", likelihood="poisson", max_rows=60)
    assert ds.kind == "count" and ds.scaling is None
    validate_for_likelihood(ds, "binomial", total_count=16)
    with pytest.raises(ValueError, match=r"above total_count.*row \d+, column \d+"):
        validate_for_likelihood(ds, "binomial", total_count=10)
    with pytest.raises(ValueError, match="scale=None"):
        validate_for_likelihood(load_dataset("digits", max_rows=60), "poisson")


def test_integer_csv_is_recorded_as_counts(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.poisson(3.0, size=(30, 4)).astype(float), columns=["g1", "g2", "g3", "g4"])
    path = tmp_path / "counts.csv"
    frame.to_csv(path, index=False)
    ds = load_dataset(str(path))
    assert ds.kind == "count" and "poisson" in ds.suitable_likelihoods
    assert load_dataset(str(path), likelihood="negbinomial").kind == "count"
    frame.loc[17, "g3"] = 2.5
    frame.to_csv(path, index=False)
    assert load_dataset(str(path)).kind == "continuous"
    with pytest.raises(ValueError, match=r"not non-negative integers.*row 17, column 2"):
        load_dataset(str(path), likelihood="poisson")


def test_one_hot_data_validate_for_categorical():
    x = np.eye(3)[np.random.default_rng(0).integers(0, 3, 20)]
    ds = load_dataset(x)
    assert ds.kind == "binary" and "categorical" in ds.suitable_likelihoods
    validate_for_likelihood(ds, "categorical")

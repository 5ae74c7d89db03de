"""studies.datasets: built-in data (digits, binarized MNIST with checksums), user data
(arrays, DataFrames, CSV) and the validation messages that name the problem."""
import hashlib

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_lvm.studies import datasets
from pyro_lvm.studies.datasets import MNIST_SHA256, Dataset, load_dataset
from pyro_lvm.studies.datasets import mnist  # patched where the lookup and checksums live
from pyro_lvm.studies.datasets.transforms import _split_indices

from conftest import mnist_path


def _rows(t: torch.Tensor) -> np.ndarray:
    """Rows sorted lexicographically (to compare multisets of rows)."""
    a = t.numpy()
    return a[np.lexsort(a.T[::-1])]


# ---------------------------------------------------------------------------------- digits
def test_digits_binarized_shapes_values_and_deterministic_split():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", binarize=True, likelihood="bernoulli")
    assert ds.sizes == {"train": 1437, "valid": 180, "test": 180}
    assert ds.data_dim == 64 and ds.image_shape == (8, 8) and ds.discrete
    assert all(getattr(ds, s).dtype == torch.float32 for s in ("train", "valid", "test"))
    # the three splits are a partition of the binarized rows, labels travel with their rows
    raw = load_digits()
    full = (raw.data > 8).astype(np.float32)
    together = torch.cat([ds.train, ds.valid, ds.test])
    np.testing.assert_array_equal(_rows(together), _rows(torch.from_numpy(full)))
    assert sorted(np.concatenate([ds.labels[s] for s in ("train", "valid", "test")])) == \
        sorted(raw.target)
    # deterministic given the seed, different for another seed
    again = load_dataset("digits", binarize=True)
    assert torch.equal(again.train, ds.train) and again.sha256 == ds.sha256
    other = load_dataset("digits", binarize=True, seed=1)
    assert other.sha256 != ds.sha256 and not torch.equal(other.train, ds.train)


def test_digits_continuous_drops_constant_columns_and_standardizes_on_train():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert not ds.discrete and ds.scaling["method"] == "standardize"
    assert ds.data_dim == 61 and sorted(set(range(64)) - set(ds.kept_columns)) == [0, 32, 39]
    assert torch.allclose(ds.train.mean(0), torch.zeros(61), atol=1e-5)
    assert torch.allclose(ds.train.std(0, unbiased=False), torch.ones(61), atol=1e-4)
    # to_images undoes scaling and column dropping: the test images are raw digits
    images = ds.to_images(ds.test)
    assert images.shape == (180, 8, 8)
    raw = load_digits().data.reshape(-1, 8, 8)
    idx = _split_indices(1797, (0.8, 0.1, 0.1), 0)["test"]
    np.testing.assert_allclose(images, raw[idx], atol=1e-4)
    minmax = load_dataset("digits", scale="minmax")
    assert float(minmax.train.min()) == 0.0 and float(minmax.train.max()) == 1.0


def test_max_rows_cuts_before_statistics():
    ds = load_dataset("digits", max_rows=40)
    assert ds.sizes == {"train": 40, "valid": 40, "test": 40}
    # standardized with the 40 rows actually used, constant columns of those rows dropped
    assert torch.allclose(ds.train.mean(0), torch.zeros(ds.data_dim), atol=1e-5)
    assert (ds.train.std(0) > 0).all()


def test_split_and_option_validation():
    with pytest.raises(ValueError, match="sum"):
        load_dataset("digits", split=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="unknown dataset 'digitz'"):
        load_dataset("digitz")
    with pytest.raises(ValueError, match="scale"):
        load_dataset("digits", scale="zscore")
    with pytest.raises(ValueError, match="likelihood"):
        load_dataset("digits", likelihood="zipf")
    with pytest.raises(ValueError, match="non-binary"):
        load_dataset("digits", binarize=True, scale="standardize")


# ---------------------------------------------------------------------------------- MNIST
def test_binarized_mnist_checksums_shapes_and_locations(monkeypatch, tmp_path):
    path = mnist_path()
    ds = load_dataset("binarized-mnist", max_rows=50)
    assert ds.sizes == {"train": 50, "valid": 50, "test": 50}
    assert ds.image_shape == (28, 28) and ds.data_dim == 784 and ds.discrete
    assert "SHA-256 verified" in ds.source
    arrays = datasets.load_binarized_mnist_arrays()
    for split, rows in datasets.MNIST_ROWS.items():
        assert arrays[split].shape == (rows, 784)
        assert hashlib.sha256(arrays[split].tobytes()).hexdigest() == MNIST_SHA256[split]
    assert abs(arrays["train"].mean() - 0.1306) < 5e-5  # README: mean pixel 0.1306
    np.testing.assert_array_equal(ds.test.numpy(), arrays["test"][:50])
    # the same file found through the environment variable (a directory) and data_path (a file)
    monkeypatch.setenv(datasets.ENV_VAR, str(path.parent))
    assert load_dataset("binarized-mnist", max_rows=5).sha256 == \
        load_dataset("binarized-mnist", data_path=path, max_rows=5).sha256


def test_corrupted_mnist_copy_fails_with_checksum_message(tmp_path):
    with np.load(mnist_path()) as z:
        packed = {k: z[k].copy() for k in z.files}
    packed["test"][123, 7] ^= 0b00010000  # one flipped pixel
    bad = tmp_path / "binarized_mnist.npz"
    np.savez(bad, **packed)
    with pytest.raises(ValueError) as err:
        load_dataset("binarized-mnist", data_path=tmp_path)
    msg = str(err.value)
    assert "SHA-256 mismatch for the test split" in msg and str(bad) in msg
    assert MNIST_SHA256["test"] in msg


def test_missing_mnist_lists_places_and_how_to_provide(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("binarized-mnist", data_path=tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "--data-path" in msg and "PYRO_LVM_DATA" in msg
    # no argument, no variable: the default places are all listed
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    monkeypatch.setattr(mnist, "checkout_root", lambda: tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("binarized-mnist")
    msg = str(err.value)
    for place in (tmp_path / "shared" / "data", tmp_path / "repo" / "data", tmp_path / "data"):
        assert str(place) in msg
    # an installed copy (no checkout) never looks beside its own files (site-packages)
    monkeypatch.setattr(mnist, "checkout_root", lambda: None)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("binarized-mnist")
    msg = str(err.value)
    assert str(tmp_path / "data") in msg and "shared" not in msg and "site-packages" not in msg
    # an empty directory named by the environment variable
    monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"\$PYRO_LVM_DATA"):
        load_dataset("binarized-mnist")


def test_mnist_amat_files_are_read_and_verified(monkeypatch, tmp_path):
    arrays = datasets.load_binarized_mnist_arrays()
    small = {s: a[:7] for s, a in arrays.items()}
    for split, a in small.items():
        np.savetxt(tmp_path / datasets.MNIST_AMAT[split], a, fmt="%d")
    # checksums of the 7-row files stand in for the published ones
    monkeypatch.setattr(mnist, "MNIST_SHA256",
                        {s: hashlib.sha256(a.tobytes()).hexdigest() for s, a in small.items()})
    ds = load_dataset("binarized-mnist", data_path=tmp_path)
    assert "amat" in ds.source
    np.testing.assert_array_equal(ds.valid.numpy(), small["valid"])
    monkeypatch.setattr(mnist, "MNIST_SHA256", MNIST_SHA256)  # the real ones: mismatch
    with pytest.raises(ValueError, match="7 rows read, 50000 expected"):
        load_dataset("binarized-mnist", data_path=tmp_path)


# ---------------------------------------------------------------------------------- user data
def _table(n=60, p=4, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(n, p)), columns=[f"v{j}" for j in range(p)])


def test_dataframe_and_csv_round_trip(tmp_path):
    df = _table()
    df["species"] = np.repeat(["a", "b", "c"], 20)
    path = tmp_path / "measurements.csv"
    df.to_csv(path, index=False)
    from_df = load_dataset(df, label_column="species")
    from_csv = load_dataset(path, label_column="species")
    assert from_csv.name == "measurements" and from_df.name == "user-data"
    assert from_csv.sha256 == from_df.sha256 and from_df.feature_names == ["v0", "v1", "v2", "v3"]
    # the splits partition the original rows; labels stay with their rows
    values = df[["v0", "v1", "v2", "v3"]].to_numpy(np.float32).copy()
    together = torch.cat([from_csv.train, from_csv.valid, from_csv.test])
    np.testing.assert_allclose(_rows(together), _rows(torch.from_numpy(values)), rtol=1e-6)
    first = from_csv.train[0].numpy()
    row = np.nonzero(np.all(np.isclose(values, first), axis=1))[0][0]
    assert from_csv.labels["train"][0] == df["species"][row]
    # arrays and dicts of fixed splits
    fixed = load_dataset({"train": values[:40], "valid": values[40:50], "test": values[50:]})
    assert fixed.sizes == {"train": 40, "valid": 10, "test": 10}
    np.testing.assert_array_equal(fixed.test.numpy(), values[50:])


def test_nan_and_inf_are_reported_with_row_and_column(tmp_path):
    df = _table()
    df.loc[7, "v2"] = np.nan
    with pytest.raises(ValueError, match=r"row 7, column 2 'v2': nan") as err:
        load_dataset(df)
    assert "allow_missing=True" in str(err.value)
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"row 7 \(line 9 of the file\), column 2 'v2'"):
        load_dataset(path)
    arr = df.to_numpy().copy()
    arr[7, 2], arr[11, 0] = 1.0, np.inf
    with pytest.raises(ValueError, match=r"row 11, column 0: inf"):
        load_dataset(arr)


def test_non_numeric_columns_are_named():
    df = _table()
    df["colour"] = "red"
    df["when"] = pd.Timestamp("2024-01-01")
    with pytest.raises(ValueError) as err:
        load_dataset(df)
    msg = str(err.value)
    assert "column 'colour'" in msg and "'red'" in msg and "column 'when'" in msg
    assert "'v0'" not in msg


def test_constant_columns_rejected_for_gaussian_models_unless_dropped():
    df = _table()
    df["v1"] = 3.0
    with pytest.raises(ValueError, match=r"column\(s\) 1 'v1' are constant"):
        load_dataset(df, likelihood="gaussian")
    with pytest.raises(ValueError, match="constant"):
        load_dataset(df, likelihood="studentt")
    with pytest.raises(ValueError, match="constant"):
        load_dataset(df, scale="standardize")
    ok = load_dataset(df, likelihood="gaussian", drop_constant=True)
    assert ok.feature_names == ["v0", "v2", "v3"] and ok.data_dim == 3
    load_dataset(df)  # no model said: kept as given


def test_bernoulli_needs_binary_values_named_by_row_and_column():
    x = (np.random.default_rng(0).random((50, 5)) > 0.5).astype(float)
    assert load_dataset(x, likelihood="bernoulli").discrete
    x[13, 4] = 0.5
    with pytest.raises(ValueError, match=r"outside \{0, 1\}.*\(row 13, column 4\)"):
        load_dataset(x, likelihood="bernoulli")
    assert load_dataset(x, likelihood="bernoulli", binarize=True).discrete
    with pytest.raises(ValueError, match=r"outside \{0, 1\}"):
        load_dataset("digits", likelihood="bernoulli")  # continuous digits


def test_wrong_width_and_too_few_rows():
    x = np.zeros((20, 3))
    with pytest.raises(ValueError, match="3 columns but the model expects data_dim=4"):
        load_dataset({"train": np.ones((20, 4)), "test": x})
    with pytest.raises(ValueError, match="2-D"):
        load_dataset(np.zeros(10))
    with pytest.raises(ValueError, match="2 row.*at least 3"):
        load_dataset(np.random.default_rng(0).normal(size=(2, 2)))
    with pytest.raises(ValueError, match="too few"):
        load_dataset(np.random.default_rng(0).normal(size=(3, 2)), split=(0.4, 0.3, 0.3))
    with pytest.raises(ValueError, match="different widths"):
        Dataset("bad", torch.zeros(3, 2), torch.zeros(1, 2), torch.zeros(1, 3))


def test_missing_values_become_a_mask_when_allowed():
    df = _table()
    df.loc[[3, 8], "v0"] = np.nan
    df.loc[8, "v3"] = np.nan
    ds = load_dataset(df, allow_missing=True, split=(1.0 - 0.2, 0.0, 0.2))
    masks = torch.cat([ds.masks["train"], ds.masks["valid"], ds.masks["test"]])
    data = torch.cat([ds.train, ds.valid, ds.test])
    assert int((~masks).sum()) == 3 and torch.all(data[~masks] == 0)
    assert ds.mask("train").dtype == torch.bool and ds.valid.shape == (0, 4)
    # each missing entry sits in the row that held the NaN: rows with 2 missing = old row 8
    two = masks.sum(1) == 2
    assert int(two.sum()) == 1
    np.testing.assert_allclose(data[two][0, 1:3].numpy(), df.loc[8, ["v1", "v2"]].to_numpy(), rtol=1e-6)
    # inf is never "missing"; a fully missing row cannot be modelled
    df.loc[5, "v1"] = np.inf
    with pytest.raises(ValueError, match="infinite values are not missing"):
        load_dataset(df, allow_missing=True)
    df.loc[5, "v1"] = 0.0
    df.loc[9, :] = np.nan
    with pytest.raises(ValueError, match="no observed entry"):
        load_dataset(df, allow_missing=True)


def test_explicit_mask_and_masked_sha():
    x = np.random.default_rng(1).normal(size=(30, 3))
    mask = np.ones_like(x, dtype=bool)
    mask[4, 1] = False
    x[4, 1] = np.nan  # allowed: masked out
    ds = load_dataset(x, mask=mask)
    assert int((~torch.cat([ds.masks[s] for s in ("train", "valid", "test")])).sum()) == 1
    assert ds.sha256 != load_dataset(np.nan_to_num(x)).sha256
    with pytest.raises(ValueError, match="mask"):
        load_dataset(x, mask=mask[:, :2])


def test_contaminate_changes_only_the_chosen_training_rows():
    clean = load_dataset("digits")
    dirty = datasets.contaminate(clean, fraction=0.05, scale=10.0, seed=3)
    changed = (dirty.train != clean.train).any(1)
    assert int(changed.sum()) == round(0.05 * clean.sizes["train"])
    assert torch.equal(dirty.test, clean.test) and torch.equal(dirty.valid, clean.valid)
    assert dirty.sha256 != clean.sha256 and "gross errors" in dirty.source
    # gross: the added errors have standard deviation 10 (4 standard errors of the sd)
    diffs = (dirty.train - clean.train)[changed]
    assert abs(float(diffs.std()) - 10.0) < 4 * 10.0 / np.sqrt(2 * diffs.numel())
    assert datasets.contaminate(clean, fraction=0.0) is clean
    with pytest.raises(ValueError, match="fraction"):
        datasets.contaminate(clean, fraction=1.0)


def test_dequantized_digits_stay_within_their_integer_cell():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", dequantize=True, scale=None)
    assert ds.name == "digits-dequantized" and ds.data_dim == 64  # no constant column left
    idx = _split_indices(1797, (0.8, 0.1, 0.1), 0)["train"]
    raw = load_digits().data[idx]
    offset = ds.train.double().numpy() - raw
    assert offset.min() >= 0 and offset.max() < 1 + 1e-5
    assert torch.equal(load_dataset("digits", dequantize=True).train,
                       load_dataset("digits", dequantize=True).train)
    with pytest.raises(ValueError, match="dequantize"):
        load_dataset("digits", dequantize=True, binarize=True)

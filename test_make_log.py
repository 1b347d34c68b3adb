"""phoenix_synthetic.make_log / write_log and scripts/make_log.py: a realistic log generator.

Each property the docstring promises is measured on a small log (10k-12k rows, under a second each) with
a stated tolerance: series follows near the parameter, repeats, popularity skew, taste drift, shuffled
rows, string ids; the files read back through phoenix_log.read_log in every format as the table itself;
and the sequential signal is there (the transition baseline beats popularity).
"""

import importlib.util
import io
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import phoenix_evaluation as evaluation
import phoenix_log
import phoenix_split
import phoenix_synthetic as synthetic

REPO = Path(__file__).resolve().parent
LONG = dict(num_users=120, num_items=3000, length_sigma=0.0)  # 100 rows per user: per-user shares are measurable


@pytest.fixture(scope="module")
def log():
    return synthetic.make_log(10_000, seed=3, truth_columns=True)


def by_user(table: pa.Table):
    """The table's columns as NumPy arrays, rows by user, then time."""
    d = table.to_pandas().sort_values(["user_id", "timestamp"], kind="stable")
    return {name: d[name].to_numpy() for name in d.columns}


def follow_rate(d) -> float:
    """Share of a user's next rows that are the next item of the previous row's series (where it has one)."""
    has = (d["user_id"][1:] == d["user_id"][:-1]) & (d["series_next"][:-1] != "")
    return float(np.mean(d["item_id"][1:][has] == d["series_next"][:-1][has]))


def repeat_share(d) -> float:
    """Share of rows whose (user, item) pair came earlier."""
    keys = np.char.add(np.char.add(d["user_id"].astype(str), "|"), d["item_id"].astype(str))
    return 1 - len(np.unique(keys)) / len(keys)


def drift(d) -> float:
    """Mean over users of the total variation distance between their first and second halves' categories."""
    categories = np.unique(d["category"])
    users, starts = np.unique(d["user_id"], return_index=True)
    ends = np.append(starts[1:], len(d["user_id"]))
    distances = []
    for start, end in zip(starts, ends):  # per user (120 of them), not per row
        codes = np.searchsorted(categories, d["category"][start:end])
        half = len(codes) // 2
        early, late = (np.bincount(c, minlength=len(categories)) / len(c) for c in (codes[:half], codes[half:]))
        distances.append(0.5 * np.abs(early - late).sum())
    return float(np.mean(distances))


def test_the_log_is_a_function_of_the_seed():
    assert synthetic.make_log(3_000, seed=1).equals(synthetic.make_log(3_000, seed=1))
    assert not synthetic.make_log(3_000, seed=1).equals(synthetic.make_log(3_000, seed=2))


def test_default_sizes_match_the_issue():
    """197k rows: about 6,000 users and 3,000 items; 1M rows: about 30,000 users and 12,000 items."""
    assert synthetic.default_log_sizes(197_000) == (5970, 3000)
    users, items = synthetic.default_log_sizes(1_000_000)
    assert users == 30303 and abs(items - 12_000) < 100


def test_ids_are_strings_times_iso_and_rows_shuffled(log):
    assert log.column_names == ["user_id", "item_id", "timestamp", "category", "series_next"]
    assert all(re.fullmatch(r"u\d{3}", u) for u in log["user_id"].to_pylist())  # 303 users: 3 digits
    assert all(re.fullmatch(r"sku-\d{3}", i) for i in log["item_id"].to_pylist())
    assert all(re.fullmatch(r"2024-\d\d-\d\dT\d\d:\d\d:\d\dZ|2025-.*Z", t) for t in log["timestamp"].to_pylist())
    users = np.asarray(log["user_id"].to_pylist())
    assert np.mean(users[1:] != users[:-1]) > 0.95  # shuffled: consecutive rows are mostly other users
    # The shuffle only reorders: the unshuffled log holds the same rows, grouped by user in time order.
    ordered = synthetic.make_log(10_000, seed=3, truth_columns=True, shuffle=False)
    assert not ordered.equals(log)
    for name, column in by_user(ordered).items():
        np.testing.assert_array_equal(column, by_user(log)[name])
    d = ordered.to_pandas()
    assert (d.groupby("user_id", sort=False).timestamp.apply(lambda t: t.is_monotonic_increasing)).all()


def test_unix_timestamps_are_the_iso_times_in_seconds(log):
    unix = synthetic.make_log(10_000, seed=3, truth_columns=True, timestamps="unix")
    assert unix["timestamp"].type == pa.int64()
    iso = np.array([t.rstrip("Z") for t in log["timestamp"].to_pylist()], "datetime64[s]").astype(np.int64)
    np.testing.assert_array_equal(unix["timestamp"].to_numpy(), iso)


@pytest.mark.parametrize("follow", [0.35, 0.6])
def test_series_follow_at_the_rate_asked(follow):
    """Fresh draws and repeats land on the next item by chance too, rarely: within 0.03 of the parameter
    (about 8,600 pairs: a standard error of 0.005)."""
    d = by_user(synthetic.make_log(12_000, seed=3, truth_columns=True, series_follow=follow, **LONG))
    assert abs(follow_rate(d) - follow) < 0.03


def test_repeats_are_reconsumptions_at_about_the_rate_asked():
    """With repeat_prob 0.2, about 0.2 x (1 - follows) of the rows are re-consumptions on top of the
    chance repeats of repeat_prob 0 (measured: 0.118 -> 0.249 with these sizes)."""
    none, some = (repeat_share(by_user(synthetic.make_log(12_000, seed=3, truth_columns=True, repeat_prob=p, **LONG)))
                  for p in (0.0, 0.2))
    assert 0.08 < some - none < 0.2


def test_popularity_is_skewed(log):
    """Zipf: the most popular tenth of the items takes several times its share of the rows (0.33 measured)."""
    counts = np.sort(np.unique(log["item_id"].to_numpy(zero_copy_only=False), return_counts=True)[1])[::-1]
    assert counts[:len(counts) // 10].sum() / counts.sum() > 0.25
    flat = synthetic.make_log(10_000, seed=3, zipf_exponent=0.0)
    flat_counts = np.sort(np.unique(flat["item_id"].to_numpy(zero_copy_only=False), return_counts=True)[1])[::-1]
    assert flat_counts[:len(flat_counts) // 10].sum() / flat_counts.sum() < 0.2


def test_tastes_drift_from_early_to_late():
    """Early and late halves of a user's categories differ more with drift (0.404 at 0.6) than without
    (0.325: sampling noise and series runs); a standard error of about 0.01 over 120 users."""
    still, drifting = (drift(by_user(synthetic.make_log(12_000, seed=3, truth_columns=True, drift=p, **LONG)))
                       for p in (0.0, 0.6))
    assert drifting > still + 0.04


def test_the_transition_baseline_beats_popularity(log):
    """The sequential signal is there (measured at 20k rows: NDCG@10 0.27 vs 0.07)."""
    split = phoenix_split.split_log(phoenix_log.from_arrays(log), stream=io.StringIO())
    ndcg = {name: evaluation.evaluate_baseline(split, "val", name)["NDCG@10"] for name in evaluation.BASELINES}
    assert ndcg["transition"] > 2 * ndcg["popularity"]


@pytest.mark.parametrize("name", ["log.csv", "log.csv.gz", "log.tsv", "log.tsv.gz", "log.parquet"])
@pytest.mark.parametrize("timestamps", ["iso", "unix"])
def test_each_format_reads_back_as_the_table(tmp_path, name, timestamps):
    table = synthetic.make_log(2_000, seed=5, timestamps=timestamps)
    path = synthetic.write_log(tmp_path / name, table)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left
    read, expected = phoenix_log.read_log(path), phoenix_log.from_arrays(table)
    for field in ("user", "item", "timestamp"):
        np.testing.assert_array_equal(getattr(read, field), getattr(expected, field))
    assert read.datetimes == (timestamps == "iso")


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "log.csv"
    path.write_text("old")
    import pyarrow.csv

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pyarrow.csv, "write_csv", fail)
    with pytest.raises(OSError, match="disk full"):
        synthetic.write_log(path, synthetic.make_log(100, num_users=10, num_items=20, num_categories=2))
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]


@pytest.mark.parametrize("call, message", [
    (lambda: synthetic.make_log(10, num_users=5), r"num_rows: expected at least 3 rows per user \(15 for 5 users\), "
                                                   r"got 10"),
    (lambda: synthetic.make_log(100, timestamps="ms"), r"timestamps: expected one of \('iso', 'unix'\), got 'ms'"),
    (lambda: synthetic.make_log(100, num_items=5, num_categories=6),
     r"num_categories: expected at most num_items \(5\) categories"),
    (lambda: synthetic.make_log(100, series_follow=1.5), r"series_follow"),
    (lambda: synthetic.write_log("log.json", pa.table({"a": [1]})), r"log.json: expected a name ending in one of "
                                                                     r"\.csv, .*got 'log.json'"),
], ids=["too-few-rows", "bad-timestamps", "more-categories-than-items", "follow-above-1", "unknown-suffix"])
def test_bad_arguments_name_themselves_and_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_script_writes_a_log_and_keeps_an_existing_one(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_log_script", REPO / "scripts" / "make_log.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "shop.csv.gz"
    script.main(["--rows", "3000", "--seed", "2", "--out", str(out)])
    assert "3000 rows" in capsys.readouterr().out
    table = synthetic.make_log(3_000, seed=2)
    np.testing.assert_array_equal(phoenix_log.read_log(out).item, phoenix_log.from_arrays(table).item)
    with pytest.raises(SystemExit):
        script.main(["--rows", "3000", "--out", str(out)])
    assert "exists; pass --overwrite" in capsys.readouterr().err

"""phoenix_pipeline.py: reading logs (CSV, arrays), ids, the splits, bad input, the run directory,
and one end-to-end run of `run_train.py --data LOG.csv` on a tiny generated log whose checkpoints
load into the runners. The quick-start notebook runs in test_quickstart_notebook_runs.

LOG: 30 users with string ids walk runs of consecutive items among 48 (item m is usually
followed by m + 1), with ratings, a favorite_score column and an author per item. Models are tiny
(D = 16, one layer) so that each jitted function compiles in seconds.
"""

import contextlib
import csv
import io
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import movielens as ml
import phoenix_log as logs
import phoenix_split
import phoenix_two_stage as two_stage
import phoenix_pipeline as pipeline
import phoenix_run_dir as run_dir
import run_train
import train_synthetic
from phoenix_inputs import ACTIONS
from runners import RecsysInferenceRunner, RecsysRetrievalInferenceRunner
from test_train_movielens import write_world

REPO = Path(__file__).resolve().parent
NUM_USERS, NUM_ITEMS = 30, 48
TINY_FLAGS = ["--emb-size", "16", "--num-layers", "1", "--history-len", "4", "--ranker-history-len", "4",
              "--retrieval-batch-size", "16", "--ranker-batch-size", "32", "--retrieval-epochs", "3",
              "--ranker-epochs", "2", "--learning-rate", "3e-3", "--warmup-steps", "5", "--hard-negatives", "2",
              "--random-negatives", "1", "--negative-pool", "6", "--retrieve-k", "12", "--evals-per-stage", "2",
              "--user-table-size", "997", "--post-table-size", "1009", "--author-table-size", "499"]


def write_log(path: Path, seed: int = 0) -> None:
    """LOG (module docstring) as CSV, rows shuffled; user ids "u00".."u29", item ids "i00".."i47"."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(NUM_USERS):
        current, seen = int(rng.integers(NUM_ITEMS)), []
        while len(seen) < int(rng.integers(10, 17)):
            if current not in seen:
                seen.append(current)
            current = (current + 1 + int(rng.random() < 0.2)) % NUM_ITEMS
        for t, item in enumerate(seen):
            rating = int(rng.integers(1, 6))
            rows.append([f"u{user:02d}", f"i{item:02d}", 1000 + 10 * t + user, rating, int(rating >= 4),
                         f"a{item % 6}"])
    rng.shuffle(rows)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp", "rating", "favorite_score", "author_id"])
        writer.writerows(rows)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- reading and ids


def test_csv_columns_ids_and_actions(tmp_path):
    path = write(tmp_path / "log.csv", "u,item_id,timestamp,stars,share_score,note\n"
                                       'alice,12,100,4,0,"a, quoted"\nbob,007,90,2,1,x\nalice,7,101,5,0,y\n')
    log = logs.read_csv(path, logs.Columns(user="u", rating="stars"))
    assert log.tokens("user", log.user) == ["alice", "bob", "alice"]  # strings, hashed by string_id
    np.testing.assert_array_equal(log.user, [logs.string_id("alice"), logs.string_id("bob")] * 1
                                  + [logs.string_id("alice")])
    assert log.tokens("item", log.item) == ["12", "007", "7"]  # "007" is not 7: the column is strings
    assert log.line is None and [log.at(r) for r in range(3)] == [f"{path}:{line}" for line in (2, 3, 4)]
    A = {name: log.actions[:, ACTIONS.index(name)].tolist() for name in
         ("click_score", "favorite_score", "share_score", "not_interested_score")}
    # click: every row; favorite >= 4 and not_interested <= 2 from the stars; share from its column.
    assert A == {"click_score": [True] * 3, "favorite_score": [True, False, True],
                 "share_score": [False, True, False], "not_interested_score": [False, True, False]}
    assert log.actions.sum() == 3 + 2 + 1 + 1


def test_integer_ids_stay_raw_and_string_ids_are_stable(tmp_path):
    log = logs.read_csv(write(tmp_path / "log.csv", "user_id,item_id,timestamp\n5,9223372036854775807,1\n6,0,2\n"))
    assert log.names == {} and log.user.tolist() == [5, 6] and log.item.tolist() == [2**63 - 1, 0]
    # Golden values: string_id must never change, or served ids stop matching trained rows.
    assert logs.string_id("alice") == 4966672586037949734
    assert logs.string_id("") == 6510301506637419378
    assert all(0 <= logs.string_id(t) < 2**63 for t in ("x", "ü", "a" * 1000))


def test_a_string_id_collision_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "string_id", lambda token: 42)
    with pytest.raises(logs.LogError, match=r"ids 'a' and 'b' hash to the same int64 42"):
        logs.read_csv(write(tmp_path / "log.csv", "user_id,item_id,timestamp\na,1,1\nb,2,2\n"))


def test_from_arrays_equals_read_csv(tmp_path):
    path = tmp_path / "log.csv"
    write_log(path)
    from_file = logs.read_csv(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    data = {name: [row[name] for row in rows] for name in rows[0]}
    data["timestamp"] = np.array(data["timestamp"], np.int64)
    data["rating"] = np.array(data["rating"], np.float64)
    data["favorite_score"] = np.array(data["favorite_score"], np.int64)
    from_dict = logs.from_arrays(data)
    for field in ("user", "item", "timestamp", "actions", "author", "rating"):
        np.testing.assert_array_equal(getattr(from_dict, field), getattr(from_file, field), err_msg=field)
    assert from_dict.names == from_file.names


def test_a_movielens_csv_splits_as_movielens(tmp_path):
    """The tiny MovieLens world written as a CSV splits exactly as `--data DIR` does (u.data holds no
    genres, so authors are 0 either way), with the same actions per position."""
    write_world(tmp_path)
    lines = [line.split("\t") for line in (tmp_path / "u.data").read_text().splitlines()]
    path = write(tmp_path / "ml.csv", "user_id,item_id,rating,timestamp\n" + "".join(",".join(f) + "\n" for f in lines))
    ours = phoenix_split.split_log(logs.read_csv(path))
    theirs = ml.movielens_split(ml.load_ratings(tmp_path))
    for field in [f.name for f in phoenix_split.Split.__dataclass_fields__.values()] + ["actions"]:
        np.testing.assert_array_equal(getattr(ours, field), getattr(theirs, field), err_msg=field)


# --------------------------------------------------------------------------- splits


TIES = "user_id,item_id,timestamp\n" + "".join(f"u,{i},{t}\n" for i, t in
                                                [(1, 10), (3, 20), (2, 20), (4, 5), (5, 30)]) + "v,1,1\nv,2,2\nv,3,3\n"


def test_leave_one_out_sorts_stably_and_takes_the_last_two(tmp_path):
    split = phoenix_split.split_log(logs.read_csv(write(tmp_path / "log.csv", TIES)))
    u = int(np.flatnonzero(split.user_ids == logs.string_id("u"))[0])
    sequence = split.items[split.offsets[u]:split.offsets[u + 1]].tolist()
    assert sequence == [4, 1, 3, 2, 5]  # time order; items 3 and 2 tie at t=20 and keep file order
    assert split.train_len[u] == 3 and split.has_eval.all()
    val, test = split.item_ids[split.targets("val")], split.item_ids[split.targets("test")]
    assert (val[split.eval_users() == u][0], test[split.eval_users() == u][0]) == (2, 5)
    # Evaluation excludes every earlier item of the user, never the target.
    exclude = split.exclude_mask("test")[list(split.eval_users()).index(u)]
    assert sorted(split.item_ids[exclude].tolist()) == [1, 2, 3, 4]


def test_repeats_are_dropped_keeping_the_earliest_or_refused(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\nu,1,1\nu,2,2\nu,1,3\nu,3,4\nu,3,4\nv,1,1\nv,2,2\n")
    stream = io.StringIO()
    split = phoenix_split.split_log(logs.read_csv(path), stream=stream)
    assert "dropped 2 repeated" in stream.getvalue() and f"{path}:4 repeats {path}:2" in stream.getvalue()
    # u keeps 1 (line 2), 2, 3 (line 5: the exact duplicate on line 6 goes too); v keeps both.
    assert split.items.tolist() == [1, 2, 3, 1, 2] and [split.log.at(r) for r in split.rows] == [
        f"{path}:{line}" for line in (2, 3, 5, 7, 8)]
    with pytest.raises(logs.LogError, match=rf"{path}:4: user 'u' and item 1 already at {path}:2 \(2 such"):
        phoenix_split.split_log(logs.read_csv(path), duplicates="error")


CUT_LOG = ("user_id,item_id,timestamp\n"
           "a,1,1\na,2,2\na,3,3\na,4,10\na,5,11\n"  # evaluated: val 3 (last before 10), test 4 (first after)
           "b,1,1\nb,2,12\n"  # one item before the cut: trains on item 1 only
           "c,1,11\nc,2,12\nc,3,13\n"  # nothing before the cut: dropped
           "d,1,1\nd,2,2\nd,3,3\nd,4,4\n")  # nothing after: trains on everything, not evaluated


def test_time_split_keeps_the_future_out(tmp_path):
    log = logs.read_csv(write(tmp_path / "log.csv", CUT_LOG))
    split = phoenix_split.split_log(log, "time", cut_time=10)
    users = {log.token("user", u): r for r, u in enumerate(split.user_ids)}
    assert set(users) == {"a", "b", "d"}
    a = users["a"]
    assert split.items[split.offsets[a]:split.offsets[a + 1]].tolist() == [1, 2, 3, 4]
    assert split.eval_users().tolist() == [a] and split.train_len[a] == 2
    assert split.item_ids[split.targets("val")].tolist() == [3] and split.item_ids[split.targets("test")].tolist() == [4]
    assert split.lengths[users["b"]] == split.train_len[users["b"]] == 1
    assert split.train_len[users["d"]] == 4 and not split.has_eval[users["d"]]
    visible = split.timestamps[np.arange(len(split.items)) < np.repeat(split.offsets[:-1] + split.train_len,
                                                                       split.lengths)]
    assert visible.max() < 10  # no training interaction at or after the cut
    # A quantile cut: the median of the 14 timestamps (method "higher") is 4.
    by_quantile = phoenix_split.split_log(log, "time", cut_quantile=0.5)
    by_time = phoenix_split.split_log(log, "time", cut_time=4)
    assert by_quantile.rows.tolist() == by_time.rows.tolist() and by_time.has_eval.sum() == 2


# --------------------------------------------------------------------------- bad input


HEADER = "user_id,item_id,timestamp,rating\n"
GOOD = "u1,1,10,4\nu1,2,11,3\nu2,1,12,5\nu2,3,13,1\n"

BAD_CSV = [
    ("missing_column", "user_id,item,timestamp\nu1,1,1\n", {}, r"log.csv:1: missing column 'item_id' \(the item column; "
     r"name another with --item-col"),
    ("missing_named_rating", HEADER + GOOD, {"rating": "stars"}, r"log.csv:1: missing column 'stars' \(the rating"),
    ("short_line", HEADER + "u1,1,10,4\nu1,2,11\n", {}, r"log.csv:3: expected 4 fields separated by ',' .*got 3"),
    ("long_line", HEADER + GOOD + "u3,1,1,1,9\n", {}, r"log.csv:6: expected 4 fields .*got 5"),
    ("non_numeric_timestamp", HEADER + "u1,1,10,4\nu1,2,yesterday,3\n", {},
     r"log.csv:3: column 'timestamp': expected a number \(e\.g\. Unix seconds\), got 'yesterday'"),
    ("infinite_timestamp", HEADER + "u1,1,10,4\nu1,2,inf,3\n", {}, r"log.csv:3: column 'timestamp': expected a number"),
    ("nan_rating", HEADER + "u1,1,10,4\nu1,2,11,nan\n", {}, r"log.csv:3: column 'rating': expected a finite number, "
     r"got nan"),
    ("empty_rating", HEADER + "u1,1,10,4\nu1,2,11,\n", {}, r"log.csv:3: column 'rating': expected a finite number, "
     r"got ''"),
    ("empty_id", HEADER + "u1,1,10,4\n,2,11,3\n", {}, r"log.csv:3: column 'user_id': expected an id, got an empty"),
    ("empty_log", HEADER, {}, r"log.csv: no interactions"),
    ("empty_file", "", {}, r"log.csv:1: expected a header line"),
    ("one_user", HEADER + "u1,1,10,4\nu1,2,11,3\nu1,3,12,3\n", {}, r"only one user \('u1'\) in 3 interactions"),
    ("one_item", HEADER + "u1,1,10,4\nu2,1,11,3\n", {}, r"only one item \(1\) in 2 interactions"),
    ("header_twice", "user_id,item_id,timestamp,user_id\nu,1,1,u\n", {}, r"column 'user_id' appears twice"),
    ("action_not_binary", "user_id,item_id,timestamp,favorite_score\nu1,1,1,1\nu2,2,2,2\n", {},
     r"log.csv:3: column 'favorite_score': expected 0 or 1, got '2'"),
    ("two_authors", "user_id,item_id,timestamp,author_id\nu1,1,1,a\nu2,2,2,b\nu2,1,3,c\n", {},
     r"log.csv:4: item 1 has author 'c', but 'a' at .*log.csv:2"),
]


@pytest.mark.parametrize("text, columns, message", [case[1:] for case in BAD_CSV], ids=[case[0] for case in BAD_CSV])
def test_bad_csv_names_the_line_and_column(tmp_path, text, columns, message):
    with pytest.raises(logs.LogError, match=message):
        logs.read_csv(write(tmp_path / "log.csv", text), logs.Columns(**columns))


def test_bad_bytes_and_formats(tmp_path):
    path = tmp_path / "log.csv"
    path.write_bytes(HEADER.encode() + b"u1,1,10,4\nu\xff,2,11,3\n")
    with pytest.raises(logs.LogError, match=r"log.csv:3: not valid UTF-8 \(byte 0xff\)"):
        logs.read_csv(path)
    (tmp_path / "log.zip").write_bytes(b"PK\x03\x04" + bytes(16))  # Parquet and gzip read: test_phoenix_log.py
    with pytest.raises(logs.LogError, match=r"log.zip: is a zip archive .* --data <\(unzip -p LOG.zip\)"):
        logs.read_csv(tmp_path / "log.zip")
    with pytest.raises(FileNotFoundError, match=r"missing.csv: no such file \(expected a log"):
        logs.read_log(tmp_path / "missing.csv")


BAD_ARRAYS = [
    ("float_ids", {"user_id": [1.0, 2.0], "item_id": [1, 2], "timestamp": [1, 2]}, TypeError,
     r"column 'user_id': expected integer or string ids, got dtype float64"),
    ("lengths", {"user_id": [1, 2], "item_id": [1, 2, 3], "timestamp": [1, 2]}, ValueError,
     r"expected 1-D columns of one length"),
    ("nan_rating", {"user_id": [1, 2], "item_id": [1, 2], "timestamp": [1, 2], "rating": [1.0, np.nan]},
     logs.LogError, r"<arrays> row 1: column 'rating': expected a finite number, got nan"),
    ("bool_time", {"user_id": [1, 2], "item_id": [1, 2], "timestamp": [True, False]}, TypeError,
     r"column 'timestamp': expected a number .* got dtype bool"),
    ("half_action", {"user_id": [1, 2], "item_id": [1, 2], "timestamp": [1, 2], "click_score": [1.0, 0.5]},
     logs.LogError, r"row 1: column 'click_score': expected 0 or 1, got 0.5"),
]


@pytest.mark.parametrize("data, kind, message", [case[1:] for case in BAD_ARRAYS], ids=[case[0] for case in BAD_ARRAYS])
def test_bad_arrays_name_the_column_and_row(data, kind, message):
    with pytest.raises(kind, match=message):
        logs.from_arrays(data)


def test_negative_integer_ids_are_strings_not_padding():
    log = logs.from_arrays({"user_id": [-1, 5], "item_id": [1, 2], "timestamp": [1, 2]})
    assert log.tokens("user", log.user) == ["-1", "5"] and log.user.min() >= 0


def test_recipes_the_log_cannot_support_name_the_flag(tmp_path):
    write_log(tmp_path / "log.csv")
    split = phoenix_split.split_log(logs.read_csv(tmp_path / "log.csv"))
    recipe = two_stage.resolve_recipe(two_stage.Recipe(), split)
    assert recipe.retrieve_k == two_stage.recommendable(split) < two_stage.RETRIEVE_K  # shrunk: a small log
    for change, flag in (({"retrieve_k": NUM_ITEMS}, "--retrieve-k"), ({"ranker_batch_size": 10**6}, "--ranker-batch-size"),
                         ({"negative_pool": NUM_ITEMS}, "--negative-pool"), ({"score_action": "reply_score"},
                                                                              "--score-action"),
                         ({"pooling": "max"}, "--pooling"),
                         ({"ranker_listwise_weight": -1.0}, "--ranker-listwise-weight"),
                         ({"popularity_weight": float("nan")}, "--popularity-weight"),
                         ({"retrieval_weight": float("inf")}, "--retrieval-weight"),
                         ({"retrieval_members": 0}, "--retrieval-members"),
                         ({"ranker_members": 0}, "--ranker-members"),
                         ({"ranker_members": 1.5}, "--ranker-members")):
        with pytest.raises(two_stage.RecipeError, match=flag):
            two_stage.check_recipe(split, two_stage.resolve_recipe(two_stage.Recipe(**change), split))


# --------------------------------------------------------------------------- the command line, end to end


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`run_train.py --data LOG.csv --dump-topk ... --plot` once, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("cli")
    write_log(tmp / "log.csv")
    argv = ["--data", str(tmp / "log.csv"), "--checkpoint-dir", str(tmp / "run"), "--dump-topk", str(tmp / "top.csv"),
            "--plot", *TINY_FLAGS]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # kept in stderr.txt: test_a_baseline_that_wins_is_one_line_on_stderr
        result = run_train.main(argv)
    (tmp / "stderr.txt").write_text(err.getvalue())
    return tmp, argv, result


def test_cli_reports_every_row_and_the_dump_recomputes_to_the_table(cli_run):
    tmp, _, result = cli_run
    assert set(result["table"]) == {(w, n) for w in ("val", "test")
                                    for n in ("popularity", "transition", "retrieval", "two-stage")}
    check, ours = result["dump_check"], result["table"][("test", "two-stage")]
    assert check["num_users"] == NUM_USERS and check["missing_users"] == 0 and check["history_items_in_topk"] == 0
    assert check["HR@10"] == pytest.approx(ours["HR@10"], abs=1e-12)
    assert check["NDCG@10"] == pytest.approx(ours["NDCG@10"], abs=1e-12)
    with open(tmp / "top.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:2] == ["user_id", "item_1"] and len(rows) == NUM_USERS + 1
    assert all(row[0].startswith("u") and all(item.startswith("i") for item in row[1:]) for row in rows[1:])


def test_cli_writes_the_metrics_log_and_the_plot(cli_run):
    tmp, _, result = cli_run
    entries = pipeline.read_metrics(tmp / "run" / pipeline.METRICS_FILE)
    for stage in pipeline.STAGES:
        losses = [e for e in entries if e["stage"] == stage and "loss" in e]
        evals = [e for e in entries if e["stage"] == stage and "eval/NDCG@10" in e]
        assert len(losses) >= 2 and len(evals) == 2
        best = max(evals, key=lambda e: e["eval/NDCG@10"])
        assert best["eval/NDCG@10"] == pytest.approx(result[f"{stage}_best"]["NDCG@10"])
    rows = {(e["split"], e["model"]): e for e in entries if e["stage"] == "evaluation"}
    assert rows.keys() == result["table"].keys()
    assert all(rows[key]["HR@10"] == pytest.approx(m["HR@10"]) for key, m in result["table"].items())
    png = (tmp / "run" / pipeline.PLOT_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1200, 450) and len(png) > 20_000  # two panels with curves, not an empty canvas
    # What the run wrote is recognised as Phoenix's by a later --overwrite, and the manifest says what it was.
    for name, kind in run_entries_written(tmp / "run").items():
        assert run_dir.entry_problem(tmp / "run" / name, kind) is None, name
    manifest = run_dir.read_manifest(tmp / "run")
    assert manifest["kind"] == "pipeline" and manifest["source"] == str(tmp / "log.csv") and manifest["seed"] == 0
    assert (tmp / "run" / pipeline.METRICS_FILE).read_text().splitlines()[0] == json.dumps(run_dir.METRICS_HEADER)


# --------------------------------------------------------------------------- the baselines' warning light

VAL = {"popularity": 0.10, "transition": 0.30, "retrieval": 0.20, "two-stage": 0.25}  # val NDCG@10


def table_of(val: dict) -> dict:
    """A run's table with these val NDCG@10s (test rows: the baselines' always win, and must not count)."""
    return {**{("val", name): {"HR@10": 0.5, "NDCG@10": value} for name, value in val.items()},
            **{("test", name): {"HR@10": 0.5, "NDCG@10": 1.0 if name in ("popularity", "transition") else 0.0}
               for name in val}}


@pytest.mark.parametrize("val, recipe, expected", [
    (VAL, two_stage.Recipe(), "warning: the transition baseline beats retrieval and two-stage on validation NDCG@10 "
     "(0.3000 vs 0.2000, 0.2500); try --pooling last (now mean), a longer --history-len (now 5), more "
     "--retrieval-epochs (now 8), more --ranker-epochs (now 4) (README: the table)"),
    ({**VAL, "two-stage": 0.31}, two_stage.Recipe(pooling="last", history_len=50, retrieval_epochs=2.5),
     "warning: the transition baseline beats retrieval on validation NDCG@10 (0.3000 vs 0.2000); try a longer "
     "--history-len (now 50), more --retrieval-epochs (now 2.5) (README: the table)"),
    ({**VAL, "transition": 0.05, "retrieval": 0.08}, two_stage.Recipe(),
     "warning: the popularity baseline beats retrieval on validation NDCG@10 (0.1000 vs 0.0800); try --pooling "
     "last (now mean), a longer --history-len (now 5), more --retrieval-epochs (now 8) (README: the table)"),
    ({**VAL, "retrieval": 0.31, "two-stage": 0.32}, two_stage.Recipe(), None),
    ({**VAL, "retrieval": 0.30, "two-stage": 0.30}, two_stage.Recipe(), None),  # a tie is no defeat
], ids=["transition-beats-both", "beats-retrieval-only", "popularity-beats-retrieval", "models-win", "tie"])
def test_baseline_warning_names_the_winner_the_figures_and_what_to_try(val, recipe, expected):
    assert pipeline.baseline_warning(table_of(val), recipe) == expected


@pytest.mark.parametrize("val, warns", [(VAL, True), ({**VAL, "retrieval": 0.31, "two-stage": 0.32}, False)],
                         ids=["baseline-wins", "models-win"])
def test_the_warning_is_one_stderr_line_and_one_metrics_entry_or_nothing(tmp_path, val, warns):
    stream, log = io.StringIO(), pipeline.MetricsLog(tmp_path / pipeline.METRICS_FILE)
    line = pipeline.report_baseline_warning(table_of(val), two_stage.Recipe(), stream, log)
    entries = [e for e in pipeline.read_metrics(log.path) if e["stage"] == "warning"]
    if warns:
        assert stream.getvalue() == line + "\n" and line.startswith("warning: the transition baseline beats")
        assert entries == [{"stage": "warning", "split": "val", "model": "baseline", "message": line}]
    else:
        assert line is None and stream.getvalue() == "" and entries == []


def test_a_baseline_that_wins_is_one_line_on_stderr(cli_run):
    """The tiny CLI run is undertrained on a next-item log: the transition baseline wins, and the run says so
    last on stderr, in its result and in metrics.jsonl."""
    tmp, _, result = cli_run
    val = {name: m["NDCG@10"] for (which, name), m in result["table"].items() if which == "val"}
    assert val["transition"] > max(val["retrieval"], val["two-stage"])  # the case this test is about
    assert result["warning"] == pipeline.baseline_warning(result["table"], result["recipe"])
    assert result["warning"].startswith("warning: the transition baseline beats retrieval and two-stage")
    assert (tmp / "stderr.txt").read_text().splitlines()[-1] == result["warning"]
    entries = pipeline.read_metrics(tmp / "run" / pipeline.METRICS_FILE)
    assert [e["message"] for e in entries if e["stage"] == "warning"] == [result["warning"]]


def run_entries_written(path) -> dict:
    names = run_dir.run_entries(path, pipeline.RUN_ENTRIES)
    assert set(names) == {"retrieval", "ranker", "metrics.jsonl", "curves.png", "run.json", "serving"}
    return names


def test_checkpoints_load_into_the_runners_and_score_as_the_pipeline(cli_run):
    tmp, _, result = cli_run
    split = result["split"]
    retriever = RecsysRetrievalInferenceRunner.from_checkpoint(str(tmp / "run" / "retrieval"))
    items = pipeline.items_batch(split, retriever.runner.model.hash_config)
    np.testing.assert_allclose(np.asarray(retriever.encode_candidates(items))[0],
                               two_stage.encode_items(result["retrieval"], result["retrieval_params"], split), atol=1e-5)
    ranker = RecsysInferenceRunner.from_checkpoint(str(tmp / "run" / "ranker"))
    recipe = result["recipe"]
    examples = phoenix_split.phoenix_examples(split, "test", recipe.ranker_history_len)
    columns = result["stage_one"]["test"].topk[:, :recipe.num_candidates]  # [U, C]
    batch = phoenix_split.phoenix_batch(split, examples, ranker.runner.model.hash_config, split.item_ids[columns])
    logits = two_stage.ranker_logits(result["ranker"], result["ranker_params"], split, examples, columns,
                                    recipe.num_candidates)
    np.testing.assert_allclose(np.asarray(ranker.rank(batch).scores), 1 / (1 + np.exp(-logits)), atol=1e-5)


def test_recommend_returns_unseen_items_best_first(cli_run):
    _, _, result = cli_run
    split = result["split"]
    top = pipeline.recommend(result, "u03", k=5)
    row = pipeline.user_row(split, "u03")  # rows follow the hashed ids, not the strings
    seen = split.log.tokens("item", split.items[split.offsets[row]:split.offsets[row + 1]])
    assert split.log.token("user", split.user_ids[row]) == "u03" and len(seen) >= 10
    assert len(top) == 5 and not {item for item, _ in top} & set(seen)
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    with pytest.raises(ValueError, match="'nobody' is not a user of the run's log"):
        pipeline.recommend(result, "nobody")


def test_a_second_run_refuses_the_directory_before_reading_the_log(cli_run, monkeypatch):
    tmp, argv, _ = cli_run
    before = {p: p.stat().st_mtime_ns for p in (tmp / "run").rglob("*")}
    monkeypatch.setattr(pipeline, "read_log", lambda *a, **k: pytest.fail("the log was read"))
    with pytest.raises(FileExistsError, match=r"run: holds an earlier run \(ranker, retrieval, metrics.jsonl, "
                                              r"curves.png, run.json, serving\); pass --resume \(resume=True\) to "
                                              r"continue it where it stopped, --overwrite"):
        run_train.main(argv)
    assert {p: p.stat().st_mtime_ns for p in (tmp / "run").rglob("*")} == before  # nothing touched
    pipeline.check_run_dir(tmp / "run", overwrite=True)  # asked: allowed
    with pytest.raises(FileExistsError):  # the library refuses too, not only the command line
        pipeline.run(cli_run[2]["split"], two_stage.Recipe(), tmp / "run")


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    """cli_run's command with --retrieval-members 2 --ranker-members 2."""
    tmp = tmp_path_factory.mktemp("ensemble")
    write_log(tmp / "log.csv")
    return tmp, run_train.main(["--data", str(tmp / "log.csv"), "--checkpoint-dir", str(tmp / "run"), *TINY_FLAGS,
                                "--retrieval-members", "2", "--ranker-members", "2"])


def test_a_retrieval_ensemble_is_its_members_read_as_one(cli_run, ensemble_run):
    """Member 0 is the single model of the same seed (bit for bit), member 1 another model; each is
    saved and loads into the runner; the ensemble's representations are the members' concatenated
    / sqrt(2): unit norm, and their dot products the mean of the members' cosines."""
    tmp, result = ensemble_run
    split, model, params = result["split"], result["retrieval"], result["retrieval_params"]
    assert isinstance(model, two_stage.RetrievalEnsemble) and len(params) == 2
    single = cli_run[2]["retrieval_params"]
    for module, named in single.items():
        for name, value in named.items():
            np.testing.assert_array_equal(params[0][module][name], value)
    assert any(not np.array_equal(params[1][m][n], v) for m, named in single.items() for n, v in named.items())
    best = result["retrieval_best"]
    assert len(best["steps"]) == 2 and best["step"] == best["steps"][0]
    reloaded = pipeline.load_members(str(tmp / "run"), params, "retrieval")
    members = []
    for m, stage in enumerate(("retrieval", "retrieval.1")):
        runner = RecsysRetrievalInferenceRunner.from_checkpoint(str(tmp / "run" / stage))
        items = np.asarray(runner.encode_candidates(pipeline.items_batch(split, runner.runner.model.hash_config)))[0]
        np.testing.assert_allclose(items, two_stage.encode_items(model.members[m], params[m], split), atol=1e-5)
        members.append(items)
        for module, named in params[m].items():
            for name, value in named.items():
                np.testing.assert_array_equal(reloaded[m][module][name], value)
    joined = two_stage.encode_items(model, params, split)  # [N, 2D]
    np.testing.assert_allclose(joined, np.concatenate(members, axis=1) / np.sqrt(2), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(joined, axis=1), 1.0, atol=1e-5)
    examples = phoenix_split.phoenix_examples(split, "test", result["recipe"].history_len)
    users = [two_stage.encode_users(member, p, split, examples) for member, p in zip(model.members, params)]
    mean_cosine = (users[0] @ members[0].T + users[1] @ members[1].T) / 2  # [U, N]
    one = result["stage_one"]["test"]
    np.testing.assert_allclose(one.topk_scores, np.take_along_axis(mean_cosine, one.topk, axis=1), atol=1e-5)
    with pytest.raises(ValueError, match="expected 2 members' params, got 1"):
        model.predict(params[:1], pipeline.items_batch(split, model.hash_config))


def test_a_ranker_ensemble_averages_its_members_logits(ensemble_run):
    """Both rankers are saved and load into the runner; the ensemble's logits (what TwoStage
    re-ranks by) are the mean of the members' own."""
    tmp, result = ensemble_run
    split, recipe, model, params = result["split"], result["recipe"], result["ranker"], result["ranker_params"]
    assert isinstance(model, two_stage.RankerEnsemble) and len(params) == 2
    assert len(result["ranker_best"]["steps"]) == 2
    examples = phoenix_split.phoenix_examples(split, "test", recipe.ranker_history_len)
    columns = result["stage_one"]["test"].topk[:, :recipe.num_candidates]  # [U, C]
    members = [two_stage.ranker_logits(m, p, split, examples, columns, recipe.num_candidates)
               for m, p in zip(model.members, params)]  # each [U, C, A]
    assert not np.allclose(members[0], members[1], atol=1e-3)  # two different models
    np.testing.assert_allclose(result["two_stage"]["test"].logits[:, :recipe.num_candidates],
                               (members[0] + members[1]) / 2, atol=1e-5)
    batch = phoenix_split.phoenix_batch(split, examples, model.hash_config, split.item_ids[columns])
    for m, stage in enumerate(("ranker", "ranker.1")):
        runner = RecsysInferenceRunner.from_checkpoint(str(tmp / "run" / stage))
        np.testing.assert_allclose(np.asarray(runner.rank(batch).scores), 1 / (1 + np.exp(-members[m])), atol=1e-5)


def test_an_ensemble_run_recommends_and_its_members_block_the_directory(ensemble_run):
    tmp, result = ensemble_run
    split = result["split"]
    top = pipeline.recommend(result, "u03", k=5)
    assert len(top) == 5 and [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    lone = tmp / "lone"
    (lone / "retrieval.1").mkdir(parents=True)  # members left behind still hold a run's checkpoints
    (lone / "ranker.2").mkdir()
    with pytest.raises(FileExistsError, match=r"holds an earlier run \(ranker.2, retrieval.1\)"):
        pipeline.check_run_dir(lone)


def test_the_console_script_prints_bad_input_without_a_traceback(tmp_path, monkeypatch, capsys):
    path = write(tmp_path / "log.csv", HEADER + "u1,1,10,4\nu1,2,later,3\n")
    monkeypatch.setattr(sys, "argv", ["phoenix-train", "--data", str(path), "--checkpoint-dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exit_info:
        run_train.cli()
    assert exit_info.value.code == 2
    assert f"phoenix-train: error: {path}:3: column 'timestamp'" in capsys.readouterr().err


@pytest.mark.parametrize("data, kind", [("synthetic", "synthetic"), ("movielens-100k", "movielens"),
                                        ("DIR", "movielens"), ("log.csv", "log")])
def test_run_train_dispatches_by_data(data, kind, tmp_path, monkeypatch):
    data = str(tmp_path) if data == "DIR" else data
    monkeypatch.setattr(train_synthetic, "run", lambda options, argv: ("called", "synthetic", options.seed))
    for other in ("log", "movielens"):
        monkeypatch.setattr(run_train, f"train_{other}", lambda command, other=other: ("called", other,
                                                                                          command.run.seed))
    assert run_train.parse_args(["--data", data]).kind == kind
    assert run_train.main(["--data", data, "--seed", "1"]) == ("called", kind, 1)


def test_plot_without_matplotlib_fails_before_training(tmp_path, monkeypatch):
    write_log(tmp_path / "log.csv")
    split = phoenix_split.split_log(logs.read_csv(tmp_path / "log.csv"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(pipeline, "train_retrieval", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(pipeline.MissingExtraError, match=r"in a clone, `uv sync --extra plot` \(or `pip install "
                                                         r"'\.\[plot\]'`\)"):
        pipeline.run(split, two_stage.Recipe(), tmp_path / "run", plot=True)


# --------------------------------------------------------------------------- the notebook


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    """examples/quickstart.ipynb top to bottom in a fresh kernel (small sizes: PHOENIX_QUICKSTART_FAST)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("PHOENIX_QUICKSTART_FAST", "1")
    monkeypatch.setenv("PHOENIX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "| test | two-stage |" in outputs and "recommended for" in outputs and "runners agree" in outputs
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1


def test_rating_actions_flag_parses_ranges_and_names_bad_ones(tmp_path):
    assert run_train.parse_rating_actions("favorite_score=4:5, not_interested_score=:2") == {
        "favorite_score": (4.0, 5.0), "not_interested_score": (-np.inf, 2.0)}
    for bad, message in (("favorite_score=4", "expected ACTION=LOW:HIGH"), ("liked=4:5", "unknown action 'liked'"),
                         ("favorite_score=5:4", "expected low <= high"), ("favorite_score=a:5", "expected numbers")):
        with pytest.raises(Exception, match=message):
            run_train.parse_rating_actions(bad)
    # The mapping is what the actions become: 10-point ratings, favorite from 8.
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp,rating\nu1,1,1,9\nu2,2,2,7\n")
    log = logs.read_csv(path, rating_actions=run_train.parse_rating_actions("favorite_score=8:"))
    assert log.actions[:, ACTIONS.index("favorite_score")].tolist() == [True, False]
    assert log.actions[:, ACTIONS.index("click_score")].all()


# --------------------------------------------------------------------------- prefix representations


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_prefix_representations_equal_the_user_tower_on_each_cut(pooling):
    """prefix_user_representations at position p = build_user_representation of the batch cut to
    history slots 0..p-1, for each pooling (running mean / last valid output), with padded slots
    (at the end and in the middle) among the history."""
    import dataclasses

    import haiku as hk
    import jax

    from conftest import A, C, D, S, tiny_retrieval_config
    from runners import create_example_batch

    cfg = tiny_retrieval_config()
    cfg.pooling = pooling
    cfg.initialize()
    batch, emb = create_example_batch(3, D, S, C, A, seed=1)
    post = np.array(batch.history_post_hashes)
    post[0, 3:] = 0  # a short history
    post[1, 2] = 0  # a gap
    batch = batch._replace(history_post_hashes=post)
    prefix = hk.transform(lambda b, e: two_stage.prefix_user_representations(cfg.make(), b, e))
    user = hk.transform(lambda b, e: cfg.make().build_user_representation(b, e)[0])
    params = jax.jit(user.init)(jax.random.PRNGKey(0), batch, emb)

    def cut(p):
        """The batch and embeddings cut to history slots 0..p-1."""
        return (batch._replace(**{f: getattr(batch, f)[:, :p] for f in batch._fields if f.startswith("history_")}),
                dataclasses.replace(emb, history_post_embeddings=emb.history_post_embeddings[:, :p],
                                    history_author_embeddings=emb.history_author_embeddings[:, :p]))

    @jax.jit  # one compiled program: the prefix pass and the user tower on each cut (its own history length)
    def prefix_and_cuts(params):
        return (prefix.apply(params, None, batch, emb),  # [B, 1+S, D]
                [user.apply(params, None, *cut(p)) for p in range(1, S + 1)])  # S x [B, D]

    got, cuts = prefix_and_cuts(params)
    for p, expected in enumerate(cuts, start=1):
        np.testing.assert_allclose(np.asarray(got)[:, p], expected, rtol=1e-4, atol=2e-5,
                                   err_msg=f"prefix of {p} slots")


def test_prefix_representations_refuse_bidirectional_attention():
    import haiku as hk
    import jax

    from conftest import A, C, D, S, tiny_retrieval_config
    from runners import create_example_batch

    cfg = tiny_retrieval_config(bidirectional_history=True)
    batch, emb = create_example_batch(2, D, S, C, A, seed=0)
    prefix = hk.transform(lambda b, e: two_stage.prefix_user_representations(cfg.make(), b, e))
    with pytest.raises(ValueError, match="bidirectional_history"):
        prefix.init(jax.random.PRNGKey(0), batch, emb)

"""phoenix_serving.py and run_recommend.py: a run directory serves exactly what the run evaluated.

One tiny run of `run_train.py --data LOG.parquet --dump-topk` (test_phoenix_pipeline's LOG as Parquet:
string ids, an Arrow timestamp column, ratings and a favorite_score column, so history actions vary;
its tiny recipe) is shared by the tests. The central one loads the run directory in a fresh process,
with the log moved away, and checks that recommend(run, u, 10, history=<u's evaluation history>)
equals u's dump row for every test user: same items, same order (no tolerance: equality by
construction, phoenix_serving.top_items).
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

import phoenix_checkpoint as checkpoint
import phoenix_evaluation as evaluation
import phoenix_metrics as metrics
import phoenix_pipeline as pipeline
import phoenix_run_dir as run_dir
import phoenix_serving as serving
import phoenix_split
import phoenix_two_stage as two_stage
import run_recommend
import run_train
from phoenix_inputs import ACTIONS
from test_phoenix_pipeline import NUM_USERS, TINY_FLAGS, write_log

REPO = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tmp, run() result) of `run_train.py --data log.parquet --checkpoint-dir run --dump-topk top.csv` +
    TINY_FLAGS: test_phoenix_pipeline's LOG (string ids) as Parquet, its times an Arrow timestamp column
    (the format and time type a served run is most often trained on); the three re-ranking weights non-zero
    (validation may choose 0 on so small a log: then the served score would not depend on the retrieval
    cosine, the popularity or the transition counts, and the tests could not see them)."""
    tmp = tmp_path_factory.mktemp("serve")
    write_log(tmp / "log.csv")
    table = pa_csv.read_csv(tmp / "log.csv", convert_options=pa_csv.ConvertOptions(
        column_types={"user_id": pa.string(), "item_id": pa.string(), "author_id": pa.string()}))
    seconds = table["timestamp"].cast(pa.int64()).to_numpy() + 1_700_000_000
    table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                             pa.array(seconds.astype("datetime64[s]"), pa.timestamp("s", tz="UTC")))
    pq.write_table(table, tmp / "log.parquet")
    (tmp / "log.csv").unlink()
    result = run_train.main(["--data", str(tmp / "log.parquet"), "--checkpoint-dir", str(tmp / "run"),
                             "--dump-topk", str(tmp / "top.csv"), *TINY_FLAGS, "--retrieval-weight", "0.5",
                             "--popularity-weight", "0.25", "--transition-weight", "1.0"])
    assert result["split"].log.datetimes  # read as a time column (int64 ns UTC)
    return tmp, result


def read_csv_rows(path) -> list:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def action_names(actions: np.ndarray) -> list:
    """[L, A] bool -> one list of ACTIONS names per item."""
    return [[ACTIONS[a] for a in np.flatnonzero(row)] for row in actions]


def evaluation_histories(split: phoenix_split.LogSplit, which: str = "test") -> dict:
    """{original user id: {"history": original item ids, "actions": names per item}} of each evaluated
    user: every item before their `which` target, oldest first (what the evaluation ranked after)."""
    out = {}
    visible = split.visible_len(which)
    for row in split.eval_users().tolist():
        positions = np.arange(split.offsets[row], split.offsets[row] + visible[row])
        out[split.log.token("user", split.user_ids[row])] = {
            "history": split.log.tokens("item", split.items[positions]),
            "actions": action_names(split.actions[positions])}
    return out


FRESH = """
import json, sys
import phoenix_pipeline as pipeline
run = pipeline.load_run(sys.argv[1])
asked = json.load(open(sys.argv[2]))
out = {"given": {}, "logged": {}}
for user, h in asked.items():
    out["given"][user] = pipeline.recommend(run, user, 10, history=h["history"], actions=h["actions"])
    out["logged"][user] = pipeline.recommend(run, user, 10)
json.dump(out, open(sys.argv[3], "w"))
"""


@pytest.fixture(scope="module")
def fresh(trained):
    """What a fresh Python process, given only the run directory (the log moved away), recommends
    for every test user: on their evaluation history ("given") and on their saved one ("logged")."""
    tmp, result = trained
    (tmp / "asked.json").write_text(json.dumps(evaluation_histories(result["split"])))
    (tmp / "log.parquet").rename(tmp / "log.away")
    try:
        done = subprocess.run([sys.executable, "-c", FRESH, str(tmp / "run"), str(tmp / "asked.json"),
                               str(tmp / "served.json")], cwd=tmp, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        (tmp / "log.away").rename(tmp / "log.parquet")
    assert done.returncode == 0, done.stderr
    return json.loads((tmp / "served.json").read_text())


def test_a_fresh_process_serves_every_test_user_exactly_as_dumped(trained, fresh):
    tmp, result = trained
    dump = {row[0]: row[1:] for row in read_csv_rows(tmp / "top.csv")[1:]}
    assert len(dump) == NUM_USERS and set(fresh["given"]) == set(dump)
    for user, items in dump.items():
        assert [item for item, _ in fresh["given"][user]] == items, user  # same items, same order
    # The scores too, to the last bit: the test evaluation's re-ranking scores of the dumped lists.
    split, evaluated = result["split"], result["two_stage"]["test"]
    final = two_stage.rerank_scores(evaluated.logits, evaluated.retrieval, result["retrieval_weight"],
                                    result["recipe"].temperature, result["recipe"].score_action,
                                    evaluated.popularity, result["popularity_weight"], evaluated.transition,
                                    result["transition_weight"])  # [U, K]
    assert result["transition_weight"] == 1.0 and evaluated.transition.any()  # the prior takes part
    final = np.sort(final, axis=1)[:, ::-1][:, :10]
    users = split.log.tokens("user", split.user_ids[split.eval_users()])
    assert {user: [s for _, s in fresh["given"][user]] for user in users} == dict(zip(users, final.tolist()))
    assert len(set(final[0].tolist())) > 1


def test_history_none_serves_the_end_of_log_history_computed_directly(trained, fresh):
    """recommend(run, u) in the fresh process equals a direct computation on the log's split: each
    user's whole sequence (all users at once, one matrix product), retrieval's top-K among the items
    they have not had, re-ranked with the chosen weights and the test evaluation's popularity."""
    _, result = trained
    split, recipe = result["split"], result["recipe"]
    rows = np.arange(len(split.user_ids))
    ends = split.offsets[1:]
    examples = phoenix_split.histories(split, rows, ends, recipe.history_len)
    examples["target_post_ids"] = split.items[ends - 1]
    users = two_stage.encode_users(result["retrieval"], result["retrieval_params"], split, examples)  # [U, D]
    items = two_stage.encode_items(result["retrieval"], result["retrieval_params"], split)  # [N, D]
    scores = users @ items.T  # [U, N]: many rows, as the evaluation's product
    seen = np.zeros(scores.shape, bool)
    seen[np.repeat(rows, split.lengths), split.item_columns] = True
    top = metrics.topk_columns(scores, recipe.retrieve_k, seen)  # [U, K]
    assert (top != metrics.NOT_RANKED).all()  # this log leaves every user retrieve_k items
    logits = two_stage.ranker_logits(result["ranker"], result["ranker_params"], split,
                                     phoenix_split.histories(split, rows, ends, recipe.ranker_history_len), top,
                                     recipe.num_candidates)
    popularity = np.log1p(evaluation.popularity_counts(split, "test").astype(np.float64))[top]
    follows = two_stage.transition_prior(two_stage.transition_pairs(evaluation.transition_table(split, "test")),
                                         len(split.item_ids), split.item_columns[ends - 1], top)  # [U, K]
    final = two_stage.rerank_scores(logits, np.take_along_axis(scores, top, axis=1), result["retrieval_weight"],
                                    recipe.temperature, recipe.score_action, popularity, result["popularity_weight"],
                                    follows, result["transition_weight"])
    order = np.argsort(-final, axis=1, kind="stable")[:, :10]
    expected = {split.log.token("user", split.user_ids[r]): split.log.tokens("item", split.item_ids[top[r, order[r]]])
                for r in rows}
    assert {user: [item for item, _ in got] for user, got in fresh["logged"].items()} == expected
    # ... and the in-memory run (result["served"]) gives the same lists and scores as the fresh process.
    for user, got in fresh["logged"].items():
        assert pipeline.recommend(result, user, 10) == [tuple(pair) for pair in got]


def test_the_serving_directory_is_phoenixs_own_and_proportional_to_the_log(trained):
    tmp, result = trained
    split = result["split"]
    path = tmp / "run" / serving.SERVING_DIR
    assert run_dir.entry_problem(path, "checkpoint") is None  # a later --overwrite recognises it
    saved = checkpoint.load_checkpoint(path)  # verified against the sha256 in meta.json
    info = saved.extra
    assert info["format"] == serving.SERVING_FORMAT and info["format_version"] == serving.SERVING_VERSION
    assert info["recipe"] == json.loads(json.dumps(two_stage.dataclasses.asdict(result["recipe"])))
    assert (info["retrieval_weight"], info["popularity_weight"], info["transition_weight"]) == (
        result["retrieval_weight"], result["popularity_weight"], result["transition_weight"])
    assert info["columns"]["user"] == "user_id" and info["id_kinds"]["user"].startswith("string")
    arrays = saved.params
    np.testing.assert_array_equal(arrays["popularity"], evaluation.popularity_counts(split, "test"))
    for name, counted in zip(("transition_indptr", "transition_to", "transition_count"),
                             evaluation.transition_table(split, "test")):  # the transition prior's counts
        np.testing.assert_array_equal(arrays[name], counted)
    np.testing.assert_array_equal(arrays["item_ids"][arrays["history_columns"]], split.items)
    np.testing.assert_array_equal(serving._unpack_actions(arrays["history_actions"]), split.actions)
    assert serving._decode_strings(arrays["names"]["user"]).tolist() == split.log.tokens("user", split.user_ids)
    R, U, N = len(split.items), len(split.user_ids), len(split.item_ids)
    name_bytes = sum(a.nbytes for kind in arrays["names"].values() for a in kind.values())
    numeric = sum(a.nbytes for key, a in arrays.items() if key != "names")
    pairs = len(arrays["transition_to"])  # distinct consecutive pairs: at most one per interaction
    assert 0 < pairs <= R
    assert numeric == 8 * R + 16 * U + 8 + 24 * N + 8 * (N + 1) + 16 * pairs  # int32 column + uint32 actions
    # per interaction; with the transition prior, its CSR
    with np.load(path / checkpoint.ARRAYS_FILE) as stored:  # + each array's npy header and zip entry
        assert os.path.getsize(path / checkpoint.ARRAYS_FILE) < numeric + name_bytes + 400 * len(stored.files)


def test_the_command_line_equals_recommend_per_user(trained, tmp_path):
    tmp, result = trained
    out = tmp_path / "recs.csv"
    assert run_recommend.main(["--run", str(tmp / "run"), "--out", str(out), "--scores"])["users"] == NUM_USERS
    rows = read_csv_rows(out)
    assert rows[0] == ["user_id"] + [f"item_{j}" for j in range(1, 11)] + [f"score_{j}" for j in range(1, 11)]
    assert len(rows) == NUM_USERS + 1
    for row in rows[1:]:
        expected = pipeline.recommend(result, row[0], 10)
        assert row[1:11] == [item for item, _ in expected] and [float(s) for s in row[11:]] == [s for _, s in expected]
    users = tmp_path / "users.txt"
    users.write_text("user_id\nu07\n\nu03\n")
    run_recommend.main(["--run", str(tmp / "run"), "--users", str(users), "--k", "3", "--out", str(out), "--overwrite"])
    assert read_csv_rows(out)[1:] == [[u] + [item for item, _ in pipeline.recommend(result, u, 3)]
                                      for u in ("u07", "u03")]


def test_the_command_line_refuses_bad_outputs_users_and_k(trained, tmp_path):
    tmp, _ = trained
    out = tmp_path / "recs.csv"
    out.write_text("mine\n")
    with pytest.raises(FileExistsError, match=r"--out .*recs.csv: exists; pass --overwrite"):
        run_recommend.main(["--run", str(tmp / "run"), "--out", str(out)])
    assert out.read_text() == "mine\n"
    with pytest.raises(run_dir.OutputError, match=r"lies inside the input --run"):
        run_recommend.main(["--run", str(tmp / "run"), "--out", str(tmp / "run" / "recs.csv")])
    users = tmp_path / "users.txt"
    users.write_text("u03\nnobody\n")
    with pytest.raises(serving.ServingError, match=r"--users: 1 id\(s\) are not users .*users.txt:2: 'nobody'"):
        run_recommend.main(["--run", str(tmp / "run"), "--users", str(users), "--out", str(tmp_path / "x.csv")])
    with pytest.raises(serving.ServingError, match=r"--k: expected at most 12 \(the run's retrieve_k"):
        run_recommend.main(["--run", str(tmp / "run"), "--k", "13", "--out", str(tmp_path / "x.csv")])
    assert not (tmp_path / "x.csv").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["recs.csv",
                                                                                                 "users.txt"]


def test_unknown_users_items_and_impossible_k_are_refused(trained):
    _, result = trained
    split = result["split"]
    with pytest.raises(ValueError, match=r"user: 'nobody' is not a user of the run's log .*pass history="):
        pipeline.recommend(result, "nobody")
    with pytest.raises(ValueError, match=r"history: 1 item\(s\) not in the run's catalog .*history\[1\]='i99'"):
        pipeline.recommend(result, "u03", history=["i01", "i99"])
    for k in (0, 13, True, 2.0):
        with pytest.raises(ValueError, match=r"k: expected an int in \[1, 12\]"):
            pipeline.recommend(result, "u03", k=k)
    with pytest.raises(ValueError, match=r"history: expected at least one item"):
        pipeline.recommend(result, "u03", history=[])
    with pytest.raises(ValueError, match=r"actions: expected one entry per history item \(2\), got 1"):
        pipeline.recommend(result, "u03", history=["i01", "i02"], actions=[["click_score"]])
    with pytest.raises(ValueError, match=r"actions\[0\]: expected names of phoenix_inputs.ACTIONS, got \['liked'\]"):
        pipeline.recommend(result, "u03", history=["i01"], actions=[["liked"]])
    # A new user with a history is served (its id hashed as the log's were); k is bounded by what is left.
    assert len(pipeline.recommend(result, "newcomer", k=12, history=["i01", "i02"])) == 12
    catalog = split.log.tokens("item", split.item_ids)
    with pytest.raises(ValueError, match=rf"k: expected at most 10 for user 'newcomer' \(the {len(catalog)} catalog "
                                         rf"items minus the {len(catalog) - 10} in their history\), got 11"):
        pipeline.recommend(result, "newcomer", k=11, history=catalog[10:])


def test_load_run_refuses_a_directory_it_cannot_serve(trained, tmp_path):
    tmp, _ = trained
    with pytest.raises(run_dir.OutputError, match="no run manifest"):
        pipeline.load_run(tmp_path / "empty")
    run_dir.write_manifest(tmp_path / "empty", "pipeline", pipeline.RUN_ENTRIES)
    with pytest.raises(serving.ServingError, match=r"serving: missing; the run was written before serving/"):
        pipeline.load_run(tmp_path / "empty")
    # A checkpoint saved again after serving/ was written (a later run that stopped before its evaluation)
    # is not what serving/ describes: refused, not served with the wrong weights.
    copy = tmp_path / "copy"
    shutil.copytree(tmp / "run", copy)
    pipeline.load_run(copy)
    ranker = checkpoint.load_checkpoint(copy / "ranker")
    checkpoint.save_checkpoint(copy / "ranker", ranker.params, step=ranker.step, config=ranker.config,
                               extra=ranker.extra)
    with pytest.raises(serving.ServingError, match=r"ranker: save [0-9a-f]+, but serving/ was written for save"):
        pipeline.load_run(copy)


def test_an_integer_id_log_is_served_by_its_integer_ids(tmp_path):
    """A log of integer ids (from_arrays, through pipeline.run and dump_topk): ids come back as ints,
    are accepted as ints or their decimal strings, and the served lists equal the dump. The log is
    LOG's interactions with user u as 1000 + u and item i as 7 i + 5: the shared run's shapes, so its
    compiled programs serve this run too."""
    write_log(tmp_path / "log.csv")
    rows = read_csv_rows(tmp_path / "log.csv")[1:]
    users = [1000 + int(user[1:]) for user, *_ in rows]
    items = [7 * int(item[1:]) + 5 for _, item, *_ in rows]
    times = [int(time) for _, _, time, *_ in rows]
    split = pipeline.split_log(pipeline.from_arrays({"user_id": users, "item_id": items, "timestamp": times}))
    args = run_train.parse_args(["--data", "log.csv", *TINY_FLAGS, "--retrieval-weight", "0.5",
                                 "--popularity-weight", "0.25"])
    result = pipeline.run(split, args.recipe, tmp_path / "run")
    pipeline.dump_topk(tmp_path / "top.csv", split, result["reranked"]["test"][:, :10])
    run = pipeline.load_run(tmp_path / "run")
    for row in read_csv_rows(tmp_path / "top.csv")[1:]:
        user = int(row[0])
        asked = evaluation_histories(split)[user]
        got = pipeline.recommend(run, user, 10, history=asked["history"], actions=asked["actions"])
        assert [item for item, _ in got] == [int(item) for item in row[1:]]
        assert all(isinstance(item, int) for item, _ in got)
    assert pipeline.recommend(run, "1003", 5) == pipeline.recommend(run, 1003, 5)
    for bad in ("01003", "u1", -3, 2.0):
        with pytest.raises(ValueError, match=r"user: expected a non-negative integer id \(the log's user ids are "
                                             r"integers\), got"):
            pipeline.recommend(run, bad)


def test_an_ensemble_run_directory_serves_as_evaluated(tmp_path):
    """--retrieval-members 2 --ranker-members 2: load_run rebuilds both ensembles from the members'
    checkpoints, and every test user's list on their evaluation history equals the dump. (LOG itself:
    each member compiles the shared run's programs.)"""
    write_log(tmp_path / "log.csv")
    result = run_train.main(["--data", str(tmp_path / "log.csv"), "--checkpoint-dir", str(tmp_path / "run"),
                             "--dump-topk", str(tmp_path / "top.csv"), *TINY_FLAGS, "--retrieval-members", "2",
                             "--ranker-members", "2", "--retrieval-weight", "0.5", "--popularity-weight", "0.25"])
    run = pipeline.load_run(tmp_path / "run")
    assert isinstance(run.retrieval, two_stage.RetrievalEnsemble) and isinstance(run.ranker, two_stage.RankerEnsemble)
    dump = {row[0]: row[1:] for row in read_csv_rows(tmp_path / "top.csv")[1:]}
    for user, asked in evaluation_histories(result["split"]).items():
        got = pipeline.recommend(run, user, 10, history=asked["history"], actions=asked["actions"])
        assert [item for item, _ in got] == dump[user], user



def test_a_user_with_fewer_items_left_than_k(trained, tmp_path, monkeypatch):
    """A user whose history leaves 5 items: recommend serves those 5 and refuses k=6 naming k;
    recommend_users and the command line end that user's row in NOT_RANKED / empty fields."""
    tmp, result = trained
    served = result["served"]
    catalog = served.item_tokens(np.arange(len(served.split.item_ids)))
    one = serving.given_history(served, "newcomer", catalog[5:])  # a one-user Split
    short = two_stage.dataclasses.replace(served, split=one, names={**served.names,
                                                                      "user": np.array(["newcomer"], dtype=object)})
    got = pipeline.recommend(short, "newcomer", k=5)
    assert sorted(item for item, _ in got) == sorted(catalog[:5])
    assert got == pipeline.recommend(served, "newcomer", k=5, history=catalog[5:])
    with pytest.raises(ValueError, match=r"k: expected at most 5 for user 'newcomer'"):
        pipeline.recommend(short, "newcomer", k=6)
    ((rows, columns, scores),) = list(serving.recommend_users(short, [0], k=8))
    assert columns[0, 5:].tolist() == [metrics.NOT_RANKED] * 3 and np.isneginf(scores[0, 5:]).all()
    assert served.item_tokens(columns[0, :5]) == [item for item, _ in got]
    monkeypatch.setattr(pipeline, "load_run", lambda path: short)
    assert run_recommend.main(["--run", str(tmp / "run"), "--k", "8", "--out", str(tmp_path / "r.csv")])["short"] == 1
    assert read_csv_rows(tmp_path / "r.csv")[1] == ["newcomer"] + [item for item, _ in got] + ["", "", ""]

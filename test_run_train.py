"""run_train.py, the one training command line: its data-aware help, and how its flags become the
library's dataclasses (the checks that refuse flags are in test_cli_safety.py)."""

import dataclasses

import pytest

import phoenix_pipeline as pipeline
import run_train
import train_synthetic
from phoenix_sasrec import SasrecRecipe

# Flags that only one data path has: the help of a path shows its own and none of the others'.
OWN_FLAGS = {"log": ["--user-col", "--item-col", "--time-col", "--rating-col", "--author-col", "--delimiter",
                     "--rating-actions", "--split", "--cut-time"],
             "movielens": ["--cache-dir", "--seeds"],
             "synthetic": ["--steps-ranker", "--num-posts", "--key-size"]}
TWO_STAGE_FLAGS = ["--dump-topk", "--protocol", "--sasrec", "--pooling", "--retrieval-members", "--score-action"]
EVERY_PATH_FLAGS = ["--checkpoint-every", "--resume", "--keep-checkpoints", "--overwrite"]  # docs/resume.md


def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        run_train.parse_args([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_help_shows_every_way_to_train_and_every_flag(capsys):
    text = help_of([], capsys)
    assert text.startswith("usage: run_train.py --data LOG.csv")
    for command in ("--data LOG.csv", "--data movielens-100k", "--data synthetic"):
        assert command in text
    for flag in [f for flags in OWN_FLAGS.values() for f in flags] + TWO_STAGE_FLAGS:
        assert flag in text, flag
    assert "your log" in text and "MovieLens" in text and "synthetic world" in text


@pytest.mark.parametrize("data, kind", [("log.csv", "log"), ("movielens-100k", "movielens"),
                                        ("synthetic", "synthetic")])
def test_the_help_of_one_data_path_shows_its_flags_only(data, kind, capsys):
    text = help_of(["--data", data], capsys)
    assert all(flag in text for flag in OWN_FLAGS[kind])
    others = [flag for other, flags in OWN_FLAGS.items() if other != kind for flag in flags]
    assert not [flag for flag in others if flag in text]
    assert all(flag in text for flag in TWO_STAGE_FLAGS) == (kind != "synthetic")
    assert all(flag in text for flag in EVERY_PATH_FLAGS)


@pytest.mark.parametrize("data, kind", [("synthetic", "synthetic"), ("movielens-100k", "movielens"),
                                        ("x.whl", "movielens"), ("log.csv", "log"), ("-", "log"),
                                        ("/dev/fd/63", "log")])
def test_data_kinds(data, kind, tmp_path):
    assert run_train.data_kind(data) == kind
    assert run_train.data_kind(str(tmp_path)) == "movielens"  # a directory: a MovieLens copy


def test_the_flags_become_the_librarys_dataclasses():
    command = run_train.parse_args(["--data", "log.csv", "--user-col", "uid", "--delimiter", "tab",
                                    "--emb-size", "32", "--protocol", "train+val", "--sasrec", "--sasrec-epochs", "2",
                                    "--sasrec-train-val", "--dump-topk", "top.csv", "--seed", "3"])
    assert command.kind == "log" and command.source.columns == pipeline.Columns(user="uid")
    assert command.source.delimiter == "\t" and not command.source.rating_actions_given
    assert command.recipe == dataclasses.replace(pipeline.LOG_RECIPE, emb_size=32)
    assert command.protocols == pipeline.Protocols("train+val", dataclasses.replace(SasrecRecipe(), epochs=2.0), True)
    assert (command.run.seed, command.run.dump_topk, command.run.seeds) == (3, "top.csv", None)
    assert run_train.parse_args(["--data", "log.csv"]).protocols == pipeline.Protocols()  # val-select alone
    assert (command.run.checkpoint_every, command.run.keep_checkpoints, command.run.resume) == (0, 3, False)
    assert command.run.flags == {"columns": dataclasses.asdict(pipeline.Columns(user="uid")),
                                 "rating_actions": {name: [repr(float(v)) for v in bounds] for name, bounds
                                                    in run_train.DEFAULT_RATING_ACTIONS.items()},
                                 "duplicates": "first", "split": "leave-one-out", "cut_time": None,
                                 "cut_quantile": None}  # what a --resume must match (no path, no delimiter)
    movielens = run_train.parse_args(["--data", "movielens-100k", "--seeds", "0,1", "--checkpoint-every", "50",
                                      "--keep-checkpoints", "2", "--resume"])
    assert movielens.recipe == pipeline.MOVIELENS_RECIPE and movielens.run.seeds == (0, 1)
    assert (movielens.run.checkpoint_every, movielens.run.keep_checkpoints, movielens.run.resume) == (50, 2, True)
    synthetic = run_train.parse_args(["--steps-ranker", "5", "--only", "ranker"])  # the default data path
    assert synthetic.kind == "synthetic" and synthetic.source is None
    assert synthetic.run == train_synthetic.SyntheticRun(steps_ranker=5, only="ranker")


def test_every_recipe_field_is_a_flag_of_the_two_stage_paths(capsys):
    text = help_of(["--data", "log.csv"], capsys)
    for field in dataclasses.fields(pipeline.Recipe):
        assert "--" + field.name.replace("_", "-") in text, field.name


# The demos' flags (run_ranker.py, run_retrieval.py): fields of phoenix_demos' options, each with its range.
DEMO_FLAG_CASES = [
    ("run_ranker", ["--steps", "-5"], "argument --steps: expected an int >= 0, got '-5'"),
    ("run_ranker", ["--emb-size", "0"], "argument --emb-size: expected an int >= 1, got '0'"),
    ("run_ranker", ["--seed", "-1"], "argument --seed: expected an int >= 0, got '-1'"),
    ("run_ranker", ["--num-posts", "5"], "WorldConfig.num_authors: expected <= num_posts (5"),
    ("run_retrieval", ["--top-k", "0"], "argument --top-k: expected an int >= 1, got '0'"),
    ("run_retrieval", ["--top-k", "5000", "--no-train"], "RetrievalDemo.top_k: expected <= corpus_size (1000)"),
    ("run_retrieval", ["--corpus-size", "1.5"], "argument --corpus-size: invalid int value: '1.5'"),
]


@pytest.mark.parametrize("script, argv, message", DEMO_FLAG_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_demo_flags_out_of_range_or_clashing_are_one_error_line(script, argv, message, capsys):
    """A demo flag out of range, or flags that clash, end in argparse's error (status 2) naming them,
    before anything is built; before, they ended in a traceback from inside the model or the world."""
    module = __import__(script)
    with pytest.raises(SystemExit) as info:
        module.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_options_check_their_values_in_the_library_too():
    import phoenix_demos as demos
    with pytest.raises(ValueError, match=r"RankerDemo.steps: expected an int >= 0, got -1"):
        demos.RankerDemo(steps=-1)
    with pytest.raises(ValueError, match=r"RetrievalDemo.num_layers: expected an int >= 1, got 2.5"):
        demos.RetrievalDemo(num_layers=2.5)
    assert demos.RankerDemo(steps=0).steps == 0 and demos.RetrievalDemo(checkpoint="x").checkpoint == "x"


def test_help_into_a_closed_pipe_is_no_error(tmp_path):
    """`run_train.py --help | head -1`: the reader closes the pipe early; the command stops quietly (status
    141, as for SIGPIPE) instead of printing an `error: Broken pipe` line. Here the pipe is closed before
    the command writes at all, so every write of the help meets it."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader: the command's first write to stdout fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, os.path.join(here, "run_train.py"), "--help"], stdout=write_end,
                              stderr=subprocess.PIPE, cwd=tmp_path, timeout=120)
    finally:
        os.close(write_end)
    stderr = proc.stderr.decode()
    assert proc.returncode == 141 and stderr == "", (proc.returncode, stderr)


# ---------------------------------------------------------------------------------------------
# --dry-run: read, validate, split, summarise; nothing trained or written
# ---------------------------------------------------------------------------------------------


def tiny_log(path):
    """6 users x 8 interactions over 24 items at times 1..8; user u's 5th interaction repeats their 2nd."""
    lines = ["user_id,item_id,timestamp"]
    for user in range(6):
        items = [(user * 5 + j) % 30 for j in range(8)]
        items[4] = items[1]
        lines += [f"{user},{item},{t + 1}" for t, item in enumerate(items)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_dry_run_summarises_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PHOENIX_CACHE_DIR", str(tmp_path / "cache"))
    log = tiny_log(tmp_path / "log.csv")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_train.main(["--data", str(log), "--dry-run", "--dump-topk", str(tmp_path / "top.csv"), "--plot"])
    out = capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run directory, cache, dump or plot
    summary = result["summary"]
    assert summary["rows"] == "48" and summary["users"].startswith("6 ") and summary["items"].startswith("24 ")
    assert summary["repeated (user, item)"].startswith("6 (12.5% of the rows): dropped")
    assert summary["time range"] == "1 .. 8" and summary["interactions kept"] == "42"
    assert summary["users per split"].startswith("6 evaluated") and summary["training examples"].startswith("24 ")
    assert set(result["seconds"]) == {"read and validate", "split", "recipe and examples"}
    assert result["peak_rss_mib"] > 0
    assert out.out.startswith(f"dry run: {log} read, validated and split") and "peak memory:" in out.out
    assert "dropped 6 repeated" in out.err


def test_dry_run_with_every_flag_that_shapes_the_split(tmp_path, monkeypatch):
    monkeypatch.setenv("PHOENIX_CACHE_DIR", str(tmp_path / "cache"))
    log = tiny_log(tmp_path / "log.csv")
    log.write_text(log.read_text().replace("user_id,item_id,timestamp", "u\ti\tt").replace(",", "\t"))
    summary = run_train.main(["--data", str(log), "--dry-run", "--user-col", "u", "--item-col", "i", "--time-col", "t",
                              "--delimiter", "tab", "--duplicates", "keep", "--split", "time", "--cut-time", "8",
                              "--history-len", "3"])["summary"]
    assert summary["repeated (user, item)"].startswith("6 (12.5% of the rows): kept as history")
    assert summary["split"].startswith("time, cut at 8 (0 rows at or after it")  # each user's 8th is a test target
    assert summary["interactions kept"] == "48" and summary["users per split"].startswith("6 evaluated")
    # first-time positions 1, 2, 3 and 5 before the validation target (position 6; 4 is the repeat): 4 per user
    assert summary["training examples"].startswith("24 (ranker); 12 retrieval windows of up to 4 items")
    with pytest.raises(pipeline.LogError, match="already at"):
        run_train.main(["--data", str(log), "--dry-run", "--user-col", "u", "--item-col", "i", "--time-col", "t",
                        "--delimiter", "tab", "--duplicates", "error"])


def test_dry_run_refuses_bad_data_and_outputs_before_reading(tmp_path, monkeypatch):
    monkeypatch.setenv("PHOENIX_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        run_train.main(["--data", str(tmp_path / "missing.csv"), "--dry-run"])
    log = tiny_log(tmp_path / "log.csv")
    with pytest.raises(run_train.run_dir.OutputError):  # the dump would go over the log itself
        run_train.main(["--data", str(log), "--dry-run", "--dump-topk", str(log)])


def test_dry_run_of_a_movielens_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("PHOENIX_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "ml"
    copy.mkdir()
    (copy / "u.data").write_text("".join(f"{u}\t{(u * 5 + j) % 30 + 1}\t{1 + j % 5}\t{100 + j}\n"
                                         for u in range(1, 7) for j in range(8)))
    result = run_train.main(["--data", str(copy), "--dry-run"])
    assert result["summary"]["rows"] == "48" and result["summary"]["users per split"].startswith("6 evaluated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml"] and sorted(p.name for p in copy.iterdir()) == ["u.data"]


def test_a_run_with_kept_repeats_trains_and_its_dump_recomputes_to_the_table(tmp_path, monkeypatch):
    """--duplicates keep end to end (tiny recipe): both stages train with repeats in the histories, the
    dump has no seen item, and check_dump (each pair's first interaction, the last one the target: an
    outside evaluator's rule) recomputes the table's test HR@10 / NDCG@10 from the file."""
    import csv
    from test_phoenix_pipeline import NUM_USERS, TINY_FLAGS, write_log
    write_log(tmp_path / "log.csv")
    with open(tmp_path / "log.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    repeats = [[user, item, str(int(time) + 5), *rest] for user, item, time, *rest in rows[::3]]  # later repeats
    with open(tmp_path / "log.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows, *repeats])
    result = run_train.main(["--data", str(tmp_path / "log.csv"), "--checkpoint-dir", str(tmp_path / "run"),
                             "--dump-topk", str(tmp_path / "top.csv"), "--duplicates", "keep", *TINY_FLAGS])
    split = result["split"]
    assert split.duplicates == "keep" and split.repeats == len(repeats) and len(split.items) == len(rows) + len(repeats)
    check, ours = result["dump_check"], result["table"][("test", "two-stage")]
    assert check["num_users"] == NUM_USERS and check["missing_users"] == 0 and check["history_items_in_topk"] == 0
    assert check["HR@10"] == pytest.approx(ours["HR@10"], abs=1e-12)
    assert check["NDCG@10"] == pytest.approx(ours["NDCG@10"], abs=1e-12)
    # served = evaluated with repeats in the histories: each test user's evaluation history (repeats included)
    # served from the run gives their dump row
    from test_phoenix_serving import evaluation_histories
    with open(tmp_path / "top.csv", newline="") as f:
        dumped = {row[0]: row[1:] for row in list(csv.reader(f))[1:]}
    for user, asked in list(evaluation_histories(split).items())[:8]:
        served = pipeline.recommend(result, user, 10, history=asked["history"], actions=asked["actions"])
        assert [item for item, _ in served] == dumped[user], user
    assert any(len(h["history"]) > len(set(h["history"])) for h in evaluation_histories(split).values())


def test_shard_tables_and_multi_process_flags_reach_the_library():
    """--shard-tables (with --data-parallel) on every data path, and the three multi-process flags."""
    for argv in (["--data", "log.csv"], ["--data", "movielens-100k"]):
        command = run_train.parse_args([*argv, "--data-parallel", "--shard-tables"])
        assert command.run.shard_tables and command.run.data_parallel and command.distributed is None
        assert not run_train.parse_args(argv).run.shard_tables
    synthetic = run_train.parse_args(["--data-parallel", "--shard-tables", "--coordinator-address", "127.0.0.1:1234",
                                      "--num-processes", "2", "--process-id", "1"])
    assert synthetic.run.shard_tables and synthetic.run.data_parallel
    assert synthetic.distributed == run_train.Distributed("127.0.0.1:1234", 2, 1)
    resumable = run_train.parse_args(["--data-parallel", "--shard-tables", "--checkpoint-every", "5", "--resume",
                                      "--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "0"])
    assert (resumable.run.checkpoint_every, resumable.run.resume, resumable.distributed.num_processes) == (5, True, 2)
    assert "shard_tables" not in train_synthetic.run_config(train_synthetic.SyntheticRun(), "ranker")  # old runs resume
    assert train_synthetic.run_config(synthetic.run, "ranker")["shard_tables"] is True


@pytest.mark.parametrize("argv, message", [
    (["--data", "log.csv", "--shard-tables"], "--shard-tables: splits the tables over the data-parallel devices"),
    (["--data", "movielens-100k", "--shard-tables"], "--shard-tables: splits the tables over the data-parallel"),
    (["--shard-tables"], "--shard-tables: splits the tables over the data-parallel devices; add --data-parallel"),
    (["--coordinator-address", "127.0.0.1:1234"], "missing --num-processes, --process-id"),
    (["--data-parallel", "--coordinator-address", "localhost", "--num-processes", "2", "--process-id", "0"],
     "--coordinator-address: expected HOST:PORT with a port in 1..65535, got 'localhost'"),
    (["--data-parallel", "--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id: expected 0 .. 1 (--num-processes 2), got 2"),
    (["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "0"], "add --data-parallel"),
    (["--data", "log.csv", "--data-parallel", "--coordinator-address", "h:1", "--num-processes", "2",
      "--process-id", "0"], "supported on --data synthetic only so far, got --data log.csv"),
    (["--data-parallel", "--checkpoint-every", "5", "--coordinator-address", "h:1", "--num-processes", "2",
      "--process-id", "0"], "step checkpoints and --resume of a multi-process run need --shard-tables"),
    (["--data-parallel", "--resume", "--coordinator-address", "h:1", "--num-processes", "2",
      "--process-id", "1"], "with replicated tables they are single-process only so far"),
])
def test_bad_shard_and_multi_process_flags_are_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        run_train.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err

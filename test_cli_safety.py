"""Issue 27's command-line safety, on every data path (CSV log, MovieLens, synthetic) and entry point.

A run never writes over its inputs or over what Phoenix did not write; options that do not apply
are refused, not ignored; a log that cannot be read says what it is; a user error on the command
line is one `error:` line and exit status 2, never a traceback. Each check runs before a log is
read or a model trained: the `no_work` fixture makes reading and training fail the test, so these
tests take milliseconds (the subprocess ones a Python start each, run concurrently).
"""

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import movielens as ml
import phoenix_checkpoint as checkpoint
import phoenix_log as logs
import phoenix_pipeline as pipeline
import phoenix_resume
import phoenix_run_dir as run_dir
import phoenix_split
import run_ranker
import run_retrieval
import run_train
import train_synthetic as ts
from test_phoenix_pipeline import TINY_FLAGS, write_log
from test_train_movielens import write_world
from test_train_synthetic import TINY as TINY_SYNTHETIC

REPO = Path(__file__).resolve().parent


@pytest.fixture
def no_work(monkeypatch):
    """Reading a log or ratings, building the synthetic world and training fail the test."""
    def fail(what):
        return lambda *a, **k: pytest.fail(f"{what} before the checks refused the command")

    monkeypatch.setattr(pipeline, "read_log", fail("the log was read"))
    monkeypatch.setattr(pipeline, "run", fail("trained"))
    monkeypatch.setattr(ml, "load_ratings", fail("the ratings were read"))
    monkeypatch.setattr(ts, "SyntheticWorld", fail("the world was built"))
    monkeypatch.setattr(run_ranker, "train_demo_ranker", fail("trained"))
    monkeypatch.setattr(run_retrieval, "train_demo_retrieval", fail("trained"))


@pytest.fixture
def log(tmp_path) -> Path:
    path = tmp_path / "log.csv"
    write_log(path)
    return path


def snapshot(directory: Path) -> dict:
    """{path: bytes} of every file under `directory`: what "nothing was touched" compares."""
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def save_checkpoint(path: Path) -> None:
    checkpoint.save_checkpoint(str(path), {"w": np.zeros(2, np.float32)}, step=1)


# --------------------------------------------------------------------------- outputs never over inputs


def dump_paths(tmp_path: Path, log: Path) -> dict:
    """Dump paths that are the log: the path itself, a symlink, a hard link, a path through a symlinked directory."""
    os.symlink(log, tmp_path / "link.csv")
    os.link(log, tmp_path / "hard.csv")
    os.symlink(tmp_path, tmp_path / "alias")
    return {"same": log, "symlink": tmp_path / "link.csv", "hardlink": tmp_path / "hard.csv",
            "via_dir_link": tmp_path / "alias" / "log.csv"}


@pytest.mark.parametrize("kind", ["same", "symlink", "hardlink", "via_dir_link"])
def test_a_dump_over_the_log_is_refused_before_reading(tmp_path, log, kind, no_work):
    dump = dump_paths(tmp_path, log)[kind]
    before = snapshot(tmp_path)
    with pytest.raises(run_dir.OutputError, match=rf"--dump-topk {dump}: is the input --data {log}; a run writes "
                                                  "nothing over its inputs"):
        run_train.main(["--data", str(log), "--dump-topk", str(dump), "--checkpoint-dir", str(tmp_path / "run")])
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_dump_paths_that_are_no_new_file_are_refused(tmp_path, log, no_work):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "old.csv").write_text("user_id,item_1\n")
    argv = ["--data", str(log), "--checkpoint-dir", str(run)]
    cases = [(tmp_path, run_dir.OutputError, r"is a directory; expected a file path"),
             (run / "metrics.jsonl", run_dir.OutputError, r"is where the run writes its metrics.jsonl"),
             (run / "ranker" / "x.csv", run_dir.OutputError, r"is where the run writes its ranker"),
             (run, run_dir.OutputError, r"is a directory"),
             ("/dev/null", run_dir.OutputError, r"is a character device; expected a file path"),
             (tmp_path / "old.csv", FileExistsError, r"old.csv: exists; pass --overwrite to replace it")]
    for dump, kind, message in cases:
        with pytest.raises(kind, match=message):
            run_train.main([*argv, "--dump-topk", str(dump)])
    assert (tmp_path / "old.csv").read_text() == "user_id,item_1\n"
    pipeline.check_run_dir(tmp_path / "fresh", True, [run_dir.Input("--data", str(log))],
                           {"--dump-topk": tmp_path / "old.csv"})  # asked: an existing dump is replaced


def test_a_run_directory_over_an_input_is_refused(tmp_path, log, no_work):
    inside = tmp_path / "run"
    inside.mkdir()
    os.link(log, inside / "metrics.jsonl")  # the log, hard-linked where the run writes its metrics
    cases = [(log, r"is the input --data"), (inside, r"the run writes metrics.jsonl there, and .* is the input --data")]
    for directory, message in cases:
        with pytest.raises(run_dir.OutputError, match=message):
            run_train.main(["--data", str(log), "--checkpoint-dir", str(directory)])


def test_movielens_outputs_never_go_into_the_data_or_over_the_cache(tmp_path, no_work):
    data = tmp_path / "ml"
    data.mkdir()
    write_world(data)
    cache = tmp_path / "cache"
    cases = [(["--data", str(data), "--checkpoint-dir", str(data)], r"--checkpoint-dir .*ml: is the input --data"),
             (["--data", str(data), "--checkpoint-dir", str(data / "run")], r"lies inside the input --data"),
             (["--data", str(data), "--dump-topk", str(data / "top10.csv")], r"--dump-topk .*: lies inside the input"),
             (["--data", str(data), "--dump-topk", str(data / "u.data")], r"--dump-topk .*u.data: is the input --data"),
             (["--cache-dir", str(cache), "--checkpoint-dir", str(cache)], r"is the input --cache-dir"),
             (["--cache-dir", str(cache), "--dump-topk", str(cache / ml.WHEEL_FILE)], r"is the input --data .*whl")]
    for argv, message in cases:
        if "--checkpoint-dir" not in argv:
            argv = [*argv, "--checkpoint-dir", str(tmp_path / "run")]
        with pytest.raises(run_dir.OutputError, match=message):
            run_train.main(["--data", ml.SOURCE_ML100K, *argv])
    command = run_train.parse_args(["--data", ml.SOURCE_ML100K, "--cache-dir", str(cache), "--checkpoint-dir",
                                    str(cache / "checkpoints" / "ml"), "--dump-topk", str(cache / "top10.csv")])
    pipeline.check_run_outputs(command.run, command.protocols, run_train.movielens_inputs(command.source))  # fine


def test_movielens_seeds_check_every_seeds_dump(tmp_path, no_work):
    data = tmp_path / "ml"
    data.mkdir()
    write_world(data)
    argv = ["--data", str(data), "--seeds", "0,1", "--checkpoint-dir", str(tmp_path / "runs"),
            "--dump-topk", str(tmp_path / "top10.csv")]
    os.link(data / "u.data", tmp_path / "top10.seed1.csv")
    with pytest.raises(run_dir.OutputError, match=r"--dump-topk \(seed 1\) .*top10.seed1.csv: is the input --data"):
        run_train.main(argv)
    os.unlink(tmp_path / "top10.seed1.csv")
    (tmp_path / "top10.seed0.csv").write_text("mine")
    with pytest.raises(FileExistsError, match=r"top10.seed0.csv: exists; pass --overwrite"):
        run_train.main(argv)
    (tmp_path / "runs" / "seed1").mkdir(parents=True)
    (tmp_path / "runs" / "seed1" / "metrics.jsonl").write_text("my notes\n")
    with pytest.raises(run_dir.ForeignFilesError, match=r"seed1/metrics.jsonl \(is not a JSON-lines metrics log\)"):
        run_train.main([*argv, "--overwrite"])
    assert (tmp_path / "top10.seed0.csv").read_text() == "mine"


# --------------------------------------------------------------------------- --overwrite replaces only Phoenix's own


def users_run_dir(path: Path) -> Path:
    """The issue's directory: the user's own metrics.jsonl, notes.txt and a ranker/ with a foreign file."""
    (path / "ranker").mkdir(parents=True)
    (path / "metrics.jsonl").write_text('{"loss": 0.5}\n')
    (path / "notes.txt").write_text("my notes\n")
    (path / "ranker" / "weights.bin").write_bytes(b"\x00" * 8)
    return path


def test_overwrite_refuses_what_phoenix_did_not_write_before_writing(tmp_path, log, no_work):
    run = users_run_dir(tmp_path / "run")
    before = snapshot(run)
    with pytest.raises(run_dir.ForeignFilesError) as info:
        run_train.main(["--data", str(log), "--checkpoint-dir", str(run), "--overwrite"])
    message = str(info.value)
    assert (f"{run / 'ranker'} (holds weights.bin, which a save does not write)" in message
            and f"{run / 'metrics.jsonl'} (its first line is not " in message and "notes.txt" not in message)
    assert snapshot(run) == before


def test_synthetic_overwrite_refuses_foreign_files_and_replaces_its_own(tmp_path, no_work):
    run = users_run_dir(tmp_path / "run")
    before = snapshot(run)
    with pytest.raises(run_dir.ForeignFilesError, match=r"ranker \(holds weights.bin"):
        run_train.main(["--data", "synthetic", "--checkpoint-dir", str(run), "--overwrite"])
    assert snapshot(run) == before
    # An earlier run of Phoenix's own: refused without a flag, continued with --resume, replaced with --overwrite.
    mine = tmp_path / "mine"
    save_checkpoint(mine / "ranker")
    save_checkpoint(mine / "steps" / "ranker" / "step-00000002")
    (mine / "steps" / "ranker" / ".lock").write_text("123")
    (mine / "notes.txt").write_text("kept")
    with pytest.raises(FileExistsError, match=r"mine: holds an earlier run \(ranker, steps\); pass --resume \(resume=True\) "
                                              r"to continue it where it stopped, --overwrite"):
        run_train.main(["--data", "synthetic", "--checkpoint-dir", str(mine)])
    for flag in ("--resume", "--overwrite"):
        ts.check_run_dir(run_train.parse_args(["--data", "synthetic", "--checkpoint-dir", str(mine), flag]).run)
    assert not (mine / "steps").exists() and (mine / "ranker").is_dir() and (mine / "notes.txt").read_text() == "kept"


def test_a_demo_refuses_a_checkpoint_path_it_could_not_save_to_before_training(tmp_path, no_work):
    (tmp_path / "file").write_text("mine")
    users_run_dir(tmp_path / "dir")
    for demo in (run_ranker, run_retrieval):
        for path, message in ((tmp_path / "file", "is a file, not a directory"),
                              (tmp_path / "dir", "holds metrics.jsonl, notes.txt, ranker, which a save does not write")):
            with pytest.raises(checkpoint.CheckpointError, match=rf"--checkpoint {path}: {message}"):
                demo.main(["--checkpoint", str(path), "--steps", "1", "--num-users", "40", "--num-posts", "60",
                           "--num-authors", "5"])


OWNERSHIP = [
    ("metrics_with_header", "metrics", "metrics.jsonl",
     '{"format": "phoenix-metrics", "format_version": 1}\n{"x": 1}\n', None),
    ("metrics_before_the_header", "metrics", "metrics.jsonl", '{"stage": "ranker", "loss": 1.0}\n', None),
    ("metrics_empty", "metrics", "metrics.jsonl", "", None),
    ("metrics_users", "metrics", "metrics.jsonl", '{"loss": 1.0}\n', "its first line is not"),
    ("metrics_text", "metrics", "metrics.jsonl", "notes\n", "is not a JSON-lines metrics log"),
    ("plot_ours", "plot", "curves.png", run_dir.PNG_SIGNATURE + b"\x00\x00\x00\x1ctEXtSource\x00"
     + run_dir.PLOT_SOURCE.encode(), None),
    ("plot_users", "plot", "curves.png", run_dir.PNG_SIGNATURE + b"\x00\x00\x00\x0dtEXtAuthor\x00me", "did not write"),
    ("plot_not_png", "plot", "curves.png", "GIF89a", "is not a PNG"),
    ("manifest_users", "manifest", "run.json", '{"format": "mine"}', "not a Phoenix run manifest"),
    ("lock_pid", "lock", ".lock", "4242", None),
    ("lock_users", "lock", ".lock", "do not delete", "is not a Phoenix run lock"),
]


@pytest.mark.parametrize("kind, name, content, problem", [c[1:] for c in OWNERSHIP], ids=[c[0] for c in OWNERSHIP])
def test_what_counts_as_phoenixs_own(tmp_path, kind, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    found = run_dir.entry_problem(path, kind)
    assert found is None if problem is None else problem in found


def test_checkpoint_trees_count_as_phoenixs_own_only_when_every_entry_is(tmp_path):
    save_checkpoint(tmp_path / "train+val" / "ranker")
    assert run_dir.entry_problem(tmp_path / "train+val", "checkpoints") is None
    assert run_dir.entry_problem(tmp_path / "absent", "checkpoint") is None
    (tmp_path / "train+val" / "notes.txt").write_text("mine")
    assert "holds notes.txt, which is a file" in run_dir.entry_problem(tmp_path / "train+val", "checkpoints")
    (tmp_path / "ranker").write_text("a file of mine")
    assert run_dir.entry_problem(tmp_path / "ranker", "checkpoint") == "is a file, not a directory"


def test_the_manifest_round_trips_and_a_foreign_one_is_named(tmp_path):
    path = run_dir.write_manifest(tmp_path / "run", "pipeline", pipeline.RUN_ENTRIES, seed=3, recipe={"k": (1, 2)})
    manifest = run_dir.read_manifest(tmp_path / "run")
    assert path == str(tmp_path / "run" / "run.json") and manifest["seed"] == 3 and manifest["recipe"] == {"k": [1, 2]}
    assert manifest["format"] == run_dir.MANIFEST_FORMAT and manifest["entries"] == pipeline.RUN_ENTRIES
    assert os.listdir(tmp_path / "run") == ["run.json"]  # the temporary file is gone
    (tmp_path / "run" / "run.json").write_text("[]")
    with pytest.raises(run_dir.OutputError, match=r"run.json: not a Phoenix run manifest"):
        run_dir.read_manifest(tmp_path / "run")


# --------------------------------------------------------------------------- silent garbage


def test_nanosecond_timestamps_stay_exact_with_a_decimal_point(tmp_path):
    base = 2**60  # far above 2**53, where float64 merges neighbouring integers
    rows = [f"u{u},i{i},{base + 4 * i + u}" for u in range(2) for i in range(3)]
    rows[0] += ".0"  # one value written as a decimal: the column used to turn float64
    log = logs.read_csv(write(tmp_path / "ns.csv", "user_id,item_id,timestamp\n" + "\n".join(rows) + "\n"))
    assert log.timestamp.dtype == np.int64
    np.testing.assert_array_equal(log.timestamp, [base + 4 * i + u for u in range(2) for i in range(3)])
    fractional = rows[:1] + [rows[1].replace(str(base + 4), str(base + 4) + ".5")] + rows[2:]
    with pytest.raises(logs.LogError, match=r"ns.csv:\d: column 'timestamp': .* are different numbers but read as "
                                            r"the same float64"):
        logs.read_csv(write(tmp_path / "ns.csv", "user_id,item_id,timestamp\n" + "\n".join(fractional) + "\n"))
    seconds = logs.read_csv(write(tmp_path / "s.csv", "user_id,item_id,timestamp\nu1,i1,1.5\nu2,i2,2.25\nu1,i2,3\n"))
    np.testing.assert_array_equal(seconds.timestamp, [1.5, 2.25, 3.0])  # genuinely fractional: float64


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_split_options_that_do_not_apply_are_refused(log):
    data = logs.read_csv(log)
    for kwargs, message in (({"cut_time": 5}, r"cut_time: applies to protocol 'time' only, got cut_time=5 with "
                                               r"protocol 'leave-one-out'"),
                            ({"cut_quantile": 0.5}, r"cut_quantile: applies to protocol 'time' only"),
                            ({"protocol": "time", "cut_time": 5, "cut_quantile": 0.5}, r"give one of them"),
                            ({"protocol": "time", "cut_quantile": 1.0},
                             r"cut_quantile: expected a number in \(0, 1\)")):
        with pytest.raises(ValueError, match=message):
            phoenix_split.split_log(data, **{"protocol": "leave-one-out", **kwargs})


FLAG_CASES = [
    ("cut_time_loo", "csv", ["--cut-time", "5"], "--cut-time: applies to --split time only, got --split leave-one-out"),
    ("cut_quantile_loo", "csv", ["--cut-quantile", "0.5"], "--cut-quantile: applies to --split time only"),
    ("both_cuts", "csv", ["--split", "time", "--cut-time", "5", "--cut-quantile", ".5"], "give one of them"),
    ("retrieve_k_below_dump", "csv", ["--retrieve-k", "5", "--dump-topk", "x.csv"],
     "--retrieve-k 5: with --dump-topk, expected at least 10"),
    ("sasrec_flag_alone", "csv", ["--sasrec-epochs", "3"], "--sasrec-epochs: applies to the SASRec reference only"),
    ("sasrec_train_val", "csv", ["--sasrec", "--sasrec-train-val"], "--sasrec-train-val: applies to --protocol "
                                                                    "train+val only"),
    ("ml_seed_and_seeds", "movielens", ["--seed", "3", "--seeds", "0,1"], "--seed 3: --seeds 0,1 runs its own seeds"),
    ("ml_cache_with_dir", "movielens", ["--data", ".", "--cache-dir", "c"], "--cache-dir: applies to --data "
                                                                          "movielens-100k"),
    ("ml_retrieve_k", "movielens", ["--retrieve-k", "9", "--dump-topk", "x.csv"], "expected at least 10"),
    ("synthetic_other_phase", "synthetic", ["--only", "ranker", "--steps-retrieval", "5"],
     "--steps-retrieval: applies to the retrieval only, which --only ranker does not train"),
    ("synthetic_keep", "synthetic", ["--keep-checkpoints", "2"], "--keep-checkpoints: applies to step checkpoints"),
    ("synthetic_overwrite_resume", "synthetic", ["--overwrite", "--resume"], "--overwrite and --resume"),
    # Values a run cannot use, refused at the flag instead of a traceback from deep inside training.
    ("emb_size_0", "csv", ["--emb-size", "0"], "argument --emb-size: expected an int >= 1, got '0'"),
    ("heads_not_dividing", "csv", ["--num-heads", "3"], "--emb-size 64: expected a multiple of --num-heads 3"),
    ("negative_seed", "movielens", ["--seed", "-1"], "argument --seed: expected an int >= 0, got '-1'"),
    ("nan_temperature", "csv", ["--temperature", "nan"], "argument --temperature: expected a finite number > 0"),
    ("boolean_typo", "csv", ["--ranker-init-from-retrieval", "flase"], "expected one of 1, true, yes, 0, false, no, "
                                                                        "got 'flase'"),
    ("synthetic_no_steps", "synthetic", ["--steps-ranker", "0"], "--steps-ranker: expected an int >= 1, got 0"),
    ("synthetic_history", "synthetic", ["--min-history-len", "50"], "--min-history-len 50: expected <= --history-len"),
]


@pytest.mark.parametrize("path, argv, message", [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES])
def test_flags_a_run_would_ignore_or_cannot_use_are_refused(path, argv, message, capsys):
    data = {"csv": "log.csv", "movielens": ml.SOURCE_ML100K, "synthetic": "synthetic"}[path]
    parse = lambda a: run_train.parse_args(["--data", data, *a])  # noqa: E731
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_rating_actions_without_a_rating_column_are_refused_before_training(tmp_path, monkeypatch):
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n" + "".join(
        f"u{u},i{i},{i}\n" for u in range(3) for i in range(4)))
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(pipeline.RecipeError, match=r"--rating-actions: .*log.csv has no rating column"):
        run_train.main(["--data", str(path), "--checkpoint-dir", str(tmp_path / "run"),
                       "--rating-actions", "favorite_score=4:"])


def test_a_dump_that_disagrees_with_the_table_is_an_error():
    table = {"HR@10": 0.3667, "NDCG@10": 0.2}
    pipeline.check_dump_figures("top.csv", table, {"HR@10": 0.3667 + 1e-12, "NDCG@10": 0.2})  # rounding: agree
    with pytest.raises(pipeline.DumpCheckError, match=r"dump top.csv: recomputed from the file, HR@10 0.1333, NDCG@10 "
                                                      r"0.2000 disagree with the table's HR@10 0.3667"):
        pipeline.check_dump_figures("top.csv", table, {"HR@10": 0.1333, "NDCG@10": 0.2})


# --------------------------------------------------------------------------- what a path is


def test_a_log_path_that_is_no_file_says_what_it_is(tmp_path):
    os.symlink(tmp_path / "gone.csv", tmp_path / "dangling.csv")
    for path, kind, message in ((tmp_path, IsADirectoryError, "is a directory, not a log file"),
                                ("/dev/null", logs.LogError, "is a character device, not a log file"),
                                (tmp_path / "missing.csv", FileNotFoundError, "missing.csv: no such file"),
                                (tmp_path / "dangling.csv", FileNotFoundError, "dangling.csv: a dangling symlink")):
        with pytest.raises(kind, match=message):
            logs.read_log(path)


def test_a_log_reads_from_a_fifo_and_from_standard_input(tmp_path, log, monkeypatch):
    expected = logs.read_csv(log)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(log.read_bytes()), daemon=True)
    writer.start()
    from_fifo = logs.read_log(fifo)
    writer.join()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(log.read_bytes())))
    from_stdin = logs.read_log("-")
    assert from_stdin.source == "<stdin>" and from_fifo.source == str(fifo)
    for read in (from_fifo, from_stdin):
        np.testing.assert_array_equal(read.timestamp, expected.timestamp)
        np.testing.assert_array_equal(read.user, expected.user)
    assert run_train.parse_args(["--data", "-"]).run.checkpoint_dir.endswith(os.path.join("checkpoints", "stdin"))
    assert run_train.parse_args(["--data", str(fifo)]).run.checkpoint_dir.endswith(os.path.join("checkpoints", "pipe"))


# Formats read since pyarrow (test_phoenix_log.py), here cut short after their first bytes: named, and the
# damage said; zip is still refused, with what to do.
BINARY = [("gzip", b"\x1f\x8b\x08\x00", "is gzip-compressed but its data is corrupt or cut short"),
          ("zstd", b"\x28\xb5\x2f\xfd\x00", "is zstd-compressed but its data is corrupt"),
          ("bzip2", b"BZh91AY&SY", "is bz2-compressed but its data is corrupt"),
          ("xz", b"\xfd7zXZ\x00\x00", "is xz-compressed but its data is corrupt"),
          ("zip", b"PK\x03\x04\x14\x00", r"is a zip archive \(or an xlsx workbook\), not a log Phoenix reads .* "
                                         r"--data <\(unzip -p LOG.zip\)"),
          ("parquet", b"PAR1\x15\x04", "is a Parquet file but cannot be read"),
          ("arrow", b"ARROW1\x00\x00", "is an Arrow IPC file but cannot be read"),
          ("feather", b"FEA1\x00", "is a Feather v1 file but cannot be read")]


@pytest.mark.parametrize("data, message", [c[1:] for c in BINARY], ids=[c[0] for c in BINARY])
def test_binary_and_compressed_logs_are_named(tmp_path, data, message):
    with pytest.raises(logs.LogError, match=rf"log.csv: {message}"):
        path = tmp_path / "log.csv"
        path.write_bytes(data + b"\x00" * 16)
        logs.read_csv(path)


# --------------------------------------------------------------------------- one error line, status 2


USER_ERRORS = [logs.LogError("log.csv:3: column 'timestamp': expected a number"),
               pipeline.RecipeError("--retrieve-k: expected >= 1"), checkpoint.CheckpointError("x: not ours"),
               phoenix_resume.ResumeError("run: cannot resume (1 difference(s)):\n  seed: checkpoint 0, now 1"),
               run_dir.OutputError("--dump-topk x: is the input --data x"),
               FileExistsError("run: holds an earlier run"),
               PermissionError("run: no write permission"), pipeline.MissingExtraError("--plot needs matplotlib"),
               ml.WheelUnavailableError("could not download recbole==1.2.1")]


@pytest.mark.parametrize("error", USER_ERRORS, ids=lambda e: type(e).__name__)
def test_a_user_error_is_one_line_and_status_2(error, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["phoenix-train"])

    def main():
        raise error

    monkeypatch.setattr(run_train, "main", main)
    with pytest.raises(SystemExit) as info:
        run_train.cli()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("phoenix-train: error: ") and err.count("error:") == 1


def test_a_bug_keeps_its_traceback_and_a_failed_dump_check_is_status_1(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["phoenix-train"])
    with pytest.raises(ZeroDivisionError):
        run_train.cli(lambda: 1 / 0)
    with pytest.raises(SystemExit) as info:
        run_train.cli(lambda: (_ for _ in ()).throw(pipeline.DumpCheckError("dump x: ... disagree")))
    assert info.value.code == 1 and capsys.readouterr().err == "phoenix-train: error: dump x: ... disagree\n"


@pytest.fixture(scope="module")
def entry_points(tmp_path_factory):
    """Each command line run once in its own interpreter with a user error, all at once:
    {name: (status, stderr, the file it must not touch, its bytes before)}. The exit status and stderr
    of a command line need an interpreter of their own; the six start together (each imports JAX, a
    few seconds of CPU) so the fixture costs about one start per core. Sizes are tiny so that code
    without the checks (which would train before failing, or not fail) finishes too."""
    tmp = tmp_path_factory.mktemp("cli")
    write_log(tmp / "log.csv")
    (tmp / "ml").mkdir()
    write_world(tmp / "ml")
    (tmp / "file").write_text("mine")
    bin_dir = Path(sys.executable).parent
    tiny_demo = ["--steps", "1", "--emb-size", "8", "--num-layers", "1", "--history-len", "4", "--num-users", "40",
                 "--num-posts", "60", "--num-authors", "5", "--eval-examples", "4"]
    no_matplotlib = "import sys; sys.modules['matplotlib'] = None; import run_train; run_train.cli()"
    commands = {
        "csv_dump_over_stdin": ([sys.executable, "run_train.py", "--data", "-", "--dump-topk", str(tmp / "log.csv"),
                                 "--checkpoint-dir", str(tmp / "run"), *TINY_FLAGS], tmp / "log.csv"),
        "csv_plot_without_matplotlib": ([sys.executable, "-c", no_matplotlib, "--data", str(tmp / "log.csv"),
                                         "--plot", "--checkpoint-dir", str(tmp / "run2"), *TINY_FLAGS], None),
        "phoenix_train_movielens": ([str(bin_dir / "phoenix-train"), "--data", str(tmp / "ml"), "--checkpoint-dir",
                                     str(tmp / "ml"), *TINY_FLAGS], tmp / "ml" / "u.data"),
        "synthetic_into_a_file": ([sys.executable, "run_train.py", "--data", "synthetic", "--checkpoint-dir",
                                   str(tmp / "file"), *TINY_SYNTHETIC, "--steps-ranker", "2", "--steps-retrieval", "2"],
                                  tmp / "file"),
        "run_ranker": ([sys.executable, "run_ranker.py", "--checkpoint", str(tmp / "file"), *tiny_demo], tmp / "file"),
        "run_retrieval": ([sys.executable, "run_retrieval.py", "--checkpoint", str(tmp / "file"), *tiny_demo],
                          tmp / "file"),
    }
    # PYTHONPATH: the console script imports this tree's modules, as `python run_train.py` does.
    env = {**os.environ, "PHOENIX_CACHE_DIR": str(tmp / "cache"), "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    started = {}
    for name, (argv, given) in commands.items():
        stdin = open(tmp / "log.csv", "rb")  # the log on standard input (a file, so it has an inode)
        before = given.read_bytes() if given else None
        started[name] = (subprocess.Popen(argv, cwd=REPO, env=env, stdin=stdin, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True), given, before, stdin)
    out = {}
    for name, (process, given, before, stdin) in started.items():
        _, err = process.communicate(timeout=300)
        stdin.close()
        out[name] = (process.returncode, err, given, before)
    return out


ENTRY_MESSAGES = {
    "csv_dump_over_stdin": "run_train.py: error: --dump-topk {tmp}/log.csv: is the input --data (standard input)",
    "csv_plot_without_matplotlib": "-c: error: --plot (plot_curves) needs matplotlib, the 'plot' extra, which is not "
                                   "installed: in a clone, `uv sync --extra plot` (or `pip install '.[plot]'`)",
    "phoenix_train_movielens": "phoenix-train: error: --checkpoint-dir {tmp}/ml: is the input --data {tmp}/ml",
    "synthetic_into_a_file": "run_train.py: error: --checkpoint-dir {tmp}/file: is a regular file, not a directory",
    "run_ranker": "run_ranker.py: error: --checkpoint {tmp}/file: is a file, not a directory",
    "run_retrieval": "run_retrieval.py: error: --checkpoint {tmp}/file: is a file, not a directory",
}


@pytest.mark.parametrize("name", ENTRY_MESSAGES)
def test_every_entry_point_prints_one_error_line_and_exits_2(entry_points, name):
    status, err, given, before = entry_points[name]
    tmp = Path(entry_points["csv_dump_over_stdin"][2]).parent
    lines = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and status == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith(ENTRY_MESSAGES[name].format(tmp=tmp)), lines
    if given is not None:
        assert given.read_bytes() == before  # the input is untouched

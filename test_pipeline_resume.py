"""Resumable runs on one's own log (phoenix_pipeline.run with checkpoint_every / resume; run_train.py's
--checkpoint-every, --resume, --keep-checkpoints on the log and MovieLens paths).

One uninterrupted reference run of the tiny CSV log of test_phoenix_pipeline (module-scoped); runs
interrupted at several points (a hard kill raised right after a new best checkpoint was saved, a clean
SIGTERM stop in the ranker, a hard kill in the final evaluation, a real SIGKILL of a subprocess) and
resumed must end bit for bit where it ended: every array of the best checkpoints, the table's figures and
the dump's bytes. A resume with another log or other flags is refused before training, each difference
named. Tolerance: none anywhere (exact equality), on CPU.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import phoenix_checkpoint as checkpoint
import phoenix_pipeline as pipeline
import phoenix_run_dir as run_dir
import phoenix_stop
import phoenix_training as training
import phoenix_two_stage as two_stage
import run_train
from test_phoenix_pipeline import TINY_FLAGS, write_log

REPO = Path(__file__).resolve().parent
STAGES = ("retrieval", "retrieval.1", "ranker")


class Killed(BaseException):
    """A simulated kill: nothing is saved on the way out (unlike a clean stop)."""


@pytest.fixture(scope="module")
def log_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("log") / "log.csv"
    write_log(path)
    return path


# Two retrieval members: a resume reads a finished member back and continues the other.
MEMBERS = ["--retrieval-members", "2"]


def argv_of(log_csv, run, dump, *more) -> list:
    return ["--data", str(log_csv), "--checkpoint-dir", str(run), "--dump-topk", str(dump), *TINY_FLAGS, *MEMBERS,
            *more]


def outcome(run, dump) -> dict:
    """What must be bit-identical: every array of each stage's best checkpoint, and the dump's bytes."""
    arrays = {}
    for stage in STAGES:
        flat, _ = checkpoint._flatten(checkpoint.load_checkpoint(os.path.join(run, stage)).params)
        arrays.update({f"{stage}/{path}": np.asarray(leaf) for path, _, leaf in flat})
    return {"arrays": arrays, "dump": Path(dump).read_bytes()}


def assert_same(result: dict, got: dict, reference: dict) -> None:
    ref_result, ref = reference["result"], reference["outcome"]
    assert result["table"] == ref_result["table"]
    assert (result["retrieval_weight"], result["popularity_weight"]) == (ref_result["retrieval_weight"],
                                                                         ref_result["popularity_weight"])
    assert sorted(got["arrays"]) == sorted(ref["arrays"])
    for name, array in ref["arrays"].items():
        np.testing.assert_array_equal(got["arrays"][name], array, err_msg=name)  # exact
        assert got["arrays"][name].dtype == array.dtype
    assert got["dump"] == ref["dump"]


@pytest.fixture(scope="module")
def reference(log_csv, tmp_path_factory) -> dict:
    """The uninterrupted run, without step checkpoints."""
    tmp = tmp_path_factory.mktemp("reference")
    result = run_train.main(argv_of(log_csv, tmp / "run", tmp / "top10.csv"))
    return {"result": result, "outcome": outcome(tmp / "run", tmp / "top10.csv"), "run": tmp / "run",
            "argv": argv_of(log_csv, tmp / "run", tmp / "top10.csv")}


def kill_after(monkeypatch, name: str, count: int = 1):
    """Raises Killed right after the `count`-th save of a checkpoint named `name` (a best checkpoint,
    "retrieval"; or "step-00000006"), before anything else happens."""
    save, seen = checkpoint.save_checkpoint, []

    def saving(path, *args, **kwargs):
        out = save(path, *args, **kwargs)
        if os.path.basename(os.fspath(path)) == name:
            seen.append(path)
            if len(seen) == count:
                raise Killed(path)
        return out

    monkeypatch.setattr(checkpoint, "save_checkpoint", saving)


def sigterm_at(monkeypatch, trainer_type: str, step: int):
    """A clean stop (as SIGTERM under a command line) before step `step` + 1 of the first `trainer_type`."""
    call_step, steps = training._call_step, []

    def stepping(trainer, state, item):
        if type(trainer).__name__ == trainer_type:
            steps.append(1)
        return call_step(trainer, state, item)

    monkeypatch.setattr(training, "_call_step", stepping)
    monkeypatch.setattr(training, "stop_requested", lambda: signal.SIGTERM if len(steps) >= step else None)


def test_a_run_interrupted_at_several_points_resumes_to_the_uninterrupted_run_bit_for_bit(
        reference, log_csv, tmp_path, monkeypatch, capsys):
    run, dump = tmp_path / "run", tmp_path / "top10.csv"
    argv = argv_of(log_csv, run, dump, "--checkpoint-every", "4", "--resume")  # --resume on a new directory

    # 1. killed right after the second retrieval member's first new best was saved, before that step's
    # step checkpoint (the first member finished)
    kill_after(monkeypatch, "retrieval.1")
    with pytest.raises(Killed):
        run_train.main(argv)
    assert "nothing to resume in" in capsys.readouterr().err
    best = checkpoint.read_meta(run / "retrieval.1")["extra"]["val"]["step"]
    newest = training.list_step_checkpoints(run / pipeline.STEPS_DIR / "retrieval.1")[-1][0]
    assert newest < best  # the kill fell between the new best and the step checkpoint after it
    monkeypatch.undo()

    # 2. resumed; stopped cleanly (SIGTERM) after the ranker's 10th step, past its first evaluation (whose
    # best, better than the last evaluation's, must travel in the step checkpoint)
    sigterm_at(monkeypatch, "RankingTrainer", 10)
    with pytest.raises(phoenix_stop.TrainingStopped) as stopped:
        run_train.main(argv)
    err = capsys.readouterr().err
    assert "retrieval: already trained by this run" in err
    assert f"resuming from {run}/steps/retrieval.1/step-{newest:08d}" in err
    line = stopped.value.line(["run_train.py"])
    assert line.startswith(f"stopped by SIGTERM after step 10 of {stopped.value.end_step} (ranker): saved ")
    assert f"{run}/steps/ranker/step-00000010 (step 10 of" in line and f"{run}/retrieval, {run}/retrieval.1 (retrieval, best val" in line
    assert f"{run}/ranker (best val NDCG@10" in line
    assert line.endswith("; resume with: run_train.py " + " ".join(argv))
    monkeypatch.undo()

    # 3. resumed; killed in the final evaluation, after both stages finished
    def evaluate_stages(*args):
        raise Killed("evaluation")

    monkeypatch.setattr(pipeline, "evaluate_stages", evaluate_stages)
    with pytest.raises(Killed):
        run_train.main(argv)
    err = capsys.readouterr().err
    assert f"resuming from {run}/steps/ranker/step-00000010" in err and "retrieval: already trained by this run" in err
    monkeypatch.undo()

    # 4. resumed to the end: nothing trained again
    result = run_train.main(argv)
    err = capsys.readouterr().err
    assert all(f"{name}: already trained" in err for name in STAGES) and "steps of" not in err
    assert not os.listdir(run / pipeline.STEPS_DIR)  # a finished stage's step checkpoints are deleted
    assert_same(result, outcome(run, dump), reference)
    metrics = pipeline.read_metrics(run / pipeline.METRICS_FILE)
    keys = [pipeline.MetricsLog._key(e) for e in metrics]
    assert len(keys) == len(set(keys))  # steps trained again after a kill are logged once
    reference_keys = [pipeline.MetricsLog._key(e) for e in
                      pipeline.read_metrics(reference["run"] / pipeline.METRICS_FILE)]
    assert sorted(map(str, keys)) == sorted(map(str, reference_keys))


# A run of run_train.py in a process of its own, SIGKILLed once its ranker's step checkpoint N exists.
def test_a_csv_run_sigkilled_in_training_resumes_to_the_uninterrupted_run(reference, log_csv, tmp_path, capsys):
    run, dump = tmp_path / "run", tmp_path / "top10.csv"
    argv = argv_of(log_csv, run, dump, "--checkpoint-every", "2")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC", "NPROC")}
    process = subprocess.Popen([sys.executable, "run_train.py", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env={**env, "JAX_PLATFORMS": "cpu"})
    target = run / pipeline.STEPS_DIR / "ranker" / "step-00000004"
    deadline = time.monotonic() + 300
    while not target.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate()
    assert process.returncode == -signal.SIGKILL, err.decode()[-2000:]
    result = run_train.main([*argv, "--resume"])
    err = capsys.readouterr().err
    assert "retrieval: already trained by this run" in err
    assert f"resuming from {run}/steps/ranker/step-" in err
    assert_same(result, outcome(run, dump), reference)


def test_a_csv_run_stopped_by_sigterm_exits_143_naming_what_is_saved_and_the_command_that_resumes(
        log_csv, tmp_path, monkeypatch, capsys):
    """A real SIGTERM under the command line's handlers (test_resume.first_step_of sends it during the
    first retrieval step): one line, exit status 143, the resume command without --overwrite."""
    from test_resume import first_step_of, stop_line
    run = tmp_path / "run"
    argv = ["--data", str(log_csv), "--checkpoint-dir", str(run), *TINY_FLAGS, "--checkpoint-every", "5",
            "--overwrite"]
    first_step_of(monkeypatch, "SequenceRetrievalTrainer", signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        phoenix_stop.command_line(run_train.main)(argv)
    assert exit_info.value.code == 143
    line = stop_line(capsys)
    end = int(line.split(" of ", 1)[1].split(" ", 1)[0])
    resume = shlex.join([*phoenix_stop.invoked_as(), *argv[:-1], "--resume"])
    assert line == (f"stopped by SIGTERM after step 1 of {end} (retrieval): saved {run}/steps/retrieval/step-00000001 "
                    f"(step 1 of {end}); resume with: {resume}")
    assert [step for step, _ in training.list_step_checkpoints(run / pipeline.STEPS_DIR / "retrieval")] == [1]


@pytest.mark.parametrize("change, expected", [
    ("log", ["log_fingerprint: checkpoint '"]),
    ("seed", ["seed: checkpoint 0, now 1"]),
    ("flags", ["flags.duplicates: checkpoint 'first', now 'error'", "recipe.emb_size: checkpoint 16, now 32"]),
], ids=["changed_log", "changed_seed", "changed_flags"])
def test_a_resume_with_another_log_or_other_flags_is_refused_before_training(reference, log_csv, tmp_path, change,
                                                                              expected):
    argv = list(reference["argv"])
    if change == "log":
        write_log(tmp_path / "other.csv", seed=1)
        argv[argv.index(str(log_csv))] = str(tmp_path / "other.csv")
    elif change == "seed":
        argv += ["--seed", "1"]
    else:
        argv[argv.index("--emb-size") + 1] = "32"
        argv += ["--duplicates", "error"]  # the log has no repeats: the same data, another flag
    before = {p: p.stat().st_mtime_ns for p in reference["run"].rglob("*")}
    with pytest.raises(training.ResumeError) as refused:
        run_train.main([*argv, "--resume"])
    message = str(refused.value)
    assert "cannot resume" in message
    lines = message.splitlines()[1:-1]
    assert len(lines) == len(expected) and all(any(line.strip().startswith(e) for line in lines) for e in expected), \
        message
    assert {p: p.stat().st_mtime_ns for p in reference["run"].rglob("*")} == before  # nothing written


def test_the_fingerprint_is_of_the_content_not_of_the_file(log_csv, tmp_path):
    """Same interactions in another row order, read from another file: the same fingerprint; one
    interaction's time changed: another."""
    rows = log_csv.read_text().splitlines()
    (tmp_path / "reordered.csv").write_text("\n".join([rows[0], *reversed(rows[1:])]) + "\n")
    split = pipeline.split_log(pipeline.read_csv(log_csv))
    assert pipeline.fingerprint(split) == pipeline.fingerprint(pipeline.split_log(
        pipeline.read_csv(tmp_path / "reordered.csv")))
    fields = rows[1].split(",")
    fields[2] = str(int(fields[2]) + 1)
    (tmp_path / "changed.csv").write_text("\n".join([rows[0], ",".join(fields), *rows[2:]]) + "\n")
    assert pipeline.fingerprint(split) != pipeline.fingerprint(pipeline.split_log(
        pipeline.read_csv(tmp_path / "changed.csv")))


@pytest.mark.parametrize("flags, message", [
    (["--overwrite", "--resume"], "--overwrite and --resume"),
    (["--keep-checkpoints", "2"], "--keep-checkpoints: applies to step checkpoints only"),
    (["--checkpoint-every", "-1"], "argument --checkpoint-every: expected an int >= 0, got '-1'"),
], ids=["overwrite_and_resume", "keep_without_checkpoints", "negative_every"])
def test_resume_flags_that_cannot_apply_are_refused(log_csv, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_train.parse_args(["--data", str(log_csv), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("skip", [1, 5, 13])
def test_a_resumed_batch_stream_yields_what_the_uninterrupted_one_yields_from_there(log_csv, skip):
    """retrieval_batches / ranker_batches with skip=k equal the stream's batches k, k+1, ... exactly."""
    split = pipeline.split_log(pipeline.read_csv(log_csv))
    recipe = two_stage.resolve_recipe(two_stage.Recipe(history_len=4, ranker_history_len=4, retrieval_batch_size=16,
                                                       ranker_batch_size=32, negative_pool=6), split)
    hashes = two_stage.hash_config(recipe)
    examples = two_stage.phoenix_examples(split, "train", recipe.ranker_history_len)
    pool = np.random.default_rng(0).integers(0, len(split.item_ids), (len(examples["user_ids"]), 6))

    def streams(rng, skip=0):
        return (two_stage.retrieval_batches(split, recipe, hashes, rng(), skip),
                two_stage.ranker_batches(split, examples, pool, recipe, hashes, rng(), skip))

    for whole, resumed in zip(streams(lambda: np.random.default_rng([0, 1])),
                              streams(lambda: np.random.default_rng([0, 1]), skip)):
        for _ in range(skip):
            next(whole)
        for _ in range(3):
            for a, b in zip(training.jax.tree.leaves(next(whole)), training.jax.tree.leaves(next(resumed))):
                np.testing.assert_array_equal(a, b)


def test_a_resumed_metrics_log_drops_a_cut_line_and_logs_an_entry_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = pipeline.MetricsLog(path)
    log.write(stage="ranker", step=5, loss=0.5, steps_per_s=3.0)
    log.write(stage="ranker", step=5, **{"eval/NDCG@10": 0.25})
    with open(path, "a") as f:
        f.write('{"stage": "ranker", "st')  # a line cut short by a kill
    resumed = pipeline.MetricsLog(path, resume=True)
    resumed.write(stage="ranker", step=5, loss=0.5, steps_per_s=4.0)  # logged again after the resume: once
    resumed.write(stage="ranker", step=10, loss=0.4, steps_per_s=4.0)
    assert pipeline.read_metrics(path) == [{"stage": "ranker", "step": 5, "loss": 0.5, "steps_per_s": 3.0},
                                           {"stage": "ranker", "step": 5, "eval/NDCG@10": 0.25},
                                           {"stage": "ranker", "step": 10, "loss": 0.4, "steps_per_s": 4.0}]
    assert pipeline.read_metrics(pipeline.MetricsLog(path).path) == []  # without resume: a new log


def test_resume_on_a_directory_of_another_kind_of_run_is_refused(log_csv, tmp_path):
    run_dir.write_manifest(tmp_path / "run", "synthetic", {})
    argv = ["--data", str(log_csv), "--checkpoint-dir", str(tmp_path / "run"), *TINY_FLAGS, "--resume"]
    with pytest.raises(training.ResumeError, match="records no two-stage run configuration"):
        run_train.main(argv)
    assert json.loads((tmp_path / "run" / run_dir.MANIFEST_FILE).read_text())["kind"] == "synthetic"


def test_a_stop_without_step_checkpoints_names_the_resume_command_once_a_stage_is_saved():
    """Without --checkpoint-every a stage keeps no step checkpoints, but a finished one is read back by
    --resume: the line says so and gives the command; with nothing saved it says nothing is resumable."""
    options = pipeline.RunOptions(checkpoint_dir="runs/mine")
    argv = ["--data", "log.csv", "--checkpoint-dir", "runs/mine", "--overwrite"]
    stop = phoenix_stop.TrainingStopped(signal.SIGINT, 10, 67, None, "ranker")
    stop.kept = ["runs/mine/retrieval (retrieval, best val NDCG@10 0.3157 at step 87)"]
    run_train.describe_stop(stop, options, argv)
    assert stop.line(["run_train.py"]) == (
        "stopped by SIGINT after step 10 of 67 (ranker): saved runs/mine/retrieval (retrieval, best val NDCG@10 "
        "0.3157 at step 87) (the stopped stage starts over: it kept no step checkpoints, --checkpoint-every is off); "
        "resume with: run_train.py --data log.csv --checkpoint-dir runs/mine --resume")
    nothing = phoenix_stop.TrainingStopped(signal.SIGINT, 3, 87, None, "retrieval")
    nothing.why_not = pipeline.NOT_RESUMABLE
    run_train.describe_stop(nothing, options, argv)
    assert nothing.line(["run_train.py"]) == ("stopped by SIGINT after step 3 of 87 (retrieval): nothing resumable "
                                              "was saved (--checkpoint-every is off)")

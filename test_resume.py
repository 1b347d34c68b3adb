"""Preemption-safe training: fit's step checkpoints and resume (phoenix_training.fit), checked bit for
bit against uninterrupted runs, with disk-full, read-only and damaged-checkpoint cases; clean stops on
SIGTERM / SIGINT (phoenix_stop) on every data path; the devices as part of a run. The fault harness
(resume_harness.py: SIGKILL, SIGTERM, SIGINT on `run_train.py --data synthetic`): test_resume_harness.py."""

import errno
import io
import itertools
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import types

import jax
import numpy as np
import pytest

import phoenix_checkpoint as checkpoint
import phoenix_pipeline as pipeline
import phoenix_resume
import phoenix_stop
import phoenix_training as training
import phoenix_two_stage as two_stage
import run_train
from recsys_model import PhoenixModelConfig
from test_phoenix_training import A, C, HASHES, OPTIMIZER, S, TRANSFORMER, D, leaves, random_batch, random_labels

STEPS = 12
EVERY = 5  # saves at steps 5, 10 and 12 (the last)
KEEP = 2
RUN_CONFIG = {"data_seed": 1000, "note": "batches of step s are random_batch(1000 + s)"}


class Preempted(Exception):
    """Stands for a kill: raised by the data stream when it is asked for the batch of a given step."""


class LabelCounts:
    """An `aux` object like phoenix_synthetic.PopularityCounts: state that the data stream updates."""

    def __init__(self):
        self.sums = np.zeros(A)

    def state_dict(self):
        return {"sums": self.sums.copy()}

    def load_state_dict(self, arrays):
        self.sums = np.asarray(arrays["sums"])


def stream(counts: LabelCounts, first_step: int, kill_at=None, signal_at=None):
    """Batches first_step, first_step + 1, ..., each a function of its step alone. `signal_at`:
    (step, signal) sends this process the signal when the batch of that step is asked for."""
    for step in itertools.count(first_step):
        if step == kill_at:
            raise Preempted(step)
        if signal_at is not None and step == signal_at[0]:
            os.kill(os.getpid(), signal_at[1])
        labels = random_labels(1000 + step)
        counts.sums += labels.sum(axis=(0, 1))
        yield random_batch(1000 + step), labels


@pytest.fixture(scope="module")
def trainer():
    config = PhoenixModelConfig(model=TRANSFORMER, emb_size=D, num_actions=A, history_seq_len=S,
                                candidate_seq_len=C, hash_config=HASHES)
    return training.make_ranking_trainer(config, optimizer_config=OPTIMIZER)


def run(trainer, directory, kill_at=None, resume=True, run_config=RUN_CONFIG, keep=KEEP, signal_at=None):
    """A fresh process's view: new state and counts, then fit (resuming from `directory` if it can)."""
    counts = LabelCounts()
    eval_batch = (random_batch(7), random_labels(7))
    out = io.StringIO()
    state = trainer.init(jax.random.PRNGKey(0), random_batch(0))
    state, history = training.fit(
        trainer, state, lambda first: stream(counts, first, kill_at, signal_at), STEPS, log_every=3,
        eval_fn=lambda s: trainer.evaluate(s.params, *eval_batch), eval_every=4, stream=out,
        checkpoint_dir=directory, checkpoint_every=EVERY, keep_checkpoints=keep, resume=resume,
        run_config=run_config, aux=counts)
    return state, history, counts, out.getvalue()


def killed(trainer, directory, kill_at):
    with pytest.raises(Preempted):
        run(trainer, directory, kill_at=kill_at)


def comparable(history):
    """The history without its timings, arrays as lists: what must repeat exactly."""
    return [{k: np.asarray(v).tolist() for k, v in entry.items() if k != "steps_per_s"} for entry in history]


def assert_same_run(got, want):
    (state, history, counts, _), (ref_state, ref_history, ref_counts, _) = got, want
    assert int(state.step) == int(ref_state.step) == STEPS
    for a, b in zip(leaves((state.params, state.opt_state, state.rng)),
                    leaves((ref_state.params, ref_state.opt_state, ref_state.rng)), strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert comparable(history) == comparable(ref_history)
    np.testing.assert_array_equal(counts.sums, ref_counts.sums)


@pytest.fixture(scope="module")
def uninterrupted(trainer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    return directory, run(trainer, directory, resume=False)


def step_names(directory):
    return sorted(e for e in os.listdir(directory) if not e.startswith("."))


def test_uninterrupted_run_keeps_its_newest_checkpoints(uninterrupted):
    directory, (state, history, _, _) = uninterrupted
    assert step_names(directory) == ["step-00000010", "step-00000012"]
    assert set(os.listdir(directory)) - {"step-00000010", "step-00000012"} == {training.LOCK_FILE}
    # Logs at 3, 6, 9, 12; evals at 4, 8 and the end: the history is the whole run's.
    assert [h["step"] for h in history] == [3, 4, 6, 8, 9, 12, 12]
    saved = checkpoint.load_checkpoint(os.path.join(directory, "step-00000012"))
    assert saved.extra["run_config"] == RUN_CONFIG and saved.extra["run_start_step"] == 0
    assert list(saved.aux) == ["sums"]


@pytest.mark.parametrize("kills", [[7], [3, 8, 11], [5, 10], [1, 2, 11]],
                         ids=["once", "three_times", "at_saved_steps", "early_and_before_the_last_step"])
def test_killed_and_resumed_run_is_bit_identical(trainer, uninterrupted, tmp_path, kills):
    for kill_at in kills:
        killed(trainer, tmp_path, kill_at)
    got = run(trainer, tmp_path)
    assert_same_run(got, uninterrupted[1])
    newest = max(s for s in (0, 5, 10) if s <= kills[-1])
    if newest:
        assert f"resuming from {tmp_path}/step-{newest:08d} (step {newest} of {STEPS})" in got[3]


def test_a_finished_run_resumes_to_the_same_result(trainer, uninterrupted, tmp_path):
    run(trainer, tmp_path, resume=False)
    again = run(trainer, tmp_path)  # restores step 12: no step to take, the final eval again
    assert "resuming from" in again[3] and "first step" not in again[3]
    assert_same_run(again, uninterrupted[1])


def test_resume_names_every_difference_in_configuration(trainer, tmp_path):
    killed(trainer, tmp_path, 7)
    with pytest.raises(training.ResumeError, match=r"step-00000005: cannot resume.*2 difference\(s\)") as e:
        run(trainer, tmp_path, run_config={**RUN_CONFIG, "data_seed": 1001, "batch": 4})
    assert "run_config.data_seed: checkpoint 1000, now 1001" in str(e.value)
    assert "run_config.batch: absent in the checkpoint, now 4" in str(e.value)
    other = training.make_ranking_trainer(trainer.model_config, optimizer_config=training.OptimizerConfig(
        learning_rate=2e-2, warmup_steps=5))
    with pytest.raises(training.ResumeError, match=r"config\.optimizer\.learning_rate: checkpoint 0\.01, now 0\.02"):
        run(other, tmp_path)
    assert step_names(tmp_path) == ["step-00000005"]  # nothing was changed


def test_fresh_run_refuses_an_earlier_runs_checkpoints(trainer, tmp_path):
    killed(trainer, tmp_path, 7)
    before = {e: os.stat(tmp_path / e).st_mtime_ns for e in step_names(tmp_path)}
    with pytest.raises(training.ResumeError, match=r"holds checkpoints of an earlier run \(newest step-00000005\); "
                                                   r"pass resume=True"):
        run(trainer, tmp_path, resume=False)
    assert {e: os.stat(tmp_path / e).st_mtime_ns for e in step_names(tmp_path)} == before


def test_damaged_newest_checkpoint_falls_back_to_the_previous(trainer, uninterrupted, tmp_path):
    killed(trainer, tmp_path, 11)
    arrays = tmp_path / "step-00000010" / checkpoint.ARRAYS_FILE
    data = bytearray(arrays.read_bytes())
    data[len(data) // 2] ^= 0xFF  # bit rot after the save: its sha256 no longer matches
    arrays.write_bytes(bytes(data))
    got = run(trainer, tmp_path)
    assert "skipping damaged checkpoint" in got[3] and "step-00000010" in got[3]
    assert f"resuming from {tmp_path}/step-00000005" in got[3]
    assert_same_run(got, uninterrupted[1])


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(trainer, uninterrupted, tmp_path, monkeypatch):
    killed(trainer, tmp_path, 7)
    previous = (tmp_path / "step-00000005" / checkpoint.ARRAYS_FILE).read_bytes()

    def full_disk(path, arrays):  # half the file lands, then the disk is full
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04" + bytes(1000))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "_write_arrays", full_disk)
    with pytest.raises(OSError, match=r"checkpoint of step 10 was not written, training stopped: .*No space left "
                                      r"on device.*newest complete checkpoint, intact: .*step-00000005") as e:
        run(trainer, tmp_path)
    assert e.value.errno == errno.ENOSPC
    # The half-written temporary directory is gone.
    assert sorted(os.listdir(tmp_path)) == sorted([training.LOCK_FILE, "step-00000005"])
    assert (tmp_path / "step-00000005" / checkpoint.ARRAYS_FILE).read_bytes() == previous
    monkeypatch.undo()
    assert_same_run(run(trainer, tmp_path), uninterrupted[1])  # space again: the run goes on


def test_read_only_checkpoint_directory_keeps_the_previous_checkpoint(trainer, uninterrupted, tmp_path,
                                                                      monkeypatch):
    killed(trainer, tmp_path, 7)
    previous = (tmp_path / "step-00000005" / checkpoint.ARRAYS_FILE).read_bytes()
    os.chmod(tmp_path, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    if os.access(tmp_path, os.W_OK):  # root ignores permission bits: make mkdir fail as on a read-only mount
        real_mkdir = os.mkdir

        def read_only(path, *args, **kwargs):
            if os.path.dirname(os.path.abspath(path)) == str(tmp_path):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", read_only)
    try:
        with pytest.raises(OSError, match=r"checkpoint of step 10 was not written, training stopped: cannot save "
                                          r"checkpoint .*step-00000010: cannot create a directory in") as e:
            run(trainer, tmp_path)
        assert e.value.errno in (errno.EACCES, errno.EROFS)
        assert "newest complete checkpoint, intact: " + str(tmp_path / "step-00000005") in str(e.value)
    finally:
        os.chmod(tmp_path, stat.S_IRWXU)
    monkeypatch.undo()
    assert (tmp_path / "step-00000005" / checkpoint.ARRAYS_FILE).read_bytes() == previous
    assert_same_run(run(trainer, tmp_path), uninterrupted[1])


def test_a_second_process_waits_for_the_run_lock(tmp_path):
    held = training.RunLock(str(tmp_path), print)
    messages = []
    waiter = threading.Thread(target=lambda: training.RunLock(str(tmp_path), messages.append).release())
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "the second lock did not wait"
    assert messages == [f"{tmp_path}: another process (pid {os.getpid()}) is training this run; waiting for it to stop"]
    held.release()
    waiter.join(10)
    assert not waiter.is_alive()


@pytest.mark.parametrize("kwargs, message", [
    ({"checkpoint_every": -1}, "checkpoint_every: expected an int >= 0"),
    ({"keep_checkpoints": 0}, "keep_checkpoints: expected an int >= 1"),
    ({"checkpoint_dir": None, "resume": True}, "resume: needs checkpoint_dir"),
    ({"checkpoint_dir": None, "checkpoint_every": 5}, "checkpoint_every: needs checkpoint_dir"),
], ids=["negative_every", "keep_0", "resume_without_dir", "every_without_dir"])
def test_bad_checkpoint_arguments(trainer, tmp_path, kwargs, message):
    state = trainer.init(jax.random.PRNGKey(0), random_batch(0))
    with pytest.raises(ValueError, match=message):
        training.fit(trainer, state, lambda s: stream(LabelCounts(), s), 2, **{"checkpoint_dir": tmp_path, **kwargs})
    assert os.listdir(tmp_path) == []  # rejected before anything was written


def test_resumable_run_needs_a_stream_reproducible_from_its_step(trainer, tmp_path):
    state = trainer.init(jax.random.PRNGKey(0), random_batch(0))
    with pytest.raises(TypeError, match="batch_iterator: a resumable run .* needs a callable first_step"):
        training.fit(trainer, state, iter([]), 2, checkpoint_dir=tmp_path)


def test_prune_keeps_the_newest_and_clears_leftovers(tmp_path):
    params = {"m": {"w": np.arange(3.0)}}
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(phoenix_resume.step_checkpoint_path(tmp_path, step), params, step=step)
    os.mkdir(tmp_path / ".step-00000001.del-0123456789abcdef")  # a prune killed while deleting
    (tmp_path / ".step-00000001.del-0123456789abcdef" / "meta.json").write_text("{")
    os.mkdir(tmp_path / "step-00000000")  # under a step name but not a checkpoint: left alone
    (tmp_path / "step-00000000" / "notes.txt").write_text("mine")
    deleted = phoenix_resume.prune_step_checkpoints(tmp_path, keep=2)
    assert deleted == [str(tmp_path / "step-00000001")]
    assert sorted(os.listdir(tmp_path)) == ["step-00000000", "step-00000002", "step-00000003"]
    with pytest.raises(ValueError, match="keep: expected an int >= 1"):
        phoenix_resume.prune_step_checkpoints(tmp_path, keep=0)


def test_aux_arrays_round_trip_and_old_readers_see_the_same_meta(tmp_path):
    aux = {"counts": {"post": np.arange(6.0).reshape(2, 3)}, "n": np.array([4], np.int64)}
    checkpoint.save_checkpoint(tmp_path / "c", {"m": {"w": np.ones(2)}}, aux=aux)
    loaded = checkpoint.load_checkpoint(tmp_path / "c")
    np.testing.assert_array_equal(loaded.aux["counts"]["post"], aux["counts"]["post"])
    assert loaded.aux["n"].dtype == np.int64
    checkpoint.save_checkpoint(tmp_path / "d", {"m": {"w": np.ones(2)}})
    assert "aux" not in checkpoint.read_meta(tmp_path / "d") and checkpoint.load_checkpoint(tmp_path / "d").aux is None


def test_history_json_round_trip_is_strict_json():
    history = [{"step": 3, "loss": 0.5, "per_action_loss": np.array([0.25, np.nan, -np.inf], np.float32),
                "steps_per_s": float("nan")},
               {"step": 4, "eval/loss": np.float64(0.25), "eval/x": jax.numpy.asarray([1.5, 2.5])}]
    text = json.dumps(training.encode_json(history), allow_nan=False)  # no NaN literal in meta.json
    back = training.decode_json(json.loads(text))
    assert back[0]["per_action_loss"].dtype == np.float32 and back[1]["eval/x"].dtype == np.float32
    np.testing.assert_array_equal(back[0]["per_action_loss"], history[0]["per_action_loss"])
    assert np.isnan(back[0]["steps_per_s"]) and back[1]["eval/loss"] == 0.25
    np.testing.assert_array_equal(back[1]["eval/x"], [1.5, 2.5])


# --------------------------------------------------------------------------- clean stops (phoenix_stop)

SIGNALS = [signal.SIGTERM, signal.SIGINT]
SIGNAL_IDS = ["sigterm", "sigint"]


@pytest.mark.parametrize("sig", SIGNALS, ids=SIGNAL_IDS)
def test_a_stop_signal_saves_the_step_in_flight_and_the_resume_is_bit_identical(trainer, uninterrupted, tmp_path,
                                                                                sig):
    before = {s: signal.getsignal(s) for s in SIGNALS}
    with training.stop_on_signals(), pytest.raises(training.TrainingStopped) as stopped:
        run(trainer, tmp_path, signal_at=(7, sig))  # the signal comes as the batch of step 7 (the 8th) is made
    stop = stopped.value
    # Nothing lost: the step in flight finished and was saved; the run went no further.
    assert (stop.signum, stop.step, stop.end_step, stop.exit_code) == (sig, 8, STEPS, 128 + sig)
    assert stop.saved == str(tmp_path / "step-00000008") and step_names(tmp_path) == ["step-00000005", "step-00000008"]
    assert str(stop) == f"stopped by {signal.Signals(sig).name} after step 8 of {STEPS}: saved {stop.saved}"
    assert {s: signal.getsignal(s) for s in SIGNALS} == before and training.stop_requested() is None
    got = run(trainer, tmp_path)
    assert f"resuming from {tmp_path}/step-00000008 (step 8 of {STEPS})" in got[3]
    assert_same_run(got, uninterrupted[1])


def test_a_stop_signal_during_a_save_lets_it_finish_then_stops(trainer, uninterrupted, tmp_path, monkeypatch):
    write_meta = checkpoint._write_meta

    def signalled(path, meta):  # SIGTERM between arrays.npz and meta.json of step 5's save
        os.kill(os.getpid(), signal.SIGTERM)
        write_meta(path, meta)

    monkeypatch.setattr(checkpoint, "_write_meta", signalled)
    with training.stop_on_signals(), pytest.raises(training.TrainingStopped) as stopped:
        run(trainer, tmp_path)
    monkeypatch.undo()
    assert (stopped.value.step, stopped.value.saved) == (5, str(tmp_path / "step-00000005"))
    assert step_names(tmp_path) == ["step-00000005"]
    assert checkpoint.load_checkpoint(tmp_path / "step-00000005").step == 5  # complete, its sha256 checked
    assert_same_run(run(trainer, tmp_path), uninterrupted[1])


def test_a_stop_without_checkpoints_or_before_any_step_saves_nothing(trainer, tmp_path):
    state = trainer.init(jax.random.PRNGKey(0), random_batch(0))
    with training.stop_on_signals(), pytest.raises(training.TrainingStopped) as stopped:
        training.fit(trainer, state, stream(LabelCounts(), 0, signal_at=(2, signal.SIGINT)), STEPS, log_every=3,
                     stream=io.StringIO())
    assert (stopped.value.step, stopped.value.saved) == (3, None)
    assert str(stopped.value) == f"stopped by SIGINT after step 3 of {STEPS}: no checkpoint saved"

    def signal_first(first):  # before the first step (the stream being opened): nothing trained, nothing saved
        os.kill(os.getpid(), signal.SIGTERM)
        return stream(LabelCounts(), first)

    state = trainer.init(jax.random.PRNGKey(0), random_batch(0))
    with training.stop_on_signals(), pytest.raises(training.TrainingStopped) as stopped:
        training.fit(trainer, state, signal_first, STEPS, checkpoint_dir=tmp_path, stream=io.StringIO())
    assert (stopped.value.step, stopped.value.saved) == (None, None)
    assert os.listdir(tmp_path) == [training.LOCK_FILE]


def test_outside_a_training_loop_a_stop_is_raised_at_once():
    with training.stop_on_signals():
        started = time.perf_counter()
        with pytest.raises(training.TrainingStopped) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # data preparation, evaluation, a compile: nothing to save, nothing to wait for
        assert time.perf_counter() - started < 10
    assert stopped.value.step is None and stopped.value.exit_code == 143
    assert stopped.value.line() == "stopped by SIGTERM: nothing resumable was saved"
    with training.deferred():  # outside stop_on_signals: nothing is recorded, nothing raised
        pass


# A process under the command line's stop handling, in fit's position (the first signal only marks
# the stop): argv[1] says what it does then.
STOP_SCRIPT = textwrap.dedent("""
    import atexit, os, signal, sys, time
    import numpy as np
    import phoenix_stop

    @phoenix_stop.command_line
    def main(mode):
        with phoenix_stop.deferred():
            print("ready", flush=True)
            if mode == "busy":  # like a compile or a device step: calls of seconds that release the GIL
                a = np.ones((4000, 4000), np.float32)
                while True:
                    a @ a
            if mode == "quick":  # the stop is done as soon as the signal comes: the process exits at once,
                atexit.register(time.sleep, 0.5)  # and takes a moment to (as JAX's exit handler does)
                while phoenix_stop.stop_requested() is None:
                    time.sleep(0.01)
            else:
                time.sleep(3)  # the parent's signals arrive meanwhile
        print("not stopped", flush=True)

    main(sys.argv[1])
""")


def stop_script(mode: str, signals: list, start_after: float = 0.0) -> tuple[subprocess.CompletedProcess, float]:
    """Runs STOP_SCRIPT in `mode`, sends it `signals` ((delay, signal) in turn) once it is ready;
    returns the completed process and the seconds from its first signal to its end."""
    proc = subprocess.Popen([sys.executable, "-c", STOP_SCRIPT, mode], cwd=os.path.dirname(__file__) or ".",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    time.sleep(start_after)
    first = time.perf_counter()
    for delay, sig in signals:
        time.sleep(delay)
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.perf_counter() - first


def test_a_second_ctrl_c_aborts_at_once_even_inside_a_long_call():
    done, seconds = stop_script("busy", [(0.0, signal.SIGINT), (phoenix_stop.ABORT_AFTER_S + 1.5, signal.SIGINT)])
    assert done.returncode == -signal.SIGINT and seconds < phoenix_stop.ABORT_AFTER_S + 10, (done, seconds)
    assert "Traceback" not in done.stderr and "not stopped" not in done.stdout


@pytest.mark.parametrize("mode, signals, code", [
    ("sleep", [(0.0, signal.SIGINT), (0.2, signal.SIGINT)], 130),  # `uv run` forwards the group's Ctrl-C 0.2 s later
    ("quick", [(0.0, signal.SIGINT), (0.2, signal.SIGINT)], 130),  # ... even once the stop is done and Python exits
    ("sleep", [(0.0, signal.SIGTERM), (0.1, signal.SIGTERM), (0.1, signal.SIGINT)], 143),  # the first one decides
], ids=["uv_forwarded_ctrl_c", "uv_forwarded_ctrl_c_while_exiting", "repeated_sigterm"])
def test_repeated_signals_within_a_moment_are_one_clean_stop(mode, signals, code):
    done, _ = stop_script(mode, signals)
    name = "SIGINT" if code == 130 else "SIGTERM"
    assert (done.returncode, done.stdout, done.stderr) == (code, "", f"stopped by {name}: nothing resumable was "
                                                                      f"saved\n"), done


def test_a_synthetic_stop_line_names_what_is_saved_and_the_command_that_resumes(tmp_path):
    import train_synthetic
    argv = ["--data", "synthetic", "--checkpoint-dir", str(tmp_path), "--checkpoint-every", "5", "--overwrite"]
    checkpoint.save_checkpoint(tmp_path / "steps" / "ranker" / "step-00000005", {"m": {"w": np.ones(2)}}, step=5)
    stop = training.TrainingStopped(signal.SIGTERM, 5, 1200)
    train_synthetic.describe_stop(stop, run_train.parse_args(argv).run, argv)
    resume = "--data synthetic --checkpoint-dir " + str(tmp_path) + " --checkpoint-every 5 --resume"
    assert stop.line(["run_train.py"]) == (  # --overwrite would start afresh: the resume drops it
        f"stopped by SIGTERM after step 5 of 1200 (ranker): saved ranker at step 5 of 1200 "
        f"({tmp_path}/steps/ranker/step-00000005); resume with: run_train.py {resume}")
    plain = ["--data", "synthetic", "--checkpoint-dir", str(tmp_path / "plain")]
    stop = training.TrainingStopped(signal.SIGINT, 7, 1200)
    train_synthetic.describe_stop(stop, run_train.parse_args(plain).run, plain)
    assert stop.line(["run_train.py"]) == ("stopped by SIGINT after step 7 of 1200 (ranker): nothing resumable was "
                                           "saved (--checkpoint-every is off)")


def test_the_resume_command_starts_as_this_process_was_started(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["run_train.py", "--data", "synthetic"])
    monkeypatch.setenv("UV", "/usr/bin/uv")
    assert phoenix_stop.invoked_as() == ["uv", "run", "run_train.py"]
    monkeypatch.delenv("UV")
    assert phoenix_stop.invoked_as() == [sys.executable, "run_train.py"]
    script = tmp_path / "bin" / "phoenix-train"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "--data", "x.csv"])
    assert phoenix_stop.invoked_as() == [str(script)]  # not on PATH: its path
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    assert phoenix_stop.invoked_as() == ["phoenix-train"]  # the one PATH finds: its name


def first_step_of(monkeypatch, trainer_type: str, sig, member_of=None):
    """Makes fit's first step of a `trainer_type` (the n-th such trainer with member_of=n) send `sig`."""
    call_step, seen = training._call_step, []

    def signalling(trainer, state, item):
        if type(trainer).__name__ == trainer_type:
            if trainer not in seen:
                seen.append(trainer)
                if len(seen) == (member_of or 1):
                    os.kill(os.getpid(), sig)
        return call_step(trainer, state, item)

    monkeypatch.setattr(training, "_call_step", signalling)


def stop_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_csv_run_stopped_in_training_exits_143_saying_nothing_is_resumable(tmp_path, monkeypatch, capsys):
    import test_phoenix_pipeline
    test_phoenix_pipeline.write_log(tmp_path / "log.csv")
    first_step_of(monkeypatch, "SequenceRetrievalTrainer", signal.SIGTERM)
    argv = ["--data", str(tmp_path / "log.csv"), "--checkpoint-dir", str(tmp_path / "run"),
            *test_phoenix_pipeline.TINY_FLAGS]
    with pytest.raises(SystemExit) as exit_info:
        phoenix_stop.command_line(run_train.main)(argv)
    assert exit_info.value.code == 143
    assert re.fullmatch(rf"stopped by SIGTERM after step 1 of \d+ \(retrieval\): nothing resumable was saved "
                        rf"\({re.escape(pipeline.NOT_RESUMABLE)}\)", stop_line(capsys))


def test_a_stop_while_the_command_line_is_read_names_the_same_command(tmp_path, monkeypatch, capsys):
    """A Ctrl-C in the first moments (flags parsed, nothing written): the line gives the command unchanged,
    which resumes an earlier run's step checkpoints when it has --resume (it said "nothing resumable" before)."""
    parse_args = run_train.parse_args

    def interrupted(argv):
        command = parse_args(argv)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises meanwhile
        return command

    monkeypatch.setattr(run_train, "parse_args", interrupted)
    argv = ["--data", "synthetic", "--checkpoint-dir", str(tmp_path / "run"), "--checkpoint-every", "5", "--resume"]
    with pytest.raises(SystemExit) as exit_info:
        phoenix_stop.command_line(run_train.main)(argv)
    assert exit_info.value.code == 130
    assert stop_line(capsys) == ("stopped by SIGINT: nothing saved yet (stopped before the run began); resume with: "
                                 + " ".join([*phoenix_stop.invoked_as(), *argv]))
    assert not os.path.exists(tmp_path / "run")


def test_a_signal_while_a_swallowed_stop_is_rescheduled_is_not_raised_inside_the_hook(monkeypatch):
    """A TrainingStopped swallowed where Python ignores exceptions goes to the unraisable hook, which has it
    raised again by a timer; a second SIGTERM arriving while the hook starts that timer is left to the timer
    (it used to raise inside the hook, where Python prints "Exception ignored" and the re-raise was lost)."""
    started = []

    class SignalOnStart(threading.Timer):
        def start(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs in the main thread, inside the hook
            started.append(self)
            super().start()

    with phoenix_stop.stop_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except phoenix_stop.TrainingStopped as stop:  # as a __del__ or a gc callback would swallow it
            swallowed = stop
        monkeypatch.setattr(phoenix_stop.threading, "Timer", SignalOnStart)
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(swallowed), exc_value=swallowed, exc_traceback=None,
                                                 err_msg=None, object=None))  # returns: nothing raised inside
        assert len(started) == 1
        with pytest.raises(phoenix_stop.TrainingStopped) as again:
            time.sleep(5)  # the timer raises it again in the main thread
        assert again.value.signum == signal.SIGTERM


def test_a_movielens_run_stopped_while_reading_its_data_exits_130(tmp_path, monkeypatch, capsys):
    import movielens
    import test_train_movielens
    (tmp_path / "ml").mkdir()
    test_train_movielens.write_world(tmp_path / "ml")
    load_ratings = movielens.load_ratings

    def interrupted(*args, **kwargs):  # Ctrl-C while the ratings are read: nothing to save
        ratings = load_ratings(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return ratings

    monkeypatch.setattr(movielens, "load_ratings", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        phoenix_stop.command_line(run_train.main)(["--data", str(tmp_path / "ml"), "--checkpoint-dir",
                                                   str(tmp_path / "run")])
    assert exit_info.value.code == 130
    assert stop_line(capsys) == "stopped by SIGINT: nothing resumable was saved"
    assert not os.path.exists(tmp_path / "run" / "retrieval")


def test_a_pipeline_stop_names_the_best_checkpoints_kept(tmp_path, monkeypatch):
    """What the CSV / MovieLens stop line lists: the best checkpoints of the members and the stage
    already trained (the training itself is replaced here: the tests above run it)."""
    import test_phoenix_pipeline
    test_phoenix_pipeline.write_log(tmp_path / "log.csv")
    split = pipeline.split_log(pipeline.read_csv(tmp_path / "log.csv"))
    recipe = pipeline.Recipe(retrieval_members=2, ranker_members=2, hard_negatives=0)
    stopped = training.TrainingStopped(signal.SIGTERM, 4, 9, stage="ranker.1")

    def fit_keeping_best(trainer, state, batches, steps, evaluate, path, *rest):
        if path.endswith("ranker.1"):
            raise stopped
        return {}, {"NDCG@10": 0.25, "step": 3}

    monkeypatch.setattr(pipeline, "_fit_keeping_best", fit_keeping_best)
    monkeypatch.setattr(two_stage, "start_retrieval", lambda *args, **kwargs: (None, None, None, 9))
    monkeypatch.setattr(two_stage, "start_ranker", lambda *args, **kwargs: (None, None, None, 9))
    monkeypatch.setattr(two_stage, "ensemble", lambda trainers, params, kind: (None, tuple(params)))
    monkeypatch.setattr(two_stage, "StageOne",
                        lambda *args, **kwargs: types.SimpleNamespace(metrics=lambda: {"NDCG@10": 0.5}))
    with pytest.raises(training.TrainingStopped) as e:
        pipeline.run(split, recipe, tmp_path / "run", stream=io.StringIO())
    assert e.value is stopped and stopped.why_not == pipeline.NOT_RESUMABLE
    run_dir = tmp_path / "run"
    assert stopped.kept == [f"{run_dir}/retrieval, {run_dir}/retrieval.1 (retrieval, best val NDCG@10 0.5000 at "
                            f"steps [3, 3] (2 members))",
                            f"{run_dir}/ranker (best val NDCG@10 0.2500 at step 3)"]
    assert stopped.line() == (f"stopped by SIGTERM after step 4 of 9 (ranker.1): nothing resumable was saved "
                              f"({pipeline.NOT_RESUMABLE}); kept {', '.join(stopped.kept)}")


# --------------------------------------------------------------------------- the devices are part of a run


def test_resume_with_another_data_parallel_mesh_is_refused(trainer, tmp_path):
    killed(trainer, tmp_path, 7)
    parallel = training.make_ranking_trainer(trainer.model_config, optimizer_config=OPTIMIZER, data_parallel=True)
    with pytest.raises(training.ResumeError, match=r"1 difference\(s\)") as e:
        run(parallel, tmp_path)
    assert "devices.mesh: checkpoint None, now {'data': 1}" in str(e.value)
    assert ("; resume on 1 CPU device(s) without --data-parallel (XLA_FLAGS=--xla_force_host_platform_device_count=1"
            in str(e.value))


# Resumes the checkpoint `sys.argv[1]` holds in another process: its devices differ by the environment.
RESUME_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax
    import phoenix_training as training
    from test_resume import run, trainer
    threads = sum(open(f"/proc/self/task/{t}/comm").read().strip().endswith("XLAEigen")
                  for t in os.listdir("/proc/self/task"))
    print("threads", training.xla_cpu_threads(), threads, jax.device_count())
    try:
        run(trainer.__wrapped__(), sys.argv[1])
    except training.ResumeError as e:
        print(e)
""")


@pytest.mark.parametrize("env, changed", [
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, "devices.count: checkpoint 1, now 8"),
    ({"PJRT_NPROC": str(training.xla_cpu_threads() + 1)},
     f"devices.intra_op_threads: checkpoint {training.xla_cpu_threads()}, now {training.xla_cpu_threads() + 1}"),
], ids=["8_cpu_devices", "another_thread_count"])
def test_resume_on_other_devices_is_refused(trainer, tmp_path, env, changed):
    """Another device count, or another size of XLA's CPU thread pool, changes float32 sums
    (docs/resume.md): a resume there is refused, naming it, and how to match the checkpoint's."""
    killed(trainer, tmp_path, 7)
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC", "NPROC")}
    done = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(__file__) or ".",
                          env={**environ, **env, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    computed, counted, _ = map(int, re.search(r"threads (\d+) (\d+) (\d+)", done.stdout).groups())
    if sys.platform == "linux":  # xla_cpu_threads() is the number of XLA's intra-op threads
        assert computed == counted
    assert "cannot resume" in done.stdout and changed in done.stdout, done.stdout
    threads = training.xla_cpu_threads()
    assert f"resume on 1 CPU device(s) without --data-parallel (XLA_FLAGS=--xla_force_host_platform_device_count=1), " \
           f"XLA's CPU thread pool of {threads} (PJRT_NPROC={threads})." in done.stdout
    assert step_names(tmp_path) == ["step-00000005"]  # nothing was changed

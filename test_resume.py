"""Preemption-safe training: fit's step checkpoints and resume (phoenix_training.fit), checked bit for
bit against uninterrupted runs, with disk-full, read-only and damaged-checkpoint cases; and the
kill-and-resume fault harness (resume_harness.py) on `run_train.py --data synthetic`."""

import errno
import io
import itertools
import json
import os
import stat
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

import phoenix_checkpoint as checkpoint
import phoenix_training as training
import resume_harness
from recsys_model import PhoenixModelConfig
from test_phoenix_training import A, C, HASHES, OPTIMIZER, S, TRANSFORMER, D, leaves, random_batch, random_labels

STEPS = 12
EVERY = 5  # saves at steps 5, 10 and 12 (the last)
KEEP = 2
RUN_CONFIG = {"data_seed": 1000, "note": "batches of step s are random_batch(1000 + s)"}


class Preempted(Exception):
    """Stands for a kill: raised by the data stream when it is asked for the batch of a given step."""


class LabelCounts:
    """An `aux` object like train_synthetic.PopularityCounts: state that the data stream updates."""

    def __init__(self):
        self.sums = np.zeros(A)

    def state_dict(self):
        return {"sums": self.sums.copy()}

    def load_state_dict(self, arrays):
        self.sums = np.asarray(arrays["sums"])


def stream(counts: LabelCounts, first_step: int, kill_at=None):
    """Batches first_step, first_step + 1, ..., each a function of its step alone."""
    for step in itertools.count(first_step):
        if step == kill_at:
            raise Preempted(step)
        labels = random_labels(1000 + step)
        counts.sums += labels.sum(axis=(0, 1))
        yield random_batch(1000 + step), labels


@pytest.fixture(scope="module")
def trainer():
    config = PhoenixModelConfig(model=TRANSFORMER, emb_size=D, num_actions=A, history_seq_len=S,
                                candidate_seq_len=C, hash_config=HASHES)
    return training.make_ranking_trainer(config, optimizer_config=OPTIMIZER)


def run(trainer, directory, kill_at=None, resume=True, run_config=RUN_CONFIG, keep=KEEP):
    """A fresh process's view: new state and counts, then fit (resuming from `directory` if it can)."""
    counts = LabelCounts()
    eval_batch = (random_batch(7), random_labels(7))
    out = io.StringIO()
    state = trainer.init(jax.random.PRNGKey(0), random_batch(0))
    state, history = training.fit(
        trainer, state, lambda first: stream(counts, first, kill_at), STEPS, log_every=3,
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
        checkpoint.save_checkpoint(checkpoint.step_checkpoint_path(tmp_path, step), params, step=step)
    os.mkdir(tmp_path / ".step-00000001.del-0123456789abcdef")  # a prune killed while deleting
    (tmp_path / ".step-00000001.del-0123456789abcdef" / "meta.json").write_text("{")
    os.mkdir(tmp_path / "step-00000000")  # under a step name but not a checkpoint: left alone
    (tmp_path / "step-00000000" / "notes.txt").write_text("mine")
    deleted = checkpoint.prune_step_checkpoints(tmp_path, keep=2)
    assert deleted == [str(tmp_path / "step-00000001")]
    assert sorted(os.listdir(tmp_path)) == ["step-00000000", "step-00000002", "step-00000003"]
    with pytest.raises(ValueError, match="keep: expected an int >= 1"):
        checkpoint.prune_step_checkpoints(tmp_path, keep=0)


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


# --------------------------------------------------------------------------- the fault harness


def test_sigkill_at_random_moments_loses_nothing_and_resumes_bit_identically(tmp_path):
    """resume_harness.py: 20 SIGKILLs of `run_train.py --data synthetic` (random times, and each kill
    point inside saves and prunes), every resume from the newest complete checkpoint, final
    parameters bit-identical to an uninterrupted run. ~1-2 min on 2 cores (one cold compile)."""
    done = subprocess.run([sys.executable, "resume_harness.py", "--dir", str(tmp_path), "--kills", "20"],
                          capture_output=True, text=True, timeout=900, cwd=os.path.dirname(__file__) or ".")
    assert done.returncode == 0, done.stderr[-5000:] + done.stdout[-5000:]
    report = json.loads(done.stdout)
    assert report["failures"] == [] and report["kills"] >= 20
    assert set(report["kills_by_point"]) == {"random time"} | {name for name, _, _ in resume_harness.KILL_POINTS}
    # Each kill inside a save comes after its attempt logged where it resumed from (random-time kills
    # may land before that, more often on a loaded machine).
    assert report["resumes_checked"] >= report["kills"] // 2 and report["runs_finished"] >= 1

"""Resumable runs: step checkpoints of a fit, the run lock, and the checks that a resume is safe.

`phoenix_training.fit(..., checkpoint_dir=...)` uses these: a run saves `checkpoint_dir/step-N`
checkpoints, holds an flock on the directory while it trains, and continues only from
checkpoints written by a run of the same configuration on the same devices (ResumeError lists
what differs; docs/resume.md says why the devices matter).
"""

import fcntl
import json
import math
import os
import re
import shutil
import uuid
from typing import Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

import phoenix_checkpoint as checkpoint
import phoenix_configs as configs
import phoenix_sharded_checkpoint as sharded_checkpoint
from phoenix_validation import check_number

# Step checkpoints a resumable run keeps: the newest, and older ones to fall back on should the
# newest be damaged after its save (its sha256 no longer matching).
DEFAULT_KEEP_CHECKPOINTS = 3
# The file a run holds an exclusive lock on, in its checkpoint directory, while it trains.
LOCK_FILE = ".lock"
# Name of the checkpoints `step_checkpoint_path` puts in a run's directory: step-00001200.
STEP_PATTERN = re.compile(r"step-(\d+)")
# What a prune leaves of a step checkpoint it was deleting when killed: `.step-N.del-<random>`.
DELETING_PATTERN = re.compile(r"\.(step-\d+)\.del-(?:\d+-)?[A-Za-z0-9_]+")
# The leftovers of a killed save (phoenix_checkpoint: `.NAME.tmp-*` / `.NAME.old-*`) or prune.
LEFTOVER_PATTERN = re.compile(r"\.(step-\d+)\.(tmp|old|del)-.*")
ARRAY_TAG = "__array__"  # JSON tag of an array in a saved history
FLOAT_TAG = "__float__"  # JSON tag of nan / inf, which strict JSON has no literal for
# XLA's CPU client: the environment variables that size its intra-op thread pool (the first that
# parses as an integer wins) and the pool's cap.
XLA_CPU_THREAD_VARIABLES = ("PJRT_NPROC", "NPROC")
XLA_CPU_MAX_THREADS = 256


class ResumeError(ValueError):
    """A run cannot continue from the checkpoints in its directory: they were written with another
    configuration (the message lists what differs), or they belong to an earlier run and resuming
    was not asked for."""


def check_checkpoint_args(checkpoint_dir, checkpoint_every, keep_checkpoints, resume, batch_iterator, aux) -> None:
    check_number(checkpoint_every, "checkpoint_every", "an int >= 0 (0: save at the end only)",
                 lambda v: v >= 0, integer=True)
    check_number(keep_checkpoints, "keep_checkpoints", "an int >= 1", lambda v: v >= 1, integer=True)
    if checkpoint_dir is None:
        for name, value in (("resume", resume), ("checkpoint_every", checkpoint_every)):
            if value:
                raise ValueError(f"{name}: needs checkpoint_dir (where step checkpoints are kept), got {value!r} "
                                 f"with checkpoint_dir None")
        return
    if not callable(batch_iterator):
        raise TypeError(f"batch_iterator: a resumable run (checkpoint_dir given) needs a callable "
                        f"first_step -> iterable yielding the batches from that step on, got "
                        f"{type(batch_iterator).__name__}")
    if aux is not None and not (callable(getattr(aux, "state_dict", None))
                                and callable(getattr(aux, "load_state_dict", None))):
        raise TypeError(f"aux: expected an object with state_dict() -> {{name: array}} and "
                        f"load_state_dict(dict), got {type(aux).__name__}")


def xla_cpu_threads() -> int:
    """The size of XLA's CPU intra-op thread pool in this process, as its CPU client computes it:
    $PJRT_NPROC or $NPROC if set, else the CPUs this process may run on; at least the CPU device
    count (XLA_FLAGS=--xla_force_host_platform_device_count); at most 256. XLA splits large
    contractions and reductions over these threads, so float32 results depend on the count."""
    for name in XLA_CPU_THREAD_VARIABLES:
        try:
            wanted = max(0, int(os.environ[name]))
            break
        except (KeyError, ValueError):
            continue
    else:
        wanted = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(max(wanted, jax.local_device_count("cpu")), XLA_CPU_MAX_THREADS)


def run_devices(mesh) -> dict:
    """What a run's bits depend on besides its configuration, recorded with its checkpoints and
    compared on resume: the platform, how many devices JAX sees, the data-parallel mesh ({axis:
    size}; None without one), the process count of a multi-process run and, on CPU, XLA's intra-op
    thread count (xla_cpu_threads). `mesh`:
    a Trainer's (a jax Mesh or None), or True / False for Trainer(data_parallel=True / False)."""
    platform = jax.default_backend()
    if mesh is True:
        shape = {"data": jax.device_count()}  # Trainer(data_parallel=True): a 1-D mesh over every device
    else:
        shape = None if mesh is None or mesh is False else {str(k): int(v) for k, v in mesh.shape.items()}
    devices = {"platform": platform, "count": jax.device_count(), "mesh": shape}
    if jax.process_count() > 1:  # absent for one process: runs recorded before it resume unchanged
        devices["processes"] = jax.process_count()
    if platform == "cpu":
        devices["intra_op_threads"] = xla_cpu_threads()
    return devices


def _devices_hint(problems: list[str], saved: dict) -> str:
    """How to resume on the devices a run was started on, when `problems` include theirs."""
    if not any(p.startswith("devices.") for p in problems) or not isinstance(saved, dict):
        return ""
    count, platform = saved.get("count"), saved.get("platform")
    how = (f"{count} {str(platform).upper()} device(s) "
           + ("with --data-parallel (data_parallel=True)" if saved.get("mesh") else "without --data-parallel"))
    if platform == "cpu":
        how += f" (XLA_FLAGS=--xla_force_host_platform_device_count={count})"
        if "intra_op_threads" in saved:
            how += f", XLA's CPU thread pool of {saved['intra_op_threads']} (PJRT_NPROC={saved['intra_op_threads']})"
    return f"\nThe devices are part of a run (other counts change float32 sums: docs/resume.md); resume on {how}."


def _finite_or_text(values):
    """Nested lists with nan / inf as the strings 'nan' / 'inf' / '-inf' (numpy parses them back)."""
    if isinstance(values, list):
        return [_finite_or_text(v) for v in values]
    return repr(values) if isinstance(values, float) and not math.isfinite(values) else values


def encode_json(value):
    """Histories and results as strict JSON: arrays (numpy, JAX) tagged with their dtype, numpy
    scalars as numbers, nan / inf tagged."""
    if isinstance(value, dict):
        return {k: encode_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return {FLOAT_TAG: repr(value)}
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        array = np.asarray(jax.device_get(value))
        return {ARRAY_TAG: _finite_or_text(array.tolist()), "dtype": array.dtype.name}
    return value


def decode_json(value):
    """Inverse of `encode_json` (arrays come back as numpy arrays of their dtype)."""
    if isinstance(value, dict):
        if ARRAY_TAG in value:
            return np.asarray(value[ARRAY_TAG], dtype=np.dtype(value["dtype"]))
        if FLOAT_TAG in value:
            return float(value[FLOAT_TAG])
        return {k: decode_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_json(v) for v in value]
    return value


def json_normal(value):
    """`value` as it reads back from a checkpoint's JSON (configs tagged, tuples tagged, ...)."""
    return json.loads(json.dumps(configs.config_to_dict(value)))


def config_differences(saved, current, where: str = "") -> list[str]:
    """'path: checkpoint X, now Y' for every value that differs between two JSON-like trees."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            sub = f"{where}.{key}" if where else str(key)
            if key not in saved:
                out.append(f"{sub}: absent in the checkpoint, now {current[key]!r}")
            elif key not in current:
                out.append(f"{sub}: checkpoint {saved[key]!r}, now absent")
            else:
                out.extend(config_differences(saved[key], current[key], sub))
        return out
    return [] if saved == current else [f"{where or 'value'}: checkpoint {saved!r}, now {current!r}"]


def _check_resumable(meta: dict, path: str, expected: dict) -> None:
    """Raises ResumeError listing every difference between the run a checkpoint was written by
    (configs, trainer, the caller's run config, first step, devices) and this one."""
    extra = meta.get("extra") or {}
    saved = {"config": meta.get("config"), "trainer": extra.get("trainer"),
             "run_config": extra.get("run_config"), "run_start_step": extra.get("run_start_step"),
             # Checkpoints written before the devices were recorded are taken to be this run's.
             "devices": extra.get("devices", expected.get("devices"))}
    problems = config_differences(saved, expected)
    if problems:
        listed = problems[:checkpoint.MAX_LISTED_PROBLEMS]
        if len(problems) > len(listed):
            listed.append(f"... and {len(problems) - len(listed)} more")
        raise ResumeError(f"{path}: cannot resume, the checkpoint was written by a run configured otherwise "
                          f"({len(problems)} difference(s)):\n  " + "\n  ".join(listed)
                          + "\nRun with the same configuration, or start afresh in another directory."
                          + _devices_hint(problems, saved["devices"]))


class RunLock:
    """An exclusive lock on a run's checkpoint directory (flock on LOCK_FILE), so that two processes
    never write one run; the kernel releases it when its holder dies, even by SIGKILL."""

    def __init__(self, directory: str, notify: Callable[[str], None]):
        path = os.path.join(directory, LOCK_FILE)
        try:
            os.makedirs(directory, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(e.errno, f"checkpoint_dir {directory}: cannot create the run lock {path} ({e.strerror}); "
                                   f"checkpoints could not be written there either") from e
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            notify(f"{directory}: another process (pid {holder}) is training this run; waiting for it to stop")
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        os.close(self._fd)  # closing drops the flock


# What a process made of a step checkpoint it tried to resume from (multi-process runs agree on the worst).
_USABLE, _DAMAGED, _REFUSED = 0, 1, 2


def _agreed_step_checkpoints(checkpoint_dir: str) -> list[tuple[int, str]]:
    """list_step_checkpoints as process 0 sees it, in every process (the same list everywhere, even
    where a process sees the directory otherwise)."""
    found = list_step_checkpoints(checkpoint_dir)
    if jax.process_count() == 1:
        return found
    count = int(multihost_utils.broadcast_one_to_all(np.int32(len(found))))
    if count == 0:
        return []
    steps = np.array([step for step, _ in found] if jax.process_index() == 0 else [0] * count, np.int32)  # [count]
    steps = np.asarray(multihost_utils.broadcast_one_to_all(steps))
    return [(int(step), step_checkpoint_path(checkpoint_dir, int(step))) for step in steps]


def _worst_of_processes(status: int) -> int:
    """The largest `status` over every process of the run (this one's in a single-process run)."""
    if jax.process_count() == 1:
        return status
    return int(np.max(multihost_utils.process_allgather(np.int32(status))))


def resume_point(trainer, state, checkpoint_dir: str, resume: bool, expected: dict,
                  end_step: int, aux, notify) -> Optional[tuple]:
    """The state and history of the newest readable step checkpoint in `checkpoint_dir` (None if
    there is none), after checking that it belongs to this run. A checkpoint damaged after its save
    is reported and skipped for the one before it; one of another configuration raises ResumeError.
    Either format (a sharded checkpoint's metadata is its dense part's). In a multi-process run every
    process takes part and all resume from the same checkpoint: process 0's listing is broadcast, and
    a checkpoint is used only if every process read its share of it (one that any process finds
    damaged is skipped by all; one that any refuses stops all)."""
    found = _agreed_step_checkpoints(checkpoint_dir)
    if found and not resume:
        raise ResumeError(f"checkpoint_dir {checkpoint_dir}: holds checkpoints of an earlier run (newest "
                          f"{os.path.basename(found[-1][1])}); pass resume=True (--resume) to continue it, or "
                          f"use another directory (nothing there was changed)")
    if not found:
        if resume:
            notify(f"no checkpoint in {checkpoint_dir} to resume from: starting at step {int(state.step)}")
        return None
    damaged = []
    for step, path in reversed(found):
        error = None
        try:
            _check_resumable(sharded_checkpoint.read_meta(path), path, expected)
            if step > end_step:
                raise ResumeError(f"{path}: cannot resume, the checkpoint is at step {step}, past this run's "
                                  f"last step {end_step}")
            restored, ckpt = trainer.load(path, like=state)
            if aux is not None and ckpt.aux is None:
                raise ResumeError(f"{path}: cannot resume, it holds no aux arrays and this run keeps some "
                                  f"({type(aux).__name__})")
        except (checkpoint.CheckpointError, ResumeError) as e:
            error = e
        worst = _worst_of_processes(_USABLE if error is None else
                                    _REFUSED if isinstance(error, ResumeError) else _DAMAGED)
        if worst == _REFUSED:
            raise error if isinstance(error, ResumeError) else ResumeError(
                f"{path}: cannot resume, another process of this run refused the checkpoint (its error says why)")
        if worst == _DAMAGED:
            why = error if error is not None else "another process of this run could not read its part"
            notify(f"skipping damaged checkpoint {path}: {why}")
            damaged.append(path)
            continue
        if aux is not None:
            aux.load_state_dict(ckpt.aux)
        notify(f"resuming from {path} (step {step} of {end_step})")
        return restored, decode_json((ckpt.extra or {}).get("history") or [])
    raise checkpoint.CheckpointError(f"checkpoint_dir {checkpoint_dir}: none of its {len(found)} checkpoints "
                                     f"can be read ({', '.join(damaged)}); remove them to start afresh")


# --------------------------------------------------------------------------- a run's step checkpoints


def step_checkpoint_path(directory, step: int) -> str:
    """`directory/step-00001200`: where a run keeps its checkpoint of `step` (zero-padded, so
    that names sort by step)."""
    return os.path.join(checkpoint.checked_path(directory), f"step-{checkpoint.check_step(step):08d}")


def list_step_checkpoints(directory) -> list[tuple[int, str]]:
    """(step, path) of the step checkpoints in `directory`, oldest first; none if it is missing.
    Only directories that a save renamed into place carry a step name (a save in progress or
    killed leaves a `.step-N.tmp-*` sibling instead, a sharded one `.step-N.tmp-sharded-*`), so
    each listed one is complete unless
    damaged after its save (a load then raises CheckpointError)."""
    directory = checkpoint.checked_path(directory)
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        match = STEP_PATTERN.fullmatch(entry)
        if match and os.path.isdir(os.path.join(directory, entry)):
            found.append((int(match.group(1)), os.path.join(directory, entry)))
    return sorted(found)


def prune_step_checkpoints(directory, keep: int) -> list[str]:
    """Deletes all but the `keep` (>= 1) newest step checkpoints of `directory` (either format), and
    the leftovers of saves and prunes that were killed there. Call it once a save is complete, so that the newest
    checkpoint is never deleted before its successor is in place. A checkpoint is first renamed to
    `.step-N.del-*` and then deleted, so a prune killed midway leaves no half-deleted checkpoint
    under a step name (the next prune finishes it). Returns the paths deleted."""
    if isinstance(keep, (bool, np.bool_)) or not isinstance(keep, (int, np.integer)) or keep < 1:
        raise ValueError(f"keep: expected an int >= 1 (the newest checkpoint is always kept), got {keep!r}")
    keep = int(keep)
    directory = checkpoint.checked_path(directory)
    deleted = []
    for _, path in list_step_checkpoints(directory)[:-keep]:
        if not _ours(path, complete=True):
            continue  # not written by a save (or damaged): not ours to delete
        doomed = os.path.join(directory, f".{os.path.basename(path)}.del-{uuid.uuid4().hex[:16]}")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(path)
    for entry in os.listdir(directory):
        match = LEFTOVER_PATTERN.fullmatch(entry)
        if match is None:
            continue
        name, kind = match.groups()
        full = os.path.join(directory, entry)
        if kind != "del":  # either format's; both skip the temporary directories of live saves
            checkpoint.remove_leftovers(directory, name)
            sharded_checkpoint.remove_leftovers(directory, name)
        elif DELETING_PATTERN.fullmatch(entry) and _ours(full, complete=False):
            shutil.rmtree(full, ignore_errors=True)  # a prune killed while deleting it
    return deleted


def _ours(path: str, complete: bool) -> bool:
    """Whether `path` looks written by a save of either format (phoenix_checkpoint's or a sharded one)."""
    return (checkpoint.why_not_ours(path, complete=complete) is None
            or sharded_checkpoint.why_not_ours(path, complete=complete) is None)


__all__ = ["DEFAULT_KEEP_CHECKPOINTS", "LOCK_FILE", "STEP_PATTERN", "ResumeError", "RunLock", "list_step_checkpoints",
           "prune_step_checkpoints", "run_devices", "step_checkpoint_path", "xla_cpu_threads"]

"""Kill-and-resume harness: SIGKILLs a tiny `run_train.py --data synthetic` run at random moments,
resumes it each time, and checks that nothing saved is lost and the result is bit-identical.

    uv run python resume_harness.py --dir DIR [--kills 24] [--seed 0]

Prints the trials on stderr and a JSON report on stdout (kills per kill point, resumes checked,
seconds); exits with status 1 if any check failed. test_resume.py runs it (~1 min on 2 cores).

How. This process imports JAX and the training code once, without starting JAX's backend (so
forking is safe), then forks one child per attempt: a fresh `uv run` would spend ~3 s importing,
a fork nothing. A child runs `run_train.main(TINY + --checkpoint-every --resume)` exactly as the
command line does. Compiled programs come from a persistent XLA cache in DIR that the reference
run fills, so that attempts do not recompile for ~10 s each.

Kill points. Half the attempts are killed at a random time; the others at the n-th occurrence of
a point inside a checkpoint save or prune (KILL_POINTS). There the child reports the point through
a pipe and blocks until told to go on, so the kill lands exactly there: before arrays.npz is
written, after it, after meta.json, before and after the rename into place, while a pruned
checkpoint is deleted, and during the final checkpoint's save.

Checks. (1) Every attempt ends killed or finished, never with an error. (2) Every resume starts from
the newest step checkpoint on disk (or skips a phase whose final checkpoint is there), as its log
says. (3) After every kill, each directory under a step name is a complete checkpoint (its
arrays.npz has the sha256 its meta.json records) and the newest step saved so far is still there.
(4) Each finished run's final parameters (every array, bit for bit), figures and metrics history
equal those of the uninterrupted reference run (a plain run without checkpointing).
"""

import argparse
import hashlib
import json
import os
import re
import select
import shutil
import signal
import sys
import time
import traceback

import numpy as np

TINY = ["--num-users", "120", "--num-posts", "300", "--num-authors", "12", "--history-len", "6",
        "--min-history-len", "3", "--num-candidates", "4", "--emb-size", "16", "--num-layers", "1",
        "--num-heads", "2", "--key-size", "8", "--user-table-size", "251", "--post-table-size", "601",
        "--author-table-size", "29", "--batch-size", "16", "--retrieval-batch-size", "32",
        "--steps-ranker", "30", "--steps-retrieval", "30", "--eval-repeats", "4", "--log-every", "5",
        "--eval-every", "15"]
RESUMABLE = ["--checkpoint-every", "6", "--keep-checkpoints", "2", "--resume"]
# Random kill times are drawn in [0, this): start-up, restore and the first steps of an attempt
# (the event kills below make the progress: each lands at the next save of its kind).
MAX_KILL_TIME_S = 2.5
PHASES = ("ranker", "retrieval")
# (name, event the child reports, which paths): kill points inside saves and prunes.
KILL_POINTS = [
    ("before arrays.npz", "arrays-begin", "step"),
    ("after arrays.npz, before meta.json", "arrays-done", "step"),
    ("after meta.json, before the rename", "meta-done", "step"),
    ("at the rename into place", "rename", "step"),
    ("at a prune's rename", "rename-del", "step"),
    ("after the rename, before pruning", "renamed", "step"),
    ("while deleting a pruned checkpoint", "rmtree", "step"),
    ("during the final checkpoint's save", "meta-done", "final"),
    ("at the final checkpoint's rename", "rename", "final"),
]
STEP_DIR = re.compile(r"step-(\d+)")


# --------------------------------------------------------------------------- the child


def child_main(argv, log_path: str, events_w: int, acks_r: int, watched: str) -> None:
    """Runs in a forked child: run_train.main(argv) with stdout/stderr to `log_path`, reporting each
    kill point under `watched` on `events_w` and waiting for a byte on `acks_r` before going on."""
    import phoenix_checkpoint as checkpoint
    import run_train

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)

    def report(event: str, path: str) -> None:
        if not os.path.abspath(path).startswith(watched + os.sep):
            return  # not the run's files (e.g. the XLA cache)
        os.write(events_w, f"{event} {path}\n".encode())
        os.read(acks_r, 1)  # the parent kills us here, or lets us go on

    write_arrays, write_meta, rename, rmtree = (checkpoint._write_arrays, checkpoint._write_meta, os.rename,
                                                shutil.rmtree)

    def hooked_arrays(path, arrays):
        report("arrays-begin", path)
        write_arrays(path, arrays)
        report("arrays-done", path)

    def hooked_meta(path, meta):
        write_meta(path, meta)
        report("meta-done", path)

    def hooked_rename(src, dst, *args, **kwargs):
        pruning = ".del-" in os.path.basename(os.fspath(dst))
        report("rename-del" if pruning else "rename", os.fspath(dst))
        rename(src, dst, *args, **kwargs)
        if not pruning:
            report("renamed", os.fspath(dst))

    def hooked_rmtree(path, *args, **kwargs):
        report("rmtree", os.fspath(path))
        rmtree(path, *args, **kwargs)

    checkpoint._write_arrays, checkpoint._write_meta = hooked_arrays, hooked_meta
    os.rename, shutil.rmtree = hooked_rename, hooked_rmtree
    code = 0
    try:
        run_train.main(argv)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # not the parent's atexit handlers


def attempt(argv, log_path: str, watched: str, kill_at) -> tuple[str, float]:
    """Forks a child running `argv`; kills it at `kill_at`: ("time", seconds), ("event", event, kind,
    n) or None (let it finish). Returns (outcome, seconds): outcome "killed", "finished" or "failed"."""
    events_r, events_w = os.pipe()
    acks_r, acks_w = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(events_r)
        os.close(acks_w)
        child_main(argv, log_path, events_w, acks_r, watched)
    os.close(events_w)
    os.close(acks_r)
    deadline = start + kill_at[1] if kill_at and kill_at[0] == "time" else None
    seen = 0
    buffer = b""
    killed = False
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
        ready, _, _ = select.select([events_r], [], [], timeout)
        if not ready:  # the random time has come
            os.kill(pid, signal.SIGKILL)
            killed = True
            break
        chunk = os.read(events_r, 4096)
        if not chunk:
            break  # the child exited
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            event, path = line.decode().split(" ", 1)
            if kill_at and kill_at[0] == "event" and event == kill_at[1] and _kind(path) == kill_at[2]:
                seen += 1
                if seen == kill_at[3]:
                    os.kill(pid, signal.SIGKILL)
                    killed = True
                    break
            os.write(acks_w, b"g")
        if killed:
            break
    _, status = os.waitpid(pid, 0)
    os.close(events_r)
    os.close(acks_w)
    seconds = time.perf_counter() - start
    if killed or (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        return "killed", seconds
    return ("finished" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else "failed"), seconds


def _kind(path: str) -> str:
    """'step' for paths of step checkpoints (and their temporary siblings), 'final' for the rest."""
    return "step" if f"{os.sep}steps{os.sep}" in path else "final"


# --------------------------------------------------------------------------- checks on disk


def complete(path: str) -> bool:
    """Whether `path` holds a whole checkpoint: meta.json parses and arrays.npz has its sha256."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        with open(os.path.join(path, "arrays.npz"), "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest() == meta["arrays_sha256"]
    except (OSError, ValueError, KeyError):
        return False


def step_checkpoints(run_dir: str, phase: str) -> list[tuple[int, str]]:
    directory = os.path.join(run_dir, "steps", phase)
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), os.path.join(directory, e)) for e in os.listdir(directory)
             if (m := STEP_DIR.fullmatch(e))]
    return sorted(found)


def finished(run_dir: str, phase: str) -> bool:
    path = os.path.join(run_dir, phase)
    if not complete(path):
        return False
    with open(os.path.join(path, "meta.json")) as f:
        return "result" in (json.load(f).get("extra") or {})


def expected_resume(run_dir: str) -> dict:
    """What each phase's resume must start from: 'finished', a step checkpoint's path, or None."""
    out = {}
    for phase in PHASES:
        found = step_checkpoints(run_dir, phase)
        out[phase] = "finished" if finished(run_dir, phase) else (found[-1][1] if found else None)
    return out


def reported_resume(log_text: str) -> dict:
    """What the attempt's log says each phase resumed from (absent: the child died before that)."""
    out = {}
    for phase in PHASES:
        if f"{phase}: already trained by this run" in log_text:
            out[phase] = "finished"
    for path in re.findall(r"resuming from (\S+) \(step", log_text):
        out[os.path.basename(os.path.dirname(path))] = path
    for directory in re.findall(r"no checkpoint in (\S+) to resume from", log_text):
        out[os.path.basename(directory)] = None
    return out


def final_state(run_dir: str, phase: str) -> tuple[dict, dict]:
    """(every array of the final checkpoint, its extra with timings removed)."""
    path = os.path.join(run_dir, phase)
    with np.load(os.path.join(path, "arrays.npz"), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    with open(os.path.join(path, "meta.json")) as f:
        extra = json.load(f)["extra"]
    result = dict(extra["result"])
    for key in ("train_s", "eval_s"):
        result.pop(key, None)
    result["history"] = [{k: v for k, v in h.items() if k != "steps_per_s"} for h in result["history"]]
    return arrays, {"result": result, "rng": extra["rng"], "metric_sums": extra["metric_sums"]}


def same_run(run_dir: str, reference_dir: str) -> list[str]:
    """Differences between the final checkpoints of two runs (empty: bit-identical)."""
    problems = []
    for phase in PHASES:
        arrays, extra = final_state(run_dir, phase)
        ref_arrays, ref_extra = final_state(reference_dir, phase)
        if arrays.keys() != ref_arrays.keys():
            problems.append(f"{phase}: arrays {sorted(arrays.keys() ^ ref_arrays.keys())} in one run only")
        for key in arrays.keys() & ref_arrays.keys():
            a, b = arrays[key], ref_arrays[key]
            if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
                problems.append(f"{phase}: array {key} differs from the uninterrupted run's")
        if extra != ref_extra:
            keys = [k for k in extra if extra[k] != ref_extra.get(k)]
            problems.append(f"{phase}: {keys} differ from the uninterrupted run's (figures / history / rng)")
    return problems


# --------------------------------------------------------------------------- the trials


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="working directory (runs, logs, XLA cache)")
    p.add_argument("--kills", type=int, default=24, help="SIGKILLs in total (at least 20 for the issue)")
    p.add_argument("--seed", type=int, default=0, help="kill times and points")
    args = p.parse_args(argv)
    base = os.path.abspath(args.dir)
    os.makedirs(base, exist_ok=True)
    # Before JAX is imported: compiled programs are shared by all attempts through this cache.
    os.environ.update(JAX_COMPILATION_CACHE_DIR=os.path.join(base, "xla-cache"),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
                      JAX_PLATFORMS="cpu")
    t_start = time.perf_counter()
    import run_train  # noqa: F401  (imported once here, inherited by every forked child)
    import train_synthetic  # noqa: F401

    rng = np.random.default_rng(args.seed)
    failures: list[str] = []
    log = sys.stderr

    reference = os.path.join(base, "reference")
    outcome, ref_s = attempt(["--data", "synthetic", *TINY, "--checkpoint-dir", reference],
                             os.path.join(base, "reference.log"), reference, None)
    if outcome != "finished":
        print(open(os.path.join(base, "reference.log")).read()[-3000:], file=log)
        raise SystemExit("the uninterrupted reference run failed")
    log.write(f"reference run (uninterrupted, no checkpointing, compiles into the cache): {ref_s:.1f} s\n")

    kills = 0
    by_point: dict[str, int] = {}
    resumes_checked = 0
    runs = 0
    attempts = 0
    while kills < args.kills:
        runs += 1
        run_dir = os.path.join(base, f"run{runs}")
        argv = ["--data", "synthetic", *TINY, *RESUMABLE, "--checkpoint-dir", run_dir]
        newest_seen = {phase: -1 for phase in PHASES}
        while True:
            attempts += 1
            if kills >= args.kills:
                kill_at, point = None, "none (finish the run)"
            elif kills % 2 == 0:
                kill_at = ("time", float(rng.uniform(0.0, MAX_KILL_TIME_S)))
                point = "random time"
            else:
                name, event, kind = KILL_POINTS[(kills // 2) % len(KILL_POINTS)]
                kill_at, point = ("event", event, kind, 1), name
            expected = expected_resume(run_dir)
            log_path = os.path.join(base, f"run{runs}-attempt{attempts}.log")
            outcome, seconds = attempt(argv, log_path, run_dir, kill_at)
            text = open(log_path).read()
            log.write(f"run {runs} attempt {attempts}: kill at {point}"
                      f"{f' ({kill_at[1]:.2f} s)' if kill_at and kill_at[0] == 'time' else ''} -> {outcome} "
                      f"after {seconds:.1f} s\n")
            if outcome == "failed":
                failures.append(f"{log_path}: the attempt failed:\n{text[-2000:]}")
                break
            for phase, resumed in reported_resume(text).items():
                resumes_checked += 1
                if resumed != expected[phase]:
                    failures.append(f"{log_path}: {phase} resumed from {resumed}, the newest complete "
                                    f"checkpoint was {expected[phase]}")
            for phase in PHASES:
                found = step_checkpoints(run_dir, phase)
                for step, path in found:
                    if not complete(path):
                        failures.append(f"{log_path}: {path} is under a step name but incomplete")
                newest = found[-1][0] if found else -1
                if newest < newest_seen[phase]:
                    failures.append(f"{log_path}: {phase}'s newest checkpoint step {newest_seen[phase]} was lost")
                newest_seen[phase] = max(newest_seen[phase], newest)
            if outcome == "killed":
                kills += 1
                by_point[point] = by_point.get(point, 0) + 1
                continue
            failures += [f"run {runs}: {p}" for p in same_run(run_dir, reference)]
            break
        if failures:
            break
    report = {"kills": kills, "kills_by_point": by_point, "attempts": attempts, "runs_finished": runs,
              "resumes_checked": resumes_checked, "reference_s": round(ref_s, 1),
              "total_s": round(time.perf_counter() - t_start, 1), "failures": failures}
    print(json.dumps(report, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

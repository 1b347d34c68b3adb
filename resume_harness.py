"""Kill-and-resume harness: SIGKILLs, SIGTERMs and SIGINTs a tiny `run_train.py --data synthetic` run at
random moments, resumes it each time, and checks that nothing saved is lost and the result is bit-identical.

    uv run python resume_harness.py --dir DIR [--kills 24] [--signals 0] [--seed 0]

Prints the trials on stderr and a JSON report on stdout (kills and stops per point, resumes checked,
seconds); exits with status 1 if any check failed. test_resume_harness.py runs it once: 20 SIGKILLs,
then 10 SIGTERMs and 10 SIGINTs, after one reference run (each attempt a fresh process's start-up and
first step, ~1-3 s on a quiet 2-core machine, tracing included: the cache saves compiling only).

How. This process imports JAX and the training code once, without starting JAX's backend (so
forking is safe), then forks one child per attempt: a fresh `uv run` would spend ~3 s importing,
a fork nothing. A child runs `run_train.main(TINY + --checkpoint-every --resume)` under the command
line's stop handling (phoenix_stop.command_line), as `run_train.py` does. Compiled programs come
from a persistent XLA cache that the reference run fills, so that attempts do not recompile for
~10 s each: $JAX_COMPILATION_CACHE_DIR if set (the test session's, so that a second harness run
compiles nothing), else DIR/xla-cache.

Kill points. Half the attempts are killed at a random time (in start-up, restore and the first steps:
up to KILL_WINDOW times the seconds the latest attempt took from start to its first step done, at
most MAX_KILL_TIME_S); the others at the n-th occurrence of a point inside a checkpoint save or
prune (KILL_POINTS). There the child reports the point through
a pipe and blocks until told to go on, so the kill lands exactly there: before arrays.npz is
written, after it, after meta.json, before and after the rename into place, while a pruned
checkpoint is deleted, and during the final checkpoint's save. The child also reports each train
step (which model, how many steps it has taken: the loop then waits for the device each step).

Clean stops (--signals N). N SIGTERMs and N SIGINTs, half at a random time and half at the kill
points, where the child is then let go on: the save in progress must finish, then the stop happen.

Checks. (1) Every attempt ends killed or finished, never with an error. (2) Every resume starts from
the newest step checkpoint on disk (or skips a phase whose final checkpoint is there), as its log
says. (3) After every kill, each directory under a step name is a complete checkpoint (its
arrays.npz has the sha256 its meta.json records) and the newest step saved so far is still there.
(4) Each finished run's final parameters (every array, bit for bit), figures and metrics history
equal those of the uninterrupted reference run (a plain run without checkpointing). (5) A stopped
attempt exits with status 143 (SIGTERM) / 130 (SIGINT), prints exactly one `stopped by` line, which
names the newest checkpoint and the command that resumes, and no traceback; no more than one step
is lost: if model M had taken k steps when the signal was sent, M is finished or its newest step
checkpoint is at step k + 1 (the step in flight) or k + 2 (a step begun just before the signal).
"""

import argparse
import hashlib
import json
import os
import re
import select
import shlex
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
# Random kill times are drawn in [0, window): start-up, restore and the first steps of an attempt
# (the event kills below make the progress: each lands at the next save of its kind). The window is
# KILL_WINDOW times the seconds from start to the first step done that the latest attempt to get
# there took (the reference run for the first), at most MAX_KILL_TIME_S: it follows the machine's
# speed, so that a random kill lands in start-up and restore or in the first steps, not mostly
# after them on a fast machine (a wasted attempt's time) or mostly before them on a slow one.
MAX_KILL_TIME_S = 2.5
KILL_WINDOW = 1.25
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
PHASE_OF_TRAINER = {"RankingTrainer": "ranker", "RetrievalTrainer": "retrieval"}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# --------------------------------------------------------------------------- the child


def child_main(argv, log_path: str, events_w: int, acks_r: int, watched: str) -> None:
    """Runs in a forked child: run_train.main(argv) under the command line's stop handling, with
    stdout/stderr to `log_path`, reporting on `events_w` when it is ready (handlers installed), each
    train step, each kill point under `watched` and its return, waiting for a byte on `acks_r` after
    each before going on."""
    import phoenix_checkpoint as checkpoint
    import phoenix_stop
    import phoenix_training as training
    import run_train

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)

    def tell(event: str, detail: str) -> None:
        os.write(events_w, f"{event} {detail}\n".encode())
        os.read(acks_r, 1)  # the parent kills or signals us here, or lets us go on

    def report(event: str, path: str) -> None:
        if os.path.abspath(path).startswith(watched + os.sep):  # not the XLA cache's files
            tell(event, path)

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

    call_step = training._call_step

    def hooked_step(trainer, state, item):
        tell("step", f"{type(trainer).__name__} {int(state.step)}")  # steps taken before this one
        return call_step(trainer, state, item)

    def entry(argv):
        tell("ready", "-")  # the stop handlers are installed
        result = run_train.main(argv)
        tell("returned", "-")  # still under them: a signal sent before the parent reads this is handled
        return result

    checkpoint._write_arrays, checkpoint._write_meta = hooked_arrays, hooked_meta
    os.rename, shutil.rmtree = hooked_rename, hooked_rmtree
    training._call_step = hooked_step
    sys.argv = ["run_train.py", *argv]  # what the resume command in a stop's line starts with
    code = 0
    try:
        phoenix_stop.command_line(entry)(argv)
    except SystemExit as e:  # a clean stop: its line is printed, its status is the exit status
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # not the parent's atexit handlers


def attempt(argv, log_path: str, watched: str, kill_at, sig=signal.SIGKILL) -> tuple[str, float, dict]:
    """Forks a child running `argv`; sends it `sig` at `kill_at`: ("time", seconds after it is ready),
    ("event", event, kind, n) or None (let it finish). A SIGKILL ends it there; after another signal
    it is let go on to its stop. Returns (outcome, seconds, info): outcome "killed", "stopped" (exit
    status 128 + sig after sig), "finished" or "failed"; info["last_step"] = (model, steps taken) of
    the last step reported before the signal, or None."""
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
    deadline = None
    seen = 0
    buffer = b""
    signalled = killed = returned = False
    last_step = None
    ready_at = first_step_s = None
    steps_seen = 0

    def send() -> None:
        nonlocal signalled, killed, deadline
        os.kill(pid, sig)
        signalled, killed, deadline = True, sig == signal.SIGKILL, None

    while not killed:
        timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
        ready, _, _ = select.select([events_r], [], [], timeout)
        if not ready:  # the random time has come
            send()
            continue
        chunk = os.read(events_r, 4096)
        if not chunk:
            break  # the child exited
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            event, detail = line.decode().split(" ", 1)
            if event == "ready":
                ready_at = time.perf_counter()
                if kill_at and kill_at[0] == "time":
                    deadline = ready_at + kill_at[1]
            elif event == "returned":  # past the stop handlers' reach: no signal any more
                returned, deadline = True, None
            elif event == "step" and not signalled:
                trainer, steps = detail.split()
                last_step = (PHASE_OF_TRAINER[trainer], int(steps))
                steps_seen += 1
                if steps_seen == 2:  # the first step is done (trace, compile or cache load, run)
                    first_step_s = time.perf_counter() - ready_at
            elif (kill_at and kill_at[0] == "event" and not signalled and not returned and event == kill_at[1]
                  and _kind(detail) == kill_at[2]):
                seen += 1
                if seen == kill_at[3]:
                    send()
                    if killed:
                        break
            os.write(acks_w, b"g")
    _, status = os.waitpid(pid, 0)
    os.close(events_r)
    os.close(acks_w)
    seconds = time.perf_counter() - start
    info = {"last_step": last_step, "signalled": signalled, "first_step_s": first_step_s}
    if killed or (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        return "killed", seconds, info
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    if signalled and sig != signal.SIGKILL and code == 128 + sig:
        return "stopped", seconds, info
    return ("finished" if code == 0 else "failed"), seconds, info


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


def plan_trials(kills: int, signals: int, seed: int) -> list[tuple]:
    """(signal, point name, kill_at) of each trial: the SIGKILLs, then SIGTERMs and SIGINTs in turn;
    of each kind, every other one at a random time, the others at the kill points in turn. A random
    time is ("time", share of the kill window in [0, 1)): main scales it to the window of its attempt.
    The kills and the clean stops draw their times from streams of their own (both seeded with `seed`),
    so a run of both tries the moments that a run of either alone tries."""
    kill_rng, stop_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    trials = [(signal.SIGKILL, *_trigger(i % 2 == 0, i // 2, kill_rng)) for i in range(kills)]
    for i in range(2 * signals):  # TERM, INT, TERM, INT, ...: pairs at random times and at points alternate
        pair = i // 2
        trials.append((STOP_SIGNALS[i % 2], *_trigger(pair % 2 == 0, pair // 2 * 2 + i % 2, stop_rng)))
    return trials


def _trigger(random_time: bool, point: int, rng: np.random.Generator) -> tuple[str, tuple]:
    """(point name, kill_at): a random time, or kill point number `point` (modulo their number)."""
    if random_time:
        return "random time", ("time", float(rng.uniform(0.0, 1.0)))
    name, event, kind = KILL_POINTS[point % len(KILL_POINTS)]
    return name, ("event", event, kind, 1)


def kill_window(window: float, info: dict) -> float:
    """The random kill window after an attempt: KILL_WINDOW times its seconds to its first step done
    (at most MAX_KILL_TIME_S), or `window` unchanged if it did not get there."""
    if info["first_step_s"] is None:
        return window
    return min(MAX_KILL_TIME_S, KILL_WINDOW * info["first_step_s"])


def check_stop(text: str, argv: list, run_dir: str, last_step, log_path: str, sig) -> list[str]:
    """Check (5) of the module docstring on a stopped attempt's log and run directory."""
    problems = []
    lines = [line for line in text.splitlines() if line.startswith("stopped by ")]
    if len(lines) != 1 or "Traceback" in text:
        return [f"{log_path}: expected one 'stopped by' line and no traceback, got {len(lines)} such line(s)"
                f"{' and a traceback' if 'Traceback' in text else ''}:\n{text[-2000:]}"]
    line = lines[0]
    if (not line.startswith(f"stopped by {signal.Signals(sig).name}") or "; resume with: " not in line
            or not line.endswith(f" run_train.py {shlex.join(argv)}")):
        problems.append(f"{log_path}: the stop's line does not name {signal.Signals(sig).name} and end with "
                        f"the command that resumes: {line}")
    for phase in PHASES:
        found = step_checkpoints(run_dir, phase)
        if found and not finished(run_dir, phase) and found[-1][1] not in line:
            problems.append(f"{log_path}: the stop's line does not name {phase}'s newest checkpoint "
                            f"{found[-1][1]}: {line}")
    if last_step is not None:
        phase, taken = last_step
        found = step_checkpoints(run_dir, phase)
        newest = found[-1][0] if found else None
        if not finished(run_dir, phase) and newest not in (taken + 1, taken + 2):
            problems.append(f"{log_path}: {phase} had taken {taken} steps when {signal.Signals(sig).name} was "
                            f"sent; its newest checkpoint after the stop is step {newest}, not {taken + 1} "
                            f"(or {taken + 2})")
    return problems


# --------------------------------------------------------------------------- the trials


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, help="working directory (runs, logs, XLA cache unless "
                                                 "$JAX_COMPILATION_CACHE_DIR is set)")
    p.add_argument("--kills", type=int, default=24, help="SIGKILLs in total (at least 20 for the issue)")
    p.add_argument("--signals", type=int, default=0, help="SIGTERMs, and as many SIGINTs (clean stops)")
    p.add_argument("--seed", type=int, default=0, help="kill times and points")
    args = p.parse_args(argv)
    base = os.path.abspath(args.dir)
    os.makedirs(base, exist_ok=True)
    # Before JAX is imported: compiled programs are shared by all attempts through this cache (and
    # with the test session and its other harness runs when it set one).
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(base, "xla-cache"))
    os.environ.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
                      JAX_PLATFORMS="cpu")
    t_start = time.perf_counter()
    import run_train  # noqa: F401  (imported once here, inherited by every forked child)
    import train_synthetic  # noqa: F401

    failures: list[str] = []
    log = sys.stderr

    reference = os.path.join(base, "reference")
    outcome, ref_s, ref_info = attempt(["--data", "synthetic", *TINY, "--checkpoint-dir", reference],
                                       os.path.join(base, "reference.log"), reference, None)
    if outcome != "finished":
        print(open(os.path.join(base, "reference.log")).read()[-3000:], file=log)
        raise SystemExit("the uninterrupted reference run failed")
    log.write(f"reference run (uninterrupted, no checkpointing, compiles into the cache): {ref_s:.1f} s\n")

    window = kill_window(MAX_KILL_TIME_S, ref_info)
    trials = plan_trials(args.kills, args.signals, args.seed)
    done = 0
    by_point: dict[str, dict[str, int]] = {}
    resumes_checked = 0
    runs = 0
    attempts = 0
    while done < len(trials):
        runs += 1
        run_dir = os.path.join(base, f"run{runs}")
        argv = ["--data", "synthetic", *TINY, *RESUMABLE, "--checkpoint-dir", run_dir]
        newest_seen = {phase: -1 for phase in PHASES}
        while True:
            attempts += 1
            sig, point, kill_at = trials[done] if done < len(trials) else (signal.SIGKILL, "none (finish the run)",
                                                                           None)
            if kill_at and kill_at[0] == "time":
                kill_at = ("time", kill_at[1] * window)
            expected = expected_resume(run_dir)
            log_path = os.path.join(base, f"run{runs}-attempt{attempts}.log")
            outcome, seconds, info = attempt(argv, log_path, run_dir, kill_at, sig)
            window = kill_window(window, info)
            text = open(log_path).read()
            log.write(f"run {runs} attempt {attempts}: {signal.Signals(sig).name if kill_at else 'nothing'} at "
                      f"{point}{f' ({kill_at[1]:.2f} s)' if kill_at and kill_at[0] == 'time' else ''} -> {outcome} "
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
            if outcome == "stopped":
                failures += check_stop(text, argv, run_dir, info["last_step"], log_path, sig)
            if outcome in ("killed", "stopped"):
                done += 1
                counts = by_point.setdefault(signal.Signals(sig).name, {})
                counts[point] = counts.get(point, 0) + 1
                continue
            failures += [f"run {runs}: {p}" for p in same_run(run_dir, reference)]
            break
        if failures:
            break
    stops = {name: sum(points.values()) for name, points in by_point.items()}
    report = {"kills": stops.get("SIGKILL", 0), "stops": {s.name: stops.get(s.name, 0) for s in STOP_SIGNALS},
              "by_point": by_point, "attempts": attempts, "runs_finished": runs, "resumes_checked": resumes_checked,
              "reference_s": round(ref_s, 1), "total_s": round(time.perf_counter() - t_start, 1),
              "failures": failures}
    print(json.dumps(report, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The fault harness (resume_harness.py: SIGKILL, SIGTERM, SIGINT of `run_train.py --data synthetic` at
random moments and inside saves, every resume checked, the result bit-identical to an uninterrupted
run's); the library behaviour it exercises is pinned by test_resume.py. Its own file, so that
pytest-xdist (`--dist loadfile`) runs it beside test_resume.py's tests rather than after them."""

import json
import os
import subprocess
import sys

import resume_harness


# --------------------------------------------------------------------------- the fault harness


def test_kills_and_stop_signals_at_random_moments_lose_nothing_and_resume_bit_identically(tmp_path):
    """resume_harness.py --kills 20 --signals 10, one run of the harness (one uninterrupted reference run
    for both kinds of trial): 20 SIGKILLs of `run_train.py --data synthetic` (random times, and each kill
    point inside saves and prunes), every resume from the newest complete checkpoint; then 10 SIGTERMs
    and 10 SIGINTs (at random times, and at each point inside saves and prunes, where the save then
    finishes), each stop with status 143 / 130, one line naming the newest checkpoint and the resume
    command, no traceback, no step lost. Every finished run's final parameters are bit-identical to the
    uninterrupted run's. ~1.5-2 min on 2 cores (one cold compile)."""
    done = subprocess.run([sys.executable, "resume_harness.py", "--dir", str(tmp_path), "--kills", "20",
                           "--signals", "10"], capture_output=True, text=True, timeout=900,
                          cwd=os.path.dirname(__file__) or ".")
    assert done.returncode == 0, done.stderr[-5000:] + done.stdout[-5000:]
    report = json.loads(done.stdout)
    assert report["failures"] == [], report["failures"]
    every_point = {"random time"} | {name for name, _, _ in resume_harness.KILL_POINTS}
    # SIGKILLs: 20, at random times and at every kill point.
    assert report["kills"] >= 20, report
    assert set(report["by_point"]["SIGKILL"]) == every_point, "a kill point was not killed at"
    # Clean stops: 10 of each signal, together at random times and at every kill point.
    assert report["stops"] == {"SIGTERM": 10, "SIGINT": 10}, report["stops"]
    assert set(report["by_point"]["SIGTERM"]) | set(report["by_point"]["SIGINT"]) == every_point, \
        "a kill point was not stopped at"
    # Each kill inside a save comes after its attempt logged where it resumed from (random-time kills
    # may land before that, more often on a loaded machine).
    assert report["resumes_checked"] >= report["kills"] // 2, "too few resumes were checked"
    # The trials' run went on to its end (and any run that ended between trials): compared bit for bit.
    assert report["runs_finished"] >= 1, report


def test_kills_and_stops_in_one_run_try_the_moments_each_kind_tries_alone():
    """The kills and the clean stops draw their random times from streams of their own: the one harness
    run above tries exactly the moments and points of a kills-only run followed by a stops-only run."""
    both = resume_harness.plan_trials(20, 10, seed=0)
    assert both == resume_harness.plan_trials(20, 0, seed=0) + resume_harness.plan_trials(0, 10, seed=0)
    assert [t[0] for t in both] == [resume_harness.signal.SIGKILL] * 20 + list(resume_harness.STOP_SIGNALS) * 10

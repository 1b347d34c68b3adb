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


def test_sigkill_at_random_moments_loses_nothing_and_resumes_bit_identically(tmp_path):
    """resume_harness.py: 20 SIGKILLs of `run_train.py --data synthetic` (random times, and each kill
    point inside saves and prunes), every resume from the newest complete checkpoint, final
    parameters bit-identical to an uninterrupted run. ~1-2 min on 2 cores (one cold compile)."""
    done = subprocess.run([sys.executable, "resume_harness.py", "--dir", str(tmp_path), "--kills", "20"],
                          capture_output=True, text=True, timeout=900, cwd=os.path.dirname(__file__) or ".")
    assert done.returncode == 0, done.stderr[-5000:] + done.stdout[-5000:]
    report = json.loads(done.stdout)
    assert report["failures"] == [] and report["kills"] >= 20
    assert set(report["by_point"]["SIGKILL"]) == {"random time"} | {name for name, _, _ in resume_harness.KILL_POINTS}
    # Each kill inside a save comes after its attempt logged where it resumed from (random-time kills
    # may land before that, more often on a loaded machine).
    assert report["resumes_checked"] >= report["kills"] // 2 and report["runs_finished"] >= 1


def test_sigterm_and_sigint_at_random_moments_stop_cleanly_and_resume_bit_identically(tmp_path):
    """resume_harness.py --signals 10: 10 SIGTERMs and 10 SIGINTs of `run_train.py --data synthetic` (at
    random times, and at each point inside saves and prunes, where the save then finishes), each stop
    with status 143 / 130, one line naming the newest checkpoint and the resume command, no traceback,
    no step lost; final parameters bit-identical to an uninterrupted run's. ~1-2 min on 2 cores."""
    done = subprocess.run([sys.executable, "resume_harness.py", "--dir", str(tmp_path), "--kills", "0",
                           "--signals", "10"], capture_output=True, text=True, timeout=900,
                          cwd=os.path.dirname(__file__) or ".")
    assert done.returncode == 0, done.stderr[-5000:] + done.stdout[-5000:]
    report = json.loads(done.stdout)
    assert report["failures"] == [] and report["stops"] == {"SIGTERM": 10, "SIGINT": 10} and report["kills"] == 0
    points = set(report["by_point"]["SIGTERM"]) | set(report["by_point"]["SIGINT"])
    assert points == {"random time"} | {name for name, _, _ in resume_harness.KILL_POINTS}
    assert report["runs_finished"] >= 1

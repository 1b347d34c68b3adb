"""Serving a run directory: its size, load_run, recommend per user, run_recommend.py for every user.

    uv run python scripts/bench_recommend.py [--users 5000] [--items 2000] [--out /tmp/bench_recommend]

Writes a log of string ids (each user walks 10-30 items of one of 20 item groups), trains a small
recipe on it with run_train.py (a run directory with serving/), then in fresh processes times
load_run, `recommend` for 200 users one call each (after one warm-up call), and run_recommend.py over
every user; checks that the CSV equals the per-user lists of those 200 users. Prints the sizes of the
log and of serving/ and each time (wall clock, compilation included where said).
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ["--emb-size", "16", "--num-layers", "1", "--history-len", "5", "--ranker-history-len", "5",
          "--retrieval-epochs", "1", "--ranker-epochs", "0.5", "--evals-per-stage", "1", "--hard-negatives", "0",
          "--random-negatives", "7"]

PER_USER = """
import json, sys, time
import numpy as np
t0 = time.perf_counter()
import phoenix_pipeline as pipeline
run = pipeline.load_run(sys.argv[1])
loaded = time.perf_counter() - t0
users = run.user_tokens(np.linspace(0, len(run.split.user_ids) - 1, 200).astype(int))
t0 = time.perf_counter()
pipeline.recommend(run, users[0], 10)
first = time.perf_counter() - t0
times, lists = [], {}
for user in users:
    t0 = time.perf_counter()
    lists[user] = [item for item, _ in pipeline.recommend(run, user, 10)]
    times.append(time.perf_counter() - t0)
json.dump({"import_and_load_s": loaded, "first_call_s": first, "median_s": float(np.median(times)),
           "p90_s": float(np.percentile(times, 90)), "lists": lists}, open(sys.argv[2], "w"))
"""


def write_log(path: Path, users: int, items: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    groups = 20
    per_group = items // groups
    lengths = rng.integers(10, 31, users)  # [U]
    owner = np.repeat(np.arange(users), lengths)  # [R]
    group = rng.integers(0, groups, users)[owner]  # [R]
    item = group * per_group + rng.integers(0, per_group, len(owner))
    t = np.arange(len(owner))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp"])
        writer.writerows(zip((f"user-{u}" for u in owner.tolist()), (f"sku-{i}" for i in item.tolist()), t.tolist()))
    return len(owner)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--out", default="/tmp/bench_recommend")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.csv"
    rows = write_log(log, args.users, args.items)
    run = out / "run"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "run_train.py"), "--data", str(log), "--checkpoint-dir", str(run),
                    "--overwrite", *RECIPE], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"log {log}: {rows:,} rows (repeats are dropped by the split), {log.stat().st_size / 1e6:.1f} MB; "
          f"trained in {time.perf_counter() - t0:.0f} s")
    serving = sum(p.stat().st_size for p in (run / "serving").iterdir())
    print(f"serving/: {serving / 1e6:.2f} MB")
    subprocess.run([sys.executable, "-c", PER_USER, str(run), str(out / "per_user.json")], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    per_user = json.loads((out / "per_user.json").read_text())
    print(f"fresh process: import + load_run {per_user['import_and_load_s']:.1f} s; first recommend (compiles) "
          f"{per_user['first_call_s']:.1f} s; then per user median {per_user['median_s'] * 1e3:.0f} ms, "
          f"p90 {per_user['p90_s'] * 1e3:.0f} ms (200 users)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "run_recommend.py"), "--run", str(run), "--out", str(out / "recs.csv"),
                    "--overwrite"], check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    with open(out / "recs.csv", newline="") as f:
        recs = {row[0]: row[1:11] for row in list(csv.reader(f))[1:]}
    same = all(recs[user] == items for user, items in per_user["lists"].items())
    print(f"run_recommend.py, all {len(recs):,} users: {wall:.1f} s wall (process start, load and compile included), "
          f"{len(recs) / wall:,.0f} users/s; equals per-user recommend for the 200 users: {same}")


if __name__ == "__main__":
    main()

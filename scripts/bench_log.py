"""Throughput of reading, validating and splitting a log: pyarrow's bare read beside Phoenix's, per format and size.

    uv run python scripts/bench_log.py                          # 1M, 5M and 20M rows (generates the logs once)
    uv run python scripts/bench_log.py --sizes 1M --formats csv  # a quick run
    uv run python scripts/bench_log.py --steps arrow,core        # some steps only

Generates logs of each size (Zipf item popularity, users with lognormal lengths, shuffled rows,
integer ids and Unix-second timestamps; a fixed seed) as CSV, gzip CSV and Parquet under --scratch
(default $PHOENIX_CACHE_DIR/bench_logs, never in the repository; generated once, then reused), then
runs each step on each file in a fresh subprocess and prints a markdown table of wall seconds and
rows/s (the whole subprocess: Python, its imports (JAX and Haiku come with phoenix_log, seconds on
their own) and the work), the seconds after the imports (timed inside the subprocess; the dry run's
own "in all"), and the subprocess's peak RSS, with the load average before and after (the machine is
shared; a loaded machine makes every figure slower). Steps:

  arrow    pyarrow's bare read of the file into a Table (pyarrow.csv.read_csv / pyarrow.parquet.read_table)
  read     phoenix_log.read_log (Phoenix's reader and every check of a Log)
  core     the data core alone: pyarrow's read, phoenix_log.from_arrays, phoenix_split.split_log and the
           summary `run_train.py --dry-run` prints (what the core costs whatever reader is in front of it)
  dry-run  `run_train.py --data FILE --dry-run`: the whole command line, as a user runs it

A step that fails prints its last error line in the table; one over --timeout is stopped and marked so.
About 5 minutes at 1M and 5M rows on 2 cores; 20M rows takes longer (generation alone about 2 minutes).
"""

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FORMATS = {"csv": ".csv", "csv.gz": ".csv.gz", "parquet": ".parquet"}
STEPS = ("arrow", "read", "core", "dry-run")
MEAN_LENGTH = 50  # interactions per user on average (lognormal lengths)
ITEMS_PER_ROW = 0.05  # catalog size: 5% of the rows (1M items at 20M rows)
ZIPF_EXPONENT = 0.9  # item popularity ~ 1 / rank^a (about 11% repeated (user, item) pairs)
SPAN_S = 365 * 24 * 3600  # a year of Unix seconds
SEED = 0

CHILD = {  # each prints its in-process seconds (after its imports) as its last line
    "arrow": """
import sys, time
import pyarrow.csv, pyarrow.parquet
start, path = time.perf_counter(), sys.argv[1]
table = pyarrow.parquet.read_table(path) if path.endswith(".parquet") else pyarrow.csv.read_csv(path)
print(table.num_rows, file=sys.stderr)
print(time.perf_counter() - start)
""",
    "read": """
import sys, time
import phoenix_log
start = time.perf_counter()
print(len(phoenix_log.read_log(sys.argv[1]).user), file=sys.stderr)
print(time.perf_counter() - start)
""",
    "core": """
import sys, time
import numpy as np
import pyarrow.csv, pyarrow.parquet
import phoenix_log, phoenix_split
start, path = time.perf_counter(), sys.argv[1]
table = pyarrow.parquet.read_table(path) if path.endswith(".parquet") else pyarrow.csv.read_csv(path)
def column(name):  # the generated logs' int64 columns, zero-copy (to_numpy would import pandas: seconds)
    array = table.column(name).combine_chunks()
    return np.frombuffer(array.buffers()[1], np.int64, len(array), array.offset * 8)
log = phoenix_log.from_arrays({name: column(name) for name in table.column_names}, source=path)
del table
split = phoenix_split.split_log(log, stream=sys.stderr)
print(phoenix_split.summary(split), file=sys.stderr)
print(time.perf_counter() - start)
""",
}


def parse_size(text: str) -> int:
    """"1M" -> 1_000_000, "500k" -> 500_000, "1234" -> 1234."""
    scale = {"k": 10 ** 3, "m": 10 ** 6}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def generate(rows: int, seed: int = SEED) -> dict:
    """Columns {user_id, item_id, timestamp} [R] int64 of a realistic log of `rows` interactions, shuffled."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(np.log(MEAN_LENGTH) - 0.5, 1.0, size=max(2, rows // MEAN_LENGTH)))
    lengths = np.floor(lengths * rows / lengths.sum()).astype(np.int64)  # [U] about `rows` in all
    lengths[: rows - lengths.sum()] += 1  # exactly `rows`
    lengths = lengths[lengths > 0]
    num_users, num_items = len(lengths), max(2, int(rows * ITEMS_PER_ROW))
    user = np.repeat(rng.permutation(num_users) * 7 + 1000, lengths)  # [R] arbitrary integer ids
    weights = 1.0 / np.arange(1, num_items + 1) ** ZIPF_EXPONENT  # [N] by popularity rank
    cdf = np.cumsum(weights / weights.sum())
    rank = np.minimum(np.searchsorted(cdf, rng.random(rows)), num_items - 1)  # [R]
    item = rng.permutation(num_items)[rank] * 13 + 5  # popularity independent of the id
    start = rng.integers(1_600_000_000, 1_600_000_000 + SPAN_S, size=num_users)  # [U]
    gaps = rng.exponential(3600.0, size=rows).astype(np.int64)  # seconds between a user's interactions
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)  # [R] each user's first row
    steps = np.cumsum(gaps) - np.cumsum(gaps)[first]
    timestamp = np.repeat(start, lengths) + steps
    shuffle = rng.permutation(rows)
    return {"user_id": user[shuffle], "item_id": item[shuffle], "timestamp": timestamp[shuffle]}


def write_logs(rows: int, scratch: Path, formats) -> dict:
    """{format: path} of the log of `rows` rows in each format, written (atomically) unless already there."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    paths = {fmt: scratch / f"log_{rows}{FORMATS[fmt]}" for fmt in formats}
    missing = [fmt for fmt, path in paths.items() if not path.exists()]
    if not missing:
        return paths
    scratch.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    table = pa.table(generate(rows))
    for fmt in missing:
        tmp = paths[fmt].with_name(paths[fmt].name + ".tmp")
        if fmt == "parquet":
            pq.write_table(table, tmp)
        else:
            with pa.OSFile(str(tmp), "wb") as raw:
                out = pa.CompressedOutputStream(raw, "gzip") if fmt == "csv.gz" else raw
                pa_csv.write_csv(table, out)
                if out is not raw:
                    out.close()
        os.replace(tmp, paths[fmt])
    print(f"generated {rows:,} rows as {', '.join(missing)} in {time.perf_counter() - start:.0f} s under {scratch}",
          file=sys.stderr)
    return paths


def run_step(step: str, path: Path, timeout: float) -> dict:
    """Wall seconds, peak RSS (MiB) and outcome of one step on one file, in a fresh subprocess."""
    if step == "dry-run":
        command = [sys.executable, str(ROOT / "run_train.py"), "--data", str(path), "--dry-run"]
    else:
        command = [sys.executable, "-c", CHILD[step], str(path)]
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        status = "timeout"
    else:
        status = "ok" if child.returncode == 0 else (err.strip().splitlines() or [f"exit {child.returncode}"])[-1]
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB; the largest child so far
    inside = float("nan")
    if status == "ok":  # the in-process seconds: the child's last line, or the dry run's "N in all"
        lines = out.strip().splitlines()
        inside = (float(next(line for line in lines if "seconds:" in line).rsplit("; ", 1)[1].split()[0])
                  if step == "dry-run" else float(lines[-1]))
    return {"wall": wall, "inside": inside, "rss_mib": rss / 1024, "status": status}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M,5M,20M", help="comma-separated row counts (1M, 500k, 20000)")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    parser.add_argument("--scratch", default=os.path.join(os.environ.get("PHOENIX_CACHE_DIR", "~/.cache/phoenix"),
                                                          "bench_logs"),
                        help="where the generated logs are kept (default $PHOENIX_CACHE_DIR/bench_logs)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a step is stopped")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    formats = [f for f in args.formats.split(",") if f]
    steps = [s for s in args.steps.split(",") if s]
    for name, values, allowed in (("--formats", formats, FORMATS), ("--steps", steps, STEPS)):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            parser.error(f"{name}: unknown {unknown}, expected some of {', '.join(allowed)}")
    scratch = Path(args.scratch).expanduser()
    load = os.getloadavg()
    rows_out = []
    for rows in sizes:
        paths = write_logs(rows, scratch, formats)
        for fmt in formats:
            size_mb = paths[fmt].stat().st_size / 2 ** 20
            for step in steps:
                # Peak RSS per step: RUSAGE_CHILDREN keeps the largest child so far, so each step runs
                # under a fresh Python parent that reports its own child's peak.
                result = measure(step, paths[fmt], args.timeout)
                rows_out.append((rows, fmt, size_mb, step, result))
                print(f"{rows:,} {fmt} {step}: {result['wall']:.1f} s ({result['inside']:.1f} s after imports), "
                      f"{result['rss_mib']:.0f} MiB, {result['status']}", file=sys.stderr)
    print(f"\nload average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f"; {os.cpu_count()} CPUs\n")
    print("| rows | format | file MiB | step | wall s | rows/s | s after imports | rows/s after imports | "
          "peak RSS MiB | outcome |")
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---|")
    for rows, fmt, size_mb, step, r in rows_out:
        ok = r["status"] == "ok"
        rate = f"{rows / r['wall']:,.0f}" if ok else "-"
        inner = f"{rows / r['inside']:,.0f}" if ok else "-"
        print(f"| {rows:,} | {fmt} | {size_mb:.0f} | {step} | {r['wall']:.1f} | {rate} | {r['inside']:.1f} | {inner} | "
              f"{r['rss_mib']:.0f} | {r['status'][:80]} |")


def measure(step: str, path: Path, timeout: float) -> dict:
    """run_step in a fresh parent process, so that RUSAGE_CHILDREN's peak is this step's alone."""
    import json
    code = (f"import json, pathlib; from scripts import bench_log; "
            f"print(json.dumps(bench_log.run_step({step!r}, pathlib.Path({str(path)!r}), {timeout!r})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        return {"wall": float("nan"), "inside": float("nan"), "rss_mib": float("nan"),
                "status": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()

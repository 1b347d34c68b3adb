"""phoenix_log.read_log beside pyarrow's bare read of the same file, per format: rows/s and peak memory.

    uv run python scripts/bench_read_formats.py --rows 5000000            # integer ids and Unix seconds
    uv run python scripts/bench_read_formats.py --rows 1000000 --strings  # string ids and ISO-8601 times

Writes a log of --rows rows (user_id, item_id, timestamp; users and items drawn at random, times
increasing) as CSV, gzip CSV (level 1) and Parquet into a temporary directory, then reads each file in
a fresh process, once with read_log (a checked phoenix_log.Log) and once with pyarrow alone (CSV:
pyarrow.csv.read_csv with its own type inference; Parquet: pyarrow.parquet.read_table), and prints
seconds, rows/s and the process's peak RSS. The read is timed from the call to its return (imports,
pyarrow's lazy import of pandas included, excluded). Minutes for 20M rows (writing the files dominates).
"""

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 1_000_000  # rows formatted at a time


def write_logs(directory: str, rows: int, strings: bool, seed: int = 0) -> dict:
    """{format: path} of one random log written as CSV, gzip CSV and Parquet."""
    import pyarrow as pa
    import pyarrow.csv as arrow_csv
    import pyarrow.parquet as parquet

    rng = np.random.default_rng(seed)
    user = rng.integers(0, max(rows // 20, 2), rows)  # [R] ~20 interactions per user
    item = rng.integers(0, max(rows // 50, 2), rows)  # [R]
    seconds = 1_600_000_000 + np.sort(rng.integers(0, 10**8, rows))  # [R]
    if strings:
        columns = {"user_id": pa.array(np.char.add("u", user.astype(str))),
                   "item_id": pa.array(np.char.add("sku-", item.astype(str))),
                   "timestamp": pa.array(seconds.astype("datetime64[s]").astype(str))}  # 2020-09-13T12:26:40
    else:
        columns = {"user_id": pa.array(user), "item_id": pa.array(item), "timestamp": pa.array(seconds)}
    table = pa.table(columns)
    paths = {"csv": os.path.join(directory, "log.csv"), "csv.gz": os.path.join(directory, "log.csv.gz"),
             "parquet": os.path.join(directory, "log.parquet")}
    arrow_csv.write_csv(table, paths["csv"], arrow_csv.WriteOptions(quoting_style="none"))
    with open(paths["csv"], "rb") as plain, gzip.open(paths["csv.gz"], "wb", compresslevel=1) as packed:
        shutil.copyfileobj(plain, packed, 1 << 24)
    parquet.write_table(table, paths["parquet"])
    return paths


def read_once(reader: str, path: str) -> dict:
    """One read in this process: seconds, rows, peak RSS."""
    sys.path.insert(0, ROOT)
    if reader == "phoenix":
        import phoenix_log

        start = time.perf_counter()
        rows = len(phoenix_log.read_log(path).user)
    else:
        import pyarrow as pa
        import pyarrow.csv as arrow_csv
        import pyarrow.parquet as parquet

        pa.array([0])  # pyarrow imports pandas lazily where it is installed (read_table does): not timed
        start = time.perf_counter()
        if path.endswith(".parquet"):
            rows = parquet.read_table(path).num_rows
        else:
            stream = pa.CompressedInputStream(pa.OSFile(path), "gzip") if path.endswith(".gz") else path
            rows = arrow_csv.read_csv(stream).num_rows
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": rows, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM on Linux (ru_maxrss would include the parent's memory
    at the fork, which Linux carries across exec)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--strings", action="store_true", help="string ids and ISO-8601 times (else integers)")
    parser.add_argument("--formats", default="csv,csv.gz,parquet")
    parser.add_argument("--read", nargs=2, metavar=("READER", "PATH"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.read:
        print(json.dumps(read_once(*args.read)))
        return
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        paths = write_logs(directory, args.rows, args.strings)
        print(f"{args.rows:,} rows ({'string ids, ISO-8601 times' if args.strings else 'integer ids and times'}) "
              f"written in {time.perf_counter() - start:.0f} s; {os.cpu_count()} CPUs")
        print(f"{'format':<8} {'MB':>7} {'reader':<8} {'seconds':>8} {'rows/s':>12} {'peak RSS MB':>12}")
        for name in args.formats.split(","):
            for reader in ("phoenix", "pyarrow"):
                out = subprocess.run([sys.executable, __file__, "--read", reader, paths[name]], check=True,
                                     capture_output=True, text=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                assert result["rows"] == args.rows, result
                print(f"{name:<8} {os.path.getsize(paths[name]) / 2**20:>7.0f} {reader:<8} {result['seconds']:>8.2f} "
                      f"{args.rows / result['seconds']:>12,.0f} {result['peak_rss_mb']:>12,.0f}")


if __name__ == "__main__":
    main()

"""Per-device table bytes and train-step time with a big hash table, sharded vs replicated, on 8 forced CPU devices.

    uv run python scripts/bench_sharded_tables.py                          # 1M and 10M rows x 64, both ways
    uv run python scripts/bench_sharded_tables.py --rows 50000000 --modes sharded

Each (rows, mode) runs in its own subprocess (8 forced CPU devices, a 1-D "data" mesh):
bench.sharded_table_case, a ranking trainer whose post table has --rows rows x --dim (user and author
tables 1,009 rows), a one-layer model, row-wise Adagrad with sparse row updates (one float of optimiser
state per row; AdamW would add two table-sized copies), a batch of 64 users (8 per device).
`sharded`: shard_tables=True (each device holds 1/8 of every table); `replicated`: data_parallel
alone (each device holds all of it).

Prints one markdown row per run: table bytes on one device (the arrays' addressable shards on device 0:
tables and their optimiser state), init seconds, first step (compile + run) and the median of the
next --steps steps, and the subprocess's peak resident memory. A run whose tables would need more
than --max-share of the memory available now (MemAvailable) is skipped, with the bytes it would
need: this machine is shared. Seconds are indicative (shared CPUs).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVICES = 8
FLOAT_BYTES = 4


def child(rows: int, dim: int, mode: str, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import bench

    return bench.sharded_table_case(rows, dim, mode, steps)


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--modes", nargs="+", choices=("sharded", "replicated"), default=["sharded", "replicated"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-share", type=float, default=0.5,
                        help="skip a run whose tables need more than this share of MemAvailable")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        rows, mode = args.child.split(",")
        print(json.dumps(child(int(rows), args.dim, mode, args.steps)))
        return
    print(f"{DEVICES} forced CPU devices; post table rows x {args.dim} float32, row-wise Adagrad; median of "
          f"{args.steps} steps")
    print("| rows | mode | table bytes per device | all devices | init s | first step s | step ms | peak RSS GB |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        for mode in args.modes:
            per_table = rows * (args.dim + 1) * FLOAT_BYTES  # rows and one accumulator per row
            total = per_table * (DEVICES if mode == "replicated" else 1)
            if total > args.max_share * available_bytes():
                print(f"| {rows:,} | {mode} | {total / DEVICES / 2 ** 30:.2f} GiB (not run) | "
                      f"{total / 2 ** 30:.1f} GiB | skipped: more than {args.max_share:.0%} of the "
                      f"{available_bytes() / 2 ** 30:.1f} GiB available | | | |", flush=True)
                continue
            env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
                       JAX_PLATFORMS="cpu")
            proc = subprocess.run([sys.executable, __file__, "--child", f"{rows},{mode}", "--dim", str(args.dim),
                                   "--steps", str(args.steps)], env=env, capture_output=True, text=True)
            if proc.returncode:
                print(f"| {rows:,} | {mode} | failed: {proc.stderr.strip().splitlines()[-1:]} | | | | | |", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"| {rows:,} | {mode} | {r['device_bytes'] / 2 ** 20:,.1f} MiB | "
                  f"{DEVICES * r['device_bytes'] / 2 ** 30:.2f} GiB | {r['init_s']:.1f} | {r['first_step_s']:.1f} | "
                  f"{r['step_ms']:.1f} | {r['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

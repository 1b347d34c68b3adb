"""Per-device table bytes and train-step time with a big hash table, sharded vs replicated, on 8 forced CPU devices.

    uv run python scripts/bench_sharded_tables.py                          # 1M and 10M rows x 64, both ways
    uv run python scripts/bench_sharded_tables.py --rows 50000000 --modes sharded

Each (rows, mode) runs in its own subprocess (8 forced CPU devices, a 1-D "data" mesh): a ranking
trainer whose post table has --rows rows x --dim (user and author tables 1,009 rows), a one-layer
model, row-wise Adagrad with sparse row updates (one float of optimiser state per row; AdamW would
add two table-sized copies), a batch of 64 users (8 per device). `sharded`: shard_tables=True (each
device holds 1/8 of every table); `replicated`: data_parallel alone (each device holds all of it).

Prints one markdown row per run: table bytes on one device (the arrays' addressable shards on device 0:
tables and their optimiser state), init seconds, first step (compile + run) and the median of the
next --steps steps, and the subprocess's peak resident memory. A run whose tables would need more
than --max-share of the memory available now (MemAvailable) is skipped, with the bytes it would
need: this machine is shared. Seconds are indicative (shared CPUs).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVICES = 8
FLOAT_BYTES = 4
SMALL_TABLE = 1009


def child(rows: int, dim: int, mode: str, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp
    import numpy as np

    import phoenix_training as training
    from grok import TransformerConfig
    from phoenix_inputs import HashConfig, create_example_batch
    from recsys_model import PhoenixModelConfig

    hashes = HashConfig(user_table_size=SMALL_TABLE, post_table_size=rows, author_table_size=SMALL_TABLE)
    config = PhoenixModelConfig(model=TransformerConfig(emb_size=dim, key_size=16, num_q_heads=2, num_kv_heads=1,
                                                        num_layers=1, widening_factor=1.0),
                                emb_size=dim, num_actions=19, history_seq_len=8, candidate_seq_len=4,
                                hash_config=hashes, fprop_dtype=jnp.float32)
    optimizer = training.OptimizerConfig(table_optimizer="rowwise_adagrad", warmup_steps=1)
    trainer = training.make_ranking_trainer(config, hashes, optimizer, data_parallel=True,
                                            shard_tables=mode == "sharded")
    rng = np.random.default_rng(0)

    def batch(i):
        b, _ = create_example_batch(64, dim, 8, 4, 19, seed=i)
        post = rng.integers(1, rows, b.history_post_hashes.shape).astype(np.int32)
        cand = rng.integers(1, rows, b.candidate_post_hashes.shape).astype(np.int32)
        b = b._replace(user_hashes=np.minimum(b.user_hashes, SMALL_TABLE - 1),
                       history_author_hashes=np.minimum(b.history_author_hashes, SMALL_TABLE - 1),
                       candidate_author_hashes=np.minimum(b.candidate_author_hashes, SMALL_TABLE - 1),
                       history_post_hashes=post, candidate_post_hashes=cand)
        return b, (rng.random((64, 4, 19)) < 0.3).astype(np.float32)

    start = time.perf_counter()
    state = trainer.init(jax.random.PRNGKey(0), batch(0)[0])
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    device = jax.devices()[0]
    on_device = sum(s.data.nbytes for leaf in jax.tree.leaves((state.params["hash_embeddings"],
                                                               state.opt_state["tables"]))
                    for s in leaf.addressable_shards if s.device == device)
    batches = [batch(i) for i in range(steps + 1)]
    start = time.perf_counter()
    state, _ = trainer.step(state, *batches[0])
    jax.block_until_ready(state)
    first_s = time.perf_counter() - start
    times = []
    for b in batches[1:]:
        start = time.perf_counter()
        state, _ = trainer.step(state, *b)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    return {"device_bytes": on_device, "init_s": init_s, "first_step_s": first_s,
            "step_ms": 1e3 * float(np.median(times)), "traces": trainer.trace_counts["step"],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


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

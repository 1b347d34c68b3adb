"""Exact top-k of a git revision's `phoenix_index.py` beside the working tree's, in one process.

    uv run python scripts/ab_index.py --rev HEAD~1 [--rows 1000000] [--batches 1,16,32] [--calls 30]

Both indexes search the same clustered corpus (`bench.make_clustered_corpus`) for the same unit
users, with the bare jitted matmul + `lax.top_k` beside them; every round calls the three in a
shuffled order, so load drifts hit them alike. Prints each plan, whether the two revisions return
identical indices and scores, and per batch size the medians and their ratios to the bare path.
"""

import argparse
import os
import subprocess
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import bench
import phoenix_index as current

ROOT = Path(__file__).resolve().parent.parent  # the clone, for `git show`


def load_revision(rev: str) -> types.ModuleType:
    """`phoenix_index.py` as of git revision `rev`, as a module named phoenix_index_<rev>."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:phoenix_index.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"phoenix_index_{rev}")
    exec(compile(source, f"phoenix_index@{rev}", "exec"), module.__dict__)
    return module


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="git revision to compare with (default HEAD)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=1000)
    parser.add_argument("--batches", default="1,16,32")
    parser.add_argument("--calls", type=int, default=30, help="rounds (each calls every method once)")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    K = args.top_k
    old = load_revision(args.rev)
    corpus, _ = bench.make_clustered_corpus(args.rows, args.dim, 0)
    before, after = old.CorpusIndex(corpus), current.CorpusIndex(corpus)
    corpus_dev = after.corpus_embeddings
    bare = jax.jit(lambda u, c: jax.lax.top_k(u @ c.T, K)[::-1])  # (indices, scores)
    fns = {}
    for B in batches:
        user = np.random.default_rng(B).standard_normal((B, args.dim)).astype(np.float32)
        user = jnp.asarray(user / np.linalg.norm(user, axis=1, keepdims=True))  # [B, D]
        fns[B, "before"] = lambda u=user: before.search(u, K)
        fns[B, "after"] = lambda u=user: after.search(u, K)
        fns[B, "bare"] = lambda u=user: bare(u, corpus_dev)
        (i0, s0), (i1, s1) = (map(np.asarray, fns[B, m]()) for m in ("before", "after"))
        print(f"B={B}: plan {before.plan(B, K)} -> {after.plan(B, K)}; identical indices "
              f"{np.array_equal(i0, i1)}, scores {np.array_equal(s0, s1)}")
    timed = bench.interleaved_ms(fns, args.calls)  # {key: (median ms, min ms)}, shuffled per round
    print(f"load average {os.getloadavg()[0]:.2f}; medians of {args.calls} calls, N={args.rows}, K={K}")
    print("| B | before ms | after ms | bare ms | before / bare | after / bare |")
    print("|---:|---:|---:|---:|---:|---:|")
    for B in batches:
        m = {name: timed[B, name][0] for name in ("before", "after", "bare")}
        print(f"| {B} | {m['before']:.2f} | {m['after']:.2f} | {m['bare']:.2f} | "
              f"{m['before'] / m['bare']:.3f} | {m['after'] / m['bare']:.3f} |")


if __name__ == "__main__":
    main()

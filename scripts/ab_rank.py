"""C-candidate ranking with each CPU serving step of the fast path switched off, beside the release.

    uv run python scripts/ab_rank.py [--c 500] [--batch 1] [--calls 200]

Runners, all on the same random parameters and inputs, each compiled once:
  release     the release's masked model under `jax.jit` (bfloat16 activations), the reference;
  runner      `RecsysInferenceRunner.rank` as shipped (float32 serving on CPU);
  -options    compiled with XLA's default options instead of `runners.CPU_RANK_COMPILER_OPTIONS`;
  -defer      with `grok.DEFER_NORMS` off (each RMSNorm applied before its matmul);
  -history    with the history inputs concatenated before one projection (the release's form);
  before      all three off (the fast path as it was before them).
Every round calls them in a shuffled order (`bench.interleaved_ms`), so load drifts hit them alike;
each is given NumPy inputs, as `create_example_batch` returns them. Prints medians, minima, the
ratio to the release's median and the largest probability difference to the shipped runner.
"""

import argparse
import contextlib
import os

import jax
import numpy as np

import bench
import grok
import recsys_model
import runners
from phoenix_demos import demo_ranker_config

STEPS = ("options", "defer", "history")


@contextlib.contextmanager
def steps_off(off: set):
    """While tracing and compiling: the named steps switched off (see the module doc)."""
    saved = runners.CPU_RANK_COMPILER_OPTIONS, grok.DEFER_NORMS, recsys_model.PhoenixModel._user_history_inputs
    history = saved[2]
    if "options" in off:
        runners.CPU_RANK_COMPILER_OPTIONS = {}
    if "defer" in off:
        grok.DEFER_NORMS = False
    if "history" in off:
        recsys_model.PhoenixModel._user_history_inputs = lambda self, b, e, fast=False: history(self, b, e)
    try:
        yield
    finally:
        runners.CPU_RANK_COMPILER_OPTIONS, grok.DEFER_NORMS, recsys_model.PhoenixModel._user_history_inputs = saved


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--c", type=int, default=500, help="candidates per user C")
    parser.add_argument("--batch", type=int, default=1, help="users B")
    parser.add_argument("--history-len", type=int, default=128, help="history length S")
    parser.add_argument("--calls", type=int, default=200, help="timed rounds")
    args = parser.parse_args(argv)

    cfg = demo_ranker_config(history_len=args.history_len, num_candidates=args.c)
    batch, emb = runners.create_example_batch(args.batch, cfg.emb_size, args.history_len, args.c,
                                              len(runners.ACTIONS), seed=0)
    variants = {"runner": set(), **{f"-{step}": {step} for step in STEPS}, "before": set(STEPS)}
    fns, scores = {}, {}
    for name, off in variants.items():
        with steps_off(off):
            ranker = runners.RecsysInferenceRunner(runners.ModelRunner(cfg, rng_seed=0))
            ranker.initialize()
            scores[name] = np.asarray(ranker.rank(batch, emb).scores)  # traced and compiled here
        fns[name] = lambda r=ranker: r.rank(batch, emb).scores
        if name == "runner":
            release = jax.jit(ranker.runner.forward.apply)
            params = ranker.params
            fns["release"] = lambda: release(params, None, batch, emb).logits
    timed = bench.interleaved_ms(fns, args.calls)
    base = timed["release"][0]
    print(f"C={args.c} B={args.batch} S={args.history_len}, medians of {args.calls} shuffled rounds, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| variant | median ms | min ms | vs release | max prob diff vs runner |\n|---|---:|---:|---:|---:|")
    for name, (median, low) in timed.items():
        diff = "" if name == "release" else f"{np.abs(scores[name] - scores['runner']).max():.1e}"
        print(f"| {name} | {median:.3f} | {low:.3f} | {median / base:.3f} | {diff} |")


if __name__ == "__main__":
    main()

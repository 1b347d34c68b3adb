"""Peak memory of the evaluation and the negative mining on a synthetic split, one step per subprocess.

    uv run python scripts/bench_eval_memory.py                              # 20k users x 10k items
    uv run python scripts/bench_eval_memory.py --users 2000 --items 1000     # a quick run
    uv run python scripts/bench_eval_memory.py --root /tmp/old               # another checkout (before/after)

Builds a log of --users users (6 to 40 interactions each, Zipf item popularity over --items items,
integer ids; a fixed seed), splits it leave-one-out, and makes an untrained tiny two-tower model
(D = 16, one layer: the model is not what is measured). Then each step runs in a fresh subprocess,
which reports the peak resident memory (ru_maxrss) before the step (after the log, split and model)
and after it, the step's own peak of NumPy/Python allocations (tracemalloc), and its seconds:

  baselines   phoenix_evaluation.evaluate_baseline and baseline_topk, popularity and transition, val and test
  stage_one   phoenix_two_stage.StageOne on val and test (what phoenix_pipeline evaluates)
  pool        phoenix_two_stage.hard_negative_pool (negative_pool 100)

--root runs the steps against the Phoenix modules of another checkout (e.g. `git archive` of the
commit before, unpacked): the same script measures before and after. The machine is shared: seconds
are indicative only; peaks do not depend on load.
"""

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("baselines", "stage_one", "pool")
MIN_LENGTH, MAX_LENGTH = 6, 40  # interactions per user, uniform
POOL = 100  # the recipe's default negative_pool


def build(num_users: int, num_items: int):
    """(split, recipe, retrieval trainer, its initial params) of the synthetic log."""
    import jax

    import phoenix_two_stage as two_stage
    from phoenix_log import from_arrays
    from phoenix_split import split_log

    rng = np.random.default_rng(0)
    lengths = rng.integers(MIN_LENGTH, MAX_LENGTH + 1, num_users)
    user = np.repeat(np.arange(num_users), lengths)
    item = (rng.zipf(1.3, len(user)) - 1) % num_items
    log = from_arrays({"user_id": user, "item_id": item, "timestamp": np.arange(len(user))}, source="<bench>")
    split = split_log(log, stream=io.StringIO())
    recipe = two_stage.resolve_recipe(two_stage.Recipe(emb_size=16, num_layers=1, num_heads=1), split)
    trainer = two_stage.SequenceRetrievalTrainer(two_stage.retrieval_config(recipe), two_stage.hash_config(recipe),
                                                 two_stage.optimizer_config(recipe, 10))
    batch = next(two_stage.retrieval_batches(split, recipe, trainer.hash_config, np.random.default_rng(0)))[0]
    params = two_stage.host_copy(trainer.init(jax.random.PRNGKey(0), batch).params)
    return split, recipe, trainer, params


def run_step(step: str, num_users: int, num_items: int) -> dict:
    import phoenix_evaluation as evaluation
    import phoenix_two_stage as two_stage

    split, recipe, trainer, params = build(num_users, num_items)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    start = time.perf_counter()
    if step == "baselines":
        for which in ("val", "test"):
            for name in evaluation.BASELINES:
                evaluation.evaluate_baseline(split, which, name)
                evaluation.baseline_topk(split, which, name)
    elif step == "stage_one":
        for which in ("val", "test"):
            two_stage.StageOne(trainer, params, split, which, recipe.history_len, recipe.retrieve_k)
    elif step == "pool":
        two_stage.hard_negative_pool(trainer, params, split, recipe.history_len, POOL)
    seconds = time.perf_counter() - start
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"step": step, "users": len(split.eval_users()), "items": len(split.item_ids), "rss_before": before,
            "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "traced_peak": traced,
            "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {STEPS}")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose Phoenix modules are measured")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one step here, print JSON
    args = parser.parse_args()
    if args.one:
        sys.path.insert(0, str(args.root))
        print(json.dumps(run_step(args.one, args.users, args.items)))
        return
    steps = args.steps.split(",")
    if set(steps) - set(STEPS):
        parser.error(f"--steps: expected names from {STEPS}, got {args.steps!r}")
    print(f"root {args.root}, {args.users} users x {args.items} items")
    print("| step | eval users | items | RSS before (MB) | RSS peak (MB) | peak - before (MB) | traced peak (MB) | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for step in steps:
        env = dict(os.environ, PYTHONPATH=str(args.root))
        proc = subprocess.run([sys.executable, __file__, "--one", step, "--users", str(args.users), "--items",
                               str(args.items), "--root", str(args.root)], capture_output=True, text=True, env=env,
                              cwd=args.root)
        if proc.returncode:
            print(f"| {step} | failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]} |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        mb = 1e6
        print(f"| {step} | {r['users']} | {r['items']} | {r['rss_before'] / mb:.0f} | {r['rss_peak'] / mb:.0f} | "
              f"{(r['rss_peak'] - r['rss_before']) / mb:.0f} | {r['traced_peak'] / mb:.0f} | {r['seconds']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()

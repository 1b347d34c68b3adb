"""Where a training step's time goes on your log: building the batch on the host, the device step, and the
loop as the pipeline runs it (and with a prefetch thread), per stage, plus negative mining and memory.

    uv run python scripts/make_log.py --rows 1000000 --seed 11 --out l1m.csv.gz
    uv run python scripts/profile_training.py --data l1m.csv.gz --steps 200

For each stage of phoenix_two_stage.LOG_RECIPE (the retrieval model, then the ranker, its hard negatives
mined by the retrieval model as initialised: mining costs the same whatever the parameters):

  host ms         drawing and building one batch from the stage's stream, alone (no device work)
  device ms       one compiled step on a batch already built (phoenix_training.seconds_per_step: the
                  median of steps timed one by one, each waited for)
  loop ms         training.fit over --steps steps, as phoenix_pipeline trains (the stage's stream,
                  phoenix_two_stage.resumable_stream; the host reads the loss once, so the device runs
                  ahead); and the same with the stream built ahead in a background thread
                  (phoenix_batching.prefetch), which the pipeline does not do: it gains nothing while
                  host ms is small beside device ms
  device share    device ms / loop ms: the share of a training step that is the model's computation
  examples/s      training targets per loop second (retrieval: the windows' targets; the ranker: its
                  examples, each with C candidates)

The process's resident memory is sampled every 0.1 s; its peak after reading the log and after each stage
is printed (memory that grows with the model and the batch, not with the log, beyond the log's own
arrays). The machine is shared: the load average is printed before and after.
"""

import argparse
import os
import threading
import time

import jax
import numpy as np

import phoenix_log
import phoenix_split
import phoenix_training as training
import phoenix_two_stage as two_stage
from phoenix_batching import prefetch


class PeakRSS:
    """The process's resident set size, sampled in a thread; `take()` returns the peak since the last take."""

    def __init__(self, every: float = 0.1):
        self.peak, self.every = 0, every
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)

    def take(self) -> float:
        peak, self.peak = max(self.peak, self.now()), 0
        return peak / 2**30


def host_ms(stream, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        next(stream)
    return 1e3 * (time.perf_counter() - start) / steps


def loop_ms(trainer, state, batches, steps: int) -> float:
    """ms per step of training.fit over `steps` steps of `batches` (first_step -> iterable), the step
    already compiled; the state is a copy (fit donates it)."""
    state = jax.tree.map(lambda x: x.copy(), state)
    start = time.perf_counter()
    state, _ = training.fit(trainer, state, batches, steps, log_every=steps, stream=open(os.devnull, "w"))
    jax.block_until_ready(state.step)
    return 1e3 * (time.perf_counter() - start) / steps


def profile_stage(name: str, trainer, state, batches, raw, steps: int, targets_per_step: int, rss: PeakRSS):
    """One row: raw(first_step) is a fresh stream of the stage's batches."""
    first = batches.first
    device = 1e3 * training.seconds_per_step(trainer, state, first, steps=15)
    host = host_ms(iter(raw(0)), steps)
    loop = loop_ms(trainer, state, batches, steps)
    with_prefetch = loop_ms(trainer, state, lambda skip: prefetch(raw(skip)), steps)
    return (f"| {name} | {host:.1f} | {device:.1f} | {loop:.1f} | {with_prefetch:.1f} | "
            f"{device / loop:.0%} | {targets_per_step / loop * 1e3:,.0f} | {rss.take():.2f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a log file (as run_train.py --data reads it)")
    parser.add_argument("--steps", type=int, default=200, help="steps timed per loop (default 200)")
    args = parser.parse_args(argv)
    rss = PeakRSS()
    print(f"load average before: {os.getloadavg()}")
    t0 = time.perf_counter()
    split = phoenix_split.split_log(phoenix_log.read_log(args.data), "leave-one-out", "first")
    recipe = two_stage.resolve_recipe(two_stage.LOG_RECIPE, split)
    print(f"{args.data}: {len(split.user_ids)} users, {len(split.item_ids)} items, {len(split.items)} interactions; "
          f"read and split in {time.perf_counter() - t0:.1f} s, peak RSS {rss.take():.2f} GB")
    print("\n| stage | host ms | device ms | loop ms | loop ms (prefetch thread) | device share | "
          "examples/s | peak RSS GB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")

    trainer, state, batches, _ = two_stage.start_retrieval(split, recipe, seed=0)
    raw = lambda skip: two_stage.retrieval_batches(split, recipe, trainer.hash_config,  # noqa: E731
                                                   np.random.default_rng([0, 1]), skip)
    print(profile_stage("retrieval", trainer, state, batches, raw, args.steps,
                        recipe.retrieval_batch_size * recipe.history_len, rss), flush=True)

    t0 = time.perf_counter()
    pool = two_stage.hard_negative_pool(trainer, trainer.host_params(state.params), split, recipe.history_len,
                                        recipe.negative_pool)
    mining = time.perf_counter() - t0
    ranker, ranker_state, ranker_batches, _ = two_stage.start_ranker(split, pool, recipe, seed=0)
    examples = two_stage.phoenix_examples(split, "train", recipe.ranker_history_len)
    raw = lambda skip: two_stage.ranker_batches(split, examples, pool, recipe, ranker.hash_config,  # noqa: E731
                                                np.random.default_rng([0, 2]), skip)
    print(profile_stage("ranker", ranker, ranker_state, ranker_batches, raw, args.steps, recipe.ranker_batch_size,
                        rss), flush=True)
    print(f"\nnegative mining ({len(pool)} examples x {pool.shape[1]}): {mining:.1f} s")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

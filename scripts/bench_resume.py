"""What resuming a run on one's own log costs besides the training itself.

    uv run python scripts/bench_resume.py [--rows 1000000] [--users 20000] [--items 50000] [--steps 200]

On a random log of --rows interactions: the seconds of phoenix_pipeline.fingerprint (computed by every
run, compared by --resume), and per training step the seconds a resumed batch stream spends skipping
a step it does not build (phoenix_two_stage.retrieval_batches / ranker_batches with skip) beside building
one, at the default recipe's batch sizes. Prints one line per figure; medians of 3 repeats.
"""

import argparse
import itertools
import time

import numpy as np

import phoenix_pipeline as pipeline
import phoenix_two_stage as two_stage


def median_seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--steps", type=int, default=200, help="stream steps timed (skipped, and built)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    log = pipeline.from_arrays({"user_id": rng.integers(0, args.users, args.rows),
                                "item_id": rng.integers(0, args.items, args.rows),
                                "timestamp": rng.integers(0, 10 ** 9, args.rows)}, source="random log")
    split = pipeline.split_log(log)
    print(f"{args.rows:,} rows, {len(split.user_ids):,} users, {len(split.item_ids):,} items after the split")
    seconds = median_seconds(lambda: pipeline.fingerprint(split))
    print(f"fingerprint: {seconds:.3f} s ({args.rows / seconds / 1e6:.1f} M rows/s)")

    recipe = two_stage.resolve_recipe(pipeline.Recipe(), split)
    hashes = two_stage.hash_config(recipe)
    examples = two_stage.phoenix_examples(split, "train", recipe.ranker_history_len)
    pool = rng.integers(0, len(split.item_ids), (len(examples["user_ids"]), recipe.negative_pool))
    streams = {
        "retrieval": lambda skip: two_stage.retrieval_batches(split, recipe, hashes, np.random.default_rng(1), skip),
        "ranker": lambda skip: two_stage.ranker_batches(split, examples, pool, recipe, hashes,
                                                        np.random.default_rng(2), skip)}
    for name, stream in streams.items():
        # Both include the stream's set-up (an epoch's windows for retrieval): timed over --steps steps.
        built = median_seconds(lambda: list(itertools.islice(stream(0), args.steps)))
        skipped = median_seconds(lambda: next(stream(args.steps))) - built / args.steps  # the one batch it builds
        print(f"{name}: building a batch {1e3 * built / args.steps:.2f} ms/step, skipping one "
              f"{1e3 * skipped / args.steps:.2f} ms/step ({built / skipped:.1f}x faster; a resume at step k "
              f"spends k x this before its first step)")


if __name__ == "__main__":
    main()

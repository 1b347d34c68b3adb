"""MovieLens-100K as a plain interaction log: the CSV a user of phoenix_pipeline.py would bring.

    uv run python examples/movielens_csv.py OUT.csv [--seed 0] [--string-ids]
    uv run run_train.py --data OUT.csv --dump-topk top10.csv

Writes `user_id,item_id,timestamp,rating` with every user and movie id renamed (a random
one-to-one map to other integers, or to strings with --string-ids) and the rows shuffled, so
nothing of MovieLens's file order or id numbering survives: no genres (authors), and ratings
sharing a user and a second now tie in random order. Prints the row count; ~1 s.
"""

import argparse
import csv

import numpy as np

import movielens as ml

ID_SPACE = 10**9  # renamed integer ids are drawn from [0, 1e9)


def renamed(ids: np.ndarray, rng: np.random.Generator, prefix: str, strings: bool) -> np.ndarray:
    """ids [R] -> new ids [R] under a random one-to-one map of the distinct ids."""
    distinct, inverse = np.unique(ids, return_inverse=True)
    new = rng.choice(ID_SPACE, size=len(distinct), replace=False)  # [V] distinct
    if strings:
        new = np.array([f"{prefix}{n:09d}" for n in new], dtype=object)
    return new[inverse.ravel()]


def export(path, seed: int = 0, string_ids: bool = False, source=ml.SOURCE_ML100K, cache=None) -> int:
    """Writes the shuffled, renamed log to `path`; returns its number of rows."""
    ratings = ml.load_ratings(source, cache)
    rng = np.random.default_rng(seed)
    users = renamed(ratings.user, rng, "u", string_ids)
    items = renamed(ratings.item, rng, "m", string_ids)
    order = rng.permutation(len(users))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp", "rating"])
        for r in order.tolist():
            writer.writerow([users[r], items[r], int(ratings.timestamp[r]), f"{ratings.rating[r]:g}"])
    return len(order)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the CSV to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--string-ids", action="store_true", help="rename ids to strings (u000123, m004567)")
    parser.add_argument("--data", default=ml.SOURCE_ML100K, help="movielens.load_ratings source")
    args = parser.parse_args(argv)
    print(f"{args.out}: {export(args.out, args.seed, args.string_ids, args.data)} rows")


if __name__ == "__main__":
    main()

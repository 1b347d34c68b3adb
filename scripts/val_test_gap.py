"""How MovieLens-100K's validation and test targets differ (issue 11: why validation > test).

    uv run python scripts/val_test_gap.py

NumPy only, no model: for the 943 users' validation targets (second-to-last rating) and test
targets (last rating) of movielens.movielens_split, prints a markdown table of
  - history length before the target (the same users, so test = val + 1),
  - the target's popularity in the TRAINING part (what the models and logQ learn from): median
    count, share of targets among the 10% most-rated items, share with < 20 training ratings,
  - the gap to the user's previous rating (same second / > 1 day / > 30 days: a return visit),
  - the target movie's age when rated (days since the movie's first rating in the whole log) and the
    share of targets rated within 30 days of the movie's first rating (new releases),
  - where the target's timestamp sits in global time (share of all training interactions after it),
  - the popularity and transition baselines (phoenix_evaluation.evaluate_baseline) on each.
"""

import numpy as np

import movielens as ml
import phoenix_evaluation as evaluation

DAY = 86400


def main():
    ratings = ml.load_ratings(ml.SOURCE_ML100K)
    split = ml.movielens_split(ratings)
    users = split.eval_users()
    train_cols = split.targets("train")  # training targets; plus each user's first item:
    firsts = split.item_columns[split.offsets[:-1][split.train_len > 0]]
    counts = np.bincount(np.concatenate([train_cols, firsts]), minlength=len(split.item_ids))  # [N] training ratings
    top10 = counts >= np.quantile(counts, 0.9)
    first_seen = np.full(len(split.item_ids), np.iinfo(np.int64).max)
    np.minimum.at(first_seen, split.item_columns, split.timestamps)
    train_mask = np.zeros(len(split.items), bool)
    for u in range(len(split.user_ids)):
        train_mask[split.offsets[u]:split.offsets[u] + split.train_len[u]] = True
    train_times = np.sort(split.timestamps[train_mask])
    rows = {}
    for which in ("val", "test"):
        _, pos = split.target_positions(which)
        cols = split.item_columns[pos]
        t = split.timestamps[pos]
        gap = t - split.timestamps[pos - 1]
        age = (t - first_seen[cols]) / DAY
        later = 1.0 - np.searchsorted(train_times, t, side="right") / len(train_times)
        r = {}
        r["history length (median)"] = f"{np.median(pos - split.offsets[users]):.0f}"
        r["target training count (median)"] = f"{np.median(counts[cols]):.0f}"
        r["target among top-10% items"] = f"{top10[cols].mean():.3f}"
        r["target with < 20 training ratings"] = f"{(counts[cols] < 20).mean():.3f}"
        with_val = counts + np.bincount(split.targets("val"), minlength=len(counts))  # protocol train+val's data
        r["target with < 20 ratings in training + validation targets"] = f"{(with_val[cols] < 20).mean():.3f}"
        r["same second as previous rating"] = f"{(gap == 0).mean():.3f}"
        r["gap to previous > 1 day"] = f"{(gap > DAY).mean():.3f}"
        r["gap to previous > 30 days"] = f"{(gap > 30 * DAY).mean():.3f}"
        r["gap to previous (median, s)"] = f"{np.median(gap):.0f}"
        r["movie age when rated (median, days)"] = f"{np.median(age):.0f}"
        r["rated within 30 days of the movie's first rating"] = f"{(age < 30).mean():.3f}"
        r["training interactions after the target (mean share)"] = f"{later.mean():.3f}"
        for name in evaluation.BASELINES:
            m = evaluation.evaluate_baseline(split, which, name)
            r[f"{name} baseline HR@10 / NDCG@10"] = f"{m['HR@10']:.4f} / {m['NDCG@10']:.4f}"
        rows[which] = r
    print(f"MovieLens-100K leave-one-out, {len(users)} users: validation vs test targets\n")
    print("| measure | val | test |\n|---|---:|---:|")
    for key in rows["val"]:
        print(f"| {key} | {rows['val'][key]} | {rows['test'][key]} |")
    same = (split.targets("val") == split.targets("test")).mean()
    print(f"\n(val and test targets are different movies for {1 - same:.3f} of users by construction)")


if __name__ == "__main__":
    main()

"""How well can any model do on a phoenix_synthetic.make_log log? A scorer that knows the generator's truth.

    uv run python scripts/log_ceiling.py --rows 80000 --seed 21
    uv run python scripts/log_ceiling.py --rows 197000 --seed 5 --rows 60000 --seed 6   # several logs

make_log draws each interaction as (docstring there): the series successor of the last item with
probability series_follow, else (rarely) a repeat, else a fresh item: a category from the user's
drifting taste, then an item of that category by popularity. The scorer here is told each item's
category and series successor (make_log's truth columns, which Phoenix never sees) and ranks item i
for a user by that mixture,

    P(i) = f [i = successor(last)] + (1 - f [last has a successor]) taste(category(i)) pop(i | category(i)),

with f = series_follow, pop(i | c) the item's share of its category's visible interactions (+ 0.5),
and taste(c) the user's visible history's category counts (each weighted decay^age, plus a
pseudo-count alpha per category). decay and alpha are chosen on validation NDCG@10 from a small grid;
seen items are excluded as the evaluation excludes them. It is close to the Bayes-optimal ranking of
the generator (it ignores the repeats and models drift by recency only), so its HR@10 / NDCG@10 are a
practical ceiling: a model that learns everything from ids alone should not expect more. The table
prints it beside the transition baseline (phoenix_evaluation.evaluate_baseline) on the leave-one-out
split run_train.py uses; docs/recipes.md has the figures.
"""

import argparse
import itertools

import numpy as np

import phoenix_evaluation as evaluation
import phoenix_log
import phoenix_metrics as metrics
import phoenix_split
import phoenix_synthetic

DECAYS = (1.0, 0.95, 0.85)  # per step back in the history
ALPHAS = (0.5, 2.0, 8.0)  # taste pseudo-count per category
CHUNK = 1024  # users scored at once ([CHUNK, N] float64)


def truth(table, split: phoenix_split.Split, log) -> tuple[np.ndarray, np.ndarray, int]:
    """(category [N], successor column [N] (-1: none), categories) of the split's catalog columns."""
    columns = {name: i for i, name in enumerate(log.names["item"][int(v)] for v in split.item_ids)}
    item = table.column("item_id").to_numpy(zero_copy_only=False)
    category = table.column("category").to_numpy(zero_copy_only=False)
    following = table.column("series_next").to_numpy(zero_copy_only=False)
    names, first = np.unique(item, return_index=True)  # one row per item
    kinds = np.unique(category)
    cat = np.empty(len(columns), np.int64)
    succ = np.full(len(columns), -1, np.int64)
    for name, at in zip(names, first):
        if name in columns:
            cat[columns[name]] = np.searchsorted(kinds, category[at])
            succ[columns[name]] = columns.get(following[at], -1) if following[at] else -1
    return cat, succ, len(kinds)


def ceiling_ranks(split, which: str, cat, succ, num_cats: int, follow: float, decay: float, alpha: float):
    """0-based ranks [U_eval] of each eval user's `which` target under the truth-knowing scorer."""
    users = split.eval_users()
    visible = split.visible_len(which)[users]  # [U]
    owner = np.repeat(np.arange(len(users)), visible)  # [V] eval row of each visible position
    age = np.concatenate([np.arange(v)[::-1] for v in visible])  # [V] 0 = the newest
    seen = split.item_columns[np.repeat(split.offsets[users], visible) + np.concatenate([np.arange(v) for v in visible])]
    taste = alpha + np.bincount(owner * num_cats + cat[seen], weights=decay ** age,
                                minlength=len(users) * num_cats).reshape(len(users), num_cats)  # [U, Cat]
    taste /= taste.sum(1, keepdims=True)
    popularity = evaluation.popularity_counts(split, which).astype(np.float64) + 0.5  # [N]
    within = popularity / np.bincount(cat, weights=popularity, minlength=num_cats)[cat]  # [N]
    last = split.item_columns[split.offsets[users] + visible - 1]  # [U]
    target = split.targets(which)  # [U]
    ranks = np.empty(len(users), np.int64)
    for start in range(0, len(users), CHUNK):
        rows = np.arange(start, min(start + CHUNK, len(users)))
        nxt = succ[last[rows]]  # [u]
        p = (1 - follow * (nxt >= 0))[:, None] * taste[rows][:, cat] * within  # [u, N]
        p[np.flatnonzero(nxt >= 0), nxt[nxt >= 0]] += follow
        mine = (owner >= rows[0]) & (owner <= rows[-1])
        p[owner[mine] - rows[0], seen[mine]] = -np.inf  # seen items are never recommended
        ranks[rows] = (p > p[np.arange(len(rows)), target[rows]][:, None]).sum(1)
    return ranks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, action="append", help="log rows (repeat with --seed for several logs)")
    parser.add_argument("--seed", type=int, action="append", help="make_log seed, one per --rows")
    parser.add_argument("--series-follow", type=float, default=0.35, help="make_log's series_follow (default 0.35)")
    args = parser.parse_args(argv)
    rows, seeds = args.rows or [80_000], args.seed or [21]
    if len(rows) != len(seeds):
        parser.error(f"--rows and --seed: expected as many of each, got {len(rows)} and {len(seeds)}")
    print("| log | split | transition HR@10 | NDCG@10 | ceiling HR@10 | NDCG@10 | ceiling / transition | decay, alpha |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    for num_rows, seed in zip(rows, seeds):
        table = phoenix_synthetic.make_log(num_rows, seed, series_follow=args.series_follow, truth_columns=True)
        log = phoenix_log.from_arrays(table.select(["user_id", "item_id", "timestamp"]))
        split = phoenix_split.split_log(log, "leave-one-out", "first")
        cat, succ, num_cats = truth(table, split, log)
        found = {(which, d, a): metrics.metrics_from_ranks(ceiling_ranks(split, which, cat, succ, num_cats,
                                                                          args.series_follow, d, a))
                 for which in ("val", "test") for d, a in itertools.product(DECAYS, ALPHAS)}
        chosen = max(itertools.product(DECAYS, ALPHAS), key=lambda da: found[("val",) + da]["NDCG@10"])
        for which in ("val", "test"):
            base, best = evaluation.evaluate_baseline(split, which, "transition"), found[(which,) + chosen]
            print(f"| {num_rows} rows, seed {seed} | {which} | {base['HR@10']:.4f} | {base['NDCG@10']:.4f} | "
                  f"{best['HR@10']:.4f} | {best['NDCG@10']:.4f} | {best['HR@10'] / base['HR@10']:.3f} / "
                  f"{best['NDCG@10'] / base['NDCG@10']:.3f} | {chosen[0]:g}, {chosen[1]:g} |", flush=True)


if __name__ == "__main__":
    main()

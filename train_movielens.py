"""MovieLens-100K end to end: train the two-tower retrieval model and the ranker, evaluate both stages.

    uv run run_train.py --data movielens-100k [--seed 0] [--dump-topk PATH] [--checkpoint-dir DIR]
                        [--overwrite] [--plot]
    uv run run_train.py --data movielens-100k --seeds 0,1,2 [--dump-topk top10.csv]   # DIR/seed<N>,
                        # top10.seed<N>.csv; then the per-seed HR@10 / NDCG@10 table and mean +- sd
    uv run run_train.py --data movielens-100k --help     # every Recipe field is a flag too

This module holds only what is MovieLens's: reading the ratings (movielens.py), the mapping of
stars to Phoenix actions (movielens.RATING_ACTIONS) and of genres to authors, the dump check
against the raw files, and the measurements below that chose phoenix_pipeline.Recipe's defaults.
Training and evaluation are phoenix_pipeline.run, the same code a CSV log goes through.

Prints, on stderr, each stage's progress bar (training.fit: step, loss, steps/s, ETA; the first
step's compile time on its own line) and its validation HR@10 / NDCG@10 four times; the best of
those (by NDCG@10) is saved with Trainer.save to DIR/retrieval and DIR/ranker (and the other
retrieval ensemble members' to DIR/retrieval.1, .2, .3; default
$PHOENIX_CACHE_DIR/checkpoints/movielens/, $PHOENIX_CACHE_DIR defaulting to ~/.cache/phoenix;
runners.*.from_checkpoint load them; a second run there needs --overwrite) and read back for the
final evaluation, with DIR/metrics.jsonl (and DIR/curves.png with --plot). On stdout: a markdown
table of HR@10, NDCG@10, HR@50 and MRR on validation and test for popularity, transition,
retrieval alone and two-stage, with the seed and wall time. With
--dump-topk, every test user's final top-10 (raw MovieLens ids) goes to PATH as CSV
(movielens.dump_topk) and movielens.recompute_from_dump's HR@10 / NDCG@10 of that file are printed
next to the table's.

Protocol (movielens.py): leave-one-out; every catalog movie is ranked except the user's earlier
ones, never the target. Two-stage: the retrieval ensemble's top K = 100 of all movies (four
two-tower models, the mean of their cosines), re-ranked by the ranker (its click logit + the
retrieval logit and a popularity prior, weighted as validation chooses); HR@50 and MRR rank the
re-ranked 100 first, then the rest in retrieval order.

The recipe's reasons and every measurement behind it: docs/notes.md ("MovieLens-100K").
"""

import argparse
import os
import sys
import time

import numpy as np

import movielens as ml
import phoenix_pipeline as pipeline
import phoenix_protocols
import phoenix_run_dir as run_dir
from phoenix_pipeline import FINAL_K, Recipe  # noqa: F401 (Recipe: this experiment's flags)


# The command line's recipe: Recipe()'s but last pooling, chosen on validation over seeds 0-2
# (module docstring; a tie on NDCG@10, +0.006 HR@10), and a retrieval ensemble of four two-tower
# models with one ranker (validation two-stage over seeds 0-2: 0.2704 / 0.1458; two models 0.2655 /
# 0.1457, three 0.2658 / 0.1453, one 0.2503 / 0.1392; two rankers on two models 0.2626 / 0.1452:
# NDCG@10 ties from two models on, broken by HR@10; validation on seeds 3, 4 then favoured four on
# both metrics; docs/notes.md). `--pooling mean` is the release's pooling, `--retrieval-members 1` a
# single two-tower model.
MOVIELENS_RECIPE = Recipe(pooling="last", retrieval_members=4)


def movielens_log(ratings: ml.Ratings, author_scheme: str = "genres") -> pipeline.Log:
    """The MovieLens mapping: stars -> actions (movielens.RATING_ACTIONS), a movie's genre
    signature -> its author (movielens.genre_authors; 0 without metadata), raw ids kept."""
    signatures = ml.genre_authors(ratings.genres, author_scheme)  # [M]
    rows = np.clip(np.searchsorted(ratings.item_ids, ratings.item), 0, max(len(ratings.item_ids) - 1, 0))  # [R]
    known = (ratings.item_ids[rows] == ratings.item) if len(ratings.item_ids) else np.zeros(len(ratings.item), bool)
    authors = np.where(known, signatures[rows] if len(signatures) else 0, 0).astype(np.int64)  # [R]
    return pipeline.Log(user=ratings.user, item=ratings.item, timestamp=ratings.timestamp,
                        actions=ml.rating_actions(ratings.rating), author=authors, rating=ratings.rating,
                        line=np.arange(len(ratings.user)), names={}, source=ratings.source, from_file=False)


def movielens_split(ratings: ml.Ratings) -> pipeline.LogSplit:
    """movielens.leave_one_out's split (repeated (user, movie) pairs refused) with the MovieLens actions."""
    return pipeline.split_log(movielens_log(ratings), "leave-one-out", duplicates="error")


def parse_seeds(text: str) -> tuple:
    """"0,1,2" -> (0, 1, 2): distinct non-negative ints."""
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds: expected distinct non-negative integers, got {text!r}")
    return seeds


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=ml.SOURCE_ML100K, help=f"{ml.SOURCE_ML100K!r} or a directory")
    parser.add_argument("--cache-dir", default=None, help="download cache (movielens.py)")
    pipeline.add_run_flags(parser, str(ml.cache_dir() / "checkpoints" / "movielens"), MOVIELENS_RECIPE)
    parser.add_argument("--seeds", type=parse_seeds, default=None, metavar="0,1,2",
                        help="run each seed in turn (instead of --seed): checkpoints in DIR/seed<N>, dumps in "
                             "PATH with .seed<N> before its suffix, then the per-seed table and mean +- sd")
    args = parser.parse_args(argv)
    given = pipeline.given_flags(parser, argv)
    if args.seeds and "seed" in given:
        parser.error(f"--seed {args.seed}: --seeds {','.join(map(str, args.seeds))} runs its own seeds; give one "
                     "of them")
    if "cache_dir" in given and args.data != ml.SOURCE_ML100K:
        parser.error(f"--cache-dir: applies to --data {ml.SOURCE_ML100K} (its download) only, got --data {args.data}")
    pipeline.check_run_flags(args, given, parser.error)
    return args, pipeline.recipe_from_args(args)


def seed_path(path: str, seed, tag: str = "seed") -> str:
    """top10.csv -> top10.seed0.csv (a path without a suffix gets .seed0 appended); another tag:
    seed_path("top10.seed0.csv", "", "trainval") -> top10.seed0.trainval.csv."""
    root, dot, suffix = path.rpartition(".")
    if not dot or "/" in suffix:
        return f"{path}.{tag}{seed}"
    return f"{root}.{tag}{seed}.{suffix}"


SEED_COLUMNS = (("test", "retrieval"), ("test", "two-stage"), ("val", "retrieval"), ("val", "two-stage"))
EXTRA_MODELS = ("sasrec",)  # rows of phoenix_protocols (and other protocols' rows) get columns too


def seed_table(tables: dict) -> tuple[str, dict]:
    """Markdown table of {seed: run table}: HR@10 / NDCG@10 of SEED_COLUMNS per seed, then their mean
    and sample standard deviation over seeds. Returns (text, {(split, model, metric): (mean, sd)})."""
    present = [key for key in next(iter(tables.values())) if all(key in t for t in tables.values())]
    columns = SEED_COLUMNS + tuple(key for key in present if key[1] in EXTRA_MODELS or key[0] not in ("val", "test"))
    keys = [(which, model, metric) for which, model in dict.fromkeys(columns) for metric in ("HR@10", "NDCG@10")]
    head = " | ".join(f"{which} {model} {metric}" for which, model, metric in keys)
    lines = [f"| seed | {head} |", "|---|" + "---:|" * len(keys)]
    for seed, table in tables.items():
        lines.append(f"| {seed} | " + " | ".join(f"{table[(w, m)][k]:.4f}" for w, m, k in keys) + " |")
    stats = {}
    for w, m, k in keys:
        values = np.array([table[(w, m)][k] for table in tables.values()])
        stats[(w, m, k)] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    lines.append("| mean +- sd | " + " | ".join(f"{stats[key][0]:.4f} +- {stats[key][1]:.4f}" for key in keys) + " |")
    return "\n".join(lines), stats


def inputs(args) -> list:
    """What a run reads (phoenix_run_dir.Input): the ratings (a directory or archive; for
    SOURCE_ML100K the wheel in the cache) and the download cache."""
    if str(args.data) != ml.SOURCE_ML100K:
        return [run_dir.Input("--data", str(args.data))]
    cache = ml.cache_dir(getattr(args, "cache_dir", None))
    return [run_dir.Input("--data", str(cache / ml.WHEEL_FILE)), run_dir.Input("--cache-dir", str(cache), "cache")]


def outputs(args) -> tuple[dict, dict]:
    """({seed or None: run directory}, {label: dump path}) of a run: one of each, or with --seeds each
    seed's; with --protocol train+val each dump's .trainval twin too."""
    seeds = getattr(args, "seeds", None)
    dirs = ({seed: os.path.join(args.checkpoint_dir, f"seed{seed}") for seed in seeds} if seeds
            else {None: args.checkpoint_dir})
    files = {}
    if args.dump_topk:
        for seed in dirs:
            path = args.dump_topk if seed is None else seed_path(args.dump_topk, seed)
            which = [] if seed is None else [f"seed {seed}"]
            files[f"--dump-topk ({', '.join(which)})" if which else "--dump-topk"] = path
            if getattr(args, "protocol", "val-select") == "train+val":
                files[f"--dump-topk ({', '.join(which + ['train+val'])})"] = seed_path(path, "", "trainval")
    return dirs, files


def check_outputs(args) -> None:
    """Everything a run will write, checked before the ratings are read (phoenix_run_dir.check_outputs)."""
    if str(args.data) != ml.SOURCE_ML100K:
        if not os.path.exists(args.data):
            raise FileNotFoundError(f"--data {args.data}: no such directory or archive (expected "
                                    f"{ml.SOURCE_ML100K!r}, a recbole wheel, or a directory with *.inter, u.data or "
                                    "ratings.dat)")
    dirs, files = outputs(args)
    run_dir.check_outputs(inputs(args), list(dirs.values()), pipeline.RUN_ENTRIES, files,
                          getattr(args, "overwrite", False))
    if getattr(args, "plot", False):
        pipeline._pyplot()  # a missing matplotlib fails now, not after training


def check_dump_k(args, recipe: Recipe, split) -> None:
    """RecipeError if the recipe, resolved on `split`, would hand fewer than FINAL_K items to a dump."""
    k = pipeline.resolve_recipe(recipe, split).retrieve_k
    if args.dump_topk and k < FINAL_K:
        raise pipeline.RecipeError(f"--dump-topk: --retrieve-k resolves to {k} on {split.log.source}, fewer than the "
                                   f"{FINAL_K} items a dump holds")


def run_seed(args, recipe: Recipe, split, ratings, seed: int, checkpoint_dir: str, dump_path, stream=None) -> dict:
    """One seed of the experiment (table on stdout); phoenix_pipeline.run's dict plus "dump_check"."""
    result = pipeline.run(split, recipe, checkpoint_dir, seed, getattr(args, "overwrite", False),
                          getattr(args, "plot", False), stream,
                          title=f"MovieLens ({ratings.source}), leave-one-out",
                          data_parallel=getattr(args, "data_parallel", False),
                          extra_rows=phoenix_protocols.extra_rows(args))
    check = None
    retrained = result.get("extra", {}).get("train+val")
    dumps = [(dump_path, result["reranked"]["test"], ("test", "two-stage"))] if dump_path else []
    if dump_path and retrained:  # protocol train+val: its two-stage top-10s beside, PATH with .trainval
        dumps.append((seed_path(dump_path, "", "trainval"), retrained["reranked_test"],
                      (phoenix_protocols.TRAIN_VAL, "two-stage")))
    for path, reranked, row in dumps:
        users = split.user_ids[split.eval_users()]
        ml.dump_topk(path, users, split.item_ids[reranked[:, :FINAL_K]])
        recomputed = ml.recompute_from_dump(path, args.data, args.cache_dir, k=FINAL_K)
        check = recomputed if check is None else check
        ours = result["table"][row]
        label = "" if row[0] == "test" else f" ({row[0]})"
        print(f"\ndump {path}{label}: table HR@10 {ours['HR@10']:.4f} NDCG@10 {ours['NDCG@10']:.4f}; "
              f"recomputed from the dump HR@10 {recomputed['HR@10']:.4f} NDCG@10 {recomputed['NDCG@10']:.4f} "
              f"({recomputed['num_users']} users, history items in the top-10s: "
              f"{recomputed['history_items_in_topk']})")
        pipeline.check_dump_figures(path, ours, recomputed)
    return {**result, "dump_check": check}


def run(args, recipe: Recipe, stream=None) -> dict:
    """The whole experiment; prints the table (stdout) and progress (`stream`, default stderr).
    Returns phoenix_pipeline.run's dict plus "dump_check". With args.seeds (--seeds), each seed in
    turn (its own DIR/seed<N> and dump path), then seed_table; returns {"seeds": {seed: that dict},
    "summary": seed_table's stats, "wall_s"}."""
    seeds = getattr(args, "seeds", None)
    check_outputs(args)  # every seed's directory and dump before the first trains, before reading
    if not seeds:
        ratings = ml.load_ratings(args.data, args.cache_dir)
        split = movielens_split(ratings)
        check_dump_k(args, recipe, split)
        return run_seed(args, recipe, split, ratings, args.seed, args.checkpoint_dir, args.dump_topk, stream)
    run_dirs = outputs(args)[0]
    ratings = ml.load_ratings(args.data, args.cache_dir)
    split = movielens_split(ratings)
    check_dump_k(args, recipe, split)
    start = time.perf_counter()
    results = {seed: run_seed(args, recipe, split, ratings, seed, run_dirs[seed],
                              seed_path(args.dump_topk, seed) if args.dump_topk else None, stream)
               for seed in seeds}
    wall = time.perf_counter() - start
    text, stats = seed_table({seed: result["table"] for seed, result in results.items()})
    print(f"\nMovieLens ({ratings.source}), leave-one-out, seeds {','.join(map(str, seeds))}: HR@10 / NDCG@10 "
          f"per seed, mean +- sample sd; wall time {wall:.0f} s ("
          + ", ".join(f"seed {seed} {result['wall_s']:.0f} s" for seed, result in results.items()) + ")\n")
    print(text)
    return {"seeds": results, "summary": stats, "wall_s": wall}


def main(argv=None):
    args, recipe = parse_args(sys.argv[1:] if argv is None else argv)
    return run(args, recipe)


if __name__ == "__main__":
    main()

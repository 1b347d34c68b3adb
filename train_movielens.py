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
those (by NDCG@10) is saved with Trainer.save to DIR/retrieval and DIR/ranker (default
$PHOENIX_CACHE_DIR/checkpoints/movielens/, $PHOENIX_CACHE_DIR defaulting to ~/.cache/phoenix;
runners.*.from_checkpoint load them; a second run there needs --overwrite) and read back for the
final evaluation, with DIR/metrics.jsonl (and DIR/curves.png with --plot). On stdout: a markdown
table of HR@10, NDCG@10, HR@50 and MRR on validation and test for popularity, transition,
retrieval alone and two-stage, with the seed and wall time. With
--dump-topk, every test user's final top-10 (raw MovieLens ids) goes to PATH as CSV
(movielens.dump_topk) and movielens.recompute_from_dump's HR@10 / NDCG@10 of that file are printed
next to the table's.

Takes about 6 minutes on a 2-core CPU shared with another training job (measured 5 min 50 s at a
load average of 2.7-5.2, median 4.3): retrieval 65 s, negative mining 3 s, ranker 276 s,
evaluation 3 s, the rest loading and compiling (each train step compiles in ~8 s).

Protocol (movielens.py): leave-one-out; every catalog movie is ranked except the user's earlier
ones, never the target. Two-stage: the retrieval model's top K = 100 of all movies, re-ranked by
the ranker; HR@50 and MRR rank the re-ranked 100 first, then the rest in retrieval order.

Recipe, and why
  Both models: D = 64, 2 layers, 2 heads of 32, float32 (bf16 is slower on CPU here). Hash tables of
  20k rows for users and movies, 4k for authors (genre signatures), 2 hashes each: of 943 users,
  1,682 movies and 216 authors none shares both rows with another (printed at start). Table init
  std 0.05. AdamW at 2e-3, 100 warmup steps, cosine decay to 10% over each stage.

  Retrieval: S = 5. The user tower mean-pools the transformer outputs over [user, history], so
  each of S movies weighs 1/(S+1) and the latest cannot dominate, while ML-100K's next movie
  depends most on the last few (the transition baseline, 0.145, uses the last one alone). Val
  HR@10 after 10 epochs at lr 1e-3 (windows per step scaled to ~1,300 examples): S=50 0.163,
  S=20 0.193, S=10 0.212, S=5 0.230. The user-id embedding carries the long-term taste, the five
  movies the session.
  Trained per prefix, as SASRec: a window of S + 1 movies passes the causal user tower once and
  the running mean of its outputs is the user representation of each of its S prefixes (equal to
  the model's pooled representation of that prefix; tested), so one pass yields S examples. One
  epoch over the 97,171 examples (every position t >= 1 of the training parts) is ~20k windows:
  ~8 s here (S=5), where one history per example measured 1.1 s per step of 256 examples at
  S=50: 7 min per epoch. Window cuts move each epoch (random offset per user), so a target's history length varies.
  256 windows per step put ~1,200 examples in the in-batch softmax (the other rows' next movies,
  most of the catalog, are the negatives), temperature 0.05, logQ correction with
  movielens.item_sampling_frequencies, accidental hits (the same movie in another row) masked by
  raw movie id. 8 epochs (620 steps): validation peaks there; 20 epochs at lr 1e-3 peaked at
  epoch 12 and fell. Temperature 0.1, D = 128, and replacing the user id of 30% of the windows
  by a shared one measured the same within noise (943 users: one standard error of HR@10 is 0.013).

  User-tower pooling (issue 11), screened on validation only (retrieval alone, seed 0, 8 epochs
  unless noted, every other field the default; B windows per step keep ~1,300 examples per
  softmax; best of 4 evaluations by NDCG@10):
  | pooling | S | B | temperature | epochs | val HR@10 | val NDCG@10 |
  |---|---:|---:|---:|---:|---:|---:|
  | mean (default) | 5 | 256 | 0.05 | 8 | 0.2333 | 0.1326 |
  | last | 5 | 256 | 0.05 | 8 | 0.2397 | 0.1256 |
  | last | 20 | 64 | 0.05 | 8 | 0.2185 | 0.1162 |
  | last | 20 | 64 | 0.1 | 8 | 0.2280 | 0.1229 |
  | last | 20 | 64 | 0.05 | 4 | 0.2216 | 0.1166 |
  | last | 50 | 26 | 0.05 | 8 | 0.2185 | 0.1176 |
  Last pooling does let longer histories work (S=50: 0.2185 last vs 0.163 mean, measured earlier
  at lr 1e-3), but none beats mean pooling over the user id and five movies on NDCG@10, the
  selection metric. (Screened with a retrieval-only script calling
  phoenix_pipeline.train_retrieval; 1-3.5 min each.) Both S = 5 poolings through both stages
  (`--pooling last` vs the default, seed 0): validation two-stage HR@10 / NDCG@10 0.2587 / 0.1413
  (last) vs 0.2481 / 0.1418 (mean); over seeds 0, 1, 2 the validation two-stage means are
  0.2481 / 0.1375 (last) vs 0.2418 / 0.1369 (mean): better on both, if within noise on NDCG@10
  (one standard error ~0.008), so the command line's MovieLens recipe is MOVIELENS_RECIPE (last
  pooling, S = 5); Recipe() keeps the release's mean for other logs.

  Ranker: trained per example (its candidates attend to the whole history, so no prefix trick),
  S = 5 (S = 20 was no better and twice as slow), C = 8 candidates: the next movie labelled with
  its rating's actions (click; favorite at >= 4 stars; share at 5; not_interested at <= 2), 6
  negatives drawn from the retrieval model's top 100 for that example (movies the user had rated
  before and the target removed: what the ranker must re-order at evaluation) and 1 uniform random
  negative, all labels 0. The positive sits at a random slot: a candidate's rotary position is its
  slot, and a fixed slot would give it away. BCE on the 4 actions ratings set (the other 15 get
  weight 0). Warm-started from the retrieval model's hash tables, transformer and input
  projections. 4 epochs of 256 examples per step; 16 candidates (14 hard) measured the same.
  Re-ranking score: ranker click logit + w * retrieval cosine / temperature, w chosen on validation
  from RETRIEVAL_WEIGHTS (the ranker alone re-ranks worse than retrieval: val HR@10 ~0.20 vs 0.23;
  the two together beat both). The 100 are scored in chunks of C, the slots the ranker was trained
  at; candidate isolation makes each score independent of its chunk mates (tested).

Measured: `uv run run_train.py --data movielens-100k --seed 0 --dump-topk top10.csv`
  | split | model | HR@10 | NDCG@10 | HR@50 | MRR |
  |---|---|---:|---:|---:|---:|
  | val | popularity | 0.0742 | 0.0345 | 0.2301 | 0.0333 |
  | val | transition | 0.1432 | 0.0748 | 0.3319 | 0.0659 |
  | val | retrieval | 0.2333 | 0.1326 | 0.5440 | 0.1193 |
  | val | two-stage | 0.2460 | 0.1399 | 0.5525 | 0.1253 |
  | test | popularity | 0.0859 | 0.0449 | 0.1983 | 0.0416 |
  | test | transition | 0.1453 | 0.0793 | 0.3393 | 0.0719 |
  | test | retrieval | 0.1951 | 0.0985 | 0.5111 | 0.0875 |
  | test | two-stage | 0.2089 | 0.1103 | 0.5239 | 0.0981 |
  (re-ranking weight w = 1 chosen on validation; the dump recomputes to the same 0.2089 / 0.1103).
  Seeds move these more than the recipe choices above did: seed 1 (7 min, w = 1) gives test
  retrieval 0.2153 / 0.1141 and two-stage 0.2280 / 0.1206 (HR@10 / NDCG@10), val two-stage 0.2418.
  Three seeds, this recipe: `uv run run_train.py --data movielens-100k --seeds 0,1,2 --dump-topk
  top10.csv` (21 min wall on 2 shared cores; seed 2 alone on a quieter machine 3.5 min), every
  dump recomputing to its table's two-stage row:
  | seed | test retrieval HR@10 | NDCG@10 | test two-stage HR@10 | NDCG@10 | val two-stage HR@10 | NDCG@10 |
  |---|---:|---:|---:|---:|---:|---:|
  | 0 | 0.1951 | 0.0985 | 0.2078 | 0.1092 | 0.2481 | 0.1418 |
  | 1 | 0.2153 | 0.1141 | 0.2248 | 0.1218 | 0.2407 | 0.1352 |
  | 2 | 0.2110 | 0.1108 | 0.2185 | 0.1179 | 0.2365 | 0.1337 |
  | mean +- sd | 0.2071 +- 0.0106 | 0.1078 +- 0.0082 | 0.2170 +- 0.0086 | 0.1163 +- 0.0064 | 0.2418 +- 0.0059 | 0.1369 +- 0.0043 |
  The same with `--pooling last` (MOVIELENS_RECIPE, now the default of this command; seed 0 from
  the single run above, seeds 1, 2 from `--seeds 1,2 --pooling last`, 7.6 min for both):
  | seed | test retrieval HR@10 | NDCG@10 | test two-stage HR@10 | NDCG@10 | val two-stage HR@10 | NDCG@10 |
  |---|---:|---:|---:|---:|---:|---:|
  | 0 | 0.1983 | 0.1072 | 0.2174 | 0.1176 | 0.2587 | 0.1413 |
  | 1 | 0.2216 | 0.1162 | 0.2365 | 0.1258 | 0.2407 | 0.1359 |
  | 2 | 0.2291 | 0.1189 | 0.2269 | 0.1244 | 0.2450 | 0.1354 |
  | mean +- sd | 0.2163 +- 0.0161 | 0.1141 +- 0.0061 | 0.2269 +- 0.0096 | 0.1226 +- 0.0044 | 0.2481 +- 0.0094 | 0.1375 +- 0.0033 |
  Two-stage beats retrieval alone on every seed of the mean recipe and on NDCG@10 of every seed of
  the last one (seed 2's HR@10: 0.2269 vs 0.2291); the issue-11 aim (two-stage test HR@10 >= 0.23,
  NDCG@10 >= 0.125, every seed >= 0.215) is not met. (Seed 0's ranker moved since the table above:
  0.2078 vs 0.2089 with retrieval identical; the ranker stage is not bit-reproducible here.)
  Test sits below validation for both stages (in every configuration tried) while the transition
  baseline does not move; our guess: the user-id embedding learns where each user's rating session
  stands at the end of the training part, which the validation target follows directly and the
  test target one step later.
"""

import argparse
import os
import sys
import time

import numpy as np

import movielens as ml
import phoenix_pipeline as pipeline
from phoenix_pipeline import FINAL_K, Recipe  # noqa: F401 (Recipe: this experiment's flags)


# The command line's recipe: Recipe()'s but last pooling, chosen on validation over seeds 0-2
# (module docstring; a tie on NDCG@10, +0.006 HR@10). `--pooling mean` is the release's pooling.
MOVIELENS_RECIPE = Recipe(pooling="last")


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
    return args, pipeline.recipe_from_args(args)


def seed_path(path: str, seed: int) -> str:
    """top10.csv -> top10.seed0.csv (a path without a suffix gets .seed0 appended)."""
    root, dot, suffix = path.rpartition(".")
    if not dot or "/" in suffix:
        return f"{path}.seed{seed}"
    return f"{root}.seed{seed}.{suffix}"


SEED_COLUMNS = (("test", "retrieval"), ("test", "two-stage"), ("val", "retrieval"), ("val", "two-stage"))


def seed_table(tables: dict) -> tuple[str, dict]:
    """Markdown table of {seed: run table}: HR@10 / NDCG@10 of SEED_COLUMNS per seed, then their mean
    and sample standard deviation over seeds. Returns (text, {(split, model, metric): (mean, sd)})."""
    keys = [(which, model, metric) for which, model in SEED_COLUMNS for metric in ("HR@10", "NDCG@10")]
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


def run_seed(args, recipe: Recipe, split, ratings, seed: int, checkpoint_dir: str, dump_path, stream=None) -> dict:
    """One seed of the experiment (table on stdout); phoenix_pipeline.run's dict plus "dump_check"."""
    result = pipeline.run(split, recipe, checkpoint_dir, seed, getattr(args, "overwrite", False),
                          getattr(args, "plot", False), stream,
                          title=f"MovieLens ({ratings.source}), leave-one-out",
                          data_parallel=getattr(args, "data_parallel", False))
    check = None
    if dump_path:
        users = split.user_ids[split.eval_users()]
        ml.dump_topk(dump_path, users, split.item_ids[result["reranked"]["test"][:, :FINAL_K]])
        check = ml.recompute_from_dump(dump_path, args.data, args.cache_dir, k=FINAL_K)
        ours = result["table"][("test", "two-stage")]
        print(f"\ndump {dump_path}: table HR@10 {ours['HR@10']:.4f} NDCG@10 {ours['NDCG@10']:.4f}; "
              f"recomputed from the dump HR@10 {check['HR@10']:.4f} NDCG@10 {check['NDCG@10']:.4f} "
              f"({check['num_users']} users, history items in the top-10s: {check['history_items_in_topk']})")
    return {**result, "dump_check": check}


def run(args, recipe: Recipe, stream=None) -> dict:
    """The whole experiment; prints the table (stdout) and progress (`stream`, default stderr).
    Returns phoenix_pipeline.run's dict plus "dump_check". With args.seeds (--seeds), each seed in
    turn (its own DIR/seed<N> and dump path), then seed_table; returns {"seeds": {seed: that dict},
    "summary": seed_table's stats, "wall_s"}."""
    seeds = getattr(args, "seeds", None)
    overwrite = getattr(args, "overwrite", False)
    if not seeds:
        pipeline.check_run_dir(args.checkpoint_dir, overwrite)
        ratings = ml.load_ratings(args.data, args.cache_dir)
        return run_seed(args, recipe, movielens_split(ratings), ratings, args.seed, args.checkpoint_dir,
                        args.dump_topk, stream)
    run_dirs = {seed: os.path.join(args.checkpoint_dir, f"seed{seed}") for seed in seeds}
    for path in run_dirs.values():  # every seed's directory before the first trains
        pipeline.check_run_dir(path, overwrite)
    ratings = ml.load_ratings(args.data, args.cache_dir)
    split = movielens_split(ratings)
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

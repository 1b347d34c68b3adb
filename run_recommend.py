"""Top-K for every user of a trained run, from its run directory alone: a CSV of original ids.

    uv run run_recommend.py --run DIR --out recs.csv              # every user of the log, k = 10
    uv run run_recommend.py --run DIR --users users.txt --k 20 --scores --out recs.csv
    phoenix-recommend --run DIR --out recs.csv                    # the same, once the package is installed

DIR is a run directory of `run_train.py --data LOG` (phoenix_pipeline.run: its checkpoints and
serving/). Each user is served on their whole history as the run saved it (phoenix_serving.py),
ranked by the evaluated two-stage score; users go through in batches (phoenix_serving.
recommend_users), and each row equals phoenix_pipeline.recommend(load_run(DIR), user, k). The log is
not read. --users: one original user id per line (a first line `user_id` is a header; blank lines
are skipped); an id the run does not know is refused, naming the line. Without it, every user of
the log, in the run's order.

Output: `user_id,item_1,...,item_K` (with --scores, then score_1 ... score_K), written atomically; a
user with fewer than K items left to recommend gets empty trailing fields (counted on stderr).
Progress (users, users/s, ETA) on stderr. An existing --out is replaced only with --overwrite, and
--out never goes inside the run directory or over --users (phoenix_run_dir.check_outputs). Time: a
model compile (seconds), then about as long as the run's evaluation took per user.
"""

import argparse
import csv
import os
import sys
import tempfile

import numpy as np
from tqdm import tqdm

import phoenix_metrics as metrics
import phoenix_pipeline as pipeline
import phoenix_run_dir as run_dir
import phoenix_serving as serving
import run_train

__all__ = ["main", "cli", "parse_args", "read_users"]

USER_HEADER = "user_id"


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run_recommend.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the run directory (run_train.py's --checkpoint-dir)")
    parser.add_argument("--out", required=True, help="the CSV to write")
    parser.add_argument("--users", help="a file of original user ids, one per line (default: every user of the log)")
    parser.add_argument("--k", type=int, default=pipeline.FINAL_K,
                        help=f"items per user, 1 .. the run's retrieve_k (default {pipeline.FINAL_K})")
    parser.add_argument("--scores", action="store_true", help="add the two-stage scores (score_1 ... score_K)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k: expected an int >= 1, got {args.k}")
    return args


def read_users(path: str, served: serving.ServedRun) -> np.ndarray:
    """User rows [u] of the ids in `path` (one per line, in file order); ServingError naming the
    file and line of the first ids the run does not know."""
    rows, unknown = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            user = line.strip()
            if not user or (number == 1 and user == USER_HEADER):
                continue
            try:
                row = served.user_row(user)
            except ValueError as error:
                raise serving.ServingError(f"{path}:{number}: {error}") from None
            if row is None:
                unknown.append(f"{path}:{number}: {user!r}")
            rows.append(row)
    if unknown:
        raise serving.ServingError(f"--users: {len(unknown)} id(s) are not users of the run's log "
                                   f"({served.info.get('source')}): " + "; ".join(unknown[:5])
                                   + ("; ..." if len(unknown) > 5 else ""))
    if not rows:
        raise serving.ServingError(f"--users {path}: no user ids (expected one per line)")
    return np.array(rows, np.int64)


def main(argv=None) -> dict:
    """The command line `argv` run to the end; returns {"path", "users", "short"} (users with fewer than k items)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    inputs = [run_dir.Input("--run", args.run)] + ([run_dir.Input("--users", args.users)] if args.users else [])
    run_dir.check_outputs(inputs, [], {}, {"--out": args.out}, args.overwrite)
    served = pipeline.load_run(args.run)
    if args.k > served.recipe.retrieve_k:
        raise serving.ServingError(f"--k: expected at most {served.recipe.retrieve_k} (the run's retrieve_k: the "
                                   f"items retrieval hands to the ranker), got {args.k}")
    rows = read_users(args.users, served) if args.users else np.arange(len(served.split.user_ids))
    header = [USER_HEADER] + [f"item_{j + 1}" for j in range(args.k)]
    if args.scores:
        header += [f"score_{j + 1}" for j in range(args.k)]
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=os.path.basename(args.out) + ".", suffix=".tmp")
    short = 0
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f, \
                tqdm(total=len(rows), unit="user", file=sys.stderr, desc="recommending") as bar:
            writer = csv.writer(f)
            writer.writerow(header)
            for part, columns, scores in serving.recommend_users(served, rows, args.k, bar.update):
                ranked = columns != metrics.NOT_RANKED  # [u, k]
                short += int((~ranked.all(axis=1)).sum())
                items = np.array(served.item_tokens(np.where(ranked, columns, 0)), dtype=object).reshape(columns.shape)
                items[~ranked] = ""
                for user, line_items, line_scores, line_ranked in zip(served.user_tokens(part), items.tolist(),
                                                                      scores.tolist(), ranked.tolist()):
                    extra = [repr(s) if r else "" for s, r in zip(line_scores, line_ranked)] if args.scores else []
                    writer.writerow([user] + line_items + extra)
        os.replace(tmp, args.out)
    except BaseException:
        os.unlink(tmp)
        raise
    if short:
        print(f"{short} user(s) have fewer than {args.k} items left to recommend: their rows end in empty fields",
              file=sys.stderr)
    print(f"top-{args.k} of {len(rows):,} users written to {args.out}", file=sys.stderr)
    return {"path": args.out, "users": len(rows), "short": short}


def _main_reporting_serving_errors() -> None:
    try:
        main()
    except serving.ServingError as error:  # a run directory or --users file to fix: one line, status 2
        run_train.report(error, 2)


def cli() -> None:
    """The `phoenix-recommend` console script: main() with run_train.cli's handling of user errors
    (one `error:` line, status 2) and of a closed stdout."""
    run_train.cli(_main_reporting_serving_errors)


if __name__ == "__main__":
    cli()

"""Writes a realistic interaction log (phoenix_synthetic.make_log) as CSV, gzip CSV, TSV or Parquet.

    uv run python scripts/make_log.py --rows 1000000 --out shop.csv.gz
    uv run python scripts/make_log.py --rows 200000 --seed 1 --timestamps unix --out shop.parquet
    uv run run_train.py --data shop.csv.gz                     # then train on it

The format follows the name (phoenix_synthetic.LOG_FORMATS); the file is written atomically and an
existing one is replaced only with --overwrite. Prints the rows, users, items and seconds taken:
about 2 s per million rows to generate on one core, plus the writing (docs/synthetic.md).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import phoenix_synthetic  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=197_000, help="interactions (default: 197000)")
    parser.add_argument("--out", required=True, help="the file to write: .csv, .csv.gz, .tsv, .tsv.gz or .parquet")
    parser.add_argument("--seed", type=int, default=0, help="the log is a function of the seed (default: 0)")
    parser.add_argument("--users", type=int, default=None, help="default: rows / 33")
    parser.add_argument("--items", type=int, default=None,
                        help="default: 3000 x (rows / 197000)^0.85 (3,000 at 197k rows, 12,000 at 1M)")
    parser.add_argument("--categories", type=int, default=None,
                        help="item categories users have tastes over (default: 20, at most one per item)")
    parser.add_argument("--series-follow", type=float, default=0.35,
                        help="P(the next item of a series follows it) (default: 0.35)")
    parser.add_argument("--repeat-prob", type=float, default=0.03, help="P(a re-consumption) (default: 0.03)")
    parser.add_argument("--drift", type=float, default=0.6,
                        help="P(late taste) at the end of a user's history (default: 0.6)")
    parser.add_argument("--timestamps", choices=phoenix_synthetic.LOG_TIMESTAMPS, default="iso",
                        help="iso: 2024-03-05T17:02:11Z; unix: integer seconds (default: iso)")
    parser.add_argument("--no-shuffle", action="store_true", help="rows by user, then time")
    parser.add_argument("--truth-columns", action="store_true",
                        help="add category and series_next columns (Phoenix ignores them)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if os.path.lexists(args.out) and not args.overwrite:
        parser.error(f"--out {args.out}: exists; pass --overwrite to replace it")
    start = time.perf_counter()
    try:
        table = phoenix_synthetic.make_log(
            args.rows, args.seed, num_users=args.users, num_items=args.items, num_categories=args.categories,
            series_follow=args.series_follow, repeat_prob=args.repeat_prob, drift=args.drift,
            timestamps=args.timestamps, shuffle=not args.no_shuffle, truth_columns=args.truth_columns)
        generated = time.perf_counter() - start
        phoenix_synthetic.write_log(args.out, table)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    users, items = (len(table.column(name).unique()) for name in ("user_id", "item_id"))
    print(f"{args.out}: {table.num_rows} rows, {users} users, {items} items; generated in {generated:.1f} s, "
          f"written in {time.perf_counter() - start - generated:.1f} s")


if __name__ == "__main__":
    main()

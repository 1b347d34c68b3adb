"""Serve a trained run over HTTP/JSON on localhost (phoenix_server.py), or export it (phoenix_export.py).

    uv run phoenix-serve --run DIR                          # http://127.0.0.1:8000, until Ctrl-C / SIGTERM
    uv run phoenix-serve --run DIR --host 0.0.0.0 --port 9000 --max-batch 32 --max-wait-ms 2
    curl -s 127.0.0.1:8000/recommend -d '{"user": "u17", "k": 10}'
    curl -s 127.0.0.1:8000/rank -d '{"user": "u17", "candidates": ["i3", "i9"]}'
    uv run run_serve.py --run DIR --export                  # writes DIR/export (JAX + NumPy loadable), exits

DIR is a run directory of `run_train.py --data LOG` (phoenix_pipeline.run). The model and the
vocabulary are loaded once; every shape the server runs is compiled before it listens (a few
seconds for a small run: the time is printed), then it prints `serving DIR on http://HOST:PORT`.
SIGTERM or SIGINT stops it cleanly (exit status 0). Answers equal phoenix_pipeline.recommend;
endpoints, errors and batching: docs/serving.md ("Serve it").
"""

import argparse
import sys

import phoenix_export
import phoenix_pipeline as pipeline
import phoenix_serving as serving
import phoenix_server
import run_train

__all__ = ["main", "cli", "parse_args"]


def parse_args(argv) -> argparse.Namespace:
    defaults = phoenix_server.ServerConfig()
    parser = argparse.ArgumentParser(prog="run_serve.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory of run_train.py --data LOG")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch,
                        help="requests one model call takes at most (default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                        help="the most a batch waits for more requests while clients are concurrent "
                             "(default: %(default)s)")
    parser.add_argument("--max-candidates", type=int, default=defaults.max_candidates,
                        help="candidates one /rank request may name (default: %(default)s)")
    parser.add_argument("--max-rank-rows", type=int, default=defaults.max_rank_rows,
                        help="ranker rows per model call, the largest compiled bucket (default: %(default)s)")
    parser.add_argument("--no-warmup", action="store_true", help="compile each shape on its first request instead")
    parser.add_argument("--export", action="store_true",
                        help="write DIR/export (phoenix_export.py: jax.export functions, parameters, vocabulary) "
                             "and exit instead of serving")
    args = parser.parse_args(argv)
    checks = [("--port", args.port, 0 <= args.port <= 65535, "an int in [0, 65535]"),
              ("--max-batch", args.max_batch, args.max_batch >= 1, "an int >= 1"),
              ("--max-wait-ms", args.max_wait_ms, 0 <= args.max_wait_ms <= 1000, "a number in [0, 1000]"),
              ("--max-candidates", args.max_candidates, args.max_candidates >= 1, "an int >= 1"),
              ("--max-rank-rows", args.max_rank_rows, args.max_rank_rows >= 1, "an int >= 1")]
    for flag, value, ok, expected in checks:
        if not ok:
            parser.error(f"{flag}: expected {expected}, got {value}")
    return args


def main(argv=None) -> int:
    """The command line `argv` run to the end: serves until stopped (returns 0) or writes the export."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    served = pipeline.load_run(args.run)
    if args.export:
        print(f"exported to {phoenix_export.export_run(served)}", flush=True)
        return 0
    config = phoenix_server.ServerConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                         max_candidates=args.max_candidates, max_rank_rows=args.max_rank_rows,
                                         warmup=not args.no_warmup)
    return phoenix_server.serve(served, args.host, args.port, config, log=lambda m: print(m, flush=True))


def _main_reporting_serving_errors() -> None:
    try:
        sys.exit(main())
    except serving.ServingError as error:  # a run directory to fix: one line, status 2
        run_train.report(error, 2)


def cli() -> None:
    """The `phoenix-serve` console script: main() with run_train.cli's handling of user errors (one
    `error:` line, status 2)."""
    run_train.cli(_main_reporting_serving_errors)


if __name__ == "__main__":
    cli()

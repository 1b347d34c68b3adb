"""Train Phoenix end to end and report quality next to baselines.

    uv run run_train.py --data LOG.csv [flags]            # your interaction log (phoenix_pipeline.py)
    uv run run_train.py --data synthetic [flags]          # the synthetic world with planted signal
    uv run run_train.py --data movielens-100k [flags]     # MovieLens-100K, leave-one-out protocol
    uv run run_train.py --data DIR [flags]                # your own MovieLens copy (u.data / ratings.dat)
    phoenix-train --data ... [flags]                      # the same, once the package is installed

A file (CSV with a header line: user_id, item_id, timestamp, optional rating ...; column names
are flags) goes through phoenix_pipeline.py; MovieLens goes through train_movielens.py, which maps
stars to actions and then runs the same pipeline; the synthetic world has its own experiment
(train_synthetic.py). `--help` after `--data ...` lists each one's flags, what it prints and how
long it takes; this script only dispatches. Checkpoints and downloads go under
$PHOENIX_CACHE_DIR (default ~/.cache/phoenix) unless --checkpoint-dir / --cache-dir say
otherwise; a run directory holding an earlier run is refused unless --overwrite.
"""

import os
import sys


def data_source(argv) -> str:
    """The --data value of an argument list (default "synthetic")."""
    data = "synthetic"
    for i, arg in enumerate(argv):
        if arg == "--data" and i + 1 < len(argv):
            data = argv[i + 1]
        elif arg.startswith("--data="):
            data = arg.split("=", 1)[1]
    return data


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    data = data_source(argv)
    if data == "synthetic":
        import train_synthetic as experiment
    elif data == "movielens-100k" or os.path.isdir(data) or data.endswith((".whl", ".zip")):
        import train_movielens as experiment
    else:  # a log file (phoenix_pipeline says so if it is missing or not a CSV)
        import phoenix_pipeline as experiment
    return experiment.main(argv)


def cli() -> None:
    """The `phoenix-train` console script: main() without its result dict (sys.exit would print it
    and exit with status 1); bad input ends with its message and status 2 instead of a traceback."""
    import movielens
    import phoenix_pipeline

    try:
        main()
    except (movielens.RatingsFileError, phoenix_pipeline.RecipeError, FileExistsError, FileNotFoundError) as error:
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()

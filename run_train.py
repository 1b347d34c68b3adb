"""Train Phoenix end to end and report quality next to baselines.

    uv run run_train.py --data synthetic [flags]          # the synthetic world with planted signal
    uv run run_train.py --data movielens-100k [flags]     # MovieLens-100K, leave-one-out protocol
    uv run run_train.py --data DIR [flags]                # your own MovieLens copy (u.data / ratings.dat)
    phoenix-train --data ... [flags]                      # the same, once the package is installed

Each data source has its own experiment module (train_synthetic.py, train_movielens.py) holding
the recipe, the flags (`--help` after `--data ...` lists them), what it prints and how long it
takes; this script only dispatches. Checkpoints and downloads go under $PHOENIX_CACHE_DIR (default
~/.cache/phoenix) unless --checkpoint-dir / --cache-dir say otherwise.
"""

import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    data = "synthetic"
    for i, arg in enumerate(argv):
        if arg == "--data" and i + 1 < len(argv):
            data = argv[i + 1]
        elif arg.startswith("--data="):
            data = arg.split("=", 1)[1]
    if data == "synthetic":
        import train_synthetic as experiment
    else:
        import train_movielens as experiment
    return experiment.main(argv)


def cli() -> None:
    """The `phoenix-train` console script: main() without its result dict (sys.exit would print it
    and exit with status 1)."""
    main()


if __name__ == "__main__":
    main()

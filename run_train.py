"""Train Phoenix end to end and report quality next to baselines.

    uv run run_train.py --data LOG.csv [flags]            # your interaction log (phoenix_pipeline.py)
    uv run run_train.py --data synthetic [flags]          # the synthetic world with planted signal
    uv run run_train.py --data movielens-100k [flags]     # MovieLens-100K, leave-one-out protocol
    uv run run_train.py --data DIR [flags]                # your own MovieLens copy (u.data / ratings.dat)
    zcat log.csv.gz | uv run run_train.py --data - [flags]   # a log on standard input (or --data <(zcat ...))
    phoenix-train --data ... [flags]                      # the same, once the package is installed

A file (CSV with a header line: user_id, item_id, timestamp, optional rating ...; column names
are flags) goes through phoenix_pipeline.py; MovieLens goes through train_movielens.py, which maps
stars to actions and then runs the same pipeline; the synthetic world has its own experiment
(train_synthetic.py). `--help` after `--data ...` lists each one's flags, what it prints and how
long it takes; this script only dispatches. Checkpoints and downloads go under
$PHOENIX_CACHE_DIR (default ~/.cache/phoenix) unless --checkpoint-dir / --cache-dir say
otherwise; a run directory holding an earlier run is refused unless --overwrite, and no output
ever goes over an input or over what Phoenix did not write (phoenix_run_dir.py), all checked
before anything is read or trained. A user error (a bad flag, path or value) prints one
`error:` line and exits with status 2; a traceback means a bug.
"""

import os
import sys

import phoenix_stop


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


def user_errors() -> tuple:
    """The exceptions that mean bad input, a bad flag or a missing optional extra on the command line
    (a user's to fix: one `error:` line, exit status 2) rather than a bug (a traceback): our validation
    errors (RatingsFileError and LogError, RecipeError, CheckpointError, ResumeError, OutputError),
    OSError (FileNotFoundError, FileExistsError, PermissionError, ...), a missing extra, no network
    for the MovieLens download. Evaluated only when an exception is being matched (no imports else)."""
    import movielens
    import phoenix_checkpoint
    import phoenix_pipeline
    import phoenix_resume
    import phoenix_run_dir
    return (movielens.RatingsFileError, movielens.WheelUnavailableError, phoenix_pipeline.RecipeError,
            phoenix_pipeline.MissingExtraError, phoenix_checkpoint.CheckpointError, phoenix_resume.ResumeError,
            phoenix_run_dir.OutputError, OSError)


def report(error: BaseException, status: int) -> None:
    """Prints `error` as one `PROG: error: ...` line on stderr (later lines of its message indented)
    and exits with `status`."""
    first, *rest = str(error).strip().splitlines() or [type(error).__name__]
    print(f"{os.path.basename(sys.argv[0])}: error: {first}" + "".join(f"\n  {line}" for line in rest),
          file=sys.stderr)
    sys.exit(status)


@phoenix_stop.command_line  # SIGTERM / Ctrl-C: a clean stop, one line, exit 143 / 130
def cli(entry=None) -> None:
    """The `phoenix-train` console script (and `uv run run_train.py`): main() without its result dict
    (sys.exit would print it and exit with status 1); a user error (user_errors) ends with its message
    and status 2 instead of a traceback, figures that fail their own check (a dump) with status 1.
    `entry`: another main to run so (run_ranker.py's, run_retrieval.py's)."""
    try:
        (entry or main)()
    except user_errors() as error:
        report(error, 2)
    except RuntimeError as error:
        import phoenix_pipeline
        if not isinstance(error, phoenix_pipeline.DumpCheckError):
            raise
        report(error, 1)


if __name__ == "__main__":
    cli()

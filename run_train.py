"""Train Phoenix end to end and report quality next to baselines: the one training command line.

    uv run run_train.py --data LOG.csv [flags]            # your interaction log (CSV with a header line)
    zcat log.csv.gz | uv run run_train.py --data - [flags]   # a log on standard input (or --data <(zcat ...))
    uv run run_train.py --data movielens-100k [flags]     # MovieLens-100K (downloaded once), leave-one-out
    uv run run_train.py --data DIR [flags]                # your own MovieLens copy (u.data / ratings.dat / *.inter)
    uv run run_train.py --data synthetic [flags]          # the synthetic world with planted signal (the default)
    phoenix-train --data ... [flags]                      # the same, once the package is installed

`--help` lists every flag of every data path; `--data X --help` those of one. A log (columns named by
--user-col, --item-col, --time-col, optional --rating-col, --author-col and 0/1 action columns) and
MovieLens (stars mapped to actions, genres to authors: movielens.py) go through the same two-stage
pipeline (phoenix_pipeline.run_experiment): on stderr each stage's progress (step, loss, steps/s, ETA)
and validation HR@10 / NDCG@10; on stdout a markdown table of HR@10, NDCG@10, HR@50 and MRR on
validation and test for the popularity and transition baselines, retrieval alone and two-stage, then
with --dump-topk every test user's top-10 as CSV, recomputed from the file. MovieLens-100K takes a
few minutes on 2 CPU cores; a log, time proportional to its training examples. The synthetic world
(train_synthetic.py) trains a ranker and a two-tower model and reports them beside the world's
oracle and a popularity baseline (about 10 minutes at the defaults on 2 CPU cores).

Checkpoints and downloads go under $PHOENIX_CACHE_DIR (default ~/.cache/phoenix) unless
--checkpoint-dir / --cache-dir say otherwise; a run directory holding an earlier run is refused
unless --overwrite, and no output ever goes over an input or over what Phoenix did not write
(phoenix_run_dir.py), all checked before anything is read or trained; flags that do not apply to the
run are refused. A user error (a bad flag, path or value) prints one `error:` line and exits with
status 2; a traceback means a bug. SIGTERM / Ctrl-C stop cleanly (exit 143 / 130) and say what is
saved and, where the run can resume, the command that resumes it. Every data path resumes after a kill
with --checkpoint-every N and --resume, bit for bit (a log or flags that changed are refused, listed:
docs/resume.md).

Several processes (each with its devices, one mesh over all): the same command in each with
--coordinator-address HOST:PORT --num-processes N --process-id I (--data synthetic, with --data-parallel;
--shard-tables splits the hash tables' rows over every device: docs/sharding.md). With --shard-tables such a
run keeps step checkpoints (--checkpoint-every, each process writing its shards) and resumes (--resume).

This module holds every training flag and is the command-line toolkit of the other entry points
(run_ranker.py, run_retrieval.py: `cli`, `dataclass_parser`); the library below it takes dataclasses.
"""

import argparse
import contextlib
import dataclasses
import math
import os
import resource
import sys
import time
import typing
from pathlib import Path
from typing import NamedTuple, Optional, Union

import jax

import movielens as ml
import phoenix_checkpoint
import phoenix_pipeline as pipeline
import phoenix_resume
import phoenix_run_dir as run_dir
import phoenix_split
import phoenix_stop
import phoenix_two_stage as two_stage
import train_synthetic
from phoenix_log import (AUTO_COLUMN_NAMES, COLUMN_FLAGS, DEFAULT_RATING_ACTIONS, STDIN, check_log_path,
                         check_rating_actions, parse_time)
from phoenix_paths import checkpoint_path
from phoenix_protocols import PROTOCOLS, TRAIN_VAL, Protocols
from phoenix_sasrec import SasrecRecipe
from phoenix_split import DEFAULT_CUT_QUANTILE, DUPLICATE_RULES, SPLIT_PROTOCOLS, check_split_options
from train_synthetic import SyntheticRun

DATA_KINDS = ("log", "movielens", "synthetic")
USAGE = """run_train.py --data LOG.csv [flags]              train on your log (CSV, TSV, Parquet, ...; - for stdin)
       run_train.py --data movielens-100k|DIR [flags]   train on MovieLens (downloaded once) or your copy
       run_train.py [--data synthetic] [flags]          train on the synthetic world
       run_train.py --data X --help                     the flags of one of them"""
HEADINGS = {"log": "Training on your log: run_train.py --data LOG.csv",
            "movielens": "Training on MovieLens: run_train.py --data movielens-100k (or a directory of your copy)",
            "synthetic": "Training on the synthetic world: run_train.py --data synthetic"}


# ---------------------------------------------------------------------------------------------
# Flag types and flags built from dataclasses (shared with run_ranker.py and run_retrieval.py)
# ---------------------------------------------------------------------------------------------


def _optional(kind):
    """argparse type for an Optional field: "none"/"auto" -> None, else kind(value)."""
    return lambda text: None if text.lower() in ("none", "auto") else kind(text)


_BOOLEAN_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def bounded(kind, low, inclusive: bool):
    """argparse type: kind(text), refused unless finite and >= `low` (> `low` if not `inclusive`)."""
    def parse(text):
        value = kind(text)
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            expected = ("a finite number" if low == -math.inf
                        else f"{'an int' if kind is int else 'a finite number'} {'>=' if inclusive else '>'} {low}")
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def _boolean(text: str) -> bool:
    """argparse type: 1/true/yes or 0/false/no (any other word is refused, never read as False)."""
    try:
        return _BOOLEAN_WORDS[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(_BOOLEAN_WORDS)}, got {text!r}") from None


def exact_number(text: str):
    """argparse type: an int when `text` is an integer (exact, even beyond 2**53: nanosecond times), else a float."""
    try:
        return int(text)
    except ValueError:
        return float(text)


class IsoTime(int):
    """A --cut-time given as an ISO-8601 date/time: its int64 ns since the epoch, UTC (phoenix_log.parse_time, the
    unit of a date/time column), printed as given."""

    def __new__(cls, text: str):
        time = super().__new__(cls, parse_time(text))
        time.text = text
        return time

    def __getnewargs__(self):  # copies and pickles are parsed again from the text
        return (self.text,)

    def __repr__(self):
        return self.text

    __str__ = __repr__


def cut_time_value(text: str):
    """argparse type of --cut-time: a number (exact_number) or an ISO-8601 date/time (IsoTime)."""
    try:
        return exact_number(text)
    except ValueError:
        pass
    try:
        return IsoTime(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (the log's time unit) or an ISO-8601 date/time "
                                         f"(2024-05-01, 2024-05-01T12:00:00Z), got {text!r}") from None


def log_cut_time(cut_time, log):
    """The cut to compare with log.timestamp: an ISO-8601 cut needs a date/time column."""
    if isinstance(cut_time, IsoTime) and not log.datetimes:
        raise pipeline.LogError(f"--cut-time {cut_time.text}: {log.source}'s time column holds numbers, not dates or "
                                "times: give the cut as a number in the same unit")
    return cut_time


def parse_seeds(text: str) -> tuple:
    """"0,1,2" -> (0, 1, 2): distinct non-negative ints."""
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: expected comma-separated integers such as 0,1,2, got "
                                         f"{text!r}") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds: expected distinct non-negative integers, got {text!r}")
    return seeds


def parse_rating_actions(text: str) -> dict:
    """"favorite_score=4:5,not_interested_score=:2" -> {action: (low, high)}; an empty bound is open."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, bounds = part.partition("=")
        low, sep, high = bounds.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"--rating-actions: expected ACTION=LOW:HIGH, got {part!r}")
        try:
            out[name.strip()] = (float(low) if low.strip() else -math.inf, float(high) if high.strip() else math.inf)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--rating-actions: expected numbers in {part!r}") from None
    try:
        return check_rating_actions(out)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def dataclass_flags(parser, cls, defaults=None, bounds: Optional[dict] = None, help_prefix: Optional[str] = None):
    """One flag per field of dataclass `cls` (--field-name), defaulting to `defaults`' value (default cls()'s
    field defaults): bools take 1/true/yes or 0/false/no (or are switches when the default is False and
    no prefix asks for values), Optional fields take "none"; `bounds` {field: (lowest, allowed)} (else a
    field's metadata "low") refuse values out of range at the flag. Help: the field's metadata "help", or "<help_prefix>.<field>, default X"."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        default = getattr(defaults, field.name) if defaults is not None else field.default
        kind = next((t for t in typing.get_args(hints[field.name]) if t is not type(None)), hints[field.name])
        text = field.metadata.get("help") or (f"{help_prefix}.{field.name}, default {default}" if help_prefix else None)
        if kind is bool and help_prefix is None and default is False:
            parser.add_argument(_flag(field.name), action="store_true", help=text)
            continue
        if bounds and field.name in bounds:
            kind = bounded(kind, *bounds[field.name])
        elif field.metadata.get("low") is not None:  # the field's own lowest value (phoenix_demos' options)
            kind = bounded(kind, field.metadata["low"], True)
        if kind is bool:
            kind = _boolean
        optional = type(None) in typing.get_args(hints[field.name])  # takes "none" whatever its default
        parser.add_argument(_flag(field.name), type=_optional(kind) if optional else kind, default=default,
                            help=text)


def dataclass_parser(cls, doc: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """A parser whose flags are the fields of dataclass `cls` (dataclass_flags), described by `doc`'s first
    paragraph."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    dataclass_flags(parser, cls)
    return parser


def parse_dataclass(cls, doc: str, argv):
    """The command line `argv` as a `cls` (dataclass_parser's flags); values the dataclass refuses together
    (ValueError: each flag alone was checked by argparse) end in argparse's one-line error, status 2."""
    parser = dataclass_parser(cls, doc)
    try:
        return cls(**vars(parser.parse_args(argv)))
    except ValueError as error:
        parser.error(str(error))


class _Given(argparse.Namespace):
    """A namespace in which argparse sets only the flags given (it fills in defaults only where an
    attribute is missing, and this one has them all)."""

    def __getattr__(self, name):
        if name.startswith("_"):  # argparse's own attributes; no flag's destination starts so
            raise AttributeError(name)
        return None


def given_flags(parser: argparse.ArgumentParser, argv) -> set:
    """The destinations of the flags that `argv` gives explicitly (defaults left out), abbreviations included."""
    return set(vars(parser.parse_args(argv, _Given())))


# ---------------------------------------------------------------------------------------------
# The flags of each data path
# ---------------------------------------------------------------------------------------------


# Command-line bounds of Recipe fields ({name: (lowest value, whether it is allowed)}): a value out
# of range is refused by argparse, naming the flag, before anything is read (floats must be finite too).
RECIPE_FLAG_BOUNDS = {
    **{name: (1, True) for name in ("emb_size", "num_layers", "num_heads", "history_len", "ranker_history_len",
                                    "retrieval_batch_size", "ranker_batch_size", "negative_pool", "retrieve_k",
                                    "num_hashes", "evals_per_stage", "retrieval_members", "ranker_members")},
    **{name: (2, True) for name in ("user_table_size", "post_table_size", "author_table_size")},
    **{name: (0, True) for name in ("warmup_steps", "hard_negatives", "random_negatives", "ranker_listwise_weight")},
    **{name: (0, False) for name in ("retrieval_epochs", "ranker_epochs", "learning_rate", "temperature",
                                     "table_init_stddev")},
    **{name: (-math.inf, False) for name in ("retrieval_weight", "popularity_weight")},  # any finite number
    "patience": (0, True), "time_budget": (0, False),
}


def add_run_flags(parser: argparse.ArgumentParser, default_checkpoint_dir, defaults: pipeline.Recipe) -> None:
    """The flags of a two-stage run (a log or MovieLens): where it goes (phoenix_pipeline.RunOptions), the
    protocols beside val-select (phoenix_protocols.Protocols) and one flag per Recipe field, each defaulting
    to `defaults`' value."""
    add_distributed_flags(parser)
    parser.add_argument("--seed", type=bounded(int, 0, True), default=0, help="parameters, batch streams, negatives")
    parser.add_argument("--checkpoint-dir", default=default_checkpoint_dir,
                        help="the run directory: retrieval/, ranker/ (and retrieval.1/, ranker.1/, ... with "
                             "--retrieval-members / --ranker-members), metrics.jsonl (default: "
                             "$PHOENIX_CACHE_DIR/checkpoints/<data name>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in --checkpoint-dir (only what Phoenix wrote there: anything "
                             "else at the paths a run writes is refused) and an existing --dump-topk file")
    parser.add_argument("--dump-topk", default=None, metavar="PATH",
                        help="write every test user's final top-10 (original ids) as CSV and re-check it (a new "
                             "file unless --overwrite; never an input of the run)")
    parser.add_argument("--plot", action="store_true",
                        help=f"write {pipeline.PLOT_FILE} (training loss, validation curves) to the run directory "
                             "(matplotlib)")
    parser.add_argument("--dry-run", action="store_true",
                        help="read, validate and split the data with every flag that shapes the split, check the "
                             "recipe and outputs, print a summary (rows, users, items, repeats, time range, users "
                             "per split, training examples, seconds per phase, peak memory) and exit 0: no "
                             "training, nothing written")
    parser.add_argument("--data-parallel", action="store_true",
                        help="split each training batch over all devices JAX finds (batch sizes must divide evenly)")
    parser.add_argument("--shard-tables", action="store_true",
                        help="with --data-parallel: split each hash table's rows over the devices (docs/sharding.md)")
    group = parser.add_argument_group("preemption (docs/resume.md)")
    group.add_argument("--checkpoint-every", type=bounded(int, 0, True), default=0, metavar="N",
                       help="save each stage's training state every N steps under <checkpoint-dir>/steps (0: off)")
    group.add_argument("--keep-checkpoints", type=bounded(int, 1, True),
                       default=phoenix_resume.DEFAULT_KEEP_CHECKPOINTS, metavar="K",
                       help="step checkpoints kept per stage (the newest K)")
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --checkpoint-dir where it stopped, the same log and flags (what "
                            "differs is refused before training); a fresh start if it has none")
    group = parser.add_argument_group("protocols beside val-select (phoenix_protocols.py)")
    group.add_argument("--protocol", choices=PROTOCOLS, default="val-select",
                       help="val-select: train only, best checkpoints by validation (always run); train+val: also "
                            f"retrain on train + validation targets for the steps validation chose, rows {TRAIN_VAL!r}")
    group.add_argument("--sasrec", action="store_true",
                       help="add the SASRec-style reference rows (phoenix_sasrec.py; full softmax over all items)")
    group.add_argument("--sasrec-epochs", type=float, default=SasrecRecipe.epochs)
    group.add_argument("--sasrec-history-len", type=int, default=SasrecRecipe.history_len)
    group.add_argument("--sasrec-dropout", type=float, default=SasrecRecipe.dropout)
    group.add_argument("--sasrec-train-val", action="store_true",
                       help=f"with --protocol train+val, retrain the sasrec reference too (row {TRAIN_VAL!r})")
    group = parser.add_argument_group("recipe (phoenix_two_stage.Recipe; docs/recipes.md says why)")
    named = next(name for name, recipe in pipeline.RECIPES.items() if recipe == defaults)
    group.add_argument("--recipe", choices=tuple(pipeline.RECIPES), default=named,
                       help=f"a named recipe (phoenix_two_stage.RECIPES; default {named}); the flags below given "
                            "beside it replace its fields (their defaults shown here are this data path's recipe)")
    dataclass_flags(group, pipeline.Recipe, defaults, RECIPE_FLAG_BOUNDS, help_prefix="Recipe")


def check_run_flags(args, given: set, error) -> None:
    """error(message) for flags `argv` gives that this run would ignore or cannot use (shared by the log
    and MovieLens command lines): --sasrec-* without --sasrec, --sasrec-train-val without --protocol
    train+val, --retrieve-k below the dumped and evaluated cut-off (FINAL_K) with --dump-topk, an
    --emb-size that --num-heads does not divide."""
    if args.shard_tables and not args.data_parallel:
        error("--shard-tables: splits the tables over the data-parallel devices; add --data-parallel")
    if args.emb_size % args.num_heads:
        error(f"--emb-size {args.emb_size}: expected a multiple of --num-heads {args.num_heads} (each head gets "
              "emb_size / num_heads dimensions)")
    for name in ("sasrec_epochs", "sasrec_history_len", "sasrec_dropout", "sasrec_train_val"):
        if name in given and not args.sasrec:
            error(f"--{name.replace('_', '-')}: applies to the SASRec reference only; add --sasrec")
    if "sasrec_train_val" in given and args.protocol != "train+val":
        error(f"--sasrec-train-val: applies to --protocol train+val only, got --protocol {args.protocol}")
    if args.overwrite and args.resume:
        error("--overwrite and --resume: --resume continues the run in --checkpoint-dir, --overwrite replaces it; "
              "give one")
    if "keep_checkpoints" in given and not (args.checkpoint_every or args.resume):
        error("--keep-checkpoints: applies to step checkpoints only; add --checkpoint-every N")
    if args.dump_topk and args.retrieve_k is not None and args.retrieve_k < pipeline.FINAL_K:
        error(f"--retrieve-k {args.retrieve_k}: with --dump-topk, expected at least {pipeline.FINAL_K} (the dump holds "
              f"each user's top {pipeline.FINAL_K} and the table's HR@{pipeline.FINAL_K} is checked against it)")


def default_run_name(data: str) -> str:
    """The run directory's name for --data LOG: the log's stem; "stdin" for "-", "pipe" for a FIFO
    (`<(zcat log.csv.gz)` is /dev/fd/63, a name that says nothing)."""
    if data == STDIN:
        return "stdin"
    if run_dir.path_kind(data) == "a FIFO":
        return "pipe"
    return Path(data).stem or "log"


class Distributed(NamedTuple):
    """jax.distributed.initialize's arguments (--coordinator-address, --num-processes, --process-id)."""

    coordinator_address: str  # HOST:PORT of process 0's coordinator service
    num_processes: int
    process_id: int


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """One process of a multi-process run (docs/sharding.md): each process runs the same command with its
    own --process-id; the devices of all processes form one mesh (with --data-parallel)."""
    group = parser.add_argument_group("multi-process training (docs/sharding.md)")
    group.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                       help="process 0's address, the same in every process (jax.distributed.initialize)")
    group.add_argument("--num-processes", type=bounded(int, 1, True), default=None, metavar="N",
                       help="processes in the run, with --coordinator-address")
    group.add_argument("--process-id", type=bounded(int, 0, True), default=None, metavar="I",
                       help="this process, 0 .. N-1, with --coordinator-address")


def distributed_args(args, kind: str, error) -> Optional[Distributed]:
    """The multi-process flags as Distributed (None without them); `error` (the parser's) for a partial
    or contradictory set."""
    names = ("coordinator_address", "num_processes", "process_id")
    given = [n for n in names if getattr(args, n) is not None]
    if not given:
        return None
    if len(given) != len(names):
        missing = ", ".join(_flag(n) for n in names if n not in given)
        error(f"{', '.join(_flag(n) for n in given)}: a multi-process run needs all three of --coordinator-address, "
              f"--num-processes and --process-id; missing {missing}")
    host, _, port = args.coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        error(f"--coordinator-address: expected HOST:PORT with a port in 1..65535, got {args.coordinator_address!r}")
    if args.process_id >= args.num_processes:
        error(f"--process-id: expected 0 .. {args.num_processes - 1} (--num-processes {args.num_processes}), "
              f"got {args.process_id}")
    if args.num_processes > 1:
        if kind != "synthetic":
            error(f"--num-processes {args.num_processes}: multi-process runs are supported on --data synthetic only "
                  f"so far, got --data {args.data} (a log run's time budget, early stopping and run directory are "
                  "decided and written in each process: docs/sharding.md, Not done)")
        if not args.data_parallel:
            error(f"--num-processes {args.num_processes}: add --data-parallel (the batch is split over every "
                  "process's devices)")
        if (args.checkpoint_every or args.resume) and not args.shard_tables:
            error(f"--num-processes {args.num_processes}: step checkpoints and --resume of a multi-process run need "
                  "--shard-tables (its step checkpoints are sharded ones, each process writing its devices' rows); "
                  "with replicated tables they are single-process only so far: add --shard-tables, or drop "
                  "--checkpoint-every / --resume")
    return Distributed(args.coordinator_address, args.num_processes, args.process_id)


def initialize_distributed(distributed: Distributed) -> None:
    """jax.distributed.initialize for this process, CPU collectives through gloo (before any JAX work)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=distributed.coordinator_address,
                               num_processes=distributed.num_processes, process_id=distributed.process_id)


def log_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=HEADINGS["log"])
    parser.add_argument("--data", required=True, metavar="LOG.csv",
                        help="the interaction log: CSV / TSV with a header (gzip, zstd, bz2, xz too), Parquet or "
                             "Arrow / Feather; a file, a pipe (<(zcat log.csv.gz)) or - (stdin)")
    group = parser.add_argument_group("the log (phoenix_log.py, phoenix_split.py)")
    for role, flag in COLUMN_FLAGS.items():
        default = getattr(pipeline.Columns(), role)
        group.add_argument(flag, default=default,
                           help=f"{role} column (default {default or AUTO_COLUMN_NAMES[role] + ' if present'})")
    group.add_argument("--delimiter", default=None, help="a CSV's field separator (\\t or tab for TSV; default: a tab "
                                                         "for .tsv / .tab, else sniffed from the header)")
    group.add_argument("--rating-actions", type=parse_rating_actions, default=DEFAULT_RATING_ACTIONS,
                       metavar="ACTION=LOW:HIGH,...",
                       help="actions a rating sets (inclusive ranges, an empty bound is open); default "
                            "click_score=:,favorite_score=4:,share_score=5:,not_interested_score=:2")
    group.add_argument("--duplicates", choices=DUPLICATE_RULES, default="first",
                       help="a repeated (user, item): first keeps the earliest (default), error refuses the log, "
                            "keep keeps repeats as history events (targets are first-time interactions only: "
                            "phoenix_split.py)")
    group.add_argument("--split", choices=SPLIT_PROTOCOLS, default="leave-one-out")
    group.add_argument("--cut-time", type=cut_time_value, default=None,
                       help="time split: the cut T (same unit as the log; for a date/time column an ISO-8601 time "
                            "such as 2024-05-01T00:00:00Z, naive = UTC)")
    group.add_argument("--cut-quantile", type=float, default=None,
                       help=f"time split: the cut at this quantile of all timestamps (default {DEFAULT_CUT_QUANTILE})")
    add_run_flags(parser, None, pipeline.LOG_RECIPE)
    return parser


def movielens_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=HEADINGS["movielens"])
    parser.add_argument("--data", default=ml.SOURCE_ML100K, help=f"{ml.SOURCE_ML100K!r} or a directory")
    parser.add_argument("--cache-dir", default=None, help="download cache (movielens.py)")
    parser.add_argument("--seeds", type=parse_seeds, default=None, metavar="0,1,2",
                        help="run each seed in turn (instead of --seed): checkpoints in DIR/seed<N>, dumps in "
                             "PATH with .seed<N> before its suffix, then the per-seed table and mean +- sd")
    add_run_flags(parser, checkpoint_path("movielens"), pipeline.MOVIELENS_RECIPE)
    return parser


SYNTHETIC_HELP = {
    "seed": "parameter init, batch streams, evaluation examples",
    "checkpoint_dir": "where ranker/ and retrieval/ are saved (default: under $PHOENIX_CACHE_DIR); one holding an "
                      "earlier run is refused unless --overwrite or --resume",
    "overwrite": "replace the earlier run in --checkpoint-dir (what Phoenix wrote there only; anything else at "
                 "ranker/, retrieval/, steps/ is refused)",
    "only": "train one model only",
    "checkpoint_every": "save the training state every N steps under <checkpoint-dir>/steps (0: off)",
    "keep_checkpoints": "step checkpoints kept per model (the newest K)",
    "resume": "continue the run in --checkpoint-dir where it stopped (a fresh start if it has none)",
    "batch_size": "ranker users per step",
    "retrieval_batch_size": "retrieval softmax rows per step",
    "data_parallel": "split each batch over all devices JAX finds (batch sizes must divide evenly)",
    "shard_tables": "with --data-parallel: split each hash table's rows over the devices (docs/sharding.md)",
    "user_id_dropout": "share of training rows whose user id is replaced by the unknown user",
    "eval_repeats": "evaluation examples per held-out user",
    "eval_every": "ranker learning curve every N steps (0: off)",
}
# SyntheticRun's fields by argument group (the first group's fields are the general ones).
SYNTHETIC_GROUPS = {
    "preemption (train_synthetic.py: resuming)": ("checkpoint_every", "keep_checkpoints", "resume"),
    "world (phoenix_synthetic.py)": ("world_seed", "num_users", "num_posts", "num_authors", "history_len",
                                     "min_history_len", "num_candidates", "impression_temperature"),
    "model": ("emb_size", "num_layers", "num_heads", "key_size", "widening_factor", "user_table_size",
              "post_table_size", "author_table_size", "table_init_stddev"),
    "optimisation and evaluation": ("batch_size", "retrieval_batch_size", "learning_rate", "data_parallel",
                                    "shard_tables", "temperature", "user_id_dropout", "eval_repeats",
                                    "eval_every", "log_every"),
}
SYNTHETIC_METAVARS = {"checkpoint_every": "N", "keep_checkpoints": "K"}


def synthetic_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_train.py --data synthetic", description=HEADINGS["synthetic"])
    parser.add_argument("--data", default="synthetic", choices=("synthetic",), help="this data path")
    defaults = SyntheticRun()
    grouped = {name for names in SYNTHETIC_GROUPS.values() for name in names}
    groups = {name: parser.add_argument_group(title) for title, names in SYNTHETIC_GROUPS.items() for name in names}
    for field in dataclasses.fields(SyntheticRun):
        target = groups[field.name] if field.name in grouped else parser
        default = getattr(defaults, field.name)
        text = SYNTHETIC_HELP.get(field.name)
        if field.name == "only":
            target.add_argument("--only", choices=train_synthetic.PHASES, default=None, help=text)
        elif isinstance(default, bool):
            target.add_argument(_flag(field.name), action="store_true", help=text)
        else:
            target.add_argument(_flag(field.name), type=type(default), default=default, help=text,
                                metavar=SYNTHETIC_METAVARS.get(field.name))
    add_distributed_flags(parser)
    return parser


PARSERS = {"log": log_parser, "movielens": movielens_parser, "synthetic": synthetic_parser}


# ---------------------------------------------------------------------------------------------
# The command line as the library's dataclasses
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LogSource:
    """Where a log comes from and how it is read and split (the log path's flags)."""

    path: str
    columns: pipeline.Columns
    rating_actions: dict
    rating_actions_given: bool  # --rating-actions given: the log must have a rating column
    delimiter: Optional[str]  # None: by the file's name or sniffed (phoenix_log.read_log)
    duplicates: str
    split: str
    cut_time: Optional[float]  # an IsoTime for an ISO-8601 --cut-time
    cut_quantile: Optional[float]


@dataclasses.dataclass(frozen=True)
class MovieLensSource:
    data: str  # ml.SOURCE_ML100K, a recbole wheel or a directory
    cache_dir: Optional[str]  # the download cache (SOURCE_ML100K only)


class Command(NamedTuple):
    """A parsed command line: the data path, its source, and what the library is called with."""

    kind: str  # DATA_KINDS
    source: Optional[Union[LogSource, MovieLensSource]]  # None for the synthetic world
    run: Union[pipeline.RunOptions, SyntheticRun]
    recipe: Optional[pipeline.Recipe] = None
    protocols: Optional[Protocols] = None
    dry_run: bool = False  # --dry-run: read, validate, split, summarise; no training, nothing written
    distributed: Optional[Distributed] = None  # one process of a multi-process run


def data_kind(data: str) -> str:
    """The data path of a --data value: "synthetic", "movielens" (movielens-100k, a directory, a
    recbole wheel) or "log" (anything else: a file, a pipe, - for standard input)."""
    if data == "synthetic":
        return "synthetic"
    if data == ml.SOURCE_ML100K or os.path.isdir(data) or data.endswith((".whl", ".zip")):
        return "movielens"
    return "log"


def data_flag(argv) -> Optional[str]:
    """The --data value of an argument list (exactly --data X or --data=X; the last one wins), or None."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--data")
    return pre.parse_known_args(argv)[0].data


def print_help(file=None) -> None:
    """Every way to train, with every flag of each (the data-aware `--help`)."""
    file = sys.stdout if file is None else file
    print(f"usage: {USAGE}\n\n{__doc__.split(chr(10) * 2)[0]}\n", file=file)
    for kind in DATA_KINDS:  # each path's own usage line is left out: the lines above say it
        print(f"{'=' * 100}\n" + PARSERS[kind]().format_help().split("\n\n", 1)[1], file=file)


def _recipe_protocols_options(args, parser, given: set, checkpoint_dir: str, flags: Optional[dict] = None) -> tuple:
    """(Recipe, Protocols, RunOptions) of a two-stage run's flags; `flags`: the data flags that shape
    the run (RunOptions.flags, compared on --resume)."""
    check_run_flags(args, given, parser.error)
    recipe = dataclasses.replace(pipeline.RECIPES[args.recipe], **{f.name: getattr(args, f.name)
                                                                   for f in dataclasses.fields(pipeline.Recipe)
                                                                   if f.name in given})
    sasrec = (SasrecRecipe(epochs=args.sasrec_epochs, history_len=args.sasrec_history_len, dropout=args.sasrec_dropout)
              if args.sasrec else None)
    protocols = Protocols(args.protocol, sasrec, args.sasrec_train_val)
    options = pipeline.RunOptions(checkpoint_dir=checkpoint_dir, seed=args.seed, seeds=getattr(args, "seeds", None),
                                  overwrite=args.overwrite, plot=args.plot, data_parallel=args.data_parallel,
                                  shard_tables=args.shard_tables,
                                  dump_topk=args.dump_topk, checkpoint_every=args.checkpoint_every,
                                  keep_checkpoints=args.keep_checkpoints, resume=args.resume, flags=flags)
    return recipe, protocols, options


def parse_args(argv) -> Command:
    """The command line `argv` as a Command; argparse's error (one line, exit status 2) for a flag that is
    bad, does not apply to its data path or clashes with another. `--help` without --data: print_help."""
    argv = list(argv)
    data = data_flag(argv)
    if data is None and any(arg in ("-h", "--help") for arg in argv):
        print_help()
        sys.exit(0)
    kind = data_kind("synthetic" if data is None else data)
    parser = PARSERS[kind]()
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    distributed = distributed_args(args, kind, parser.error)
    if kind == "synthetic":
        return Command(kind, None, _synthetic_run(args, given, parser), distributed=distributed)
    if kind == "movielens":
        if args.seeds and "seed" in given:
            parser.error(f"--seed {args.seed}: --seeds {','.join(map(str, args.seeds))} runs its own seeds; give one "
                         "of them")
        if "cache_dir" in given and args.data != ml.SOURCE_ML100K:
            parser.error(f"--cache-dir: applies to --data {ml.SOURCE_ML100K} (its download) only, got --data "
                         f"{args.data}")
        recipe, protocols, options = _recipe_protocols_options(args, parser, given, args.checkpoint_dir)
        return Command(kind, MovieLensSource(args.data, args.cache_dir), options, recipe, protocols, args.dry_run,
                       distributed)
    for name in ("cut_time", "cut_quantile"):
        if name in given and args.split != "time":
            parser.error(f"--{name.replace('_', '-')}: applies to --split time only, got --split {args.split}")
    if args.cut_time is not None and args.cut_quantile is not None:
        parser.error(f"--cut-time {args.cut_time} and --cut-quantile {args.cut_quantile}: give one of them (the cut)")
    try:
        check_split_options(args.split, args.cut_time, args.cut_quantile)
    except ValueError as error:
        parser.error("--" + str(error).replace("_", "-", 1))
    checkpoint_dir = args.checkpoint_dir or checkpoint_path(default_run_name(args.data))
    columns = pipeline.Columns(user=args.user_col, item=args.item_col, time=args.time_col, rating=args.rating_col,
                               author=args.author_col)
    recipe, protocols, options = _recipe_protocols_options(args, parser, given, checkpoint_dir,
                                                           log_flags(args, columns))
    source = LogSource(args.data, columns, args.rating_actions, "rating_actions" in given,
                       "\t" if args.delimiter in ("\\t", "tab") else args.delimiter, args.duplicates, args.split,
                       args.cut_time, args.cut_quantile)
    return Command(kind, source, options, recipe, protocols, args.dry_run, distributed)


# Log flags left out of a run's configuration: where the log is and how its fields are separated do not
# shape the results (the log's content does: phoenix_pipeline.fingerprint).
NOT_SHAPING_LOG_FLAGS = ("data", "delimiter")


def log_flags(args, columns: pipeline.Columns) -> dict:
    """The log path's flags that shape a run (RunOptions.flags, compared on --resume): columns, rating
    actions, duplicates and split (NOT_SHAPING_LOG_FLAGS aside)."""
    return {"columns": dataclasses.asdict(columns),
            "rating_actions": {name: [repr(float(v)) for v in bounds] for name, bounds in args.rating_actions.items()},
            "duplicates": args.duplicates, "split": args.split, "cut_time": args.cut_time,
            "cut_quantile": args.cut_quantile}


def _synthetic_run(args, given: set, parser) -> SyntheticRun:
    """The synthetic path's flags as a SyntheticRun, after refusing values and flags it cannot use."""
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticRun)}
    if args.checkpoint_every < 0:
        parser.error(f"--checkpoint-every: expected an int >= 0 (0: off), got {args.checkpoint_every}")
    if args.keep_checkpoints < 1:
        parser.error(f"--keep-checkpoints: expected an int >= 1 (the newest is always kept), got "
                     f"{args.keep_checkpoints}")
    for name, value in fields.items():
        if (problem := train_synthetic.out_of_bounds(name, value)) is not None:
            parser.error(f"{_flag(name)}: {problem}")
    if args.user_id_dropout > 1:
        parser.error(f"--user-id-dropout: expected a share in [0, 1], got {args.user_id_dropout}")
    if args.min_history_len > args.history_len:
        parser.error(f"--min-history-len {args.min_history_len}: expected <= --history-len {args.history_len}")
    if args.overwrite and args.resume:
        parser.error("--overwrite and --resume: --resume continues the run in --checkpoint-dir, --overwrite replaces "
                     "it; give one")
    if args.shard_tables and not args.data_parallel:
        parser.error("--shard-tables: splits the tables over the data-parallel devices; add --data-parallel")
    if "keep_checkpoints" in given and not (args.checkpoint_every or args.resume):
        parser.error("--keep-checkpoints: applies to step checkpoints only; add --checkpoint-every N")
    if args.only is not None:
        other = "retrieval" if args.only == "ranker" else "ranker"
        for name in sorted(train_synthetic.PHASE_FLAGS[other] & given):
            parser.error(f"--{name.replace('_', '-')}: applies to the {other} only, which --only {args.only} does not "
                         "train")
    return SyntheticRun(**fields)


# ---------------------------------------------------------------------------------------------
# Running a command
# ---------------------------------------------------------------------------------------------


def movielens_inputs(source: MovieLensSource) -> list:
    """What a MovieLens run reads (phoenix_run_dir.Input): the ratings (a directory or archive; for
    SOURCE_ML100K the wheel in the cache) and the download cache."""
    if str(source.data) != ml.SOURCE_ML100K:
        return [run_dir.Input("--data", str(source.data))]
    cache = ml.cache_dir(source.cache_dir)
    return [run_dir.Input("--data", str(cache / ml.WHEEL_FILE)), run_dir.Input("--cache-dir", str(cache), "cache")]


class _Phases:
    """Wall seconds of the named phases of a run, in order (`with phases("read"): ...`)."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (getrusage's ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


def dry_run(split, recipe: pipeline.Recipe, options: pipeline.RunOptions, phases: _Phases, stream=None) -> dict:
    """--dry-run after the split: the recipe resolved and checked on it (what training would refuse), the
    retrieval stage's first-epoch windows built, then the summary printed on `stream` (default stdout).
    Writes nothing. Returns {"summary": {name: text}, "seconds": {phase: s}, "peak_rss_mib"}."""
    with phases("recipe and examples"):
        resolved = two_stage.resolve_recipe(recipe, split)
        two_stage.check_recipe(split, resolved)
        pipeline.check_dump_k(options, recipe, split)
        windows = len(two_stage.training_windows(split, resolved.history_len)[0])
    summary = phoenix_split.summary(split)
    summary["training examples"] += (f" (ranker); {windows:,} retrieval windows of up to {resolved.history_len + 1} "
                                     "items per epoch")
    summary["seconds"] = ", ".join(f"{name} {s:.1f}" for name, s in phases.seconds.items()) + (
        f"; {sum(phases.seconds.values()):.1f} in all")
    summary["peak memory"] = f"{peak_rss_mib():,.0f} MiB (resident, getrusage)"
    stream = sys.stdout if stream is None else stream
    width = max(map(len, summary))
    print(f"dry run: {split.log.source} read, validated and split; nothing trained or written", file=stream)
    for name, text in summary.items():
        print(f"  {name + ':':<{width + 1}} {text}", file=stream)
    return {"summary": summary, "seconds": dict(phases.seconds), "peak_rss_mib": peak_rss_mib()}


def train_log(command: Command) -> dict:
    """A log through the pipeline: every check of the command line (the log's path, outputs never over it,
    the run directory, the plot extra) before the log is read. --dry-run: up to the split (dry_run)."""
    source = command.source
    check_log_path(source.path)
    pipeline.check_run_outputs(command.run, command.protocols, [run_dir.Input("--data", source.path)])
    phases = _Phases()
    with phases("read and validate"):
        log = pipeline.read_log(source.path, source.columns, source.rating_actions, delimiter=source.delimiter)
    if source.rating_actions_given and log.rating is None:
        raise pipeline.RecipeError(f"--rating-actions: {log.source} has no rating column for it to apply to (name it "
                                   "with --rating-col)")
    with phases("split"):
        split = pipeline.split_log(log, source.split, source.duplicates, log_cut_time(source.cut_time, log),
                                   source.cut_quantile)
    if command.dry_run:
        return dry_run(split, command.recipe, command.run, phases)
    return pipeline.run_experiment(split, command.recipe, dataclasses.replace(command.run, columns=source.columns),
                                   command.protocols)


def train_movielens(command: Command) -> dict:
    """MovieLens through the pipeline; each dump is recomputed from the raw files (movielens.recompute_from_dump)."""
    source = command.source
    if str(source.data) != ml.SOURCE_ML100K and not os.path.exists(source.data):
        raise FileNotFoundError(f"--data {source.data}: no such directory or archive (expected {ml.SOURCE_ML100K!r}, "
                                "a recbole wheel, or a directory with *.inter, u.data or ratings.dat)")
    pipeline.check_run_outputs(command.run, command.protocols, movielens_inputs(source))
    phases = _Phases()
    with phases("read and validate"):
        ratings = ml.load_ratings(source.data, source.cache_dir)
    with phases("split"):
        split = ml.movielens_split(ratings)
    if command.dry_run:
        return dry_run(split, command.recipe, command.run, phases)
    return pipeline.run_experiment(
        split, command.recipe, command.run, command.protocols, title=f"MovieLens ({ratings.source}), leave-one-out",
        check=lambda path: ml.recompute_from_dump(path, source.data, source.cache_dir, k=pipeline.FINAL_K))


def describe_stop(stop: phoenix_stop.TrainingStopped, options: pipeline.RunOptions, argv: list) -> None:
    """Fills in a clean stop's line for a log or MovieLens run: with step checkpoints (--checkpoint-every or
    --resume), the command that resumes it, `argv` with --resume (without --overwrite, which would start
    afresh); without them, the same command when a stage was saved (--resume reads finished stages back
    and starts the stopped one over). The stages already saved are listed by phoenix_pipeline."""
    kept = [a for a in argv if not (a.startswith("--ov") and "--overwrite".startswith(a))]
    if options.checkpoint_every or options.resume:
        stop.resume_argv = kept if options.resume else [*kept, "--resume"]
    elif stop.kept:  # stages saved before the stop: --resume reads them back, the stopped one starts over
        stop.resume_argv = [*kept, "--resume"]
        stop.why_not = "the stopped stage starts over: it kept no step checkpoints, --checkpoint-every is off"


def main(argv=None) -> dict:
    """The command line `argv` (default sys.argv[1:]) run to the end; returns the run's figures."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command = parse_args(argv)
        if command.distributed is not None:
            initialize_distributed(command.distributed)
    except phoenix_stop.TrainingStopped as stop:  # nothing written yet: the same command starts it again
        stop.resume_argv, stop.why_not = argv, "stopped before the run began"
        raise
    if command.kind == "synthetic":
        return train_synthetic.run(command.run, argv)
    try:
        return train_log(command) if command.kind == "log" else train_movielens(command)
    except phoenix_stop.TrainingStopped as stop:
        describe_stop(stop, command.run, argv)
        raise


def user_errors() -> tuple:
    """The exceptions that mean bad input, a bad flag or a missing optional extra on the command line
    (a user's to fix: one `error:` line, exit status 2) rather than a bug (a traceback): our validation
    errors (LogError and the adapters' RatingsFileError, RecipeError, CheckpointError, ResumeError,
    OutputError), OSError (FileNotFoundError, FileExistsError, PermissionError, ...), a missing extra,
    no network for the MovieLens download."""
    return (pipeline.LogError, ml.WheelUnavailableError, pipeline.RecipeError, pipeline.MissingExtraError,
            phoenix_checkpoint.CheckpointError, phoenix_resume.ResumeError, run_dir.OutputError, OSError)


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
    except BrokenPipeError:  # stdout closed by its reader (`--help | head`): not an error of the user's input
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exiting flushes nowhere, silently
        sys.exit(141)  # 128 + SIGPIPE, as a shell reports a pipeline writer stopped so
    except user_errors() as error:
        report(error, 2)
    except pipeline.DumpCheckError as error:
        report(error, 1)


if __name__ == "__main__":
    cli()

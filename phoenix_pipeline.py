"""Train Phoenix on your own interaction log: a CSV (or a dict of arrays) in, evaluated checkpoints out.

    uv run run_train.py --data LOG.csv [--user-col U --item-col I --time-col T --rating-col R]
                        [--dump-topk top10.csv] [--plot] [--overwrite] [--checkpoint-dir DIR]
                        [--split time --cut-quantile 0.9]   # every Recipe field is a flag too

    import phoenix_pipeline as pipeline
    log = pipeline.read_csv("log.csv")               # or pipeline.from_arrays({"user_id": ..., ...})
    split = pipeline.split_log(log)                  # chronological leave-one-out
    result = pipeline.run(split, pipeline.Recipe(), "runs/mine")   # both stages, best checkpoints, table
    pipeline.recommend(result, split, "u17")         # retrieve + re-rank for one user

Prints on stderr each stage's progress (phoenix_training.fit: step, loss, steps/s, ETA) and its
validation HR@10 / NDCG@10; on stdout a markdown table of HR@10, NDCG@10, HR@50 and MRR on
validation and test for the popularity and transition baselines (movielens.py's code), retrieval
alone and two-stage; with --dump-topk, every test user's top-10 (original ids) as CSV and
check_dump's HR@10 / NDCG@10 of that file. Time grows with the number of training examples.
train_movielens.py gives the measurements behind the recipe and runs MovieLens through this module.

Measured: MovieLens-100K as a plain CSV (examples/movielens_csv.py: ids renamed, rows shuffled,
so no genres and same-second ratings in random order), `uv run run_train.py --data ml100k.csv
--dump-topk top10.csv --plot`, seed 0, 2 CPU cores shared with other jobs (load average 4.0-7.0,
median 5.0): 9 min 06 s wall (retrieval 116 s, mining 11 s, ranker 403 s, evaluation 6 s).
  | split | model | HR@10 | NDCG@10 | HR@50 | MRR |
  |---|---|---:|---:|---:|---:|
  | val | popularity | 0.0742 | 0.0375 | 0.2312 | 0.0370 |
  | val | transition | 0.1474 | 0.0803 | 0.3499 | 0.0730 |
  | val | retrieval | 0.2195 | 0.1157 | 0.5376 | 0.1015 |
  | val | two-stage | 0.2301 | 0.1206 | 0.5345 | 0.1046 |
  | test | popularity | 0.0838 | 0.0422 | 0.2047 | 0.0387 |
  | test | transition | 0.1421 | 0.0811 | 0.3213 | 0.0746 |
  | test | retrieval | 0.1972 | 0.1025 | 0.4677 | 0.0901 |
  | test | two-stage | 0.2047 | 0.1081 | 0.4719 | 0.0950 |
  (re-ranking weight 2 chosen on validation; the dump recomputes to the same 0.2047 / 0.1081.)
  `--data movielens-100k` (genres as authors, RecBole's file order within a second) measured 0.2089
  / 0.1103 two-stage (train_movielens.py; measured before this module existed: on the tiny world
  of test_train_movielens.py the code here reproduces that code's table and dump exactly).

Input
  A CSV with a header line (stdlib csv: quoting works; --delimiter for TSV): user_id, item_id,
  timestamp, optional rating, optional 0/1 columns named after Phoenix actions (ACTIONS, e.g.
  favorite_score), optional author_id; names configurable (Columns, --user-col ...). Extra columns
  are ignored. Parquet is not read: pyarrow is not a dependency (export the log as CSV).
  Ids: a column is integer when every value is a non-negative int64 in canonical decimal form
  ("12", not "012" or "-3"); any other column is strings, each hashed to a non-negative int64 by
  string_id (BLAKE2b, stable across runs and machines: hash a string the same way to serve it).
  Two distinct strings of one column hashing alike (p ~ n^2 / 2^64) is refused, naming both.
  Timestamps: numbers (integers, or decimals such as 1.5e9); only their order is used. Ratings:
  finite numbers. Action columns: 0 or 1. Every bad value raises LogError naming file, line and
  column; so do a missing column, a line with the wrong number of fields, an empty log, a log
  with one user or one item, and an item listed with two authors.

Actions (the Phoenix labels of an interaction)
  Every row is an interaction: click_score is set unless a click_score column says otherwise.
  A rating column sets actions through `rating_actions` {action: inclusive rating range}, by
  default DEFAULT_RATING_ACTIONS (MovieLens's 1-5 stars: favorite >= 4, share = 5,
  not_interested <= 2). An action column overrides the rating for that action. The ranker is
  trained on the actions the log ever sets (the others get weight 0) and re-ranks by
  Recipe.score_action.

Recipe
  train_movielens.py's, tuned on MovieLens-100K. Fields left None adapt to the log: hash tables of
  max(20k, 4 x ids) rows (4k for authors); retrieve_k and negative_pool 100, or fewer when some
  user has seen all but fewer items; ranker_batch_size 256, or the number of training examples.
  A value given explicitly is kept, and refused (RecipeError naming the flag) if the log cannot
  support it. --rating-actions "favorite_score=8:,not_interested_score=:3" remaps a rating scale.

Duplicates and ties
  Each user's interactions are sorted by timestamp with a stable sort: equal timestamps keep file
  order. A (user, item) pair seen again later would put a target in its own history, so by
  default only its earliest interaction is kept (the count of dropped rows is printed; exact
  duplicate lines are such repeats); duplicates="error" (--duplicates error) refuses them,
  naming both lines.

Splits (movielens.Split, so the baselines, metrics and dumps of movielens.py apply unchanged)
  leave-one-out  last interaction = test target, second to last = validation, earlier = training
                 (users with fewer than 3 interactions only train).
  time           a global cut T (--cut-time, or the --cut-quantile of all timestamps): training
                 and every history use interactions before T only; a user's test target is their
                 first (new) item at or after T, the validation target their last item before T;
                 users without 2 interactions before T and one after only train (on those before).
  Evaluation ranks every catalog item except the user's earlier ones (never the target).

Outputs (the run directory: --checkpoint-dir, default $PHOENIX_CACHE_DIR/checkpoints/<log name>)
  retrieval/, ranker/  the best checkpoints by validation NDCG@10 (Trainer.save; load them with
                       RecsysRetrievalInferenceRunner / RecsysInferenceRunner.from_checkpoint). A
                       run refuses a directory holding an earlier run's unless overwrite=True.
  metrics.jsonl        one JSON object per line: {"stage", "step", "loss", ...} per progress log,
                       {"stage", "step", "eval/HR@10", ...} per validation, one per table row.
  curves.png           with --plot (needs matplotlib: `uv sync --extra plot`).

Shape glossary
  R  interactions   U  users (evaluated users: one target each)   N  catalog items
  E  training examples   B  batch   S  history length   C  ranker candidates per row
  D  embedding size      A  actions (19)   K  retrieved per user   P  hard-negative pool per example
  W  windows (retrieval training)
"""

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

import movielens as ml
import phoenix_checkpoint as checkpoint
import phoenix_hashing as hashing
import phoenix_metrics as metrics
import phoenix_training as training
from grok import TransformerConfig
from phoenix_inputs import ACTIONS, PAD_ID, HashConfig
from recsys_model import PhoenixModelConfig
from recsys_retrieval_model import POOLINGS, PhoenixRetrievalModelConfig, check_pooling, l2_normalize, last_valid

NUM_ACTIONS = len(ACTIONS)
INTERACTION_ACTION = "click_score"  # set by every row: the user chose the item
# A rating column's default meaning: MovieLens stars (movielens.RATING_ACTIONS), every row a click.
DEFAULT_RATING_ACTIONS = {"click_score": (-math.inf, math.inf), "favorite_score": (4.0, math.inf),
                          "share_score": (5.0, math.inf), "not_interested_score": (-math.inf, 2.0)}
SPLIT_PROTOCOLS = ("leave-one-out", "time")
DUPLICATE_RULES = ("first", "error")
DEFAULT_CUT_QUANTILE = 0.9  # time split: the last ~10% of interactions are after the cut
RETRIEVE_K = 100  # the retrieval stage hands this many items per user to the ranker
FINAL_K = 10  # the list a user sees (and the dump holds)
EVAL_BATCH = 256  # rows per predict call in evaluation (fixed, so one compilation)
MIN_TABLE_ROWS_PER_ID = 4  # auto table sizes: >= 4 rows per id, so few ids share both their rows
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
STAGES = ("retrieval", "ranker")
_INT64_MAX = np.iinfo(np.int64).max


class LogError(ml.RatingsFileError):
    """An interaction log that cannot be trained on; the message names the file (or input), line and column."""


class RecipeError(ValueError):
    """A Recipe the log cannot support (a batch or top-k larger than the data); names the flag."""


# ---------------------------------------------------------------------------------------------
# The log: reading, ids, validation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Columns:
    """Column names of a log. Optional columns left None are used when the default name is present."""

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    rating: Optional[str] = None  # None: "rating" if the log has it
    author: Optional[str] = None  # None: "author_id" if the log has it


_FLAGS = {"user": "--user-col", "item": "--item-col", "time": "--time-col", "rating": "--rating-col",
          "author": "--author-col"}
_AUTO_NAMES = {"rating": "rating", "author": "author_id"}


def string_id(token: str) -> int:
    """A non-negative int64 for a string id: the first 63 bits of its UTF-8 BLAKE2b-64 digest."""
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclasses.dataclass(frozen=True)
class Log:
    """Interactions in input order (checked on construction)."""

    user: np.ndarray  # [R] int64 raw ids >= 0 (string ids hashed by string_id)
    item: np.ndarray  # [R] int64
    timestamp: np.ndarray  # [R] int64 or float64, finite
    actions: np.ndarray  # [R, A] bool, ACTIONS order
    author: np.ndarray  # [R] int64 author of the item (0 without an author column)
    rating: Optional[np.ndarray]  # [R] float32, None without a rating column
    line: np.ndarray  # [R] int64 file line (or input row) of each interaction, for messages
    names: Mapping  # {"user"/"item"/"author": {hashed id: original string}} of string columns
    source: str
    from_file: bool = True  # `line` holds file lines ("path:12"), else row indices ("source row 12")

    def __post_init__(self):
        num = len(self.user)
        if num == 0:
            raise LogError(f"{self.source}: no interactions (expected at least one row after the header)")
        for name, kind in (("user", "i"), ("item", "i"), ("author", "i"), ("line", "i"), ("timestamp", "if"),
                           ("rating", "f")):
            x = getattr(self, name)
            if x is None and name == "rating":
                continue
            if np.shape(x) != (num,) or np.asarray(x).dtype.kind not in kind:
                raise TypeError(f"Log.{name}: expected [R={num}] of kind {kind!r}, got "
                                f"{np.shape(x)} {np.asarray(x).dtype}")
        if np.shape(self.actions) != (num, NUM_ACTIONS) or self.actions.dtype != bool:
            raise TypeError(f"Log.actions: expected [R={num}, A={NUM_ACTIONS}] bool, got "
                            f"{np.shape(self.actions)} {self.actions.dtype}")
        for name in ("timestamp", "rating"):
            x = getattr(self, name)
            if x is not None and not np.all(np.isfinite(x)):
                raise LogError(f"{self.at(_first_bad(np.isfinite(x)))}: Log.{name}: expected finite numbers, "
                               f"got {x[_first_bad(np.isfinite(x))]}")
        for name in ("user", "item", "author"):
            x = getattr(self, name)
            if x.min() < 0:  # negative raw ids are padding (phoenix_inputs.PAD_ID)
                raise LogError(f"{self.at(int(np.argmin(x)))}: Log.{name}: expected ids >= 0, got {x.min()}")
        for name, why in (("user", "in-batch negatives and evaluation need several users"),
                          ("item", "a next item is ranked against the other items")):
            distinct = np.unique(getattr(self, name))
            if len(distinct) < 2:
                raise LogError(f"{self.source}: only one {name} ({self.token(name, distinct[0])!r}) in {num} "
                               f"interactions: expected at least 2 ({why})")

    def at(self, row: int) -> str:
        """Where interaction `row` came from: "path:line" or "source row i"."""
        return f"{self.source}:{self.line[row]}" if self.from_file else f"{self.source} row {self.line[row]}"

    def token(self, kind: str, value: int):
        """The original id of raw id `value` of column kind "user"/"item"/"author" (a str or an int)."""
        names = self.names.get(kind)
        return names[int(value)] if names else int(value)

    def tokens(self, kind: str, values) -> list:
        return [self.token(kind, v) for v in np.asarray(values).ravel().tolist()]


def _first_bad(ok: np.ndarray) -> int:
    return int(np.flatnonzero(~ok)[0])


def _as_text(x: np.ndarray) -> np.ndarray:
    return np.char.strip(x.astype(str))


def _id_column(x: np.ndarray, column: str, at) -> tuple[np.ndarray, Optional[dict]]:
    """Raw ids [R] int64 and, for a string column, {hashed id: string}."""
    if x.dtype.kind in "iu" and (x.dtype.kind == "i" or x.max() <= _INT64_MAX):
        if x.min() >= 0:
            return x.astype(np.int64), None
        x = x.astype(str)  # negative integers are padding to the hashing: treat them as strings
    elif x.dtype.kind not in "UOS":
        raise TypeError(f"column {column!r}: expected integer or string ids, got dtype {x.dtype} "
                        "(a float id such as 1.5 would be truncated)")
    text = _as_text(x)
    empty = text == ""
    if empty.any():
        raise LogError(f"{at(_first_bad(~empty))}: column {column!r}: expected an id, got an empty field")
    try:
        ints = text.astype(np.int64)
        if ints.min() >= 0 and np.array_equal(ints.astype(str), text):  # "012" and "12" stay distinct
            return ints, None
    except (ValueError, OverflowError):
        pass
    distinct, inverse = np.unique(text, return_inverse=True)
    hashed = np.array([string_id(t) for t in distinct.tolist()], np.int64)  # [V]
    order = np.argsort(hashed, kind="stable")
    same = np.flatnonzero(hashed[order][1:] == hashed[order][:-1])
    if len(same):
        a, b = distinct[order[same[0]]].tolist(), distinct[order[same[0] + 1]].tolist()
        raise LogError(f"column {column!r}: ids {a!r} and {b!r} hash to the same int64 {hashed[order[same[0]]]} "
                       "(string_id); rename one of them")
    return hashed[inverse.ravel()], dict(zip(hashed.tolist(), distinct.tolist()))


def _number_column(x: np.ndarray, column: str, at, expected: str) -> np.ndarray:
    """Finite numbers [R]: int64 when every value is an integer, else float64."""
    if x.dtype.kind in "iub":
        if x.dtype.kind == "b":
            raise TypeError(f"column {column!r}: expected {expected}, got dtype bool")
        return x.astype(np.int64)
    if x.dtype.kind == "f":
        values = x.astype(np.float64)
    elif x.dtype.kind in "UOS":
        text = _as_text(x)
        try:
            return text.astype(np.int64)
        except (ValueError, OverflowError):
            pass
        values = np.empty(len(text), np.float64)
        for r, field in enumerate(text.tolist()):
            try:
                if "_" in field:  # float() would read "1_0" as 10
                    raise ValueError(field)
                values[r] = float(field)
            except ValueError:
                raise LogError(f"{at(r)}: column {column!r}: expected {expected}, got {field!r}") from None
    else:
        raise TypeError(f"column {column!r}: expected {expected}, got dtype {x.dtype}")
    finite = np.isfinite(values)
    if not finite.all():
        r = _first_bad(finite)
        raise LogError(f"{at(r)}: column {column!r}: expected {expected}, got {values[r]}")
    return values


def _flag_column(x: np.ndarray, column: str, at) -> np.ndarray:
    """0/1 [R] -> bool; anything else (2, 0.5, "yes", NaN) raises."""
    if x.dtype.kind == "b":
        return x
    text = _as_text(x) if x.dtype.kind in "UOS" else None
    ok = np.isin(text, ("0", "1")) if text is not None else np.isin(x, (0, 1))
    if not ok.all():
        r = _first_bad(ok)
        raise LogError(f"{at(r)}: column {column!r}: expected 0 or 1, got "
                       f"{(text if text is not None else x)[r].tolist()!r}")
    return text == "1" if text is not None else x == 1


def check_rating_actions(rating_actions: Mapping) -> dict:
    """{action: (low, high)} with known actions and low <= high; returns it as a dict of floats."""
    out = {}
    for name, bounds in dict(rating_actions).items():
        if name not in ACTIONS:
            raise ValueError(f"rating_actions: unknown action {name!r}; expected one of {ACTIONS}")
        try:
            low, high = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise ValueError(f"rating_actions[{name!r}]: expected (low, high), got {bounds!r}") from None
        if not low <= high:
            raise ValueError(f"rating_actions[{name!r}]: expected low <= high, got {bounds!r}")
        out[name] = (low, high)
    return out


def _actions(rating: Optional[np.ndarray], flags: Mapping, rating_actions: Mapping, num: int) -> np.ndarray:
    """[R, A] bool: click on every row, the rating mapping, then the action columns on top."""
    actions = np.zeros((num, NUM_ACTIONS), bool)  # [R, A]
    actions[:, ACTIONS.index(INTERACTION_ACTION)] = True
    if rating is not None:
        for name, (low, high) in check_rating_actions(rating_actions).items():
            actions[:, ACTIONS.index(name)] = (rating >= low) & (rating <= high)
    for name, values in flags.items():
        actions[:, ACTIONS.index(name)] = values
    return actions


def _build_log(values: Mapping[str, np.ndarray], names: Mapping[str, str], rating_actions, source: str,
               lines: np.ndarray, from_file: bool) -> Log:
    """A Log from raw columns {role or action: [R] values} (text or arrays)."""
    def at(row):
        return f"{source}:{lines[row]}" if from_file else f"{source} row {lines[row]}"

    if len(lines) == 0:
        raise LogError(f"{source}: no interactions (expected at least one row after the header)")
    ids, id_names = {}, {}
    for role in ("user", "item", "author"):
        if role in values:
            ids[role], mapping = _id_column(values[role], names[role], at)
            if mapping:
                id_names[role] = mapping
    rating = None
    if "rating" in values:
        rating = _number_column(values["rating"], names["rating"], at, "a finite number").astype(np.float32)
    flags = {name: _flag_column(values[name], name, at) for name in ACTIONS if name in values}
    author = ids.get("author", np.zeros(len(lines), np.int64))
    log = Log(user=ids["user"], item=ids["item"],
              timestamp=_number_column(values["time"], names["time"], at, "a number (e.g. Unix seconds)"),
              actions=_actions(rating, flags, rating_actions, len(lines)), author=author, rating=rating,
              line=np.asarray(lines, np.int64), names=id_names, source=source, from_file=from_file)
    _check_one_author_per_item(log)
    return log


def _check_one_author_per_item(log: Log) -> None:
    by_item = np.lexsort((np.arange(len(log.item)), log.item))  # [R] by item, then input order
    item, author = log.item[by_item], log.author[by_item]
    clash = np.flatnonzero((item[1:] == item[:-1]) & (author[1:] != author[:-1]))
    if len(clash):
        first, second = by_item[clash[0]], by_item[clash[0] + 1]
        raise LogError(f"{log.at(second)}: item {log.token('item', log.item[second])!r} has author "
                       f"{log.token('author', log.author[second])!r}, but {log.token('author', log.author[first])!r} "
                       f"at {log.at(first)}: an item has one author")


def _resolve_columns(header: list, columns: Columns, where: str) -> dict:
    """{role or action name: column index} for the columns the log uses."""
    seen = {}
    for j, name in enumerate(header):
        if name in seen:
            raise LogError(f"{where}: column {name!r} appears twice in the header (fields {seen[name] + 1} "
                           f"and {j + 1})")
        seen[name] = j
    wanted = {}
    for role in ("user", "item", "time", "rating", "author"):
        name = getattr(columns, role)
        if name is None:
            name = _AUTO_NAMES[role]
            if name not in seen:
                continue
        elif name not in seen:
            raise LogError(f"{where}: missing column {name!r} (the {role} column; name another with "
                           f"{_FLAGS[role]} / Columns({role}=...)); the header has {header}")
        wanted[role] = (name, seen[name])
    for name in ACTIONS:
        if name in seen and name not in {n for n, _ in wanted.values()}:
            wanted[name] = (name, seen[name])
    return wanted


def read_csv(path, columns: Columns = Columns(), rating_actions: Mapping = DEFAULT_RATING_ACTIONS,
             delimiter: str = ",") -> Log:
    """Reads a log CSV (header line first, UTF-8); the module docstring has the format and the checks."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        raise LogError(f"{path}: Parquet is not supported (pyarrow is not a dependency of Phoenix); "
                       "export the log as CSV, e.g. pandas.read_parquet(path).to_csv(out, index=False)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise LogError(f"{path}:{line}: not valid UTF-8 (byte {data[error.start]:#04x})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None or not "".join(header).strip():
            raise LogError(f"{path}:1: expected a header line naming the columns ({columns.user}, "
                           f"{columns.item}, {columns.time}, ...), got an empty line or file")
        header = [name.strip() for name in header]
        wanted = _resolve_columns(header, columns, f"{path}:1")
        fields = {role: [] for role in wanted}
        lines = []
        for row in reader:
            if not "".join(row).strip():
                continue  # blank line
            if len(row) != len(header):
                raise LogError(f"{path}:{reader.line_num}: expected {len(header)} fields separated by "
                               f"{delimiter!r} (as the header), got {len(row)}: {delimiter.join(row)[:80]!r}")
            lines.append(reader.line_num)
            for role, (_, j) in wanted.items():
                fields[role].append(row[j])
    except csv.Error as error:
        raise LogError(f"{path}:{reader.line_num}: {error}") from None
    values = {role: np.array(v, dtype=str) for role, v in fields.items()}
    return _build_log(values, {role: name for role, (name, _) in wanted.items()}, rating_actions, str(path),
                      np.array(lines, np.int64), from_file=True)


def from_arrays(data: Mapping, columns: Columns = Columns(), rating_actions: Mapping = DEFAULT_RATING_ACTIONS,
                source: str = "<arrays>") -> Log:
    """A Log from {column name: [R] array or list} (ids int or str; messages name the row index)."""
    header = list(data)
    wanted = _resolve_columns(header, columns, source)
    values = {role: np.asarray(data[name]) for role, (name, _) in wanted.items()}
    shapes = {wanted[role][0]: np.shape(v) for role, v in values.items()}
    num = np.shape(values["user"])[0] if np.ndim(values["user"]) == 1 else -1
    if any(shape != (num,) for shape in shapes.values()):
        raise ValueError(f"{source}: expected 1-D columns of one length [R], got shapes {shapes}")
    return _build_log(values, {role: name for role, (name, _) in wanted.items()}, rating_actions, source,
                      np.arange(num), from_file=False)


def read_log(path, columns: Columns = Columns(), rating_actions: Mapping = DEFAULT_RATING_ACTIONS,
             delimiter: str = ",") -> Log:
    """read_csv, with FileNotFoundError naming the path if there is no such file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such log file (expected a CSV with a header line)")
    return read_csv(path, columns, rating_actions, delimiter)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LogSplit(ml.Split):
    """movielens.Split of a Log (items and users keep their raw ids), plus what a Split lacks:
    each position's actions and log row, and the log itself (for original ids in dumps)."""

    actions: np.ndarray  # [R, A] bool, per position
    rows: np.ndarray  # [R] the log row of each position
    log: Log
    protocol: str = "leave-one-out"


def _time_order(log: Log) -> np.ndarray:
    """Log rows [R] sorted by user, then timestamp; ties keep input order (stable sorts)."""
    order = np.argsort(log.timestamp, kind="stable")
    return order[np.argsort(log.user[order], kind="stable")]


def _repeats(log: Log, order: np.ndarray) -> np.ndarray:
    """[R] bool over `order`: True where the (user, item) pair already occurred earlier in it."""
    by_pair = np.lexsort((np.arange(len(order)), log.item[order], log.user[order]))
    same = np.zeros(len(order), bool)
    same[1:] = ((log.user[order][by_pair][1:] == log.user[order][by_pair][:-1])
                & (log.item[order][by_pair][1:] == log.item[order][by_pair][:-1]))
    repeat = np.zeros(len(order), bool)
    repeat[by_pair] = same
    return repeat


def _time_cut(log: Log, order: np.ndarray, cut) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows in `order`'s order, raw ids of the users whose last kept row is their test target)."""
    t = log.timestamp[order]
    users, starts, counts = np.unique(log.user[order], return_index=True, return_counts=True)  # [U]
    owner = np.repeat(np.arange(len(users)), counts)  # [R]
    before = t < cut  # [R]; within a user, rows before the cut come first
    num_before = np.bincount(owner, weights=before, minlength=len(users)).astype(np.int64)  # [U]
    evaluated = (num_before >= ml.MIN_EVAL_RATINGS - 1) & (num_before < counts)  # [U] history + a target
    first_after = np.zeros(len(order), bool)
    first_after[(starts + num_before)[evaluated]] = True
    return order[before | first_after], users[evaluated]


def split_log(log: Log, protocol: str = "leave-one-out", duplicates: str = "first", cut_time=None,
              cut_quantile: Optional[float] = None, stream=None) -> LogSplit:
    """The log as a LogSplit: leave-one-out or a global time cut (module docstring)."""
    if protocol not in SPLIT_PROTOCOLS:
        raise ValueError(f"protocol: expected one of {SPLIT_PROTOCOLS}, got {protocol!r}")
    if duplicates not in DUPLICATE_RULES:
        raise ValueError(f"duplicates: expected one of {DUPLICATE_RULES}, got {duplicates!r}")
    order = _time_order(log)
    repeat = _repeats(log, order)
    if repeat.any():
        r = order[_first_bad(~repeat)]
        earlier = order[np.flatnonzero((log.user[order] == log.user[r]) & (log.item[order] == log.item[r]))[0]]
        if duplicates == "error":
            raise LogError(f"{log.at(r)}: user {log.token('user', log.user[r])!r} and item "
                           f"{log.token('item', log.item[r])!r} already at {log.at(earlier)} ({int(repeat.sum())} "
                           "such repeats): a repeat would put a target in its own history; pass "
                           "duplicates='first' (--duplicates first) to keep each pair's earliest interaction")
        print(f"{log.source}: dropped {int(repeat.sum())} repeated (user, item) interactions, keeping each pair's "
              f"earliest (e.g. {log.at(r)} repeats {log.at(earlier)})", file=sys.stderr if stream is None else stream)
        order = order[~repeat]
    evaluated = None
    if protocol == "time":
        if cut_time is None:
            quantile = DEFAULT_CUT_QUANTILE if cut_quantile is None else cut_quantile
            if not 0.0 < quantile < 1.0:
                raise ValueError(f"cut_quantile: expected a number in (0, 1), got {quantile}")
            cut_time = np.quantile(log.timestamp, quantile, method="higher")
        elif cut_quantile is not None:
            raise ValueError("give cut_time or cut_quantile, not both")
        order, evaluated = _time_cut(log, order, cut_time)
        if len(evaluated) == 0:
            raise LogError(f"{log.source}: no user has {ml.MIN_EVAL_RATINGS - 1} interactions before the time cut "
                           f"{cut_time} and one at or after it: nothing to evaluate (move the cut)")
    # Rows already in (user, time) order with distinct timestamps 0..R-1: leave_one_out keeps the
    # order, so position p of its Split is row order[p] of the log.
    ratings = ml.Ratings(user=log.user[order], item=log.item[order], rating=np.zeros(len(order), np.float32),
                         timestamp=np.arange(len(order), dtype=np.int64), item_ids=np.zeros(0, np.int64),
                         titles=np.zeros(0, object), years=np.zeros(0, np.int32),
                         genres=np.zeros((0, len(ml.GENRES)), bool), source=log.source)
    split = ml.leave_one_out(ratings)
    rows = order[split.timestamps]  # [R]
    fields = {f.name: getattr(split, f.name) for f in dataclasses.fields(ml.Split)}
    items, first = np.unique(log.item, return_index=True)  # one author per item (checked by Log)
    fields.update(ratings=np.zeros(len(rows), np.float32) if log.rating is None else log.rating[rows],
                  timestamps=log.timestamp[rows],
                  item_authors=log.author[first][np.searchsorted(items, split.item_ids)])
    if evaluated is not None:  # only users with a target after the cut are evaluated
        has_eval = np.isin(split.user_ids, evaluated)
        fields.update(has_eval=has_eval, train_len=np.where(has_eval, split.lengths - 2, split.lengths))
    return LogSplit(**fields, actions=log.actions[rows], rows=rows, log=log, protocol=protocol)


def describe(split: LogSplit) -> str:
    """One line of statistics: users, items, interactions, examples, id kinds."""
    kinds = ", ".join(f"{kind} ids {'strings (hashed)' if kind in split.log.names else 'integers'}"
                      for kind in ("user", "item"))
    return (f"{split.log.source}: {len(split.user_ids):,} users ({int(split.has_eval.sum()):,} evaluated), "
            f"{len(split.item_ids):,} items, {len(split.items):,} interactions, "
            f"{len(split.target_positions('train')[0]):,} training examples, {split.protocol} split; {kinds}")


# ---------------------------------------------------------------------------------------------
# Phoenix examples
# ---------------------------------------------------------------------------------------------


def _histories(split: LogSplit, rows, ends, history_len: int) -> dict:
    """History fields of users `rows` [E] whose history is the up-to-S positions before `ends` [E]."""
    valid_len = np.minimum(ends - split.offsets[rows], history_len)  # [E]
    slots = np.arange(history_len)[None, :]  # [1, S]
    valid = slots < valid_len[:, None]  # [E, S]
    history = np.where(valid, ends[:, None] - valid_len[:, None] + slots, 0)  # [E, S] positions
    items = np.where(valid, split.items[history], PAD_ID)  # [E, S]
    return {"user_ids": split.user_ids[rows], "user_rows": rows, "history_post_ids": items,
            "history_author_ids": split.authors_of(items),
            "history_actions": split.actions[history] & valid[..., None],
            "history_surfaces": np.full(items.shape, ml.SURFACE, dtype=np.int32), "history_len": valid_len}


def phoenix_examples(split: LogSplit, which: str = "train", history_len: int = 200, example_indices=None) -> dict:
    """movielens.phoenix_examples with the log's actions: the same keys, shapes and order."""
    if history_len < 1:
        raise ValueError(f"history_len: expected >= 1, got {history_len}")
    rows, positions = split.target_positions(which)  # [E], [E]
    if example_indices is not None:
        rows, positions = rows[example_indices], positions[example_indices]
    examples = _histories(split, rows, positions, history_len)
    examples.update(target_post_ids=split.items[positions], target_author_ids=split.authors_of(split.items[positions]),
                    target_columns=split.item_columns[positions], target_actions=split.actions[positions],
                    target_surfaces=np.full(positions.shape, ml.SURFACE, dtype=np.int32))
    return examples


def take(examples: dict, rows) -> dict:
    return {key: value[rows] for key, value in examples.items()}


# ---------------------------------------------------------------------------------------------
# Recipe and configs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Model sizes and training schedule of both stages (train_movielens.py's docstring says why)."""

    emb_size: int = 64  # D, both models
    num_layers: int = 2
    num_heads: int = 2  # of D / heads = 32 dimensions each
    history_len: int = 5  # S of the retrieval user tower: its mean pooling dilutes longer histories
    pooling: str = "mean"  # the user tower's pooling (recsys_retrieval_model.POOLINGS)
    ranker_history_len: int = 5  # S of the ranker
    retrieval_batch_size: int = 256  # windows of S + 1 items per step: ~1,200 rows of the softmax
    ranker_batch_size: Optional[int] = None  # examples per step, each with C candidates; None: 256 (fewer
    # if the log has fewer training examples)
    retrieval_epochs: float = 8.0  # passes over the training examples; longer overfits on MovieLens
    ranker_epochs: float = 4.0
    learning_rate: float = 2e-3  # AdamW peak, cosine decay to 10% over each stage
    warmup_steps: int = 100
    temperature: float = 0.05  # in-batch softmax over cosines: logits in [-20, 20]
    hard_negatives: int = 6  # ranker negatives drawn from the retrieval model's top `negative_pool`
    random_negatives: int = 1  # ranker negatives drawn uniformly from the catalog
    negative_pool: Optional[int] = None  # the list the ranker re-ranks at evaluation; None: retrieve_k's default
    retrieve_k: Optional[int] = None  # K: items the retrieval stage hands to the ranker per user; None: 100
    # (fewer if some user has seen all but fewer items)
    table_init_stddev: float = 0.05  # small rows move fast relative to their size under Adam
    user_table_size: Optional[int] = None  # None: max(20k, 4 x users); MovieLens's 943 users get 20k
    post_table_size: Optional[int] = None  # None: max(20k, 4 x items)
    author_table_size: Optional[int] = None  # None: max(4k, 4 x authors)
    num_hashes: int = 2
    evals_per_stage: int = 4  # validation evaluations (and best-checkpoint chances) per stage
    ranker_init_from_retrieval: bool = True  # start from the retrieval model's tables and transformer
    retrieval_weight: Optional[float] = None  # None: chosen on validation from RETRIEVAL_WEIGHTS
    score_action: str = "click_score"  # the ranker logit that re-ranks: P(the user picks this next)

    @property
    def num_candidates(self) -> int:  # C
        return 1 + self.hard_negatives + self.random_negatives


# Weights of the retrieval logit in the re-ranking score tried on validation (rerank_scores).
RETRIEVAL_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
RANKER_BATCH = 256  # default examples per ranker step
# Auto table sizes (Recipe fields left None): minimum rows.
_TABLE_MINIMUM = {"user_table_size": 20_000, "post_table_size": 20_000, "author_table_size": 4_000}


def _recommendable(split: ml.Split) -> int:
    """Items every evaluated user can still be recommended at test time (the catalog minus the most
    any user has seen)."""
    return len(split.item_ids) - int(split.visible_len("test")[split.eval_users()].max())


def resolve_recipe(recipe: Recipe, split: ml.Split) -> Recipe:
    """The recipe with its auto fields (None) filled in from the split: table sizes from the id
    counts; retrieve_k, negative_pool and ranker_batch_size at their defaults unless the log is too
    small for them. Values given explicitly are kept (check_recipe refuses those that do not fit)."""
    counts = {"user_table_size": len(split.user_ids), "post_table_size": len(split.item_ids),
              "author_table_size": len(np.unique(split.item_authors))}
    auto = {name: max(minimum, MIN_TABLE_ROWS_PER_ID * counts[name]) for name, minimum in _TABLE_MINIMUM.items()}
    auto["retrieve_k"] = min(RETRIEVE_K, _recommendable(split))
    auto["negative_pool"] = max(1, min(RETRIEVE_K, len(split.item_ids) - int(split.lengths.max()) - 1))
    auto["ranker_batch_size"] = max(1, min(RANKER_BATCH, len(split.target_positions("train")[0])))
    return dataclasses.replace(recipe, **{name: value for name, value in auto.items() if getattr(recipe, name) is None})


def hash_config(recipe: Recipe) -> HashConfig:
    """The hash tables of a recipe; auto sizes (None) not yet resolved (resolve_recipe) take the minimum."""
    sizes = [getattr(recipe, name) or minimum for name, minimum in _TABLE_MINIMUM.items()]
    return HashConfig(num_user_hashes=recipe.num_hashes, num_item_hashes=recipe.num_hashes,
                      num_author_hashes=recipe.num_hashes, user_table_size=sizes[0], post_table_size=sizes[1],
                      author_table_size=sizes[2])


def transformer_config(recipe: Recipe) -> TransformerConfig:
    key_size = recipe.emb_size // recipe.num_heads
    return TransformerConfig(emb_size=recipe.emb_size, key_size=key_size, num_q_heads=recipe.num_heads,
                             num_kv_heads=recipe.num_heads, num_layers=recipe.num_layers, widening_factor=4.0,
                             attn_output_multiplier=1.0 / math.sqrt(key_size))


def retrieval_config(recipe: Recipe) -> PhoenixRetrievalModelConfig:
    return PhoenixRetrievalModelConfig(model=transformer_config(recipe), emb_size=recipe.emb_size,
                                       history_seq_len=recipe.history_len, candidate_seq_len=1,
                                       fprop_dtype=np.float32, hash_config=hash_config(recipe),
                                       pooling=recipe.pooling).initialize()


def ranker_config(recipe: Recipe) -> PhoenixModelConfig:
    return PhoenixModelConfig(model=transformer_config(recipe), emb_size=recipe.emb_size, num_actions=NUM_ACTIONS,
                              history_seq_len=recipe.ranker_history_len, candidate_seq_len=recipe.num_candidates,
                              fprop_dtype=np.float32, hash_config=hash_config(recipe)).initialize()


def optimizer_config(recipe: Recipe, num_steps: int) -> training.OptimizerConfig:
    warmup = min(recipe.warmup_steps, max(num_steps // 4, 1))
    return training.OptimizerConfig(learning_rate=recipe.learning_rate, warmup_steps=warmup,
                                    decay_steps=max(num_steps, warmup + 1))


def action_weights(split: LogSplit) -> np.ndarray:
    """[A]: 1 for each action the log ever sets, 0 for the others (they would only dilute the loss)."""
    return split.actions.any(axis=0).astype(np.float32)


def check_recipe(split: LogSplit, recipe: Recipe) -> None:
    """Recipe sizes (after resolve_recipe) the log can support; each error names the flag to change."""
    if recipe.score_action not in ACTIONS or not action_weights(split)[ACTIONS.index(recipe.score_action)]:
        raise RecipeError(f"score_action (--score-action): expected an action the log sets, one of "
                         f"{[a for a, w in zip(ACTIONS, action_weights(split)) if w]}, got {recipe.score_action!r}")
    if recipe.pooling not in POOLINGS:
        raise RecipeError(f"pooling (--pooling): expected one of {POOLINGS}, got {recipe.pooling!r}")
    room = _recommendable(split)
    if not 0 < recipe.retrieve_k <= room:
        raise RecipeError(f"retrieve_k (--retrieve-k): expected in [1, {room}] (the {len(split.item_ids)} items minus "
                          f"the most one user has seen), got {recipe.retrieve_k}")
    if recipe.hard_negatives and not 0 < recipe.negative_pool < len(split.item_ids) - int(split.lengths.max()):
        raise RecipeError(f"negative_pool (--negative-pool): expected in [1, {len(split.item_ids) - int(split.lengths.max())}) "
                         f"(items a user has not seen), got {recipe.negative_pool}")
    if recipe.hard_negatives > recipe.negative_pool:
        raise RecipeError(f"hard_negatives (--hard-negatives): expected <= negative_pool {recipe.negative_pool}, "
                         f"got {recipe.hard_negatives}")
    examples = len(split.target_positions("train")[0])
    if examples == 0:
        raise LogError(f"{split.log.source}: no training examples (no user has 2 interactions before their "
                       "validation target)")
    if recipe.retrieval_batch_size < 1:  # more windows than the log holds are fine: they span epochs
        raise RecipeError(f"retrieval_batch_size (--retrieval-batch-size): expected >= 1, got "
                         f"{recipe.retrieval_batch_size}")
    if not 0 < recipe.ranker_batch_size <= examples:
        raise RecipeError(f"ranker_batch_size (--ranker-batch-size): expected in [1, {examples}] (the log's "
                         f"training examples), got {recipe.ranker_batch_size}")


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def epoch_batches(num_examples: int, batch_size: int, rng: np.random.Generator):
    """Endless example-index batches [B]: a fresh permutation per epoch, the last partial batch dropped
    (fixed shapes: the train step compiles once)."""
    per_epoch = num_examples // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} training examples")
    while True:
        order = rng.permutation(num_examples)
        for i in range(per_epoch):
            yield order[i * batch_size:(i + 1) * batch_size]


def training_windows(split: ml.Split, history_len: int, rng: Optional[np.random.Generator] = None):
    """Windows of up to S + 1 consecutive training items that cover every training target once.

    Returns (user rows [W], start positions [W] into split.items, lengths [W]). Within a window the
    item at slot j >= 1 is the target of the prefix of slots 0..j-1, so a window of n items holds
    n - 1 examples. Window boundaries fall at r, r + S, r + 2S, ... of each user's training part,
    with r = 0 without `rng` and r uniform in [0, S) per user with it (a new cut every epoch, so a
    target's history length varies between epochs instead of being fixed by where the cuts fall).
    """
    rows, starts, lengths = [], [], []
    for user in range(len(split.user_ids)):
        length = int(split.train_len[user])  # targets are positions 1 .. length - 1
        if length < 2:
            continue
        shift = int(rng.integers(0, history_len)) if rng is not None else 0
        cuts = ([0] if shift > 0 else []) + list(range(shift, length - 1, history_len))
        for begin, end in zip(cuts, cuts[1:] + [length - 1]):  # items begin..end, end - begin <= S
            rows.append(user)
            starts.append(split.offsets[user] + begin)
            lengths.append(end - begin + 1)
    return np.array(rows, np.int64), np.array(starts, np.int64), np.array(lengths, np.int64)


def window_examples(split: LogSplit, rows, starts, lengths, history_len: int):
    """The windows as histories: (examples dict with history fields [W, S + 1], their positions
    [W, S + 1] into split.items, valid [W, S + 1])."""
    slots = np.arange(history_len + 1)[None, :]  # [1, S+1]
    valid = slots < lengths[:, None]  # [W, S+1]
    positions = np.where(valid, starts[:, None] + slots, 0)  # [W, S+1]
    items = np.where(valid, split.items[positions], PAD_ID)  # [W, S+1]
    examples = {"user_ids": split.user_ids[rows], "history_post_ids": items,
                "history_author_ids": split.authors_of(items),
                "history_actions": split.actions[positions] & valid[..., None],
                "history_surfaces": np.full(items.shape, ml.SURFACE, np.int32)}
    return examples, positions, valid


def window_batch(split: ml.Split, examples: dict, hashes: HashConfig):
    """A RecsysBatch whose history is each window and whose candidates are the window's items 1..S
    (candidate c is the target of the prefix ending at slot c)."""
    return ml.phoenix_batch(split, examples, hashes, examples["history_post_ids"][:, 1:])


def retrieval_batches(split: LogSplit, recipe: Recipe, hashes: HashConfig, rng: np.random.Generator):
    """Endless (batch, log_q [B, S], positive_ids [B, S]) for SequenceRetrievalTrainer.step, B windows
    each. log q is a target's share among training targets (logQ correction); positive_ids, the
    targets' catalog columns (-1: padding), mark accidental hits (the same item as another row's positive)."""
    q = ml.item_sampling_frequencies(split)  # [N]
    log_q = np.log(np.where(q > 0, q, 1.0)).astype(np.float32)  # [N]; unsampled items are never targets
    pending = np.zeros((0, 3), np.int64)
    B, S = recipe.retrieval_batch_size, recipe.history_len
    while True:
        while len(pending) < B:  # the next epoch: new cuts, new order
            windows = np.stack(training_windows(split, S, rng), axis=1)  # [W, 3]
            pending = np.concatenate([pending, windows[rng.permutation(len(windows))]])
        (rows, starts, lengths), pending = pending[:B].T, pending[B:]
        examples, positions, valid = window_examples(split, rows, starts, lengths, S)
        targets = valid[:, 1:]  # [B, S]
        # Accidental hits by catalog column, not raw id: a hashed string id needs 63 bits, and the
        # jitted step sees int32 (-1 marks padding, as PAD_ID did).
        yield (window_batch(split, examples, hashes),
               np.where(targets, log_q[split.item_columns[positions[:, 1:]]], 0.0).astype(np.float32),
               np.where(targets, split.item_columns[positions[:, 1:]], PAD_ID).astype(np.int32))


def ranker_candidates(examples: dict, rows, pool: Optional[np.ndarray], num_hard: int, num_random: int,
                      num_items: int, rng: np.random.Generator):
    """Candidate columns [B, C] with the target at a random slot, and that slot [B].

    Negatives: `num_hard` distinct entries of each example's hard-negative pool (P columns, target and
    earlier items already removed) and `num_random` uniform catalog columns other than the target. The
    target's slot is random because a candidate's rotary position is its slot: a fixed slot would let
    the ranker recognise the positive by position.
    """
    target = examples["target_columns"][rows]  # [B]
    B = len(rows)
    parts = [target[:, None]]
    if num_hard:
        if pool is None:
            raise ValueError("hard negatives need a pool (hard_negative_pool)")
        pick = np.argsort(rng.random((B, pool.shape[1])), axis=1)[:, :num_hard]  # [B, num_hard]
        parts.append(np.take_along_axis(pool[rows], pick, axis=1))
    if num_random:
        random = rng.integers(0, num_items - 1, (B, num_random))  # [B, num_random], skipping the target:
        parts.append(random + (random >= target[:, None]))
    columns = np.concatenate(parts, axis=1)  # [B, C], target first
    order = np.argsort(rng.random(columns.shape), axis=1)  # [B, C] random permutation per row
    columns = np.take_along_axis(columns, order, axis=1)
    return columns, np.argmax(order == 0, axis=1)


def ranker_batches(split: ml.Split, examples: dict, pool: Optional[np.ndarray], recipe: Recipe,
                   hashes: HashConfig, rng: np.random.Generator):
    """Endless (batch, labels [B, C, A]) for RankingTrainer.step: the target carries its actions,
    sampled negatives all-zero labels."""
    num_items = len(split.item_ids)
    for rows in epoch_batches(len(examples["user_ids"]), recipe.ranker_batch_size, rng):
        columns, slot = ranker_candidates(examples, rows, pool, recipe.hard_negatives, recipe.random_negatives,
                                          num_items, rng)
        labels = np.zeros(columns.shape + (NUM_ACTIONS,), np.float32)  # [B, C, A]
        labels[np.arange(len(rows)), slot] = examples["target_actions"][rows]
        yield ml.phoenix_batch(split, take(examples, rows), hashes, split.item_ids[columns]), labels


def padded_chunks(num_rows: int, size: int):
    """(rows [size] padded by repeating the last row, number of real rows) covering 0..num_rows-1."""
    for start in range(0, num_rows, size):
        rows = np.arange(start, min(start + size, num_rows))
        yield np.concatenate([rows, np.full(size - len(rows), rows[-1])]), len(rows)


# ---------------------------------------------------------------------------------------------
# Retrieval stage: the per-prefix trainer, representations and scores
# ---------------------------------------------------------------------------------------------


def prefix_user_representations(model, batch, embeddings) -> jax.Array:
    """[B, 1+S, D]: at position p, the user tower's representation of the history before slot p,
    i.e. `build_user_representation` of the batch cut to history slots 0..p-1.

    Causal attention makes the transformer output at position p depend on positions 0..p only, and
    a right-padded history puts slot j at rotary position 1 + j in both cases, so pooling the
    outputs up to p gives that representation (tested against it): the running mean over valid
    positions for "mean" pooling, the output at the last valid position <= p for "last".
    """
    if model.config.model.bidirectional_history:
        raise ValueError("prefix_user_representations: needs causal attention over the history "
                         "(model.bidirectional_history=False): with bidirectional attention a position "
                         "sees later slots, so no prefix's representation can be read off one pass")
    out, mask = model.build_user_sequence(batch, embeddings)  # [B, 1+S, D], [B, 1+S]
    if check_pooling(model.config.pooling) == "last":
        return l2_normalize(last_valid(out, mask))[0]  # [B, 1+S, D]
    mask_f = mask.astype(jnp.float32)[:, :, None]  # [B, 1+S, 1]
    running = jnp.cumsum(out * mask_f, axis=1) / jnp.maximum(jnp.cumsum(mask_f, axis=1), 1.0)  # [B, 1+S, D]
    return l2_normalize(running)[0]


def window_towers(model, batch, embeddings):
    """(users [B, S, D], candidates [B, S, D], valid [B, S]) float32 of a batch of windows: the
    representation of each prefix and the item that follows it."""
    users = prefix_user_representations(model, batch, embeddings)[:, 1:-1]  # [B, S, D]
    candidates, candidate_mask = model.build_candidate_representation(batch, embeddings)  # [B, S, D]
    valid = candidate_mask & (batch.user_hashes[:, :1] != 0)  # [B, S]
    return users.astype(jnp.float32), candidates.astype(jnp.float32), valid


class SequenceRetrievalTrainer(training.RetrievalTrainer):
    """RetrievalTrainer whose train step takes every prefix of a window as an example (SASRec-style).

    A batch holds windows of S + 1 items as histories and items 1..S as candidates; the row of
    candidate c pairs the prefix representation before slot c + 1 with that item, so one pass of
    the user tower over B windows yields up to B * S examples of the in-batch softmax (with logQ
    correction and accidental-hit masking, training.retrieval_loss_terms), instead of B. Parameters,
    checkpoints, `predict` and the runners are those of the plain RetrievalTrainer.

    step(state, batch, log_q [B, S], positive_ids [B, S]) -> (state, metrics)
    predict_windows(params, batch) -> (users [B, S, D], candidates [B, S, D], valid [B, S])
    """

    def __init__(self, model_config: PhoenixRetrievalModelConfig, hash_config: Optional[HashConfig] = None,
                 optimizer_config: Optional[training.OptimizerConfig] = None,
                 temperature: float = training.DEFAULT_TEMPERATURE, table_init_stddev: Optional[float] = None,
                 data_parallel=False):
        super().__init__(model_config, hash_config, optimizer_config, temperature, table_init_stddev, data_parallel)
        self._jit_predict_windows = jax.jit(lambda params, batch: self._windows(params, None, batch))

    def _windows(self, params, rng, batch):
        return self.forward.apply(params, batch, call=window_towers, rng=rng)

    def _prepare_batch(self, batch):
        return batch  # every candidate slot is a positive (RetrievalTrainer keeps slot 0 only)

    def step(self, state, batch, log_q, positive_ids):
        """One optimiser step on B windows (C = S candidates each). `state` is donated."""
        B, _, C = self._validate(batch)
        for name, value in (("log_q", log_q), ("positive_ids", positive_ids)):
            if np.shape(value) != (B, C):
                raise ValueError(f"{name}: expected shape {(B, C)}, got {np.shape(value)}")
        if not np.all(np.isfinite(log_q)):
            raise ValueError("log_q: contains NaN or inf")
        return self._jit_step(state, *self._place(batch, log_q, positive_ids))

    def _loss(self, params, rng, batch, log_q, positive_ids):
        users, candidates, valid = self._windows(params, rng, batch)
        D = users.shape[-1]
        terms = training.retrieval_loss_terms(users.reshape(-1, D), candidates.reshape(-1, D), self.temperature,
                                              positive_ids.reshape(-1), log_q.reshape(-1), valid.reshape(-1))
        return terms.loss, {"accuracy": terms.accuracy}

    def predict_windows(self, params, batch):
        return self._jit_predict_windows(params, batch)


def _item_examples(split: ml.Split) -> dict:
    """A one-row examples dict with an empty history: the carrier of candidate-only batches."""
    return {"user_ids": split.user_ids[:1], "history_post_ids": np.full((1, 1), PAD_ID),
            "history_author_ids": np.full((1, 1), PAD_ID), "history_actions": np.zeros((1, 1, NUM_ACTIONS), bool),
            "history_surfaces": np.zeros((1, 1), np.int32)}


def encode_items(trainer: training.RetrievalTrainer, params, split: ml.Split) -> np.ndarray:
    """Candidate-tower representations [N, D] of every catalog item (unit norm), in one call."""
    ids = split.item_ids[None, :]  # [1, N]
    _, candidates, _ = trainer.predict(params, ml.phoenix_batch(split, _item_examples(split), trainer.hash_config, ids))
    return np.asarray(candidates[0])  # [N, D]


def encode_users(trainer: training.RetrievalTrainer, params, split: ml.Split, examples: dict,
                 batch_size: int = EVAL_BATCH) -> np.ndarray:
    """User-tower representations [E, D] (unit norm) of the examples' histories."""
    out = []
    for rows, real in padded_chunks(len(examples["user_ids"]), batch_size):
        user, _, _ = trainer.predict(params, ml.phoenix_batch(split, take(examples, rows), trainer.hash_config))
        out.append(np.asarray(user)[:real])
    return np.concatenate(out)


def eval_mask(split: ml.Split, which: str) -> np.ndarray:
    """[U, N]: items ranked for nobody: the user's earlier items, except the target (phoenix_metrics.py's rule)."""
    exclude = split.exclude_mask(which)
    exclude[np.arange(exclude.shape[0]), split.targets(which)] = False
    return exclude


def first_positions(split: ml.Split) -> np.ndarray:
    """[U, N] int32: position (within the user's sequence) of the user's first interaction with each
    item, or a large number where the user never had one."""
    first = np.full((len(split.user_ids), len(split.item_ids)), np.iinfo(np.int32).max, np.int32)
    owner = np.repeat(np.arange(len(split.user_ids)), split.lengths)  # [R]
    within = np.arange(len(split.items)) - split.offsets[owner]  # [R]
    np.minimum.at(first, (owner, split.item_columns), within.astype(np.int32))
    return first


def example_representations(trainer: SequenceRetrievalTrainer, params, split: LogSplit, history_len: int,
                            batch_size: int = EVAL_BATCH) -> np.ndarray:
    """User representations [E, D] of every training example (phoenix_examples order) from one pass
    over the windows of training_windows (cuts at 0, S, 2S, ...): an example's history is then the
    items since its window's start (1..S of them), not always the last S; good enough to mine negatives
    and ~S times cheaper than encoding each example's own history."""
    rows, starts, lengths = training_windows(split, history_len)
    by_position = np.zeros((len(split.items), trainer.model_config.emb_size), np.float32)  # [R, D]
    for chunk, real in padded_chunks(len(rows), batch_size):
        examples, positions, valid = window_examples(split, rows[chunk], starts[chunk], lengths[chunk], history_len)
        users, _, _ = trainer.predict_windows(params, window_batch(split, examples, trainer.hash_config))
        keep = valid[:real, 1:]  # [b, S]
        by_position[positions[:real, 1:][keep]] = np.asarray(users)[:real][keep]
    return by_position[split.target_positions("train")[1]]


def hard_negative_pool(trainer: SequenceRetrievalTrainer, params, split: LogSplit, history_len: int,
                       pool_size: int, chunk: int = 4096) -> np.ndarray:
    """[E, P] catalog columns: the retrieval model's top-P for each training example among the items
    the user had not seen before the target, the target excluded (so every entry is a negative)."""
    items = encode_items(trainer, params, split)  # [N, D]
    users = example_representations(trainer, params, split, history_len)  # [E, D]
    first = first_positions(split)
    rows, positions = split.target_positions("train")
    within = positions - split.offsets[rows]  # [E] the target's position within its user
    targets = split.item_columns[positions]  # [E]
    if not 0 < pool_size < len(split.item_ids) - int(split.lengths.max()):
        raise ValueError(f"negative pool {pool_size} must be below the items a user has not seen")
    pool = np.empty((len(users), pool_size), np.int32)
    for start in range(0, len(users), chunk):
        sl = slice(start, start + chunk)
        scores = users[sl] @ items.T  # [e, N]
        scores[first[rows[sl]] < within[sl, None]] = -np.inf
        scores[np.arange(scores.shape[0]), targets[sl]] = -np.inf
        pool[sl] = np.argpartition(-scores, pool_size, axis=1)[:, :pool_size]
    return pool


class StageOne:
    """Retrieval evaluation of one split: scores, the target's full rank and the top-K lists."""

    def __init__(self, trainer, params, split: LogSplit, which: str, history_len: int, k: int = RETRIEVE_K,
                 items=None):
        self.examples = phoenix_examples(split, which, history_len)
        self.target = split.targets(which)  # [U]
        self.exclude = eval_mask(split, which)  # [U, N]
        items = encode_items(trainer, params, split) if items is None else items  # [N, D]
        users = encode_users(trainer, params, split, self.examples)  # [U, D]
        self.scores = users @ items.T  # [U, N] cosines
        self.ranks = metrics.target_ranks(self.scores, self.target, self.exclude)  # [U]
        self.topk = metrics.topk_columns(self.scores, k, self.exclude)  # [U, K], best first
        if (self.topk == metrics.NOT_RANKED).any():
            raise ValueError(f"k={k} exceeds the items some user can be recommended")

    def metrics(self) -> dict:
        return metrics.metrics_from_ranks(self.ranks)


# ---------------------------------------------------------------------------------------------
# Ranking stage
# ---------------------------------------------------------------------------------------------


def ranker_logits(trainer: training.RankingTrainer, params, split: ml.Split, examples: dict,
                  columns: np.ndarray, num_candidates: int, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Ranker logits [U, K, A] of candidate columns [U, K] for each example's history.

    Candidates are scored in chunks of the training C (slots 0..C-1, the rotary positions the ranker
    was trained on); candidate isolation makes a candidate's logits independent of its chunk mates.
    """
    U, K = columns.shape
    num_chunks = -(-K // num_candidates)
    padded = np.full((U, num_chunks * num_candidates), -1, np.int64)  # [U, K'] -1 = padding
    padded[:, :K] = columns
    chunk_columns = padded.reshape(U * num_chunks, num_candidates)  # [U*chunks, C]
    owners = np.repeat(np.arange(U), num_chunks)  # [U*chunks]
    ids = np.where(chunk_columns >= 0, split.item_ids[np.maximum(chunk_columns, 0)], PAD_ID)
    out = []
    for rows, real in padded_chunks(len(owners), batch_size):
        batch = ml.phoenix_batch(split, take(examples, owners[rows]), trainer.hash_config, ids[rows])
        out.append(np.asarray(trainer.predict(params, batch))[:real])
    logits = np.concatenate(out).reshape(U, num_chunks * num_candidates, -1)  # [U, K', A]
    return logits[:, :K]


def two_stage_ranks(stage_one: StageOne, rerank_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(full-ranking ranks [U], re-ranked top-K columns [U, K]).

    The K retrieved items are re-ordered by `rerank_scores` [U, K] (ties keep retrieval order); the
    rest follow in retrieval order, so a target outside the top-K keeps its retrieval rank.
    """
    order = np.argsort(-rerank_scores, axis=1, kind="stable")  # [U, K]
    reranked = np.take_along_axis(stage_one.topk, order, axis=1)  # [U, K]
    in_list = metrics.ranks_in_topk(reranked, stage_one.target)  # [U]
    ranks = np.where(in_list == metrics.NOT_RANKED, stage_one.ranks, in_list)
    return ranks, reranked


def rerank_scores(logits: np.ndarray, retrieval_scores: np.ndarray, weight: float, temperature: float,
                  score_action: str = "click_score"):
    """Ranker `score_action` logit + weight * retrieval logit (cosine / temperature), both [U, K]."""
    return logits[..., ACTIONS.index(score_action)] + weight * retrieval_scores / temperature


class TwoStage:
    """Two-stage evaluation of one split: the ranker re-scores the retrieval model's top-K."""

    def __init__(self, stage_one: StageOne, ranker, ranker_params, split, which: str, recipe: Recipe):
        self.stage_one = stage_one
        self.score_action = recipe.score_action
        examples = phoenix_examples(split, which, recipe.ranker_history_len)
        self.logits = ranker_logits(ranker, ranker_params, split, examples, stage_one.topk,
                                    recipe.num_candidates)  # [U, K, A]
        self.retrieval = np.take_along_axis(stage_one.scores, stage_one.topk, axis=1)  # [U, K]

    def evaluate(self, weight: float, temperature: float):
        """(metrics, re-ranked top-K columns [U, K]) with the given retrieval weight."""
        scores = rerank_scores(self.logits, self.retrieval, weight, temperature, self.score_action)
        ranks, reranked = two_stage_ranks(self.stage_one, scores)
        return metrics.metrics_from_ranks(ranks), reranked


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def host_copy(tree):
    return jax.tree.map(np.array, jax.device_get(tree))


class MetricsLog:
    """Appends JSON lines to `path` (flushed per line, so a crashed run keeps what it logged)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write(self, **entry) -> None:
        entry = {k: _json_number(v) for k, v in entry.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _json_number(value):
    """NumPy/JAX scalars and arrays as Python numbers and lists; NaN and inf (an unmeasured steps/s)
    as null, so every line is valid JSON."""
    if isinstance(value, str) or value is None:
        return value
    if np.ndim(value):
        return [_json_number(v) for v in np.asarray(value).tolist()]
    value = float(value) if not isinstance(value, (bool, int, np.integer)) else int(value)
    return value if math.isfinite(value) else None


def read_metrics(path) -> list[dict]:
    """The entries of a metrics.jsonl; a bad line raises LogError naming it."""
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise LogError(f"{path}:{number}: not JSON ({error})") from None
    return entries


def _fit_keeping_best(trainer, state, batches, steps: int, evaluate, path: str, extra: dict, evals: int, stream,
                      stage: str, log: Optional[MetricsLog]):
    """training.fit with `evaluate(params) -> metrics` on validation `evals` times (the last at the
    end); the best by NDCG@10 is saved to `path` and returned as (host params, its metrics). Each fit
    history entry goes to `log` with the stage name as it is made (so metrics.jsonl grows during training)."""
    best = {"NDCG@10": -math.inf}
    kept = {}

    def validate(state):
        nonlocal best
        result = evaluate(state.params)
        if result["NDCG@10"] > best["NDCG@10"]:
            best = {**result, "step": int(state.step)}
            kept["params"] = host_copy(state.params)
            trainer.save(path, state, extra={**extra, "val": best})
        return {k: result[k] for k in ("HR@10", "NDCG@10")}

    training.fit(trainer, state, batches, steps, log_every=max(1, min(50, steps // 10)),
                 eval_fn=validate, eval_every=max(1, -(-steps // evals)), stream=stream,
                 on_log=None if log is None else (lambda entry: log.write(stage=stage, **entry)))
    return kept["params"], best


def _with_first(first, rest):
    yield first
    yield from rest


def _extra(recipe: Recipe, seed: int, split: LogSplit) -> dict:
    """What a checkpoint records about its run: recipe, seed, and how raw ids were made."""
    return {"recipe": dataclasses.asdict(recipe), "seed": seed, "source": split.log.source,
            "string_id_columns": sorted(split.log.names)}


def train_retrieval(split: LogSplit, recipe: Recipe, seed: int, checkpoint_dir: str, stream=None,
                    log: Optional[MetricsLog] = None, data_parallel=False):
    """Trains the two-tower model; returns (trainer, best params, best val metrics). `data_parallel`:
    training.Trainer's (each batch split over the devices, the state replicated)."""
    windows_per_epoch = len(training_windows(split, recipe.history_len)[0])
    steps = max(1, round(recipe.retrieval_epochs * windows_per_epoch / recipe.retrieval_batch_size))
    trainer = SequenceRetrievalTrainer(retrieval_config(recipe), hash_config(recipe), optimizer_config(recipe, steps),
                                       temperature=recipe.temperature, table_init_stddev=recipe.table_init_stddev,
                                       data_parallel=data_parallel)
    batches = retrieval_batches(split, recipe, trainer.hash_config, np.random.default_rng([seed, 1]))
    first = next(batches)
    state = trainer.init(jax.random.PRNGKey(seed), first[0])
    print(f"retrieval: {steps} steps of {recipe.retrieval_batch_size} windows ({windows_per_epoch} windows "
          f"per epoch)", file=stream)
    params, best = _fit_keeping_best(
        trainer, state, _with_first(first, batches), steps,
        lambda params: StageOne(trainer, params, split, "val", recipe.history_len, recipe.retrieve_k).metrics(),
        os.path.join(checkpoint_dir, "retrieval"), _extra(recipe, seed, split), recipe.evals_per_stage, stream,
        "retrieval", log)
    return trainer, params, best


def warm_start(ranker_params, retrieval_params):
    """Ranker params with every parameter the retrieval model also has (hash tables, transformer,
    input projections, action and surface embeddings) copied from it; the rest stay as initialised."""
    out = {}
    for module, named in ranker_params.items():
        source = retrieval_params.get(module.replace("phoenix_model", "phoenix_retrieval_model", 1), {})
        out[module] = {name: (np.asarray(source[name]) if name in source and
                              np.shape(source[name]) == np.shape(value) else value)
                       for name, value in named.items()}
    return out


def train_ranker(split: LogSplit, pool, recipe: Recipe, seed: int, checkpoint_dir: str, val_stage_one: StageOne,
                 retrieval_params=None, stream=None, log: Optional[MetricsLog] = None, data_parallel=False):
    """Trains the ranker; returns (trainer, best params, best val metrics). Model selection by the
    validation two-stage NDCG@10 of the ranker's own score (retrieval weight 0)."""
    examples = phoenix_examples(split, "train", recipe.ranker_history_len)
    steps = max(1, round(recipe.ranker_epochs * len(examples["user_ids"]) / recipe.ranker_batch_size))
    trainer = training.make_ranking_trainer(ranker_config(recipe), hash_config(recipe),
                                            optimizer_config(recipe, steps), action_weights=action_weights(split),
                                            table_init_stddev=recipe.table_init_stddev, data_parallel=data_parallel)
    batches = ranker_batches(split, examples, pool, recipe, trainer.hash_config, np.random.default_rng([seed, 2]))
    first = next(batches)
    state = trainer.init(jax.random.PRNGKey(seed + 1), first[0])
    if retrieval_params is not None:
        state = trainer._place_state(state._replace(params=jax.device_put(warm_start(host_copy(state.params),
                                                                                     retrieval_params))))
    print(f"ranker: {steps} steps of {recipe.ranker_batch_size} examples x {recipe.num_candidates} candidates",
          file=stream)
    params, best = _fit_keeping_best(
        trainer, state, _with_first(first, batches), steps,
        lambda params: TwoStage(val_stage_one, trainer, params, split, "val", recipe).evaluate(
            0.0, recipe.temperature)[0],
        os.path.join(checkpoint_dir, "ranker"), _extra(recipe, seed, split), recipe.evals_per_stage, stream,
        "ranker", log)
    return trainer, params, best


def evaluate_stages(split: LogSplit, retrieval, retrieval_params, ranker, ranker_params, recipe: Recipe):
    """Validation and test rows of the table, baselines included.

    The re-ranking weight of the retrieval logit is recipe.retrieval_weight, or the one of
    RETRIEVAL_WEIGHTS with the best validation NDCG@10. Returns (table {(split, name): metrics},
    re-ranked top-K columns {split: [U, K]}, StageOne per split, TwoStage per split, weight).
    """
    table, reranked, stage_one, two_stage = {}, {}, {}, {}
    for which in ("val", "test"):
        stage_one[which] = StageOne(retrieval, retrieval_params, split, which, recipe.history_len, recipe.retrieve_k)
        two_stage[which] = TwoStage(stage_one[which], ranker, ranker_params, split, which, recipe)
    weight = recipe.retrieval_weight
    if weight is None:
        weight = max(RETRIEVAL_WEIGHTS,
                     key=lambda w: two_stage["val"].evaluate(w, recipe.temperature)[0]["NDCG@10"])
    for which in ("val", "test"):
        for name in ml.BASELINES:
            table[(which, name)] = ml.evaluate_baseline(split, which, name)
        table[(which, "retrieval")] = stage_one[which].metrics()
        table[(which, "two-stage")], reranked[which] = two_stage[which].evaluate(weight, recipe.temperature)
    return table, reranked, stage_one, two_stage, weight


def hash_collisions(split: ml.Split, hashes: HashConfig) -> dict:
    """{id type: (ids, ids sharing both their rows with another id, ids sharing at least one row)}."""
    out = {}
    for name, ids in (("user", split.user_ids), ("post", split.item_ids), ("author", np.unique(split.item_authors))):
        values = hashing.hash_ids(ids, hashes, name)  # [V, H]
        one = np.zeros(len(ids), bool)
        for h in range(values.shape[1]):
            one |= hashing.colliding_mask(values[:, h:h + 1])
        out[name] = (len(ids), int(hashing.colliding_mask(values).sum()), int(one.sum()))
    return out


def format_table(rows: dict) -> str:
    """Markdown table from {(split, name): metrics dict}."""
    lines = ["| split | model | HR@10 | NDCG@10 | HR@50 | MRR |", "|---|---|---:|---:|---:|---:|"]
    for (which, name), m in rows.items():
        cells = [f"{m[k]:.4f}" if k in m else "n/a" for k in ("HR@10", "NDCG@10", "HR@50", "MRR")]
        lines.append(f"| {which} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_run_dir(path, overwrite: bool = False) -> None:
    """Refuses (FileExistsError) a run directory holding an earlier run's checkpoints or metrics,
    unless `overwrite`: nothing already saved is replaced without being asked."""
    earlier = [name for name in (*STAGES, METRICS_FILE) if os.path.exists(os.path.join(path, name))]
    if earlier and not overwrite:
        raise FileExistsError(f"{path}: holds an earlier run ({', '.join(earlier)}); pass --overwrite "
                              "(overwrite=True) to replace it, or choose another --checkpoint-dir")


def run(split: LogSplit, recipe: Recipe, checkpoint_dir, seed: int = 0, overwrite: bool = False,
        plot: bool = False, stream=None, title: Optional[str] = None, data_parallel=False) -> dict:
    """Trains both stages, keeps the best checkpoints, evaluates them read back; prints the table.

    Progress goes to `stream` (default stderr), the table to stdout. Returns {"table": {(split, name):
    metrics}, "reranked": {split: [U, K] columns}, "retrieval_weight", "retrieval" / "ranker" (trainers),
    "retrieval_params" / "ranker_params" (best, as saved), "retrieval_best" / "ranker_best" (their val
    metrics and step), "stage_one" / "two_stage" (per split), "times", "wall_s", "checkpoint_dir",
    "recipe" (with table sizes resolved), "split"}.
    """
    stream = sys.stderr if stream is None else stream
    checkpoint_dir = str(checkpoint_dir)
    check_run_dir(checkpoint_dir, overwrite)
    if plot:
        _pyplot()  # a missing matplotlib fails now, not after training
    recipe = resolve_recipe(recipe, split)
    check_recipe(split, recipe)
    start = time.perf_counter()
    log = MetricsLog(os.path.join(checkpoint_dir, METRICS_FILE))
    print(f"{describe(split)}; seed {seed}\n{recipe}", file=stream)
    print("hash collisions (ids, sharing all rows, sharing a row): " + ", ".join(
        f"{name}s {c}" for name, c in hash_collisions(split, hash_config(recipe)).items()), file=stream)

    print("\n== stage 1: retrieval (in-batch softmax, logQ correction, accidental-hit masking)", file=stream)
    t0 = time.perf_counter()
    retrieval, retrieval_params, retrieval_best = train_retrieval(split, recipe, seed, checkpoint_dir, stream, log,
                                                                  data_parallel)
    times = {"retrieval": time.perf_counter() - t0}
    print(f"retrieval: best val NDCG@10 {retrieval_best['NDCG@10']:.4f} at step {retrieval_best['step']}, "
          f"{times['retrieval']:.0f} s", file=stream)

    t0 = time.perf_counter()
    pool = (hard_negative_pool(retrieval, retrieval_params, split, recipe.history_len, recipe.negative_pool)
            if recipe.hard_negatives else None)
    val_one = StageOne(retrieval, retrieval_params, split, "val", recipe.history_len, recipe.retrieve_k)
    times["mining"] = time.perf_counter() - t0

    print(f"\n== stage 2: ranker (target + {recipe.hard_negatives} hard + {recipe.random_negatives} random "
          f"negatives, multi-action BCE); negatives mined in {times['mining']:.0f} s", file=stream)
    t0 = time.perf_counter()
    ranker, ranker_params, ranker_best = train_ranker(
        split, pool, recipe, seed, checkpoint_dir, val_one,
        retrieval_params if recipe.ranker_init_from_retrieval else None, stream, log, data_parallel)
    times["ranker"] = time.perf_counter() - t0
    print(f"ranker: best val NDCG@10 {ranker_best['NDCG@10']:.4f} at step {ranker_best['step']}, "
          f"{times['ranker']:.0f} s", file=stream)

    t0 = time.perf_counter()
    # The final evaluation reads the best weights back from the saved checkpoints.
    retrieval_params = checkpoint.load_checkpoint(os.path.join(checkpoint_dir, "retrieval"),
                                                  params_template=retrieval_params).params
    ranker_params = checkpoint.load_checkpoint(os.path.join(checkpoint_dir, "ranker"),
                                               params_template=ranker_params).params
    table, reranked, stage_one, two_stage, weight = evaluate_stages(split, retrieval, retrieval_params, ranker,
                                                                    ranker_params, recipe)
    times["evaluation"] = time.perf_counter() - t0
    wall = time.perf_counter() - start
    for (which, name), m in table.items():
        log.write(stage="evaluation", split=which, model=name, **m)
    print(f"evaluation {times['evaluation']:.0f} s; re-ranking score = ranker {recipe.score_action} logit + "
          f"{weight:g} x retrieval cosine / {recipe.temperature:g} (weight chosen on validation)", file=stream)
    if plot:
        print(f"curves: {plot_curves(log.path, os.path.join(checkpoint_dir, PLOT_FILE))}", file=stream)

    title = title or f"{split.log.source}, {split.protocol}"
    print(f"\n{title}, all {len(split.item_ids)} items ranked, seed {seed}, wall time {wall:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")\n")
    print(format_table(table))
    return {"table": table, "reranked": reranked, "retrieval_weight": weight, "retrieval": retrieval,
            "retrieval_params": retrieval_params, "ranker": ranker, "ranker_params": ranker_params,
            "retrieval_best": retrieval_best, "ranker_best": ranker_best, "stage_one": stage_one,
            "two_stage": two_stage, "times": times, "wall_s": wall, "checkpoint_dir": checkpoint_dir,
            "recipe": recipe, "split": split}


# ---------------------------------------------------------------------------------------------
# Serving one user, dumps, curves
# ---------------------------------------------------------------------------------------------


def user_row(split: LogSplit, user) -> int:
    """The split's row of `user`, an original id (a string for a string column); ValueError if absent."""
    try:
        raw = string_id(str(user)) if "user" in split.log.names else int(user)
    except ValueError:
        raise ValueError(f"user: expected an integer id (the log's user ids are integers), got {user!r}") from None
    row = int(np.searchsorted(split.user_ids, raw))
    if row >= len(split.user_ids) or split.user_ids[row] != raw:
        raise ValueError(f"user: {user!r} is not in {split.log.source}")
    return row


def user_examples(split: LogSplit, user, history_len: int) -> dict:
    """Examples dict (phoenix_examples keys but the targets) of one user whose history is the last
    S of everything the log holds for them: what serving sees."""
    row = user_row(split, user)
    rows, ends = np.array([row]), np.array([split.offsets[row + 1]])
    examples = _histories(split, rows, ends, history_len)
    examples["target_post_ids"] = split.items[ends - 1]  # a placeholder candidate for user-tower-only calls
    return examples


def user_batch(split: LogSplit, user, history_len: int, hashes: HashConfig, candidate_ids=None):
    """RecsysBatch [1, S] of `user`'s latest history with candidates `candidate_ids` [C] (raw item ids,
    default one placeholder): the input of the runners' retrieve / rank for that user."""
    candidates = None if candidate_ids is None else np.asarray(candidate_ids, np.int64)[None, :]  # [1, C]
    return ml.phoenix_batch(split, user_examples(split, user, history_len), hashes, candidates)


def items_batch(split: ml.Split, hashes: HashConfig):
    """RecsysBatch [1, N] whose candidates are every catalog item: the corpus for the candidate tower."""
    return ml.phoenix_batch(split, _item_examples(split), hashes, split.item_ids[None, :])


def seen_items(split: LogSplit, user) -> np.ndarray:
    """[N] bool: the catalog items the log holds for `user` (never recommended again)."""
    row = user_row(split, user)
    seen = np.zeros(len(split.item_ids), bool)
    seen[split.item_columns[split.offsets[row]:split.offsets[row + 1]]] = True
    return seen


def recommend(result: dict, split: LogSplit, user, k: int = FINAL_K) -> list[tuple]:
    """Top-k new items for `user` (an original id) after everything the log holds for them.

    Retrieval's top retrieve_k of the items the user has not seen, re-ranked as in the evaluation
    (ranker logit + the chosen weight x retrieval logit). Returns [(item id, score)] best first.
    """
    recipe, retrieval, ranker = result["recipe"], result["retrieval"], result["ranker"]
    seen = seen_items(split, user)[None, :]  # [1, N]
    items = encode_items(retrieval, result["retrieval_params"], split)  # [N, D]
    users = encode_users(retrieval, result["retrieval_params"], split, user_examples(split, user, recipe.history_len))
    scores = users @ items.T  # [1, N]
    top = metrics.topk_columns(scores, min(recipe.retrieve_k, int((~seen).sum())), seen)  # [1, K]
    logits = ranker_logits(ranker, result["ranker_params"], split, user_examples(split, user, recipe.ranker_history_len),
                           top, recipe.num_candidates)  # [1, K, A]
    final = rerank_scores(logits, np.take_along_axis(scores, top, axis=1), result["retrieval_weight"],
                          recipe.temperature, recipe.score_action)[0]  # [K]
    order = np.argsort(-final, kind="stable")[:k]
    return list(zip(split.log.tokens("item", split.item_ids[top[0, order]]), final[order].tolist()))


def dump_topk(path, split: LogSplit, topk_columns: np.ndarray) -> None:
    """CSV `user_id,item_1,...,item_K` of every evaluated user, original ids, written atomically."""
    users = split.log.tokens("user", split.user_ids[split.eval_users()])
    items = split.log.tokens("item", split.item_ids[topk_columns])
    K = topk_columns.shape[1]
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["user_id"] + [f"item_{j + 1}" for j in range(K)])
            for u, user in enumerate(users):
                writer.writerow([user] + items[u * K:(u + 1) * K])
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_dump(path, log: Log, k: int = FINAL_K) -> dict:
    """HR@k / NDCG@k of a dump against leave-one-out test targets rebuilt from the log in plain Python
    (independent of split_log and phoenix_metrics.py, as an outside evaluator would be): per user,
    interactions by (timestamp, input order), each item's first one kept, the last = the target."""
    by_user = {}
    for r, (user, item, stamp) in enumerate(zip(log.tokens("user", log.user), log.tokens("item", log.item),
                                                log.timestamp.tolist())):
        by_user.setdefault(str(user), []).append((stamp, r, str(item)))
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    dumped = {row[0]: row[1:k + 1] for row in rows[1:] if row}
    hits = gain = evaluated = history_hits = 0
    for user, events in by_user.items():
        sequence = list(dict.fromkeys(item for _, _, item in sorted(events)))  # first occurrences, in time order
        if len(sequence) < ml.MIN_EVAL_RATINGS:
            continue
        evaluated += 1
        target, top = sequence[-1], dumped.get(user, [])
        history_hits += len(set(top) & set(sequence[:-1]))
        if target in top:
            hits += 1
            gain += 1.0 / math.log2(top.index(target) + 2)
    return {f"HR@{k}": hits / evaluated, f"NDCG@{k}": gain / evaluated, "num_users": evaluated,
            "missing_users": len(set(by_user) - set(dumped)) if evaluated else 0,
            "history_items_in_topk": history_hits}


_PLOT_TITLES = {"retrieval": "retrieval (validation: retrieval alone)",
                "ranker": "ranker (validation: two-stage, ranker score alone)"}


def _pyplot():
    """matplotlib.pyplot with the file-only backend, or ImportError saying how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot_curves / --plot need matplotlib: `uv sync --extra plot` "
                          "(or pip install 'phoenix-recsys[plot]')") from None
    return plt


def plot_curves(metrics_path, png_path) -> str:
    """PNG of each stage's training loss and validation HR@10 / NDCG@10 by step; returns its path.
    Needs matplotlib (the `plot` extra)."""
    plt = _pyplot()
    entries = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(STAGES), figsize=(6 * len(STAGES), 4.5), squeeze=False)
    for ax, stage in zip(axes[0], STAGES):
        train = [e for e in entries if e.get("stage") == stage and "loss" in e]
        val = [e for e in entries if e.get("stage") == stage and "eval/NDCG@10" in e]
        ax.plot([e["step"] for e in train], [e["loss"] for e in train], color="tab:blue", label="training loss")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss", color="tab:blue")
        ax.set_title(_PLOT_TITLES[stage])
        right = ax.twinx()
        for key, style in (("eval/HR@10", "o-"), ("eval/NDCG@10", "s--")):
            right.plot([e["step"] for e in val], [e[key] for e in val], style, color="tab:orange",
                       label="validation " + key.split("/")[1])
        right.set_ylabel("validation", color="tab:orange")
        lines = ax.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3,
                  frameon=False)  # below the axes: curves are never hidden
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return str(png_path)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _optional(kind):
    """argparse type for an Optional field: "none"/"auto" -> None, else kind(value)."""
    return lambda text: None if text.lower() in ("none", "auto") else kind(text)


def add_run_flags(parser: argparse.ArgumentParser, default_checkpoint_dir, defaults: Optional["Recipe"] = None) -> None:
    """--seed, --checkpoint-dir, --overwrite, --dump-topk, --plot, --data-parallel and one flag per Recipe field,
    each defaulting to `defaults`' value (default Recipe())."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", default=default_checkpoint_dir,
                        help="the run directory: retrieval/, ranker/, metrics.jsonl (default: "
                             "$PHOENIX_CACHE_DIR/checkpoints/<data name>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the checkpoints and metrics of an earlier run in --checkpoint-dir")
    parser.add_argument("--dump-topk", default=None, metavar="PATH",
                        help="write every test user's final top-10 (original ids) as CSV and re-check it")
    parser.add_argument("--plot", action="store_true",
                        help=f"write {PLOT_FILE} (training loss, validation curves) to the run directory (matplotlib)")
    parser.add_argument("--data-parallel", action="store_true",
                        help="split each training batch over all devices JAX finds (batch sizes must divide evenly)")
    defaults = Recipe() if defaults is None else defaults
    hints = typing.get_type_hints(Recipe)
    for field in dataclasses.fields(Recipe):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        kind = next((t for t in typing.get_args(hints[field.name]) if t is not type(None)), hints[field.name])
        if kind is bool:
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default,
                                help=f"Recipe.{field.name}, default {default}")
        else:
            parser.add_argument(flag, type=_optional(kind) if default is None else kind, default=default,
                                help=f"Recipe.{field.name}, default {default}")


def recipe_from_args(args) -> Recipe:
    return Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})


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


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, metavar="LOG.csv", help="the interaction log (CSV with a header)")
    for role, flag in _FLAGS.items():
        default = getattr(Columns(), role)
        parser.add_argument(flag, default=default,
                            help=f"{role} column (default {default or _AUTO_NAMES[role] + ' if present'})")
    parser.add_argument("--delimiter", default=",", help="field separator (\\t for TSV)")
    parser.add_argument("--rating-actions", type=parse_rating_actions, default=DEFAULT_RATING_ACTIONS,
                        metavar="ACTION=LOW:HIGH,...",
                        help="actions a rating sets (inclusive ranges, an empty bound is open); default "
                             "click_score=:,favorite_score=4:,share_score=5:,not_interested_score=:2")
    parser.add_argument("--duplicates", choices=DUPLICATE_RULES, default="first",
                        help="a repeated (user, item): keep the earliest (default) or refuse the log")
    parser.add_argument("--split", choices=SPLIT_PROTOCOLS, default="leave-one-out")
    parser.add_argument("--cut-time", type=float, default=None, help="time split: the cut T (same unit as the log)")
    parser.add_argument("--cut-quantile", type=float, default=None,
                        help=f"time split: the cut at this quantile of all timestamps (default {DEFAULT_CUT_QUANTILE})")
    add_run_flags(parser, None)
    args = parser.parse_args(argv)
    if args.checkpoint_dir is None:
        args.checkpoint_dir = str(ml.cache_dir() / "checkpoints" / Path(args.data).stem)
    args.delimiter = "\t" if args.delimiter in ("\\t", "tab") else args.delimiter
    return args, recipe_from_args(args)


def main(argv=None) -> dict:
    """The whole experiment on a CSV log (module docstring); returns run()'s dict plus "dump_check"."""
    args, recipe = parse_args(sys.argv[1:] if argv is None else argv)
    check_run_dir(args.checkpoint_dir, args.overwrite)  # before reading and splitting a large log
    columns = Columns(user=args.user_col, item=args.item_col, time=args.time_col, rating=args.rating_col,
                      author=args.author_col)
    log = read_log(args.data, columns, args.rating_actions, delimiter=args.delimiter)
    split = split_log(log, args.split, args.duplicates, args.cut_time, args.cut_quantile)
    result = run(split, recipe, args.checkpoint_dir, args.seed, args.overwrite, args.plot,
                 data_parallel=args.data_parallel)
    result["dump_check"] = None
    if args.dump_topk:
        dump_topk(args.dump_topk, split, result["reranked"]["test"][:, :FINAL_K])
        ours = result["table"][("test", "two-stage")]
        line = f"\ndump {args.dump_topk}: table HR@10 {ours['HR@10']:.4f} NDCG@10 {ours['NDCG@10']:.4f}"
        if split.protocol == "leave-one-out":
            check = result["dump_check"] = check_dump(args.dump_topk, log)
            line += (f"; recomputed from the dump HR@10 {check['HR@10']:.4f} NDCG@10 {check['NDCG@10']:.4f} "
                     f"({check['num_users']} users, history items in the top-10s: {check['history_items_in_topk']})")
        print(line)
    return result


if __name__ == "__main__":
    main()

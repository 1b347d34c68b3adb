"""Interaction logs: read a CSV (or arrays) and check every value; phoenix_split.py splits the result.

    log = phoenix_log.read_csv("log.csv")     # or phoenix_log.from_arrays({"user_id": ..., ...})
    split = phoenix_split.split_log(log)       # chronological leave-one-out

Input
  A CSV with a header line (stdlib csv: quoting works; --delimiter for TSV): user_id, item_id,
  timestamp, optional rating, optional 0/1 columns named after Phoenix actions (ACTIONS, e.g.
  favorite_score), optional author_id; names configurable (Columns, --user-col ...). Extra columns
  are ignored. A path may be a file, a FIFO (--data <(zcat log.csv.gz)) or "-" (standard input),
  read once front to back. Compressed and binary files (gzip, zstd, bzip2, xz, zip, Parquet,
  Arrow/Feather) are recognised by their first bytes and refused, saying what they are: reading
  them is not supported yet (decompress or export as CSV; pyarrow is not a dependency).
  Ids: a column is integer when every value is a non-negative int64 in canonical decimal form
  ("12", not "012" or "-3"); any other column is strings, each hashed to a non-negative int64 by
  string_id (BLAKE2b, stable across runs and machines: hash a string the same way to serve it).
  Two distinct strings of one column hashing alike (p ~ n^2 / 2^64) is refused, naming both.
  Timestamps: numbers (integers, or decimals such as 1.5e9); only their order is used. A column
  whose values are all integers is int64, parsed exactly even where some are written "...000.0"
  (nanoseconds beyond 2**53 stay distinct); one with fractional values is float64, and two
  different values that float64 would merge are refused, naming both lines. Ratings:
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


Duplicates, ties and splits: phoenix_split.py (a Log keeps every row in input order).


Shape glossary
  R  interactions   A  actions (19)
"""

import csv
import dataclasses
import decimal
import hashlib
import io
import math
import os
import re
import stat
import sys
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from phoenix_inputs import ACTIONS

__all__ = ["Log", "LogError", "Columns", "read_csv", "read_log", "from_arrays", "check_log_path", "string_id",
           "check_rating_actions", "DEFAULT_RATING_ACTIONS", "COLUMN_FLAGS", "AUTO_COLUMN_NAMES", "STDIN"]

NUM_ACTIONS = len(ACTIONS)
INTERACTION_ACTION = "click_score"  # set by every row: the user chose the item
# A rating column's default meaning: MovieLens stars (movielens.RATING_ACTIONS), every row a click.
DEFAULT_RATING_ACTIONS = {"click_score": (-math.inf, math.inf), "favorite_score": (4.0, math.inf),
                          "share_score": (5.0, math.inf), "not_interested_score": (-math.inf, 2.0)}
_INT64_MAX = np.iinfo(np.int64).max
STDIN = "-"  # read_csv / read_log / --data: the log on standard input
STDIN_SOURCE = "<stdin>"


class LogError(ValueError):
    """Data that cannot be trained on (a log, a dataset's files, a dump); the message names the file (or
    input), line and column. Dataset adapters derive theirs from it (movielens.RatingsFileError)."""


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


COLUMN_FLAGS = {"user": "--user-col", "item": "--item-col", "time": "--time-col", "rating": "--rating-col",
          "author": "--author-col"}
AUTO_COLUMN_NAMES = {"rating": "rating", "author": "author_id"}


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
    line: Optional[np.ndarray]  # [R] int64 file line (or input row) of each interaction, for messages;
    # None: row + 2 in a file (the header is line 1, no blank or multi-line rows), the row itself in arrays
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
            if x is None and name in ("rating", "line"):
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
            x = getattr(self, name)
            if x.min() == x.max():  # O(R), unlike counting the distinct ids
                raise LogError(f"{self.source}: only one {name} ({self.token(name, x[0])!r}) in {num} "
                               f"interactions: expected at least 2 ({why})")

    def at(self, row: int) -> str:
        """Where interaction `row` came from: "path:line" or "source row i"."""
        line = int(row) + (2 if self.from_file else 0) if self.line is None else self.line[row]
        return f"{self.source}:{line}" if self.from_file else f"{self.source} row {line}"

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


# An integer written as a decimal with a zero fraction ("1700000000000000000.0"): still an integer.
_INTEGRAL_TEXT = re.compile(r"([-+]?[0-9]+)(?:\.0*)?")


def _number_column(x: np.ndarray, column: str, at, expected: str, exact: bool = False) -> np.ndarray:
    """Finite numbers [R]: int64 when every value is an integer (written "12" or "12.0", parsed
    exactly, never through float64), else float64. `exact`: distinct values written as text must
    stay distinct (a float64 column rounds to 15-17 significant digits): LogError naming both rows."""
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
        integral = [_INTEGRAL_TEXT.fullmatch(field) for field in text.tolist()]
        if all(integral):
            ints = [int(match.group(1)) for match in integral]
            if all(-_INT64_MAX - 1 <= v <= _INT64_MAX for v in ints):
                return np.array(ints, np.int64)
        values = np.empty(len(text), np.float64)
        for r, field in enumerate(text.tolist()):
            try:
                if "_" in field:  # float() would read "1_0" as 10
                    raise ValueError(field)
                values[r] = float(field)
            except ValueError:
                raise LogError(f"{at(r)}: column {column!r}: expected {expected}, got {field!r}") from None
        if exact:
            _check_distinct_stay_distinct(text, values, column, at)
    else:
        raise TypeError(f"column {column!r}: expected {expected}, got dtype {x.dtype}")
    finite = np.isfinite(values)
    if not finite.all():
        r = _first_bad(finite)
        raise LogError(f"{at(r)}: column {column!r}: expected {expected}, got {values[r]}")
    return values


def _check_distinct_stay_distinct(text: np.ndarray, values: np.ndarray, column: str, at) -> None:
    """LogError if two fields denoting different numbers read as one float64 (rounding is monotone,
    so that is the only way reading as float64 changes the order of a column)."""
    fields, rows = np.unique(text, return_index=True)  # [V] distinct texts, the first row of each
    by_value = {}
    for field, row in zip(fields.tolist(), rows.tolist()):
        if not math.isfinite(values[row]):
            continue  # refused as not finite by the caller
        number = decimal.Decimal(field)
        seen = by_value.setdefault(float(values[row]), (number, row))
        if seen[0] != number:
            first, second = sorted((seen[1], row))
            raise LogError(f"{at(second)}: column {column!r}: {str(text[second])!r} and {str(text[first])!r} (at "
                           f"{at(first)}) are different numbers but read as the same float64 {float(values[row])!r} "
                           "(the column has "
                           "fractional values, so it is read as float64, which holds 15-17 significant digits): "
                           "write every value as an integer (e.g. nanoseconds), or in a coarser unit")


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
              timestamp=_number_column(values["time"], names["time"], at, "a number (e.g. Unix seconds)", exact=True),
              actions=_actions(rating, flags, rating_actions, len(lines)), author=author, rating=rating,
              line=np.asarray(lines, np.int64), names=id_names, source=source, from_file=from_file)
    _check_one_author_per_item(log)
    return log


def _check_one_author_per_item(log: Log) -> None:
    if not np.any(log.author != log.author[0]):  # one author (or no author column): nothing can clash
        return
    by_item = np.argsort(log.item, kind="stable")  # [R] by item, then input order
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
            name = AUTO_COLUMN_NAMES[role]
            if name not in seen:
                continue
        elif name not in seen:
            raise LogError(f"{where}: missing column {name!r} (the {role} column; name another with "
                           f"{COLUMN_FLAGS[role]} / Columns({role}=...)); the header has {header}")
        wanted[role] = (name, seen[name])
    for name in ACTIONS:
        if name in seen and name not in {n for n, _ in wanted.values()}:
            wanted[name] = (name, seen[name])
    return wanted


# Leading bytes of file formats a log might arrive in by mistake: (magic, what it is, what to do).
_DECOMPRESS = "reading compressed logs is not supported yet: decompress it first, or pipe it in"
BINARY_FORMATS = (
    (b"\x1f\x8b", "gzip-compressed", _DECOMPRESS + " (--data <(zcat LOG.gz), or zcat LOG.gz | ... --data -)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", _DECOMPRESS + " (--data <(zstdcat LOG.zst))"),
    (b"BZh", "bzip2-compressed", _DECOMPRESS + " (--data <(bzcat LOG.bz2))"),
    (b"\xfd7zXZ\x00", "xz-compressed", _DECOMPRESS + " (--data <(xzcat LOG.xz))"),
    (b"PK\x03\x04", "a zip archive", "reading zip archives is not supported yet: extract the CSV first "
                                      "(unzip LOG.zip), or pipe it in (--data <(unzip -p LOG.zip))"),
    (b"PK\x05\x06", "an empty zip archive", "extract the CSV first"),
    (b"PAR1", "a Parquet file", "reading Parquet is not supported yet (pyarrow is not a dependency of Phoenix): "
                                "export the log as CSV, e.g. pandas.read_parquet(path).to_csv(out, index=False)"),
    (b"ARROW1", "an Arrow IPC (Feather v2) file", "reading Arrow/Feather is not supported yet: export the log as "
                                                  "CSV, e.g. pandas.read_feather(path).to_csv(out, index=False)"),
    (b"FEA1", "a Feather (v1) file", "reading Feather is not supported yet: export the log as CSV, e.g. "
                                     "pandas.read_feather(path).to_csv(out, index=False)"),
)


def _check_not_binary(data: bytes, source: str) -> None:
    """LogError saying what a log's bytes are when they are a known binary or compressed format."""
    for magic, what, advice in BINARY_FORMATS:
        if data.startswith(magic):
            what = what if what.startswith(("a ", "an ")) else f"a {what} file"
            raise LogError(f"{source}: is {what}, not a CSV (it starts with the bytes {data[:len(magic)]!r}); "
                           f"{advice}")


def read_csv(path, columns: Columns = Columns(), rating_actions: Mapping = DEFAULT_RATING_ACTIONS,
             delimiter: str = ",") -> Log:
    """Reads a log CSV (header line first, UTF-8) from a file, a FIFO (`<(zcat log.csv.gz)`) or
    standard input ("-"), once and front to back; the module docstring has the format and the checks."""
    stdin = os.fspath(path) == STDIN
    source = STDIN_SOURCE if stdin else str(path)
    if not stdin and Path(path).suffix.lower() == ".parquet":
        raise LogError(f"{path}: Parquet is not supported yet (pyarrow is not a dependency of Phoenix); "
                       "export the log as CSV, e.g. pandas.read_parquet(path).to_csv(out, index=False)")
    data = sys.stdin.buffer.read() if stdin else Path(path).read_bytes()
    _check_not_binary(data, source)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise LogError(f"{source}:{line}: not valid UTF-8 (byte {data[error.start]:#04x})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None or not "".join(header).strip():
            raise LogError(f"{source}:1: expected a header line naming the columns ({columns.user}, "
                           f"{columns.item}, {columns.time}, ...), got an empty line or file")
        header = [name.strip() for name in header]
        wanted = _resolve_columns(header, columns, f"{source}:1")
        fields = {role: [] for role in wanted}
        lines = []
        for row in reader:
            if not "".join(row).strip():
                continue  # blank line
            if len(row) != len(header):
                raise LogError(f"{source}:{reader.line_num}: expected {len(header)} fields separated by "
                               f"{delimiter!r} (as the header), got {len(row)}: {delimiter.join(row)[:80]!r}")
            lines.append(reader.line_num)
            for role, (_, j) in wanted.items():
                fields[role].append(row[j])
    except csv.Error as error:
        raise LogError(f"{source}:{reader.line_num}: {error}") from None
    values = {role: np.array(v, dtype=str) for role, v in fields.items()}
    return _build_log(values, {role: name for role, (name, _) in wanted.items()}, rating_actions, source,
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


def check_log_path(path) -> None:
    """Refuses, before anything is read, a log path that is missing or that no log can be read from:
    FileNotFoundError, IsADirectoryError or LogError saying what the path is. A regular file, a FIFO
    and "-" (standard input) pass."""
    if os.fspath(path) == STDIN:
        if sys.stdin is None or sys.stdin.isatty():
            raise LogError("-: standard input is a terminal, not a log: pipe one in (cat log.csv | ... --data -)")
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        dangling = os.path.islink(path)
        raise FileNotFoundError(f"{path}: {'a dangling symlink' if dangling else 'no such file'} (expected a log: "
                                "a CSV with a header line)") from None
    except NotADirectoryError:
        raise FileNotFoundError(f"{path}: no such file (a parent of it is a file, not a directory)") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{path}: is a directory, not a log file (expected a CSV with a header line)")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        kind = ("a character device" if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise LogError(f"{path}: is {kind}, not a log file (expected a CSV with a header line; a pipe works too: "
                       "--data <(zcat log.csv.gz), or - for standard input)")


def read_log(path, columns: Columns = Columns(), rating_actions: Mapping = DEFAULT_RATING_ACTIONS,
             delimiter: str = ",") -> Log:
    """read_csv, after check_log_path's errors (a missing path, a directory, a device)."""
    check_log_path(path)
    return read_csv(path, columns, rating_actions, delimiter)

"""Interaction logs: read any common log format (or arrays) and check every value; phoenix_split.py splits the result.

    log = phoenix_log.read_log("log.csv.gz")  # or phoenix_log.from_arrays({"user_id": ..., ...}) / a DataFrame
    split = phoenix_split.split_log(log)       # chronological leave-one-out

Input
  A table with columns user_id, item_id, timestamp, optional rating, optional 0/1 columns named after
  Phoenix actions (ACTIONS, e.g. favorite_score), optional author_id; names configurable (Columns,
  --user-col ...). Extra columns are ignored (and never converted).
  Formats (read_log; pyarrow reads them, multi-threaded, converting only the columns used), told
  apart by their first bytes whatever the file is called:
    CSV / TSV    a header line, then one row per line (UTF-8; "quoted, fields" and quoted newlines
                 work; blank lines are skipped). The delimiter: the one given, else a tab for a
                 .tsv / .tab name (also .tsv.gz, ...), else sniffed from the header line (",", tab,
                 ";" or "|": the one that splits out the user, item and time column names).
    compressed   gzip, zstd, bzip2 or xz around any of these formats.
    Parquet      "PAR1"; Arrow IPC / Feather v2 ("ARROW1"), Feather v1, and an Arrow IPC stream.
  A path may be a file, a FIFO (--data <(zcat log.csv.gz)) or "-" (standard input): a pipe is read
  whole into memory once (it cannot be read twice), a file is streamed. Zip archives (and xlsx) are
  refused, saying how to extract the CSV.
  Ids: a column is integer when every value is a non-negative int64 (for text: in canonical decimal
  form, "12", not "012", "+12" or "-3"); any other column is strings, each distinct value hashed once
  to a non-negative int64 by string_id (BLAKE2b, stable across runs and machines: hash a string the
  same way to serve it). Two distinct strings of one column hashing alike (p ~ n^2 / 2^64) is
  refused, naming both. Text ids are read as text, so a file's integer column gives the same ids as
  the same column in Parquet.
  Timestamps: only their order is used (and the cut of a time split).
    integers     int64, parsed exactly (never through float64), also where some are written
                 "...000.0": nanoseconds beyond 2**53 stay distinct.
    decimals     float64 (e.g. 1.5e9); two different values that float64 would merge are refused,
                 naming both lines.
    dates/times  ISO-8601 / RFC 3339 text (2024-05-01, 2024-05-01 12:00:00, 2024-05-01T12:00:00.250Z,
                 2024-05-01T14:00:00+02:00, 2024-05-01 12:00:00 UTC) and Arrow / Parquet / pandas /
                 NumPy timestamp and date types become int64 NANOSECONDS SINCE 1970-01-01 UTC
                 (Log.datetimes is then True): a zoned time is converted to UTC, a naive one (no
                 zone, a date, a zone-less timestamp type) is read as if it were UTC. A column
                 mixing zoned and naive text is refused (their order would depend on a zone the log
                 does not give), so is a time outside the years 1677-2262 (what int64 nanoseconds
                 hold). A time split's cut is then an ISO-8601 time too (parse_time; run_train.py
                 --cut-time 2024-05-01).
  Ratings: finite numbers. Action columns: 0 or 1. Every bad value raises LogError naming file, line
  and column (a Parquet / Arrow file or arrays: the row, counted from 0); so do a missing value
  (null, NaN in pandas), a missing column, a line with the wrong number of fields, invalid UTF-8
  in the header or a column used, an empty log, a log with one user or one item, and an item
  listed with two authors. A line is a line of the (decompressed) text, where its row starts; a
  line of empty fields (",,") is a row of empty values, refused, not a blank line.


Actions (the Phoenix labels of an interaction)
  Every row is an interaction: click_score is set unless a click_score column says otherwise.
  A rating column sets actions through `rating_actions` {action: inclusive rating range}, by
  default DEFAULT_RATING_ACTIONS (MovieLens's 1-5 stars: favorite >= 4, share = 5,
  not_interested <= 2). An action column overrides the rating for that action. The ranker is
  trained on the actions the log ever sets (the others get weight 0) and re-ranks by
  Recipe.score_action.


Duplicates, ties and splits: phoenix_split.py (a Log keeps every row in input order).


Shape glossary
  R  interactions   A  actions (19)   V  distinct values of a column
"""

import codecs
import contextlib
import csv
import dataclasses
import decimal
import hashlib
import io
import lzma
import math
import os
import re
import stat
import sys
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as arrow_csv

from phoenix_inputs import ACTIONS

__all__ = ["Log", "LogError", "Columns", "read_csv", "read_log", "from_arrays", "check_log_path", "string_id",
           "parse_time", "check_rating_actions", "DEFAULT_RATING_ACTIONS", "COLUMN_FLAGS", "AUTO_COLUMN_NAMES",
           "STDIN"]

NUM_ACTIONS = len(ACTIONS)
INTERACTION_ACTION = "click_score"  # set by every row: the user chose the item
# A rating column's default meaning: MovieLens stars (movielens.RATING_ACTIONS), every row a click.
DEFAULT_RATING_ACTIONS = {"click_score": (-math.inf, math.inf), "favorite_score": (4.0, math.inf),
                          "share_score": (5.0, math.inf), "not_interested_score": (-math.inf, 2.0)}
_INT64_MAX = np.iinfo(np.int64).max
NANOSECONDS = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}  # per unit of an Arrow timestamp
NANOSECONDS_PER_DAY = 86_400 * 10**9
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
    timestamp: np.ndarray  # [R] int64 or float64, finite (dates/times: int64 ns since the Unix epoch, UTC)
    actions: np.ndarray  # [R, A] bool, ACTIONS order
    author: np.ndarray  # [R] int64 author of the item (0 without an author column)
    rating: Optional[np.ndarray]  # [R] float32, None without a rating column
    line: Optional[np.ndarray]  # [R] int64 file line (or input row) of each interaction, for messages;
    # None: row + 2 in a file (the header is line 1, no blank or multi-line rows), the row itself in arrays
    names: Mapping  # {"user"/"item"/"author": {hashed id: original string}} of string columns
    source: str
    from_file: bool = True  # `line` holds file lines ("path:12"), else row indices ("source row 12")
    datetimes: bool = False  # timestamp came from dates/times: int64 ns since 1970-01-01 UTC (parse_time's unit)

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


# ---------------------------------------------------------------------------------------------
# Columns: Arrow arrays in, checked NumPy arrays out (vectorised: Arrow kernels and NumPy, Python
# only per distinct string id and on the error path)
# ---------------------------------------------------------------------------------------------


def _numpy(x) -> np.ndarray:
    """[R] NumPy array of an Arrow (chunked) array without nulls; numbers and booleans read from Arrow's
    buffers (Arrow's to_numpy would import pandas where it is installed)."""
    if isinstance(x, pa.ChunkedArray):
        x = x.combine_chunks()  # ChunkedArray.to_numpy takes a slow path
    if pa.types.is_boolean(x.type):
        return _numpy(pc.cast(x, pa.uint8())).view(bool)
    if (pa.types.is_integer(x.type) or pa.types.is_floating(x.type)) and not x.null_count:
        dtype = np.dtype(x.type.to_pandas_dtype())
        return np.frombuffer(x.buffers()[1], dtype)[x.offset:x.offset + len(x)]
    return x.to_numpy(zero_copy_only=False)


_SAMPLE = 4096  # values a cast is first tried on: Arrow's failing casts still pass over every value


def _cast(x, to: pa.DataType):
    """x cast to `to`, or None where some value does not convert (a failing sample saves the full pass)."""
    try:
        if len(x) > _SAMPLE:
            pc.cast(x[:_SAMPLE], to)
        return pc.cast(x, to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None


def _all_match(text, pattern: str) -> bool:
    """Whether every value of `text` matches the regular expression (a failing sample saves the full pass)."""
    return all(pc.all(pc.match_substring_regex(part, pattern)).as_py() is not False
               for part in ((text[:_SAMPLE], text) if len(text) > _SAMPLE else (text,)))


def _failing_row(x, to: pa.DataType, error: Exception) -> int:
    """The first row of x whose value does not cast to `to` (error: the cast's ArrowInvalid): the value
    the message quotes, else a bisection on prefixes (error path only)."""
    quoted = re.search(r"Failed to parse string: '(.*)' as a scalar", str(error), re.S)
    if quoted is not None:
        row = pc.index(x, quoted.group(1)).as_py()
        if row >= 0 and _cast(x[row:row + 1], to) is None:
            return row
    good, bad = 0, len(x)  # x[:good] casts, x[:bad] does not
    while bad - good > 1:
        middle = (good + bad) // 2
        if _cast(x[:middle], to) is None:
            bad = middle
        else:
            good = middle
    return good


def _dtype(t: pa.DataType) -> str:
    """An Arrow type as the NumPy dtype users know it by (float64, bool, ...), for messages."""
    try:
        return np.dtype(t.to_pandas_dtype()).name
    except (NotImplementedError, TypeError):
        return str(t)


def _plain(x, column: str, at, expected: str):
    """x with dictionaries decoded and without nulls (a null raises LogError naming its row)."""
    if pa.types.is_dictionary(x.type):  # categorical: its values
        x = x.cast(x.type.value_type)
    if pa.types.is_string_view(x.type) or pa.types.is_binary(x.type) or pa.types.is_large_binary(x.type):
        cast = _cast(x, pa.large_string())
        if cast is None:
            raise LogError(f"column {column!r}: expected {expected}, got bytes that are not UTF-8 text")
        x = cast
    if x.null_count:
        row = _first_bad(_numpy(pc.is_valid(x)))
        raise LogError(f"{at(row)}: column {column!r}: expected {expected}, got a missing value (null/NaN/None)")
    return x


def _shown(value: str) -> str:
    """A field's text for a message: quoted, cut at 60 characters, a multi-line one flagged."""
    shown = repr(value if len(value) <= 60 else value[:60] + "...")
    return shown + (" (a field over several lines: is a quote left open?)" if "\n" in value else "")


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _integers(x, column: str) -> np.ndarray:
    """An Arrow integer column as int64 (a uint64 beyond int64 raises TypeError)."""
    if pa.types.is_uint64(x.type) and len(x) and pc.max(x).as_py() > _INT64_MAX:
        raise TypeError(f"column {column!r}: expected int64 values, got uint64 up to {pc.max(x).as_py()}")
    return _numpy(x).astype(np.int64, copy=False)


def _trimmed(text):
    return pc.utf8_trim_whitespace(text)


def _id_column(x, column: str, at) -> tuple[np.ndarray, Optional[dict]]:
    """Raw ids [R] int64 and, for a string column, {hashed id: string}."""
    x = _plain(x, column, at, "an id")
    if pa.types.is_integer(x.type):
        if pa.types.is_unsigned_integer(x.type) and len(x) and pc.max(x).as_py() > _INT64_MAX:
            raise TypeError(f"column {column!r}: expected integer or string ids, got dtype uint64 beyond int64")
        ids = _numpy(x).astype(np.int64, copy=False)
        if ids.min() >= 0:
            return ids, None
        x = pc.cast(x, pa.string())  # negative integers are padding to the hashing: treat them as strings
    elif not _is_text(x.type):
        raise TypeError(f"column {column!r}: expected integer or string ids, got dtype {_dtype(x.type)} "
                        "(a float id such as 1.5 would be truncated)")
    ints = _cast(x, pa.int64())
    if ints is None:  # e.g. " 12": Arrow's integers take no spaces
        x = _trimmed(x)
        ints = _cast(x, pa.int64())
    if ints is not None and not pc.any(pc.match_substring_regex(x, r"^(?:[-+]|0.)")).as_py():
        return _numpy(ints), None  # every value canonical ("12", not "012", "+12", "-3"): ids; else strings
    distinct, index = _dictionary(x)  # [V] values in order of first appearance, [R] index of each row's value
    tokens = distinct.to_pylist()
    if "" in tokens:
        raise LogError(f"{at(int(np.argmax(index == tokens.index(''))))}: column {column!r}: expected an id, got an "
                       "empty field")
    hashed = np.fromiter((string_id(token) for token in tokens), np.int64, count=len(tokens))  # [V]
    order = np.argsort(hashed, kind="stable")
    same = np.flatnonzero(hashed[order][1:] == hashed[order][:-1])
    if len(same):
        a, b = tokens[order[same[0]]], tokens[order[same[0] + 1]]
        raise LogError(f"column {column!r}: ids {a!r} and {b!r} hash to the same int64 {hashed[order[same[0]]]} "
                       "(string_id); rename one of them")
    return hashed[index], dict(zip(hashed.tolist(), tokens))


def _dictionary(x) -> tuple[pa.Array, np.ndarray]:
    """The distinct values [V] of a text column and each row's index into them [R] (one hashing pass)."""
    encoded = pc.dictionary_encode(x)
    if isinstance(encoded, pa.Array):
        return encoded.dictionary, _numpy(encoded.indices)
    chunks = encoded.chunks
    if any(len(chunk.dictionary) != len(chunks[-1].dictionary) for chunk in chunks):  # not one dictionary
        chunks = encoded.unify_dictionaries().chunks
    return chunks[-1].dictionary, np.concatenate([_numpy(chunk.indices) for chunk in chunks])


_NUMBER_EXPECTED = "a number (e.g. Unix seconds)"
_TIME_EXPECTED = ("a number (e.g. Unix seconds) or an ISO-8601 date/time (2024-05-01, 2024-05-01 12:00:00, "
                  "2024-05-01T12:00:00Z, 2024-05-01T12:00:00+02:00)")
_ZONED, _NAIVE = pa.timestamp("ns", "UTC"), pa.timestamp("ns")


def _finite(values: np.ndarray, column: str, at, expected: str) -> np.ndarray:
    finite = np.isfinite(values)
    if not finite.all():
        r = _first_bad(finite)
        raise LogError(f"{at(r)}: column {column!r}: expected {expected}, got {values[r]}")
    return values


def _text_numbers(text, column: str, at, expected: str, exact: bool):
    """Numbers [R] from text: int64 when every value is an integer (written "12", "+12" or "12.0",
    parsed exactly, never through float64), else float64 (`exact`: distinct values that float64
    merges raise LogError naming both rows); None when some value is no number."""
    ints = _cast(text, pa.int64())
    if ints is not None:
        return _numpy(ints)
    text = _trimmed(text)
    ints = _cast(text, pa.int64())
    if ints is not None:
        return _numpy(ints)
    if _all_match(text, r"^[-+]?[0-9]+(\.0*)?$"):
        ints = _cast(pc.replace_substring_regex(pc.replace_substring_regex(text, r"\.0*$", ""), r"^\+", ""),
                     pa.int64())
        if ints is not None:  # else beyond int64: float64 below
            return _numpy(ints)
    floats = _cast(text, pa.float64())
    if floats is None:
        return None
    values = _numpy(floats)
    if exact:
        _check_distinct_stay_distinct(text, values, column, at)
    return _finite(values, column, at, expected)


def _number_column(x, column: str, at, expected: str) -> np.ndarray:
    """Finite numbers [R] (a rating): int64 or float64, as _text_numbers for text."""
    x = _plain(x, column, at, expected)
    t = x.type
    if pa.types.is_integer(t):
        return _integers(x, column)
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return _finite(_numpy(pc.cast(x, pa.float64())), column, at, expected)
    if not _is_text(t):
        raise TypeError(f"column {column!r}: expected {expected}, got dtype {_dtype(t)}")
    values = _text_numbers(x, column, at, expected, exact=False)
    if values is None:
        _refuse_non_numbers(_trimmed(x), column, at, expected)
    return values


def _refuse_non_numbers(text, column: str, at, expected: str) -> None:
    """LogError naming the first value of text [R] that does not read as a number, if any."""
    try:
        pc.cast(text, pa.float64())
    except pa.ArrowInvalid as error:
        row = _failing_row(text, pa.float64(), error)
        raise LogError(f"{at(row)}: column {column!r}: expected {expected}, got "
                       f"{_shown(text[row].as_py())}") from None


def _time_column(x, column: str, at) -> tuple[np.ndarray, bool]:
    """Timestamps [R] and whether they are dates/times (int64 ns since the epoch, UTC): numbers as in
    _text_numbers (exact), ISO-8601 text, Arrow timestamp and date types."""
    x = _plain(x, column, at, _TIME_EXPECTED)
    t = x.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return _datetime_column(x, column, at), True
    if pa.types.is_integer(t):
        return _integers(x, column), False
    if pa.types.is_floating(t):
        return _finite(_numpy(pc.cast(x, pa.float64())), column, at, _NUMBER_EXPECTED), False
    if pa.types.is_decimal(t):
        x = pc.cast(x, pa.string())  # exact, through the text path
    elif not _is_text(t):
        raise TypeError(f"column {column!r}: expected {_NUMBER_EXPECTED} or a date/time, got dtype {_dtype(t)}")
    values = _text_numbers(x, column, at, _NUMBER_EXPECTED, exact=True)
    if values is not None:
        return values, False
    text = _trimmed(x)
    first = text[0].as_py()
    if _cast(text[:1], pa.float64()) is not None:  # a column of numbers with some other value
        _refuse_non_numbers(text, column, at, _NUMBER_EXPECTED)
    return _text_times(text, first, column, at), True


def _text_times(text, first: str, column: str, at) -> np.ndarray:
    """ISO-8601 text [R] -> int64 ns since the epoch, UTC (naive read as UTC); its first value says
    whether the column is zoned."""
    upper = pc.ascii_upper(text)  # RFC 3339 allows "t" and "z"; Arrow reads "T" and "Z"
    if pc.any(pc.ends_with(upper, "UTC")).as_py():  # "2024-05-01 12:00:00 UTC" (BigQuery's exports)
        upper = pc.replace_substring_regex(upper, r"\s*UTC$", "Z")
    zoned = _cast(upper[:1], _ZONED) is not None
    if not zoned and _cast(upper[:1], _NAIVE) is None:
        raise LogError(f"{at(0)}: column {column!r}: expected {_TIME_EXPECTED}, got {_shown(first)}")
    to, other = (_ZONED, _NAIVE) if zoned else (_NAIVE, _ZONED)
    try:
        return _numpy(pc.cast(pc.cast(upper, to), pa.int64()))
    except pa.ArrowInvalid as error:
        row = _failing_row(upper, to, error)
    value = text[row].as_py()
    if _cast(upper[row:row + 1], other) is not None:
        has, lacks = (repr(first), repr(value)) if zoned else (repr(value), repr(first))
        raise LogError(f"{at(row)}: column {column!r}: {value!r} and {first!r} (at {at(0)}) mix zoned and naive "
                       f"times ({has} has a zone, {lacks} none), so their order is unknown: give every time a zone "
                       "(e.g. Z for UTC) or none (naive times are read as UTC)") from None
    raise LogError(f"{at(row)}: column {column!r}: expected an ISO-8601 date/time like {first!r} (at {at(0)}; years "
                   f"1677-2262), got {_shown(value)}") from None


def _datetime_column(x, column: str, at) -> np.ndarray:
    """An Arrow timestamp or date column -> int64 ns since the epoch (a zoned timestamp is stored in UTC;
    a naive one is read as UTC). Times int64 nanoseconds cannot hold raise LogError."""
    t = x.type
    if pa.types.is_timestamp(t):
        per, values = NANOSECONDS[t.unit], pc.cast(x, pa.int64())
    elif pa.types.is_date32(t):
        per, values = NANOSECONDS_PER_DAY, pc.cast(x, pa.int32())
    else:  # date64: milliseconds
        per, values = NANOSECONDS["ms"], pc.cast(x, pa.int64())
    values = _numpy(values).astype(np.int64, copy=False)
    outside = np.abs(values) > _INT64_MAX // per
    if outside.any():
        r = _first_bad(~outside)
        raise LogError(f"{at(r)}: column {column!r}: {x[r].as_py()} is outside the years 1677-2262 that int64 "
                       "nanoseconds hold")
    return values * per


def parse_time(text: str) -> int:
    """An ISO-8601 / RFC 3339 date or time as int64 nanoseconds since 1970-01-01 UTC, the unit of a
    date/time column (a naive time is read as UTC): parse_time("2024-05-01T12:00:00Z") is
    1714564800000000000. ValueError for anything else."""
    text = re.sub(r"\s*UTC$", "Z", text.strip().upper()) if isinstance(text, str) else text
    for to in (_ZONED, _NAIVE):
        if isinstance(text, str) and (ns := _cast(pa.array([text]), to)) is not None:
            return pc.cast(ns, pa.int64())[0].as_py()
    raise ValueError(f"expected an ISO-8601 date/time such as 2024-05-01, 2024-05-01T12:00:00Z or "
                     f"2024-05-01T14:00:00+02:00, got {text!r}")


def _check_distinct_stay_distinct(text, values: np.ndarray, column: str, at) -> None:
    """LogError if two texts denoting different numbers read as one float64 (rounding is monotone, so
    that is the only way reading as float64 changes the order of a column). Vectorised over the
    distinct texts; Python compares only the texts that float64 merges."""
    fields = pc.unique(text)  # [V]
    parsed = _numpy(pc.cast(fields, pa.float64()))  # [V]
    order = np.argsort(parsed, kind="stable")
    merged = np.flatnonzero(parsed[order][1:] == parsed[order][:-1])
    for k in merged.tolist():
        a, b = fields[int(order[k])].as_py(), fields[int(order[k + 1])].as_py()
        if not math.isfinite(parsed[order[k]]) or decimal.Decimal(a) == decimal.Decimal(b):
            continue  # refused as not finite by the caller / the same number written twice ("1.5", "1.50")
        first, second = sorted((pc.index(text, a).as_py(), pc.index(text, b).as_py()))
        raise LogError(f"{at(second)}: column {column!r}: {text[second].as_py()!r} and {text[first].as_py()!r} (at "
                       f"{at(first)}) are different numbers but read as the same float64 {float(parsed[order[k]])!r} "
                       "(the column has fractional values, so it is read as float64, which holds 15-17 significant "
                       "digits): write every value as an integer (e.g. nanoseconds), or in a coarser unit")


def _flag_column(x, column: str, at) -> np.ndarray:
    """0/1 [R] -> bool; anything else (2, 0.5, "yes", NaN) raises."""
    x = _plain(x, column, at, "0 or 1")
    t = x.type
    if pa.types.is_boolean(t):
        return _numpy(x)
    if _is_text(t):
        text = _trimmed(x)
        try:
            values = _numpy(pc.cast(text, pa.int8()))
        except pa.ArrowInvalid as error:
            row = _failing_row(text, pa.int8(), error)
            raise LogError(f"{at(row)}: column {column!r}: expected 0 or 1, got "
                           f"{_shown(text[row].as_py())}") from None
        ok = ((values == 0) | (values == 1)) & (_numpy(pc.utf8_length(text)) == 1)  # "0" or "1", not "01" or "+1"
        if not ok.all():
            raise LogError(f"{at(_first_bad(ok))}: column {column!r}: expected 0 or 1, got "
                           f"{_shown(text[_first_bad(ok)].as_py())}")
        return values == 1
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise TypeError(f"column {column!r}: expected 0 or 1, got dtype {_dtype(t)}")
    values = _numpy(x)
    ok = (values == 0) | (values == 1)
    if not ok.all():
        raise LogError(f"{at(_first_bad(ok))}: column {column!r}: expected 0 or 1, got "
                       f"{values[_first_bad(ok)].tolist()!r}")
    return values == 1


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


def _kept_lines(lines: np.ndarray, from_file: bool) -> Optional[np.ndarray]:
    """Log.line of rows at `lines` (strictly increasing): None where they are Log's default (row + 2 in a
    file, one line per row after the header; the row itself in arrays), which spares R int64s."""
    lines = np.asarray(lines, np.int64)
    first = 2 if from_file else 0
    if lines[0] == first and lines[-1] == first + len(lines) - 1:
        return None
    return lines


def _build_log(values: Mapping, names: Mapping[str, str], rating_actions, source: str, lines: np.ndarray,
               from_file: bool, copy: bool = False) -> Log:
    """A Log from raw columns {role or action: [R] Arrow array} (text from a CSV, typed from elsewhere);
    `copy`: the columns may share the caller's memory (from_arrays), which the Log must not."""
    def at(row):
        return f"{source}:{lines[row]}" if from_file else f"{source} row {lines[row]}"

    if len(lines) == 0:
        raise LogError(f"{source}: no interactions (expected at least one row after the header)")
    # values (the caller's own dict): each column is popped, so that its text is freed once converted
    ids, id_names = {}, {}
    for role in ("user", "item", "author"):
        if role in values:
            ids[role], mapping = _id_column(values.pop(role), names[role], at)
            if mapping:
                id_names[role] = mapping
    timestamp, datetimes = _time_column(values.pop("time"), names["time"], at)
    rating = None
    if "rating" in values:
        rating = _number_column(values.pop("rating"), names["rating"], at, "a finite number").astype(np.float32)
    flags = {name: _flag_column(values.pop(name), name, at) for name in ACTIONS if name in values}
    if copy:  # arrays that may be views of the caller's memory: the Log gets its own
        ids, timestamp = {role: x.copy() for role, x in ids.items()}, timestamp.copy()
    author = ids["author"] if "author" in ids else np.zeros(len(lines), np.int64)
    log = Log(user=ids["user"], item=ids["item"], timestamp=timestamp,
              actions=_actions(rating, flags, rating_actions, len(lines)), author=author, rating=rating,
              line=_kept_lines(lines, from_file), names=id_names, source=source, from_file=from_file,
              datetimes=datetimes)
    if "author" in names:  # without the column every author is 0
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


# ---------------------------------------------------------------------------------------------
# Reading: bytes -> format -> Arrow columns -> Log
# ---------------------------------------------------------------------------------------------

# Compressed streams, by their first bytes (regular expressions; whatever the file is called).
COMPRESSIONS = ((rb"\x1f\x8b", "gzip"), (rb"\x28\xb5\x2f\xfd", "zstd"), (rb"\xfd7zXZ\x00", "xz"),
                (rb"BZh[1-9](?:1AY&SY|\x17\x72\x45\x38\x50\x90)", "bz2"))  # bzip2: a block's or the end's magic
COMPRESSED_SUFFIXES = (".gz", ".gzip", ".zst", ".zstd", ".bz2", ".xz")
TAB_SUFFIXES = (".tsv", ".tab")  # a tab-separated log (also .tsv.gz, ...) unless a delimiter is given
SNIFFED_DELIMITERS = (",", "\t", ";", "|")
# Binary formats read as tables, by their first bytes (after any decompression).
TABLE_FORMATS = ((b"PAR1", "Parquet"), (b"ARROW1", "Arrow IPC"), (b"FEA1", "Feather v1"),
                 (b"\xff\xff\xff\xff", "Arrow IPC stream"))
# Formats that are refused, with what to do instead.
REFUSED_FORMATS = (
    (b"PK\x03\x04", "a zip archive (or an xlsx workbook)",
     "extract the log first (unzip LOG.zip), or pipe it in: --data <(unzip -p LOG.zip); export a workbook as CSV"),
    (b"PK\x05\x06", "an empty zip archive", "extract the log first"),
    (b"\xff\xfe", "UTF-16 text", "save it as UTF-8 (iconv -f UTF-16 -t UTF-8 LOG > LOG.csv)"),
    (b"\xfe\xff", "UTF-16 text", "save it as UTF-8 (iconv -f UTF-16 -t UTF-8 LOG > LOG.csv)"),
)
_BLOCK_BYTES = 1 << 24  # Arrow parses a CSV in blocks of this size, one per thread at a time
_HEADER_BYTES = 1 << 20  # the longest header line read (to find the columns and the delimiter)


class _Input:
    """A log's bytes: open() gives a fresh stream of its (decompressed) bytes, front to back. A pipe
    or standard input is read whole into memory once (it cannot be read twice); a file is reopened."""

    def __init__(self, path):
        self.path = os.fspath(path)
        stdin = self.path == STDIN
        self.source = STDIN_SOURCE if stdin else str(path)
        self.buffer = None
        if stdin:
            self.buffer = pa.py_buffer(sys.stdin.buffer.read())
        elif stat.S_ISFIFO(os.stat(self.path).st_mode):
            with open(self.path, "rb") as pipe:
                self.buffer = pa.py_buffer(pipe.read())
        with contextlib.closing(self._raw()) as raw:
            head = raw.read(16)
        self.compression = next((name for magic, name in COMPRESSIONS if re.match(magic, head, re.S)), None)
        with self.open() as stream:
            self.head = self._read(stream, 8, "its first bytes")

    def _raw(self):
        return pa.BufferReader(self.buffer) if self.buffer is not None else pa.OSFile(self.path)

    @contextlib.contextmanager
    def open(self):
        raw = self._raw()
        try:
            if self.compression is None:
                yield raw
            elif self.compression == "xz":  # not one of Arrow's codecs: Python's, on Arrow's file
                with lzma.open(raw) as stream:
                    yield stream
            else:
                yield pa.CompressedInputStream(raw, self.compression)
        finally:
            raw.close()

    def _read(self, stream, size: int, what: str) -> bytes:
        """stream.read(size), a corrupt compressed stream raising LogError."""
        try:
            return bytes(stream.read() if size < 0 else stream.read(size))
        except (OSError, EOFError, lzma.LZMAError, pa.ArrowInvalid) as error:
            if self.compression is None:
                raise
            raise LogError(f"{self.source}: is {self.compression}-compressed but its data is corrupt or cut short "
                           f"(reading {what}: {error})") from None

    def read_all(self) -> pa.Buffer:
        """The whole (decompressed) log in memory: what random-access formats (Parquet) need."""
        if self.compression is None:
            return self.buffer if self.buffer is not None else pa.memory_map(self.path).read_buffer()
        with self.open() as stream:
            return pa.py_buffer(self._read(stream, -1, "it"))

    def name_without_compression(self) -> str:
        name = Path(self.path).name.lower()
        for suffix in COMPRESSED_SUFFIXES:
            name = name.removesuffix(suffix)
        return name


class _CountingStream:
    """A file object over an Arrow stream for Arrow's CSV reader that counts the newlines it passes
    and keeps the end of the text: whether a log's rows are its lines (the common case) is then
    known without reading it twice."""

    closed = False

    def __init__(self, stream, source: str):
        self.stream, self.source = stream, source
        self.newlines = 0
        self.tail = b""

    def read(self, size=-1):
        read = getattr(self.stream, "read_buffer", self.stream.read)
        block = read(size)
        self.newlines += int(np.count_nonzero(np.frombuffer(block, np.uint8) == ord("\n")))
        if len(block):
            self.tail = (self.tail + bytes(memoryview(block)[-4096:]))[-4096:]
        return block

    def readable(self):
        return True

    def close(self):
        pass


def _delimiter(given: Optional[str], name: str, header: str, columns: Columns) -> str:
    """The delimiter: the given one, a tab for a .tsv / .tab name, else the one of SNIFFED_DELIMITERS
    that splits the user, item and time column names out of the header line (else the most frequent)."""
    if given is not None:
        if not (isinstance(given, str) and len(given) == 1 and given.isascii() and given not in "\"\r\n"):
            raise ValueError(f"delimiter: expected one ASCII character other than a quote or newline (',', '\\t', "
                             f"';', ...), got {given!r}")
        return given
    if name.endswith(TAB_SUFFIXES):
        return "\t"
    needed = {columns.user, columns.item, columns.time}
    for delimiter in SNIFFED_DELIMITERS:
        if needed <= {field.strip() for field in next(csv.reader([header], delimiter=delimiter))}:
            return delimiter
    most = max(SNIFFED_DELIMITERS, key=header.count)
    return most if header.count(most) else ","


def _header_line(inp: _Input, columns: Columns) -> str:
    """The CSV's first line, decoded (LogError for an empty first line or invalid UTF-8)."""
    with inp.open() as stream:
        head = inp._read(stream, _HEADER_BYTES, "the header")
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        line = line.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise LogError(f"{inp.source}:1: not valid UTF-8 (byte {line[error.start]:#04x})") from None
    if not line.strip():
        raise LogError(f"{inp.source}:1: expected a header line naming the columns ({columns.user}, "
                       f"{columns.item}, {columns.time}, ...), got an empty line or file")
    return line


def _skip_blank_rows(row) -> str:
    """Arrow's invalid-row handler: a whitespace-only line is a blank line, any other short or long row an error."""
    return "skip" if not row.text.strip() else "error"


def _read_csv_columns(inp: _Input, columns: Columns, delimiter: Optional[str]):
    """{role: [R] text}, {role: column name} and the line of each row, read by Arrow's CSV reader
    (only the used columns are converted, all as text: a column's type is decided here, not guessed
    from its first block)."""
    line = _header_line(inp, columns)
    delimiter = _delimiter(delimiter, inp.name_without_compression(), line, columns)
    header = [name.strip() for name in next(csv.reader([line], delimiter=delimiter))]
    wanted = _resolve_columns(header, columns, f"{inp.source}:1")
    field_names = [f"f{j}" for j in range(len(header))]  # Arrow's names: positions (header names may repeat)
    used = list(dict.fromkeys(field_names[j] for _, j in wanted.values()))
    read_options = arrow_csv.ReadOptions(column_names=field_names, skip_rows=1, block_size=_BLOCK_BYTES,
                                         use_threads=True)
    parse_options = arrow_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                           invalid_row_handler=_skip_blank_rows)
    convert_options = arrow_csv.ConvertOptions(include_columns=used, column_types={f: pa.string() for f in used},
                                               strings_can_be_null=False, quoted_strings_can_be_null=False)
    with inp.open() as stream:
        counting = _CountingStream(stream, inp.source)
        try:
            table = arrow_csv.read_csv(counting, read_options, parse_options, convert_options)
        except (pa.ArrowInvalid, OSError, EOFError, lzma.LZMAError) as error:
            raise _parse_error(inp, delimiter, len(header), error) from None
    num = table.num_rows
    values = {role: table.column(field_names[j]) for role, (_, j) in wanted.items()}
    del table
    tail = counting.tail.rstrip(b" \t\r\n\v\f")
    text_lines = counting.newlines - (counting.tail[len(tail):].count(b"\n")) + 1  # without trailing blank lines
    if tail and text_lines == num + 1:
        lines = np.arange(2, num + 2, dtype=np.int64)  # one line per row: no blank lines, no quoted newlines
    else:
        lines = _unquoted_row_lines(inp, num)
        if lines is None:
            lines = _row_lines(inp, delimiter, len(header), num)
    return values, {role: name for role, (name, _) in wanted.items()}, lines


@contextlib.contextmanager
def _text(inp: _Input):
    """The log as text for the csv module (error path and logs whose rows are not their lines)."""
    class Raw(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, buffer):
            data = inp._read(stream, len(buffer), "it")
            buffer[:len(data)] = data
            return len(data)

    with inp.open() as stream:
        yield io.TextIOWrapper(io.BufferedReader(Raw(), 1 << 20), encoding="utf-8-sig", newline="")


def _rows(inp: _Input, delimiter: str, num_fields: int):
    """The line where each data row starts, as Arrow reads them (blank and whitespace-only lines
    skipped), read by the csv module; a malformed row raises LogError naming its line."""
    with _text(inp) as text:
        reader = csv.reader(text, delimiter=delimiter)
        try:
            next(reader, None)  # the header
            end = reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num
                if len(row) != num_fields:
                    if not "".join(row).strip():
                        continue  # a blank line
                    raise LogError(f"{inp.source}:{start}: expected {num_fields} fields separated by {delimiter!r} "
                                   f"(as the header), got {len(row)}: {delimiter.join(row)[:80]!r}")
                yield start
        except csv.Error as error:
            raise LogError(f"{inp.source}:{reader.line_num + 1}: {error}") from None
        except UnicodeDecodeError:
            raise _utf8_error(inp) from None


_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[list(b" \t\r\n\v\f")] = True


def _unquoted_row_lines(inp: _Input, num: int, block_bytes: int = 1 << 22) -> Optional[np.ndarray]:
    """[R] the line each row starts on, for a text without a quote character: its lines that are not
    blank, after the header (NumPy over blocks of the text; Python looks only at lines that start with
    whitespace). None where a quote appears or the count differs from Arrow's rows (e.g. a line of
    tabs, a row of a TSV): _row_lines decides then."""
    found = []  # [lines with content] per block
    lines, pending = 0, False  # complete lines so far; whether the unfinished line has content
    with inp.open() as stream:
        while block := inp._read(stream, block_bytes, "it"):
            b = np.frombuffer(block, np.uint8)  # [n]
            if (b == ord('"')).any():
                return None
            ends = np.flatnonzero(b == ord("\n"))  # [L] where each complete line of the block ends
            starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)  # [L]
            has = (starts < ends) & ~_WHITESPACE[b[np.minimum(starts, len(b) - 1)]]  # [L] starts with content
            for k in np.flatnonzero(~has).tolist():  # empty, or starting with whitespace: look closer
                has[k] = bool(block[starts[k]:ends[k]].strip())
            if len(ends):
                has[0] |= pending
                pending = bool(block[ends[-1] + 1:].strip())
            else:
                pending = pending or bool(block.strip())
            found.append(lines + 1 + np.flatnonzero(has))
            lines += len(ends)
    if pending:
        found.append(np.array([lines + 1]))
    rows = np.concatenate(found)[1:].astype(np.int64)  # the first line with content is the header
    return rows if len(rows) == num else None


def _row_lines(inp: _Input, delimiter: str, num_fields: int, num: int) -> np.ndarray:
    """[R] the line each row starts on, by reading the text again with the csv module (logs with blank
    lines or quoted newlines only)."""
    lines = np.fromiter(_rows(inp, delimiter, num_fields), np.int64)
    if len(lines) != num:
        raise LogError(f"{inp.source}: Arrow's CSV reader found {num} rows and Python's csv module {len(lines)}: the "
                       "file's quoting is ambiguous; check its quotes (fields with a \" should be quoted, the quote "
                       "doubled)")
    return lines


def _utf8_error(inp: _Input) -> LogError:
    """LogError naming the line and byte of the log's first invalid UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    newlines = 0
    with inp.open() as stream:
        while True:
            block = inp._read(stream, 1 << 20, "it")
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:  # error.object: the decoder's pending bytes, then the block
                line = newlines + error.object.count(b"\n", 0, error.start) + 1
                return LogError(f"{inp.source}:{line}: not valid UTF-8 (byte {error.object[error.start]:#04x})")
            if not block:
                return LogError(f"{inp.source}: not valid UTF-8")
            newlines += block.count(b"\n")


def _parse_error(inp: _Input, delimiter: str, num_fields: int, error: Exception) -> LogError:
    """What went wrong where, for an error of Arrow's CSV reader (a malformed row, invalid UTF-8, a
    corrupt compressed stream): the csv module reads the text again to find the line."""
    if isinstance(error, (OSError, EOFError, lzma.LZMAError)) or "nflate" in str(error) or "ecompress" in str(error):
        return LogError(f"{inp.source}: is {inp.compression}-compressed but its data is corrupt or cut short ({error})")
    try:
        for _ in _rows(inp, delimiter, num_fields):
            pass
    except LogError as located:
        return located
    return LogError(f"{inp.source}: {error}")


def _read_table_columns(inp: _Input, kind: str, columns: Columns):
    """{role: [R] Arrow column} and {role: column name} of a Parquet / Arrow IPC / Feather log (only
    the used columns read)."""
    import pyarrow.feather as feather
    import pyarrow.ipc as ipc
    import pyarrow.parquet as parquet

    data = pa.BufferReader(inp.read_all())
    try:
        if kind == "Parquet":
            file = parquet.ParquetFile(data)
            wanted = _resolve_columns(file.schema_arrow.names, columns, inp.source)
            table = file.read(columns=list(dict.fromkeys(name for name, _ in wanted.values())), use_threads=True)
        else:
            if kind == "Arrow IPC stream":
                table = ipc.open_stream(data).read_all()
            elif kind == "Arrow IPC":
                table = ipc.open_file(data).read_all()
            else:
                table = feather.read_table(data)
            wanted = _resolve_columns(table.column_names, columns, inp.source)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
        article = "an" if kind[0] in "AEIOU" else "a"
        raise LogError(f"{inp.source}: is {article} {kind} file but cannot be read: {error}") from None
    names = {role: name for role, (name, _) in wanted.items()}
    return {role: table.column(name) for role, name in names.items()}, names


def read_log(path, columns: Columns = Columns(), rating_actions: Mapping = DEFAULT_RATING_ACTIONS,
             delimiter: Optional[str] = None) -> Log:
    """Reads a log in any format of the module docstring (CSV / TSV, compressed or not, Parquet, Arrow)
    from a file, a FIFO (`<(zcat log.csv.gz)`) or standard input ("-"), after check_log_path's errors
    (a missing path, a directory, a device). `delimiter`: a CSV's field separator (None: by name or
    sniffed)."""
    check_log_path(path)
    return read_csv(path, columns, rating_actions, delimiter)


def read_csv(path, columns: Columns = Columns(), rating_actions: Mapping = DEFAULT_RATING_ACTIONS,
             delimiter: Optional[str] = None) -> Log:
    """read_log without its path checks (named for the CSV reader it was; it reads every format)."""
    inp = _Input(path)
    for magic, what, advice in REFUSED_FORMATS:
        if inp.head.startswith(magic):
            packed = f" inside {inp.compression} compression" if inp.compression else ""
            raise LogError(f"{inp.source}: is {what}{packed}, not a log Phoenix reads (it starts with the bytes "
                           f"{inp.head[:len(magic)]!r}); {advice}")
    kind = next((kind for magic, kind in TABLE_FORMATS if inp.head.startswith(magic)), None)
    if kind is not None:
        values, names = _read_table_columns(inp, kind, columns)
        num = len(values["user"])
        return _build_log(values, names, rating_actions, inp.source, np.arange(num), from_file=False)
    values, names, lines = _read_csv_columns(inp, columns, delimiter)
    return _build_log(values, names, rating_actions, inp.source, lines, from_file=True)


# ---------------------------------------------------------------------------------------------
# Arrays: NumPy, pandas, Arrow
# ---------------------------------------------------------------------------------------------


def _table_columns(data) -> tuple[list, dict]:
    """The header and {name: column} of a Mapping, a pandas DataFrame, an Arrow Table / RecordBatch or
    any Arrow stream (Polars, DuckDB, ...)."""
    if isinstance(data, (pa.Table, pa.RecordBatch)):
        names = list(data.schema.names)
        return names, {name: data.column(j) for j, name in enumerate(names)}
    if isinstance(data, Mapping):
        return list(data), data
    if hasattr(data, "columns") and hasattr(data, "dtypes") and hasattr(data, "__getitem__"):  # a DataFrame
        names = [str(name) for name in data.columns]
        if len(set(names)) == len(names):
            return names, {str(name): data[name] for name in data.columns}
        return names, {}  # _resolve_columns names the repeated column
    if hasattr(data, "__arrow_c_stream__"):
        return _table_columns(pa.table(data))
    raise TypeError(f"from_arrays: expected a mapping {{column name: [R] values}}, a pandas DataFrame or an Arrow "
                    f"table, got {type(data).__name__}")


def _arrow_column(x, column: str):
    """[R] Arrow array of a column given as an Arrow array, a pandas Series, a NumPy array or a list."""
    if isinstance(x, (pa.Array, pa.ChunkedArray)):
        return x
    try:
        if hasattr(x, "index") and hasattr(x, "dtype") and hasattr(x, "to_numpy"):  # a pandas Series
            return pa.array(x, from_pandas=True)  # NaN, None and NA become nulls
        x = np.asarray(x)
        return pa.array(x, from_pandas=x.dtype == object)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
        raise TypeError(f"column {column!r}: expected one type of values (integers, strings, numbers or times), "
                        f"got {error}") from None


def from_arrays(data, columns: Columns = Columns(), rating_actions: Mapping = DEFAULT_RATING_ACTIONS,
                source: str = "<arrays>") -> Log:
    """A Log from {column name: [R] NumPy array, list, pandas Series or Arrow array}, a pandas DataFrame
    or an Arrow table, with the checks and conversions of a file (ids int or str; pandas / NumPy /
    Arrow datetimes as in the module docstring; a null, NaN or None raises LogError naming its row)."""
    header, data = _table_columns(data)
    wanted = _resolve_columns(header, columns, source)
    shapes = {}
    for role, (name, _) in wanted.items():
        x = data[name]
        shapes[name] = (len(x),) if isinstance(x, (pa.Array, pa.ChunkedArray)) else np.shape(x)
    num = shapes[wanted["user"][0]][0] if len(shapes[wanted["user"][0]]) == 1 else -1
    if any(shape != (num,) for shape in shapes.values()):
        raise ValueError(f"{source}: expected 1-D columns of one length [R], got shapes {shapes}")
    values = {role: _arrow_column(data[name], name) for role, (name, _) in wanted.items()}
    return _build_log(values, {role: name for role, (name, _) in wanted.items()}, rating_actions, source,
                      np.arange(num), from_file=False, copy=True)


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
                                "CSV / TSV with a header line, Parquet, ...)") from None
    except NotADirectoryError:
        raise FileNotFoundError(f"{path}: no such file (a parent of it is a file, not a directory)") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{path}: is a directory, not a log file (expected CSV / TSV with a header line, "
                                "Parquet, ...)")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        kind = ("a character device" if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise LogError(f"{path}: is {kind}, not a log file (expected CSV / TSV with a header line, Parquet, ...; a "
                       "pipe works too: --data <(zcat log.csv.gz), or - for standard input)")

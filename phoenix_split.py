"""A log split for evaluation: per-user time-ordered interactions, their targets, and Phoenix examples.

    split = phoenix_split.split_log(log)                   # chronological leave-one-out of a phoenix_log.Log
    examples = phoenix_split.phoenix_examples(split, "val", history_len=5)
    batch = phoenix_split.phoenix_batch(split, examples, hash_config)

Knows no dataset: a dataset adapter (movielens.py) turns its files into a phoenix_log.Log, or into
time-ordered arrays for `split_rows`, and gets the same split, examples and batches.

Splits
  leave-one-out  each user's interactions sorted by timestamp with a stable sort (equal timestamps
                 keep input order); the last is the test target, the one before it the validation
                 target, all earlier ones train. Users with fewer than MIN_EVAL_INTERACTIONS only
                 train (as in SASRec); a log where no user has that many is an error.
  time           a global cut T (cut_time, or the cut_quantile of all timestamps): training and every
                 history use interactions before T only; a user's test target is their first (new)
                 item at or after T, the validation target their last item before T; users without 2
                 interactions before T and one after only train (on those before).
  Options of the other protocol are refused, not ignored (cut_time / cut_quantile with leave-one-out).
  The catalog is every item with an interaction. Training examples: every position t >= 1 of a
  user's training part. Evaluation ranks every catalog item except the user's earlier ones (not only
  the last S), never the target (phoenix_metrics.py has the tie rule: smaller catalog column first).

Repeats: a (user, item) pair seen again later (DUPLICATE_RULES)
  first   (default) only each pair's earliest interaction is kept; the count of dropped rows is printed.
  error   the log is refused, naming the first repeat and the line of its earlier interaction.
  keep    every interaction stays, in time order, as a history event (it is in every later history,
          counts in popularity and transitions, and is excluded from the user's later rankings like
          any seen item), but only a user's FIRST interaction with an item is ever a target: the test
          target is the user's last first-time interaction, the validation target the first-time one
          before it (leave-one-out; time split: the last first-time one before T, and the first
          first-time one at or after T), training targets the first-time positions t >= 1 before the
          validation target. An evaluated user needs MIN_EVAL_INTERACTIONS distinct items. So a target
          never appears in its own history, at evaluation or in training. Repeats between the
          validation and the test target are history of the test target only; repeats after the test
          target (leave-one-out) stay in the split (the history as of the end of the log, for
          serving) but in no evaluated history. With first and error every position is first-time,
          and the two definitions coincide: the targets, histories and figures are those of "first".
  The split's layout is the same under every rule: per user, positions [0, train_len) train,
  train_len is the validation target, test_len the test target (train_len + 1 without kept
  repeats); Split.first_time marks the positions that may be targets (None: all).

Phoenix inputs (phoenix_hashing.py hashes the raw ids later)
  user, post   raw user and item ids (string ids already hashed by phoenix_log.string_id).
  author       the item's author id (0 without one).
  actions      each interaction's action multi-hot (phoenix_log: click on every row, a rating's
               mapping, action columns; movielens.py: the stars' mapping).
  surface      SURFACE = 0 everywhere: a log says nothing about product surfaces. Padding also has
               surface 0; the model masks by the post hash.
  padding      right-padded: valid items first (oldest .. most recent), then PAD_ID (-1,
               phoenix_inputs.py's convention) posts and authors, zero actions, surface 0.

Shape glossary
  R  interactions   U  users (evaluated users: one target each)   N  catalog items
  E  examples   S  history length   A  actions (19)
"""

import dataclasses
import math
import sys
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from phoenix_inputs import PAD_ID, RawBatch
from phoenix_log import Log, LogError

__all__ = ["Split", "LogSplit", "split_log", "split_rows", "check_split_options", "describe", "summary",
           "histories", "phoenix_examples", "phoenix_batch", "item_sampling_frequencies", "SPLIT_PROTOCOLS",
           "DUPLICATE_RULES", "DEFAULT_CUT_QUANTILE", "MIN_EVAL_INTERACTIONS", "SPLITS", "SURFACE"]

SPLITS = ("train", "val", "test")
SPLIT_PROTOCOLS = ("leave-one-out", "time")
DUPLICATE_RULES = ("first", "error", "keep")
DEFAULT_CUT_QUANTILE = 0.9  # time split: the last ~10% of interactions are after the cut
MIN_EVAL_INTERACTIONS = 3  # an evaluated user needs a training item, a validation and a test target
SURFACE = 0  # the one product surface of a log (module docstring)


# ---------------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
    """Per-user time-ordered interactions (CSR layout) with leave-one-out targets; catalog = items with an
    interaction."""

    user_ids: np.ndarray  # [U] int64 raw ids, ascending
    offsets: np.ndarray  # [U + 1] user u's interactions are positions offsets[u]:offsets[u + 1]
    items: np.ndarray  # [R] int64 raw item ids, per user oldest first
    ratings: np.ndarray  # [R] float32 (0 without a rating)
    timestamps: np.ndarray  # [R] int64 or float64
    item_columns: np.ndarray  # [R] int64 column of `items` in the catalog
    train_len: np.ndarray  # [U] training positions per user, before the validation target (length - 2 without
    # kept repeats), or length if no eval
    has_eval: np.ndarray  # [U] bool, the user has validation and test targets
    item_ids: np.ndarray  # [N] int64 catalog: every item with an interaction, ascending (= score columns)
    item_authors: np.ndarray  # [N] int64 author id of each catalog item
    actions: np.ndarray  # [R, A] bool, ACTIONS order, per position (read-only; a log whose rows all have the
    # same actions gets one row broadcast, np.broadcast_to)
    # Where repeats are kept (duplicates="keep"); the defaults describe a split without them:
    test_len: Optional[np.ndarray] = dataclasses.field(default=None, kw_only=True)  # [U] positions before
    # the test target (None: train_len + has_eval, the validation target right before it)
    first_time: Optional[np.ndarray] = dataclasses.field(default=None, kw_only=True)  # [R] bool, the user's
    # first interaction with the item: only these are targets (None: every position)

    def __post_init__(self):
        if self.test_len is None:  # stored, so that dataclasses.replace(train_len=...) keeps it
            object.__setattr__(self, "test_len", (self.train_len + self.has_eval).astype(np.int64))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # [U]

    def eval_users(self) -> np.ndarray:
        """Rows [U_eval] of the users with validation and test targets."""
        return np.flatnonzero(self.has_eval)

    def visible_len(self, which: str) -> np.ndarray:
        """[U] number of each user's first interactions that training may use when evaluating `which`."""
        if which == "test":  # the validation item too: everything before the test target
            return self.test_len
        if which in ("train", "val"):
            return self.train_len
        raise ValueError(f"which must be one of {SPLITS}, got {which!r}")

    def target_positions(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(user rows [E], positions [E] into `items`) of the targets of `which`."""
        if which == "train":  # every first-time position t >= 1 of each training part
            counts = np.maximum(self.train_len - 1, 0)  # [U]
            rows = np.repeat(np.arange(len(self.user_ids)), counts)  # [E]
            first = np.cumsum(counts) - counts  # [U] index of each user's first example
            t = np.arange(counts.sum()) - first[rows] + 1  # [E] position within the user
            positions = self.offsets[rows] + t
            if self.first_time is not None:
                new = self.first_time[positions]
                rows, positions = rows[new], positions[new]
            return rows, positions
        rows = self.eval_users()  # [E]
        if which == "val":
            return rows, self.offsets[rows] + self.train_len[rows]
        return rows, self.offsets[rows] + self.visible_len(which)[rows]

    def num_distinct(self, which: Optional[str] = None) -> np.ndarray:
        """[U] distinct items among each user's positions before the `which` target (None: all of them):
        visible_len / lengths, less the kept repeats."""
        ends = self.lengths if which is None else self.visible_len(which)
        if self.first_time is None:
            return ends
        new = np.concatenate([[0], np.cumsum(self.first_time, dtype=np.int64)])  # [R + 1]
        return new[self.offsets[:-1] + ends] - new[self.offsets[:-1]]

    def num_examples(self, which: str = "train") -> int:
        """len(target_positions(which)[0]), without building them."""
        if which != "train":
            return int(np.count_nonzero(self.has_eval))
        counts = np.maximum(self.train_len - 1, 0)  # [U]
        if self.first_time is None:
            return int(counts.sum())
        starts = self.offsets[:-1]
        new = np.concatenate([[0], np.cumsum(self.first_time, dtype=np.int64)])  # [R + 1]
        return int((new[starts + np.maximum(self.train_len, 1)] - new[starts + 1]).sum())

    def exclude_mask(self, which: str, eval_rows=None) -> np.ndarray:
        """[U_eval, N] bool: every item before the `which` ("val"/"test") target of each eval user;
        `eval_rows` [u] (indices into eval_users()): only those users' rows [u, N], so that callers
        scoring users in chunks hold one chunk's mask, never all users'."""
        rows = self.eval_users() if eval_rows is None else self.eval_users()[eval_rows]
        visible = self.visible_len(which)[rows]  # [U_eval]
        owner = np.repeat(np.arange(len(rows)), visible)  # [sum visible]
        first = np.cumsum(visible) - visible
        positions = self.offsets[rows][owner] + np.arange(visible.sum()) - first[owner]
        mask = np.zeros((len(rows), len(self.item_ids)), dtype=bool)
        mask[owner, self.item_columns[positions]] = True
        return mask

    def targets(self, which: str) -> np.ndarray:
        """Catalog columns [E] of the targets of `which`."""
        return self.item_columns[self.target_positions(which)[1]]

    def authors_of(self, item_ids) -> np.ndarray:
        """Author ids [...] of raw item ids [...]; PAD_ID stays PAD_ID; unknown items raise."""
        item_ids = check_integer_ids(item_ids, "item_ids")
        columns = np.clip(np.searchsorted(self.item_ids, item_ids), 0, len(self.item_ids) - 1)
        known = self.item_ids[columns] == item_ids
        if not np.all(known | (item_ids < 0)):
            raise ValueError(f"items not in the catalog: {np.unique(item_ids[~known & (item_ids >= 0)])[:10]}")
        return np.where(item_ids < 0, PAD_ID, self.item_authors[columns])


@dataclasses.dataclass(frozen=True)
class LogSplit(Split):
    """The Split of a phoenix_log.Log (items and users keep their raw ids), plus each position's log
    row and the log itself (for original ids in dumps and serving)."""

    rows: np.ndarray  # [R] the log row of each position
    log: Log
    protocol: str = "leave-one-out"
    duplicates: str = "first"  # DUPLICATE_RULES: what happened to repeated (user, item) interactions
    repeats: int = 0  # how many the log had (dropped with "first", kept as history with "keep")
    cut: Optional[float] = None  # the time split's cut T (protocol "time")


def check_integer_ids(ids, name: str) -> np.ndarray:
    """ids as int64; floats, bools and strings raise TypeError (a cast would truncate 10.7 to 10)."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name}: expected integer item ids, got dtype {ids.dtype}")
    return ids.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Sorting and grouping R rows: one hash pass or one packed sort each, no per-row Python
# ---------------------------------------------------------------------------------------------


def _numpy(array: pa.Array, dtype) -> np.ndarray:
    """A null-free fixed-width Arrow array as NumPy, zero-copy (to_numpy would import pandas)."""
    dtype = np.dtype(dtype)
    return np.frombuffer(array.buffers()[1], dtype, len(array), array.offset * dtype.itemsize)


def _codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values [V] ascending, codes [R] with values[codes] == x): one hash pass over the R
    values (pyarrow's dictionary_encode), then a sort of the V distinct ones only."""
    x = np.ascontiguousarray(x)
    # from_buffers: zero-copy, and unlike pa.array it does not import pandas (a second on first use)
    encoded = pc.dictionary_encode(pa.Array.from_buffers(pa.from_numpy_dtype(x.dtype), len(x), [None, pa.py_buffer(x)]))
    values, codes = _numpy(encoded.dictionary, x.dtype), _numpy(encoded.indices, np.int32)  # [V] first seen, [R]
    by_value = np.argsort(values, kind="stable")
    rank = np.empty(len(values), codes.dtype)
    rank[by_value] = np.arange(len(values), dtype=codes.dtype)
    return values[by_value], rank[codes]


def _stable_argsort(key: np.ndarray, bounds: Optional[tuple] = None) -> np.ndarray:
    """np.argsort(key, kind="stable") [R] of integer keys: one value sort of (key - min, index) packed in an
    int64 where it fits (several times faster than an argsort), else the argsort itself. `bounds`: the
    keys' (min, max) when the caller knows them (a pass over R spared)."""
    num = len(key)
    shift = max(1, (num - 1).bit_length())  # bits of an index
    if num == 0 or key.dtype.kind not in "iu":
        return np.argsort(key, kind="stable")
    low, high = (int(key.min()), int(key.max())) if bounds is None else bounds
    step = 1
    if high - low >= 1 << (63 - shift) and high - low < 1 << 63:  # a common step (ns times of whole seconds)
        step = int(np.gcd.reduce(key.astype(np.int64) - low))  # exact: (key - low) // step keeps order and ties
    if (high - low) // step >= 1 << (63 - shift):
        return np.argsort(key, kind="stable")
    packed = key.astype(np.int64)  # [R] a new array: (key - low) // step << shift | index
    if low:
        packed -= low
    if step > 1:
        packed //= step
    packed <<= shift
    packed |= np.arange(num, dtype=np.int64)
    packed.sort()
    packed &= (1 << shift) - 1
    return packed


def _time_order(user_codes: np.ndarray, timestamp: np.ndarray, num_users: Optional[int] = None) -> np.ndarray:
    """time_order from users' codes (_codes: [0, num_users)): a stable sort by timestamp, then a stable one
    by user."""
    by_time = _stable_argsort(timestamp)  # [R]
    bounds = None if num_users is None else (0, num_users - 1)
    return by_time[_stable_argsort(user_codes[by_time], bounds)]


def time_order(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Rows [R] sorted by user, then timestamp; ties keep input order (stable sorts)."""
    return _time_order(_codes(user)[1], timestamp)


def _later_repeats(user_codes: np.ndarray, item_codes: np.ndarray, num_items: Optional[int] = None) -> np.ndarray:
    """later_repeats of rows grouped by user (codes non-decreasing): sorted by (item, row), a user's rows
    of one item are adjacent (rows of a user are contiguous), the first of them the earliest."""
    by_pair = _stable_argsort(item_codes, None if num_items is None else (0, num_items - 1))  # [R]
    item, user = item_codes[by_pair], user_codes[by_pair]
    same = (item[1:] == item[:-1]) & (user[1:] == user[:-1])  # [R - 1]
    repeat = np.zeros(len(user_codes), dtype=bool)
    repeat[by_pair[1:][same]] = True
    return repeat


def later_repeats(user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """[R] bool over time-ordered rows: True where the (user, item) pair already occurred earlier."""
    user_codes, item_codes = _codes(user)[1], _codes(item)[1]
    if np.any(user_codes[1:] < user_codes[:-1]):  # not grouped by user: group them first (stable)
        by_user = _stable_argsort(user_codes)
        repeat = np.empty(len(user), dtype=bool)
        repeat[by_user] = _later_repeats(user_codes[by_user], item_codes[by_user])
        return repeat
    return _later_repeats(user_codes, item_codes)


def _user_targets(offsets: np.ndarray, first_time: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(positions [U] of each user's last first-time interaction, of the first-time one before it; -1
    where there is none). first_time [R] bool, None: every position is one."""
    if first_time is None:
        return offsets[1:] - 1, np.where(np.diff(offsets) >= 2, offsets[1:] - 2, -1)
    positions = np.flatnonzero(first_time)  # [F] grouped by user, in time order
    per_user = np.add.reduceat(first_time, offsets[:-1], dtype=np.int64)  # [U]; every user has a row
    ends = np.cumsum(per_user)  # [U] one past each user's last first-time position in `positions`
    last = np.where(per_user >= 1, positions[np.maximum(ends - 1, 0)], -1)
    before = np.where(per_user >= 2, positions[np.maximum(ends - 2, 0)], -1)
    return last, before


def split_rows(user, item, rating, timestamp, author, actions, source: str, what: str = "interactions") -> Split:
    """The leave-one-out Split of interactions [R] already in time_order, without repeats: the last
    of a user's is the test target, the one before it the validation target. `author` [R] is each
    row's item's author (one per item); `what` names the rows in the error when no user is evaluated."""
    user_ids, counts = np.unique(user, return_counts=True)  # [U]
    has_eval = counts >= MIN_EVAL_INTERACTIONS
    if not has_eval.any():  # nothing to validate or test on: the baselines would fail much later
        raise ValueError(f"{source}: no user has >= {MIN_EVAL_INTERACTIONS} {what} (a training item, a validation "
                         f"and a test target); found max {counts.max() if len(counts) else 0} over {len(user_ids)} "
                         "users")
    item_ids, first = np.unique(item, return_index=True)  # [N]
    return Split(user_ids=user_ids, offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), items=item,
                 ratings=rating, timestamps=timestamp, item_columns=np.searchsorted(item_ids, item).astype(np.int64),
                 train_len=np.where(has_eval, counts - 2, counts).astype(np.int64), has_eval=has_eval,
                 item_ids=item_ids, item_authors=author[first], actions=actions)


def _time_cut(timestamp: np.ndarray, offsets: np.ndarray, first_time: Optional[np.ndarray], cut) -> tuple:
    """(kept [R] bool over time-ordered rows grouped by user (offsets [U + 1]), evaluated [U] bool): rows
    before the cut, plus each evaluated user's first first-time row at or after it (their test target).
    Evaluated: 2 first-time rows before the cut and one at or after it."""
    before = timestamp < cut  # [R]; within a user, rows before the cut come first
    new = np.ones(len(timestamp), bool) if first_time is None else first_time
    counts = np.diff(offsets)
    owner = np.repeat(np.arange(len(counts)), counts)  # [R]
    new_before = np.bincount(owner, weights=before & new, minlength=len(counts)).astype(np.int64)  # [U]
    after = np.flatnonzero(~before & new)  # [F] first-time rows at or after the cut, grouped by user
    starts = np.ones(len(after), bool)
    starts[1:] = owner[after[1:]] != owner[after[:-1]]
    has_after = np.zeros(len(counts), bool)
    has_after[owner[after[starts]]] = True
    evaluated = (new_before >= MIN_EVAL_INTERACTIONS - 1) & has_after  # [U] history + a target
    target = after[starts][evaluated[owner[after[starts]]]]  # [U_eval] positions of the test targets
    kept = before.copy()
    kept[target] = True
    return kept, evaluated


def _gather_rows(actions: np.ndarray, order: np.ndarray) -> np.ndarray:
    """actions[order] [R', A]; when every row is the same (a log of clicks alone) a read-only broadcast of
    that row instead: the same values without R' x A bytes."""
    if actions.strides[0] == 0 or np.array_equal(actions.any(axis=0), actions.all(axis=0)):
        return np.broadcast_to(actions[0], (len(order), actions.shape[1]))
    return actions[order]


def check_split_options(protocol: str, cut_time=None, cut_quantile=None) -> None:
    """ValueError naming the option for a split's options that do not apply to `protocol` or clash:
    cut_time / cut_quantile belong to protocol "time", and one of them is the cut."""
    if protocol not in SPLIT_PROTOCOLS:
        raise ValueError(f"protocol: expected one of {SPLIT_PROTOCOLS}, got {protocol!r}")
    given = {name: value for name, value in (("cut_time", cut_time), ("cut_quantile", cut_quantile))
             if value is not None}
    if protocol != "time" and given:
        name, value = next(iter(given.items()))
        raise ValueError(f"{name}: applies to protocol 'time' only, got {name}={value!r} with protocol {protocol!r} "
                         f"(--{name.replace('_', '-')} needs --split time)")
    if len(given) == 2:
        raise ValueError(f"cut_time and cut_quantile: give one of them (the cut), got cut_time={cut_time!r} and "
                         f"cut_quantile={cut_quantile!r}")
    if cut_quantile is not None and not 0.0 < cut_quantile < 1.0:
        raise ValueError(f"cut_quantile: expected a number in (0, 1), got {cut_quantile!r}")
    if cut_time is not None and not (isinstance(cut_time, (int, float, np.integer, np.floating))
                                     and not isinstance(cut_time, bool) and math.isfinite(cut_time)):
        raise ValueError(f"cut_time: expected a finite number (same unit as the timestamps), got {cut_time!r}")


def split_log(log: Log, protocol: str = "leave-one-out", duplicates: str = "first", cut_time=None,
              cut_quantile: Optional[float] = None, stream=None) -> LogSplit:
    """The log as a LogSplit: leave-one-out or a global time cut, repeats dropped, refused or kept
    (module docstring). What happened to repeats is reported on `stream` (default stderr)."""
    if duplicates not in DUPLICATE_RULES:
        raise ValueError(f"duplicates: expected one of {DUPLICATE_RULES}, got {duplicates!r}")
    check_split_options(protocol, cut_time, cut_quantile)
    user_ids, user_codes = _codes(log.user)  # [U], [R]
    item_ids, item_codes = _codes(log.item)  # [N], [R]
    order = _time_order(user_codes, log.timestamp, len(user_ids))  # [R] log rows by user, then time
    user_codes, item_codes = user_codes[order], item_codes[order]  # now per position
    repeat = _later_repeats(user_codes, item_codes, len(item_ids))  # [R]
    num_repeats = int(np.count_nonzero(repeat))
    if num_repeats:
        p = int(np.argmax(repeat))  # the first repeat; its pair's first row is earlier in the same user
        user_start = int(np.searchsorted(user_codes, user_codes[p]))
        r, earlier = order[p], order[user_start + int(np.argmax(item_codes[user_start:p] == item_codes[p]))]
        if duplicates == "error":
            raise LogError(f"{log.at(r)}: user {log.token('user', log.user[r])!r} and item "
                           f"{log.token('item', log.item[r])!r} already at {log.at(earlier)} ({num_repeats} "
                           "such repeats): a repeat would put a target in its own history; pass "
                           "duplicates='first' (--duplicates first) to keep each pair's earliest interaction, or "
                           "duplicates='keep' (--duplicates keep) to keep repeats as history")
        stream = sys.stderr if stream is None else stream
        if duplicates == "first":
            print(f"{log.source}: dropped {num_repeats} repeated (user, item) interactions, keeping each pair's "
                  f"earliest (e.g. {log.at(r)} repeats {log.at(earlier)})", file=stream)
            keep = ~repeat
            order, user_codes, item_codes = order[keep], user_codes[keep], item_codes[keep]
        else:
            print(f"{log.source}: kept {num_repeats} repeated (user, item) interactions as history, never as "
                  f"targets (e.g. {log.at(r)} repeats {log.at(earlier)})", file=stream)
    first_time = ~repeat if duplicates == "keep" and num_repeats else None  # [R] per position
    del repeat
    offsets = np.concatenate([[0], np.cumsum(np.bincount(user_codes, minlength=len(user_ids)))]).astype(np.int64)
    has_eval = None
    if protocol == "time":
        if cut_time is None:
            quantile = DEFAULT_CUT_QUANTILE if cut_quantile is None else cut_quantile
            cut_time = np.quantile(log.timestamp, quantile, method="higher")
        kept, has_eval = _time_cut(log.timestamp[order], offsets, first_time, cut_time)
        if not has_eval.any():
            raise LogError(f"{log.source}: no user has {MIN_EVAL_INTERACTIONS - 1} "
                           f"{'first-time ' if first_time is not None else ''}interactions before the time cut "
                           f"{cut_time} and one at or after it: nothing to evaluate (move the cut)")
        order, user_codes, item_codes = order[kept], user_codes[kept], item_codes[kept]
        first_time = None if first_time is None else first_time[kept]
        counts = np.bincount(user_codes, minlength=len(user_ids))  # [U] users with no row before the cut: 0
        present = counts > 0
        user_ids, has_eval = user_ids[present], has_eval[present]
        offsets = np.concatenate([[0], np.cumsum(counts[present])]).astype(np.int64)
    del user_codes
    test, val = _user_targets(offsets, first_time)  # [U], [U]
    lengths = np.diff(offsets)
    if has_eval is None:  # leave-one-out: a training item, then the validation and the test target
        distinct = (lengths if first_time is None  # [U] first-time interactions
                    else np.add.reduceat(first_time, offsets[:-1], dtype=np.int64))
        has_eval = distinct >= MIN_EVAL_INTERACTIONS
        if not has_eval.any():  # nothing to validate or test on: the baselines would fail much later
            what = "interactions" if first_time is None else "distinct items"
            raise ValueError(f"{log.source}: no user has >= {MIN_EVAL_INTERACTIONS} {what} (a training item, a "
                             f"validation and a test target); found max {distinct.max()} over {len(user_ids)} users")
    item_counts = np.bincount(item_codes, minlength=len(item_ids))
    if not item_counts.all():  # items seen after the time cut only leave the catalog
        item_ids = item_ids[item_counts > 0]
        item_codes = (np.cumsum(item_counts > 0) - 1)[item_codes]
    item_columns = item_codes.astype(np.int64)  # [R]
    del item_codes
    first = np.full(len(item_ids), len(order), np.int64)  # [N] each item's first position
    np.minimum.at(first, item_columns, np.arange(len(order), dtype=np.int64))
    return LogSplit(
        user_ids=user_ids, offsets=offsets, items=log.item[order],
        ratings=np.zeros(len(order), np.float32) if log.rating is None else log.rating[order],
        timestamps=log.timestamp[order], item_columns=item_columns,
        train_len=np.where(has_eval, val - offsets[:-1], lengths).astype(np.int64), has_eval=has_eval,
        item_ids=item_ids, item_authors=log.author[order[first]], actions=_gather_rows(log.actions, order),
        test_len=np.where(has_eval, test - offsets[:-1], lengths).astype(np.int64), first_time=first_time,
        rows=order, log=log, protocol=protocol, duplicates=duplicates, repeats=num_repeats,
        cut=cut_time if protocol == "time" else None)


def _time_text(log: Log, value) -> str:
    """A timestamp as an ISO date-time (UTC) when it came from dates/times (Log.datetimes: int64
    nanoseconds since the Unix epoch), else the number itself."""
    if getattr(log, "datetimes", False) and np.issubdtype(np.asarray(value).dtype, np.integer):
        return np.datetime_as_string(np.datetime64(int(value), "ns"), unit="auto", timezone="UTC")  # ...:07Z
    return f"{value.item() if isinstance(value, np.generic) else value}"


def summary(split: LogSplit) -> dict:
    """{name: text} of what a split did to its log, in reading order: rows, users, items, repeats and
    what happened to them, time range, the split (cut), users per split, training examples."""
    log, num_rows = split.log, len(split.log.user)
    what = {"first": "dropped, each pair's earliest kept", "keep": "kept as history, never targets", "error": ""}
    repeats = (f"{split.repeats:,} ({split.repeats / num_rows:.1%} of the rows): {what[split.duplicates]} "
               f"(--duplicates {split.duplicates})" if split.repeats else f"none (--duplicates {split.duplicates})")
    out = {"log": log.source, "rows": f"{num_rows:,}",
           "users": f"{len(split.user_ids):,}{' with an interaction before the cut' if split.cut is not None else ''} "
                    f"({'strings, hashed' if 'user' in log.names else 'integer ids'})",
           "items": f"{len(split.item_ids):,} in the catalog "
                    f"({'strings, hashed' if 'item' in log.names else 'integer ids'})",
           "repeated (user, item)": repeats,
           "time range": f"{_time_text(log, log.timestamp.min())} .. {_time_text(log, log.timestamp.max())}"}
    evaluated = int(np.count_nonzero(split.has_eval))
    if split.protocol == "time":
        dropped = num_rows - len(split.items) - (split.repeats if split.duplicates == "first" else 0)
        out["split"] = (f"time, cut at {_time_text(log, np.asarray(split.cut))} ({dropped:,} rows at or after it "
                        "are no test target: left out)")
    else:
        new = "first-time " if split.duplicates == "keep" else ""
        out["split"] = f"leave-one-out (test: each user's last {new}item; validation: the {new}one before)"
    out["interactions kept"] = f"{len(split.items):,}"
    out["users per split"] = (f"{evaluated:,} evaluated (a validation and a test target each), "
                              f"{len(split.user_ids) - evaluated:,} train only")
    out["training examples"] = f"{split.num_examples('train'):,}"
    return out


def describe(split: LogSplit) -> str:
    """One line of statistics: users, items, interactions, examples, id kinds."""
    kinds = ", ".join(f"{kind} ids {'strings (hashed)' if kind in split.log.names else 'integers'}"
                      for kind in ("user", "item"))
    return (f"{split.log.source}: {len(split.user_ids):,} users ({int(split.has_eval.sum()):,} evaluated), "
            f"{len(split.item_ids):,} items, {len(split.items):,} interactions, "
            f"{split.num_examples('train'):,} training examples, {split.protocol} split; {kinds}")


# ---------------------------------------------------------------------------------------------
# Phoenix examples and batches
# ---------------------------------------------------------------------------------------------


def histories(split: Split, rows, ends, history_len: int) -> dict:
    """History fields of users `rows` [E] whose history is the up-to-S positions before `ends` [E]."""
    valid_len = np.minimum(ends - split.offsets[rows], history_len)  # [E]
    slots = np.arange(history_len)[None, :]  # [1, S]
    valid = slots < valid_len[:, None]  # [E, S]
    history = np.where(valid, ends[:, None] - valid_len[:, None] + slots, 0)  # [E, S] positions
    items = np.where(valid, split.items[history], PAD_ID)  # [E, S]
    return {"user_ids": split.user_ids[rows], "user_rows": rows, "history_post_ids": items,
            "history_author_ids": split.authors_of(items),
            "history_actions": split.actions[history] & valid[..., None],
            "history_surfaces": np.full(items.shape, SURFACE, dtype=np.int32), "history_len": valid_len}


def phoenix_examples(split: Split, which: str = "train", history_len: int = 200, example_indices=None) -> dict:
    """Phoenix inputs of the `which` examples (all, or those at `example_indices`) as NumPy arrays.

    Keys: user_ids [E], history_post_ids / history_author_ids [E, S] int64 (PAD_ID padding),
    history_actions [E, S, A] bool (cast to float32 per batch; batch_from_ids does), history_surfaces
    [E, S] int32, history_len [E], target_post_ids / target_author_ids / target_columns [E],
    target_actions [E, A] bool, target_surfaces [E], user_rows [E]. Histories hold the up-to-S items
    right before the target, oldest first, then padding.
    """
    if history_len < 1:
        raise ValueError(f"history_len: expected >= 1, got {history_len}")
    rows, positions = split.target_positions(which)  # [E], [E]
    if example_indices is not None:
        rows, positions = rows[example_indices], positions[example_indices]
    examples = histories(split, rows, positions, history_len)
    examples.update(target_post_ids=split.items[positions], target_author_ids=split.authors_of(split.items[positions]),
                    target_columns=split.item_columns[positions], target_actions=split.actions[positions],
                    target_surfaces=np.full(positions.shape, SURFACE, dtype=np.int32))
    return examples


def phoenix_batch(split: Split, examples: dict, hash_config, candidate_post_ids=None):
    """The hashed RecsysBatch of `examples`; candidates [E, C] raw item ids, default the targets [E, 1]."""
    if candidate_post_ids is None:
        candidate_post_ids = examples["target_post_ids"][:, None]  # [E, 1]
    candidate_post_ids = check_integer_ids(candidate_post_ids, "candidate_post_ids")
    return RawBatch.with_candidates(examples, candidate_post_ids, split.authors_of(candidate_post_ids),
                                    np.full(candidate_post_ids.shape, SURFACE, np.int32)).hashed(hash_config)


def item_sampling_frequencies(split: Split) -> np.ndarray:
    """Share [N] (sums to 1) of each catalog item among training targets: q for logQ correction.

    In-batch negatives are other examples' targets, so an item is sampled in proportion to how
    often it is a training target; subtract log q from its logit (Yi et al., RecSys 2019).
    Items that are never a training target get 0 (they never appear as in-batch negatives).
    """
    counts = np.bincount(split.targets("train"), minlength=len(split.item_ids))  # [N]
    return counts / counts.sum()

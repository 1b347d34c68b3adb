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
  A (user, item) pair seen again later would put a target in its own history: by default only its
  earliest interaction is kept (the count of dropped rows is printed); duplicates="error" refuses them.
  The catalog is every item with an interaction. Training examples: every position t >= 1 of a
  user's training part. Evaluation ranks every catalog item except the user's earlier ones (not only
  the last S), never the target (phoenix_metrics.py has the tie rule: smaller catalog column first).

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

from phoenix_inputs import PAD_ID, RawBatch
from phoenix_log import Log, LogError

__all__ = ["Split", "LogSplit", "split_log", "split_rows", "check_split_options", "describe", "histories",
           "phoenix_examples", "phoenix_batch", "item_sampling_frequencies", "SPLIT_PROTOCOLS", "DUPLICATE_RULES",
           "DEFAULT_CUT_QUANTILE", "MIN_EVAL_INTERACTIONS", "SPLITS", "SURFACE"]

SPLITS = ("train", "val", "test")
SPLIT_PROTOCOLS = ("leave-one-out", "time")
DUPLICATE_RULES = ("first", "error")
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
    train_len: np.ndarray  # [U] training positions per user (length - 2, or length if no eval)
    has_eval: np.ndarray  # [U] bool, the user has validation and test targets
    item_ids: np.ndarray  # [N] int64 catalog: every item with an interaction, ascending (= score columns)
    item_authors: np.ndarray  # [N] int64 author id of each catalog item
    actions: np.ndarray  # [R, A] bool, ACTIONS order, per position

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # [U]

    def eval_users(self) -> np.ndarray:
        """Rows [U_eval] of the users with validation and test targets."""
        return np.flatnonzero(self.has_eval)

    def visible_len(self, which: str) -> np.ndarray:
        """[U] number of each user's first interactions that training may use when evaluating `which`."""
        if which == "test":  # the validation item too: everything before the test target
            return self.train_len + self.has_eval
        if which in ("train", "val"):
            return self.train_len
        raise ValueError(f"which must be one of {SPLITS}, got {which!r}")

    def target_positions(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(user rows [E], positions [E] into `items`) of the targets of `which`."""
        if which == "train":  # every position t >= 1 of each training part
            counts = np.maximum(self.train_len - 1, 0)  # [U]
            rows = np.repeat(np.arange(len(self.user_ids)), counts)  # [E]
            first = np.cumsum(counts) - counts  # [U] index of each user's first example
            t = np.arange(counts.sum()) - first[rows] + 1  # [E] position within the user
            return rows, self.offsets[rows] + t
        rows = self.eval_users()  # [E]
        return rows, self.offsets[rows] + self.visible_len(which)[rows]

    def exclude_mask(self, which: str) -> np.ndarray:
        """[U_eval, N] bool: every item before the `which` ("val"/"test") target of each eval user."""
        rows = self.eval_users()
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


def check_integer_ids(ids, name: str) -> np.ndarray:
    """ids as int64; floats, bools and strings raise TypeError (a cast would truncate 10.7 to 10)."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name}: expected integer item ids, got dtype {ids.dtype}")
    return ids.astype(np.int64)


def time_order(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Rows [R] sorted by user, then timestamp; ties keep input order (stable sorts)."""
    order = np.argsort(timestamp, kind="stable")
    return order[np.argsort(user[order], kind="stable")]


def later_repeats(user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """[R] bool over time-ordered rows: True where the (user, item) pair already occurred earlier."""
    by_pair = np.lexsort((np.arange(len(user)), item, user))  # (user, item), then time order
    same = np.zeros(len(user), dtype=bool)
    same[1:] = (user[by_pair][1:] == user[by_pair][:-1]) & (item[by_pair][1:] == item[by_pair][:-1])
    repeat = np.zeros(len(user), dtype=bool)
    repeat[by_pair] = same
    return repeat


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


def _time_cut(log: Log, order: np.ndarray, cut) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows in `order`'s order, raw ids of the users whose last kept row is their test target)."""
    t = log.timestamp[order]
    users, starts, counts = np.unique(log.user[order], return_index=True, return_counts=True)  # [U]
    owner = np.repeat(np.arange(len(users)), counts)  # [R]
    before = t < cut  # [R]; within a user, rows before the cut come first
    num_before = np.bincount(owner, weights=before, minlength=len(users)).astype(np.int64)  # [U]
    evaluated = (num_before >= MIN_EVAL_INTERACTIONS - 1) & (num_before < counts)  # [U] history + a target
    first_after = np.zeros(len(order), bool)
    first_after[(starts + num_before)[evaluated]] = True
    return order[before | first_after], users[evaluated]


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
    """The log as a LogSplit: leave-one-out or a global time cut (module docstring). Dropped repeats
    are reported on `stream` (default stderr)."""
    if duplicates not in DUPLICATE_RULES:
        raise ValueError(f"duplicates: expected one of {DUPLICATE_RULES}, got {duplicates!r}")
    check_split_options(protocol, cut_time, cut_quantile)
    order = time_order(log.user, log.timestamp)
    repeat = later_repeats(log.user[order], log.item[order])
    if repeat.any():
        r = order[np.flatnonzero(repeat)[0]]
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
            cut_time = np.quantile(log.timestamp, quantile, method="higher")
        order, evaluated = _time_cut(log, order, cut_time)
        if len(evaluated) == 0:
            raise LogError(f"{log.source}: no user has {MIN_EVAL_INTERACTIONS - 1} interactions before the time cut "
                           f"{cut_time} and one at or after it: nothing to evaluate (move the cut)")
    rating = np.zeros(len(order), np.float32) if log.rating is None else log.rating[order]
    split = split_rows(log.user[order], log.item[order], rating, log.timestamp[order], log.author[order],
                       log.actions[order], log.source)
    fields = {f.name: getattr(split, f.name) for f in dataclasses.fields(Split)}
    if evaluated is not None:  # only users with a target after the cut are evaluated
        has_eval = np.isin(split.user_ids, evaluated)
        fields.update(has_eval=has_eval, train_len=np.where(has_eval, split.lengths - 2, split.lengths))
    return LogSplit(**fields, rows=order, log=log, protocol=protocol)


def describe(split: LogSplit) -> str:
    """One line of statistics: users, items, interactions, examples, id kinds."""
    kinds = ", ".join(f"{kind} ids {'strings (hashed)' if kind in split.log.names else 'integers'}"
                      for kind in ("user", "item"))
    return (f"{split.log.source}: {len(split.user_ids):,} users ({int(split.has_eval.sum()):,} evaluated), "
            f"{len(split.item_ids):,} items, {len(split.items):,} interactions, "
            f"{len(split.target_positions('train')[0]):,} training examples, {split.protocol} split; {kinds}")


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

"""Evaluation beside the models: the popularity and transition baselines, top-k dumps and their check.

    table = phoenix_evaluation.evaluate_baseline(split, "test", "transition")   # HR@10, NDCG@10, HR@50, MRR
    phoenix_evaluation.dump_topk("top10.csv", user_ids, topk_item_ids)          # user_id,item_1,...,item_K
    check = phoenix_evaluation.check_dump("top10.csv", log)                     # HR@10 / NDCG@10 from the file

Baselines (the models' evaluation rule, phoenix_split.py; "visible" = what training may use for the
split evaluated)
  popularity   items by number of visible interactions.
  transition   items by the count of visible consecutive pairs (user's last visible item -> item),
               ties and unseen pairs backed off to popularity, then catalog column.
  Validation sees the training parts; test also sees the validation items, i.e. everything before
  the test targets, which is also the history the test targets get.

Dumps and their check
  A dump is CSV `user_id,item_1,...,item_K`, one row per evaluated user, best first. check_dump
  recomputes HR@k and NDCG@k of a dump against leave-one-out test targets rebuilt from the log in
  plain Python, independent of phoenix_split.py and phoenix_metrics.py as an outside evaluator
  would be; check_dump_figures refuses a dump whose figures disagree with the table's.

Shape glossary
  R  interactions   U  users (U_eval: evaluated users)   N  catalog items   K  top-k
"""

import csv
import math
import os
import tempfile
from pathlib import Path

import numpy as np

import phoenix_metrics as metrics
from phoenix_inputs import PAD_ID
from phoenix_log import Log, LogError
from phoenix_split import MIN_EVAL_INTERACTIONS, Split

__all__ = ["BASELINES", "popularity_counts", "transition_counts", "transition_table", "evaluate_baseline", "baseline_topk", "dump_topk",
           "read_dump", "check_dump", "check_dump_figures", "DumpCheckError"]

BASELINES = ("popularity", "transition")
EVAL_CHUNK = 1024  # users scored at once: bounds the [users, N] float64 score matrix
DUMP_TOLERANCE = 1e-9  # the table's and check_dump's HR / NDCG sum the same hits in another order


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def _visible_positions(split: Split, which: str) -> np.ndarray:
    """Boolean [R]: interactions that training may use when evaluating `which` (all users)."""
    within = np.arange(len(split.items)) - np.repeat(split.offsets[:-1], split.lengths)  # [R]
    return within < np.repeat(split.visible_len(which), split.lengths)


def popularity_counts(split: Split, which: str) -> np.ndarray:
    """Visible interactions per catalog item [N] int64."""
    return np.bincount(split.item_columns[_visible_positions(split, which)], minlength=len(split.item_ids))


def _visible_pairs(split: Split, which: str) -> tuple[np.ndarray, np.ndarray]:
    """(from columns [P], to columns [P]): the visible consecutive pairs within users' sequences."""
    visible = _visible_positions(split, which)  # [R]
    same_user = np.ones(len(split.items), dtype=bool)
    same_user[split.offsets[1:-1]] = False  # position p pairs with p - 1 unless p starts a user
    pair = same_user[1:] & visible[1:]  # [R - 1]; visible[p] implies visible[p - 1] in one user
    return split.item_columns[:-1][pair], split.item_columns[1:][pair]


def transition_counts(split: Split, which: str) -> np.ndarray:
    """[N, N] int64: visible consecutive pairs (i -> j) within users' time-ordered sequences (dense:
    for small catalogs and tests; the baseline itself reads transition_table)."""
    counts = np.zeros((len(split.item_ids),) * 2, dtype=np.int64)
    np.add.at(counts, _visible_pairs(split, which), 1)
    return counts


def transition_table(split: Split, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """transition_counts in CSR form, O(pairs) memory: (indptr [N + 1], to columns [P'], counts [P'])
    int64, row i = the distinct items that followed item i, ascending, and how often."""
    num_items = len(split.item_ids)
    source, target = _visible_pairs(split, which)
    codes, counts = np.unique(source * num_items + target, return_counts=True)  # [P'] sorted by (i, j)
    indptr = np.searchsorted(codes, np.arange(num_items + 1) * num_items)  # [N + 1]
    return indptr, codes % num_items, counts.astype(np.int64)


def baseline_scores(split: Split, which: str, name: str):
    """A function rows [u] (eval-user indices) -> scores [u, N] float64 of baseline `name` for `which`."""
    popularity = popularity_counts(split, which).astype(np.float64)  # [N]
    if name == "popularity":
        return lambda rows: np.broadcast_to(popularity, (len(rows), len(popularity)))
    if name != "transition":
        raise ValueError(f"name must be one of {BASELINES}, got {name!r}")
    indptr, following, counts = transition_table(split, which)
    users = split.eval_users()
    last = split.item_columns[split.offsets[users] + split.visible_len(which)[users] - 1]  # [U_eval]
    weight = popularity.max() + 1.0  # one transition outweighs any popularity gap, so popularity only
    # breaks transition ties

    def score(rows):
        out = np.tile(popularity, (len(rows), 1))  # [u, N]: count 0 x weight + popularity, exactly
        begin, end = indptr[last[rows]], indptr[last[rows] + 1]  # [u]
        owner = np.repeat(np.arange(len(rows)), end - begin)  # [pairs of the chunk]
        entry = np.arange(len(owner)) - np.repeat(np.cumsum(end - begin) - (end - begin), end - begin) \
            + begin[owner]  # [pairs of the chunk] indices into following / counts
        column = following[entry]
        out[owner, column] = counts[entry] * weight + popularity[column]
        return out

    return score


def _user_chunks(num_users: int):
    """Eval-user rows in pieces of EVAL_CHUNK (one piece for an empty set)."""
    return np.array_split(np.arange(num_users), max(1, -(-num_users // EVAL_CHUNK)))


def evaluate_baseline(split: Split, which: str, name: str) -> dict:
    """metrics.evaluate_scores of a baseline over all eval users (in chunks of EVAL_CHUNK)."""
    score = baseline_scores(split, which, name)
    target = split.targets(which)  # [U_eval]
    ranks = [metrics.target_ranks(score(rows), target[rows], split.exclude_mask(which, rows))
             for rows in _user_chunks(len(target))]
    return metrics.metrics_from_ranks(np.concatenate(ranks))


def baseline_topk(split: Split, which: str, name: str, k: int = 10) -> np.ndarray:
    """Raw item ids [U_eval, K] a baseline recommends to each eval user (history excluded; PAD_ID where
    fewer than k items are left)."""
    score = baseline_scores(split, which, name)
    top = np.concatenate([metrics.topk_columns(score(rows), k, split.exclude_mask(which, rows))
                          for rows in _user_chunks(len(split.eval_users()))])
    return np.where(top == metrics.NOT_RANKED, PAD_ID, split.item_ids[top])


# ---------------------------------------------------------------------------------------------
# Top-k dumps and their independent check
# ---------------------------------------------------------------------------------------------


def _id_array(ids, name: str) -> np.ndarray:
    """ids as an array; floats and bools raise TypeError ("1.0" is no item id)."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iuUO":
        raise TypeError(f"{name}: expected integer item ids (or strings), got dtype {ids.dtype}")
    return ids


def dump_topk(path, user_ids, topk_items) -> None:
    """Writes CSV `user_id,item_1,...,item_K`: user_ids [U] and topk_items [U, K] (raw integer ids, or a
    log's original ids), atomically (a temp file beside it, then os.replace; its directory created)."""
    user_ids, topk_items = _id_array(user_ids, "user_ids"), _id_array(topk_items, "topk_items")
    if topk_items.ndim != 2 or user_ids.shape != topk_items.shape[:1]:
        raise ValueError(f"need user_ids [U] and topk_items [U, K], got {user_ids.shape}, {topk_items.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["user_id"] + [f"item_{j + 1}" for j in range(topk_items.shape[1])])
            for user, items in zip(user_ids.tolist(), topk_items.tolist()):
                writer.writerow([user] + items)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_dump(path, k: int, integer_ids: bool = True) -> dict:
    """{user id: its first k dumped item ids} of a dump_topk CSV, ids as ints (`integer_ids`) or strings;
    a bad header, a repeated user or (with integer ids) a field that is no integer raise LogError naming
    the file and line."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0] != "user_id":
        raise LogError(f"{path}:1: expected the header 'user_id,item_1,...', got {rows[:1]}")
    parse = int if integer_ids else str
    dumped, lines = {}, {}
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            user, *top = (parse(x) for x in row[:k + 1])
        except ValueError:
            raise LogError(f"{path}:{number}: expected integer ids, got {row[:k + 1]}") from None
        if user in dumped:  # a second row would silently replace the first
            raise LogError(f"{path}:{number}: user {user} already has a row on line {lines[user]}")
        dumped[user], lines[user] = top, number
    return dumped


def check_dump(path, log: Log, k: int = 10) -> dict:
    """HR@k and NDCG@k of a dump against leave-one-out test targets rebuilt from `log` in plain Python:
    per user, interactions by (timestamp, input order), each item's first one kept, the last = the target.

    Users the dump lacks count as misses. Also counts dumped items that are in the user's history (an
    unfiltered ranking), rows with repeated items, and rows of users the log does not have.
    """
    integer_ids = "user" not in log.names and "item" not in log.names
    by_user = {}
    for r, (user, item, stamp) in enumerate(zip(log.tokens("user", log.user), log.tokens("item", log.item),
                                                log.timestamp.tolist())):
        key, item = (user, item) if integer_ids else (str(user), str(item))
        by_user.setdefault(key, []).append((stamp, r, item))
    dumped = read_dump(path, k, integer_ids)
    hits = gain = history_hits = repeated = missing = evaluated = 0
    for user, events in by_user.items():
        sequence = list(dict.fromkeys(item for _, _, item in sorted(events)))  # first occurrences, in time order
        if len(sequence) < MIN_EVAL_INTERACTIONS:
            continue
        evaluated += 1
        target, history = sequence[-1], set(sequence[:-1])
        if user not in dumped:
            missing += 1
            continue
        top = dumped[user]
        history_hits += sum(item in history for item in top)
        repeated += len(set(top)) != len(top)
        if target in top:
            hits += 1
            gain += 1.0 / math.log2(top.index(target) + 2)
    if not evaluated:
        raise LogError(f"{log.source}: no user has >= {MIN_EVAL_INTERACTIONS} interactions (a training item, a "
                       "validation and a test target): nothing to evaluate")
    return {f"HR@{k}": hits / evaluated, f"NDCG@{k}": gain / evaluated, "num_users": evaluated,
            "missing_users": missing, "extra_users": len(set(dumped) - set(by_user)),
            "history_items_in_topk": history_hits, "rows_with_repeats": repeated}


class DumpCheckError(RuntimeError):
    """A dump's figures, recomputed from the file, disagree with the table's: one of them is wrong."""


def check_dump_figures(path, table_row: dict, check: dict, k: int = 10) -> None:
    """DumpCheckError unless HR@k and NDCG@k recomputed from a dump equal the table's (to rounding)."""
    keys = (f"HR@{k}", f"NDCG@{k}")
    if any(abs(check[key] - table_row[key]) > DUMP_TOLERANCE for key in keys):
        raise DumpCheckError(f"dump {path}: recomputed from the file, " + ", ".join(
            f"{key} {check[key]:.4f}" for key in keys) + " disagree with the table's " + ", ".join(
            f"{key} {table_row[key]:.4f}" for key in keys) + "; the dump is kept for inspection, the figures are not "
            "to be trusted")

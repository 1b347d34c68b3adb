"""Every metric of the library: HR@K, NDCG@K and MRR of leave-one-out evaluation (below), ROC AUC,
Spearman correlation, recall@K of a positive, and the recall of an approximate top-k.

Shape glossary
  U  users (one held-out target each)      N  items, as columns 0..N-1 of a score matrix
  K  width of a top-k list                 E  scored examples

Protocol (SASRec, Kang & McAuley 2018; BERT4Rec; HSTU): every user has one target item; all N
items are ranked except those the caller excludes (the user's history), and the target is never
excluded, even where the mask marks it (a user may re-rate a movie; dropping the target would
make it unrankable). rank is the 0-based position of the target in that ranking, and
  HR@K = [rank < K],  NDCG@K = [rank < K] / log2(rank + 2),  MRR = 1 / (rank + 1),
each averaged over users. With one relevant item the ideal DCG is 1, so NDCG needs no normaliser.

Ties: items are ordered by score, descending, then by column, ascending (a stable sort of the
columns by descending score). The target's rank is therefore
  #{non-excluded n : s_n > s_t} + #{non-excluded n : s_n == s_t and n < t},
deterministic for baselines that tie heavily (popularity). Callers order columns by raw item id,
so ties go to the smaller MovieLens id. NaN scores are rejected: they compare false to everything
and would give the target rank 0.
"""

import numpy as np

__all__ = [
    # leave-one-out ranking metrics
    "target_ranks", "topk_columns", "ranks_in_topk", "metrics_from_ranks", "evaluate_scores", "evaluate_rankings",
    "NOT_RANKED", "HR_CUTOFFS", "NDCG_CUTOFF",
    # other metrics
    "auc", "rankdata", "spearman", "recall_at_k", "topk_recall",
]

# `ranks_in_topk` writes this where the target is not in the list.
NOT_RANKED = -1
HR_CUTOFFS = (10, 50)  # HR@10 and HR@50 are reported; NDCG only at the first cutoff
NDCG_CUTOFF = 10


def _check_scores(scores, target, exclude_mask):
    scores = np.asarray(scores)
    target = np.asarray(target, dtype=np.int64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [U, N], got shape {scores.shape}")
    num_users, num_items = scores.shape
    if target.shape != (num_users,):
        raise ValueError(f"target must be [U={num_users}], got shape {target.shape}")
    if num_users and (target.min() < 0 or target.max() >= num_items):
        raise ValueError(f"target columns must lie in [0, {num_items})")
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if exclude_mask is None:
        exclude_mask = np.zeros(scores.shape, dtype=bool)
    exclude_mask = np.array(exclude_mask, dtype=bool)  # a copy: the target is cleared below
    if exclude_mask.shape != scores.shape:
        raise ValueError(f"exclude_mask must have the shape of scores {scores.shape}, got {exclude_mask.shape}")
    exclude_mask[np.arange(num_users), target] = False  # never exclude the target
    return scores, target, exclude_mask


def target_ranks(scores, target, exclude_mask=None) -> np.ndarray:
    """0-based rank [U] int64 of each user's target among its non-excluded items (ties: see module doc).

    scores [U, N], target [U] columns, exclude_mask [U, N] bool (True = not ranked) or None.
    """
    scores, target, exclude_mask = _check_scores(scores, target, exclude_mask)
    rows = np.arange(len(target))
    target_score = scores[rows, target][:, None]  # [U, 1]
    columns = np.arange(scores.shape[1])[None, :]  # [1, N]
    ahead = (scores > target_score) | ((scores == target_score) & (columns < target[:, None]))  # [U, N]
    return np.sum(ahead & ~exclude_mask, axis=1).astype(np.int64)  # [U]


def topk_columns(scores, k: int, exclude_mask=None) -> np.ndarray:
    """The k best columns [U, K] of each row, best first, by the module's tie rule; excluded skipped.

    Rows with fewer than k rankable items (or k > N) are padded with NOT_RANKED. Consistent with
    `target_ranks`: a column's position here is its rank there.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [U, N], got shape {scores.shape}")
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    num_items = scores.shape[1]
    excluded = (np.zeros(scores.shape, dtype=bool) if exclude_mask is None
                else np.asarray(exclude_mask, dtype=bool))  # [U, N]
    if np.issubdtype(scores.dtype, np.floating) and k < num_items and np.isfinite(scores).all():
        return _topk_partitioned(scores, k, excluded)
    columns = np.broadcast_to(np.arange(num_items), scores.shape)  # [U, N]
    # Last key is primary: rankable first, then score descending, then column ascending (the tie rule).
    # float64 negation: exact for integer counts below 2**53, and safe for unsigned and bool scores.
    order = np.lexsort((columns, -scores.astype(np.float64), excluded), axis=1)[:, :k]  # [U, K]
    top = np.full((scores.shape[0], k), NOT_RANKED, dtype=np.int64)  # [U, K]; k may exceed N
    top[:, : order.shape[1]] = np.where(np.take_along_axis(excluded, order, axis=1), NOT_RANKED, order)
    return top


def _topk_partitioned(scores, k: int, excluded) -> np.ndarray:
    """topk_columns of finite float scores [U, N] with k < N, the same integers without sorting whole
    rows: each row's k-th best non-excluded score (np.partition, excluded as -inf) bounds the
    candidates, and only those are sorted by the tie rule (score descending, column ascending)."""
    num_users, num_items = scores.shape
    masked = np.where(excluded, -np.inf, scores)  # [U, N]
    kth = np.partition(masked, num_items - k, axis=1)[:, num_items - k]  # [U]; -inf: fewer than k rankable
    rows, cols = np.nonzero((masked >= kth[:, None]) & ~excluded)  # [c] candidates (ties at the k-th included)
    order = np.lexsort((cols, -scores[rows, cols].astype(np.float64), rows))  # [c] by row, then the tie rule
    rows, cols = rows[order], cols[order]
    slot = np.arange(len(rows)) - np.searchsorted(rows, rows)  # [c] position within its row
    keep = slot < k
    top = np.full((num_users, k), NOT_RANKED, dtype=np.int64)  # [U, K]
    top[rows[keep], slot[keep]] = cols[keep]
    return top


def ranks_in_topk(topk_items, target) -> np.ndarray:
    """Position [U] of each target in its row of topk_items [U, K] (first occurrence), NOT_RANKED if absent."""
    topk_items = np.asarray(topk_items)
    target = np.asarray(target)
    if topk_items.ndim != 2 or target.shape != topk_items.shape[:1]:
        raise ValueError(f"need topk_items [U, K] and target [U], got {topk_items.shape} and {target.shape}")
    hit = topk_items == target[:, None]  # [U, K]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), NOT_RANKED).astype(np.int64)


def metrics_from_ranks(ranks, list_len: int | None = None) -> dict:
    """HR@10, NDCG@10, HR@50 and MRR (averages over users) from 0-based ranks [U].

    list_len None: ranks are over the full ranking, every rank is known. list_len K: ranks come
    from top-K lists (NOT_RANKED = beyond the list); HR@c needs c <= K and MRR becomes MRR@K.
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty [U], got shape {ranks.shape}")
    found = ranks != NOT_RANKED
    if list_len is None and not found.all():
        raise ValueError("NOT_RANKED ranks need list_len")
    if (ranks[found] < 0).any() or (list_len is not None and (ranks[found] >= list_len).any()):
        raise ValueError("ranks must be NOT_RANKED or lie in [0, list_len)")
    safe = np.where(found, ranks, 0)  # [U]; absent targets contribute 0 below
    result = {}
    for cutoff in HR_CUTOFFS:
        if list_len is None or cutoff <= list_len:
            result[f"HR@{cutoff}"] = float(np.mean(found & (safe < cutoff)))
        if cutoff == NDCG_CUTOFF and (list_len is None or cutoff <= list_len):
            gain = np.where(found & (safe < cutoff), 1.0 / np.log2(safe + 2.0), 0.0)  # [U]
            result[f"NDCG@{cutoff}"] = float(np.mean(gain))
    reciprocal = np.where(found, 1.0 / (safe + 1.0), 0.0)  # [U]
    result["MRR" if list_len is None else f"MRR@{list_len}"] = float(np.mean(reciprocal))
    result["num_users"] = int(ranks.size)
    return result


def evaluate_scores(scores, target, exclude_mask=None) -> dict:
    """Metrics of full score matrices: scores [U, N], target [U] columns, exclude_mask [U, N] or None."""
    return metrics_from_ranks(target_ranks(scores, target, exclude_mask))


def evaluate_rankings(topk_items, target) -> dict:
    """Metrics of top-K lists [U, K] (K >= 10; HR@50 only when K >= 50; MRR truncated at K) vs target [U].

    Items and targets may be columns or raw ids, as long as both use the same.
    """
    topk_items = np.asarray(topk_items)
    if topk_items.ndim != 2 or topk_items.shape[1] < NDCG_CUTOFF:
        raise ValueError(f"topk_items must be [U, K>={NDCG_CUTOFF}], got shape {topk_items.shape}")
    return metrics_from_ranks(ranks_in_topk(topk_items, target), list_len=topk_items.shape[1])


# ---------------------------------------------------------------------------------------------
# Classification, correlation and retrieval metrics


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of scores [E] against binary labels [E] (Mann-Whitney, ties count half); NaN if one class."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel() > 0
    if scores.shape != labels.shape:
        raise ValueError(f"labels: expected {scores.size} values (one per score), got {labels.size}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores: expected finite values, got NaN or inf")
    num_pos, num_neg = labels.sum(), (~labels).sum()
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Mid-ranks (1-based) of tied groups.
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]
    return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def rankdata(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mid-ranks (1-based; ties share their mean rank) along `axis`."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    order = np.argsort(x, axis=-1, kind="stable")
    sorted_x = np.take_along_axis(x, order, axis=-1)
    ranks = np.empty_like(sorted_x)
    n = x.shape[-1]
    flat_sorted, flat_ranks = sorted_x.reshape(-1, n), ranks.reshape(-1, n)
    for row, values in enumerate(flat_sorted):
        starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])  # first index of each tie group
        ends = np.r_[starts[1:], n]
        flat_ranks[row] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    out = np.empty_like(ranks)
    np.put_along_axis(out, order, ranks, axis=-1)
    return np.moveaxis(out, -1, axis)


def spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman rank correlation of x and y along `axis` (Pearson correlation of mid-ranks); NaN
    where either is constant."""
    rx, ry = rankdata(x, axis), rankdata(y, axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis=axis) / denominator


def recall_at_k(scores: np.ndarray, positives: np.ndarray, k: int) -> float:
    """Share of rows whose positive (index [E]) is among the k best of scores [E, N]; a tie with the
    positive counts against it."""
    positive_score = scores[np.arange(len(positives)), positives]  # [E]
    better = (scores >= positive_score[:, None]).sum(axis=1) - 1  # [E] others scoring at least as high
    return float(np.mean(better < k))


def topk_recall(approx_indices, exact_indices) -> float:
    """Mean over users of |approx_b ∩ exact_b| / K for [B, K] index arrays; -1 entries never match."""
    approx, exact = np.asarray(approx_indices), np.asarray(exact_indices)
    if approx.ndim != 2 or approx.shape != exact.shape:
        raise ValueError(f"approx_indices: expected shape {exact.shape} (that of exact_indices, [B, K]), "
                         f"got shape {approx.shape}")
    hits = [np.intersect1d(a[a >= 0], e).size for a, e in zip(approx, exact)]
    return float(np.mean(hits) / exact.shape[1])

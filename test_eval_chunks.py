"""The evaluation and mining in user chunks against the dense [U, N] code they replace, bit for bit.

The oracle (dense_*) is the code before chunking: the whole [U_eval, N] exclusion mask, [U, N] first
positions, the dense [N, N] transition counts, StageOne's [U, N] cosines ranked at once, and
phoenix_metrics.topk_columns's lexsort of whole rows (now a partition, then a sort of the candidates). The
chunked code must give the same integers and floats at chunk sizes 1, a non-divisor of U, and all
users at once, with heavy ties in the scores (vectors on a coarse grid: every product is exact, so
the scores do not depend on how they are blocked and ties are real ties). One test pins the memory:
ranking users in chunks never holds their [U, N] cosines.
"""

import io
import tracemalloc

import numpy as np
import pytest

import phoenix_evaluation as evaluation
import phoenix_metrics as metrics
import phoenix_two_stage as two_stage
from phoenix_log import from_arrays
from phoenix_split import split_log

# ---------------------------------------------------------------------------------------------
# The dense oracle (the code before chunking)
# ---------------------------------------------------------------------------------------------


def dense_exclude_mask(split, which):
    rows = split.eval_users()
    mask = np.zeros((len(rows), len(split.item_ids)), dtype=bool)
    for i, row in enumerate(rows):
        start = split.offsets[row]
        mask[i, split.item_columns[start:start + split.visible_len(which)[row]]] = True
    return mask


def dense_eval_mask(split, which):
    exclude = dense_exclude_mask(split, which)
    exclude[np.arange(exclude.shape[0]), split.targets(which)] = False
    return exclude


def dense_first_positions(split):
    first = np.full((len(split.user_ids), len(split.item_ids)), np.iinfo(np.int32).max, np.int32)
    owner = np.repeat(np.arange(len(split.user_ids)), split.lengths)
    within = np.arange(len(split.items)) - split.offsets[owner]
    np.minimum.at(first, (owner, split.item_columns), within.astype(np.int32))
    return first


def dense_baseline_scores(split, which, name):
    """[U_eval, N] float64: the baseline's scores from the dense [N, N] transition counts."""
    popularity = evaluation.popularity_counts(split, which).astype(np.float64)
    users = split.eval_users()
    if name == "popularity":
        return np.tile(popularity, (len(users), 1))
    transitions = evaluation.transition_counts(split, which)
    last = split.item_columns[split.offsets[users] + split.visible_len(which)[users] - 1]
    return transitions[last] * (popularity.max() + 1.0) + popularity


def dense_topk_columns(scores, k, exclude):
    """phoenix_metrics.topk_columns before its partition path: one lexsort of whole rows."""
    excluded = np.asarray(exclude, bool)
    columns = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((columns, -scores.astype(np.float64), excluded), axis=1)[:, :k]
    top = np.full((scores.shape[0], k), metrics.NOT_RANKED, dtype=np.int64)
    top[:, :order.shape[1]] = np.where(np.take_along_axis(excluded, order, axis=1), metrics.NOT_RANKED, order)
    return top


def dense_hard_negative_pool(split, users, items, pool_size, chunk=4096):
    first = dense_first_positions(split)
    rows, positions = split.target_positions("train")
    within = positions - split.offsets[rows]
    targets = split.item_columns[positions]
    pool = np.empty((len(users), pool_size), np.int32)
    for start in range(0, len(users), chunk):
        sl = slice(start, start + chunk)
        scores = users[sl] @ items.T
        scores[first[rows[sl]] < within[sl, None]] = -np.inf
        scores[np.arange(scores.shape[0]), targets[sl]] = -np.inf
        pool[sl] = np.argpartition(-scores, pool_size, axis=1)[:, :pool_size]
    return pool


# ---------------------------------------------------------------------------------------------
# Fixtures: a log with repeats, > EVAL_BATCH evaluated users; vectors with ties
# ---------------------------------------------------------------------------------------------

NUM_USERS, NUM_ITEMS, D = 600, 40, 4


def random_log(seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 14, NUM_USERS)
    user = np.repeat(np.arange(NUM_USERS), lengths)
    item = rng.zipf(1.5, len(user)) % NUM_ITEMS  # popular items, repeats
    return from_arrays({"user_id": user * 3 + 1, "item_id": item + 100, "timestamp": rng.integers(0, 50, len(user))},
                       source="<chunk log>")


@pytest.fixture(scope="module", params=["first", "keep"])
def split(request):
    return split_log(random_log(), duplicates=request.param, stream=io.StringIO())


def grid_vectors(rows, seed):
    """[rows, D] float32 on a grid of 1/4 in [-1, 1]: exact products, many tied scores."""
    return (np.random.default_rng(seed).integers(-4, 5, (rows, D)) / 4).astype(np.float32)


def chunk_sizes(num):
    return [1, 7, num]  # one at a time, a non-divisor of every U here, all at once


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["val", "test"])
def test_exclude_and_eval_mask_rows_equal_the_dense_mask(split, which):
    dense, dense_eval = dense_exclude_mask(split, which), dense_eval_mask(split, which)
    np.testing.assert_array_equal(split.exclude_mask(which), dense)
    for size in chunk_sizes(len(dense)):
        for start in range(0, len(dense), size):
            rows = np.arange(start, min(start + size, len(dense)))
            np.testing.assert_array_equal(split.exclude_mask(which, rows), dense[rows])
            np.testing.assert_array_equal(two_stage.eval_mask(split, which, rows), dense_eval[rows])


def test_first_positions_of_some_users_equal_the_dense_rows(split):
    dense = dense_first_positions(split)
    np.testing.assert_array_equal(two_stage.first_positions(split), dense)
    rows = np.array([5, 0, 5, len(split.user_ids) - 1])
    np.testing.assert_array_equal(two_stage.first_positions(split, rows), dense[rows])


@pytest.mark.parametrize("name", evaluation.BASELINES)
@pytest.mark.parametrize("which", ["val", "test"])
def test_baselines_in_chunks_equal_the_dense_baseline(split, which, name, monkeypatch):
    dense = dense_baseline_scores(split, which, name)  # [U_eval, N]
    exclude, target = dense_exclude_mask(split, which), split.targets(which)
    want_metrics = metrics.evaluate_scores(dense, target, exclude)
    want_top = dense_topk_columns(dense, 10, exclude)
    want_top = np.where(want_top == metrics.NOT_RANKED, -1, split.item_ids[want_top])
    score = evaluation.baseline_scores(split, which, name)
    np.testing.assert_array_equal(score(np.arange(len(target))), dense)  # float64, bit for bit
    for size in chunk_sizes(len(target)):
        monkeypatch.setattr(evaluation, "EVAL_CHUNK", size)
        assert evaluation.evaluate_baseline(split, which, name) == want_metrics
        np.testing.assert_array_equal(evaluation.baseline_topk(split, which, name, 10), want_top)


def test_transition_table_is_the_dense_counts(split):
    dense = evaluation.transition_counts(split, "test")
    indptr, following, counts = evaluation.transition_table(split, "test")
    rebuilt = np.zeros_like(dense)
    rebuilt[np.repeat(np.arange(len(split.item_ids)), np.diff(indptr)), following] = counts
    np.testing.assert_array_equal(rebuilt, dense)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 5, 29, 30, 31], ids=lambda k: f"K={k}")
def test_topk_columns_equals_the_full_sort(k, dtype):
    """The partition-then-sort top-k (k < N, finite floats) = the full lexsort, ties, exclusions and all."""
    rng = np.random.default_rng(k)
    scores = (rng.integers(-3, 4, (40, 30)) / 2).astype(dtype)  # heavy ties
    scores[1] = -0.0
    scores[1, ::2] = 0.0  # -0.0 and 0.0 tie
    exclude = rng.random(scores.shape) < 0.4
    exclude[2] = True  # nothing rankable
    exclude[3, :-2] = True  # two rankable
    np.testing.assert_array_equal(metrics.topk_columns(scores, k, exclude), dense_topk_columns(scores, k, exclude))
    scores[4, 0] = -np.inf  # not finite: the full sort decides
    np.testing.assert_array_equal(metrics.topk_columns(scores, k, exclude), dense_topk_columns(scores, k, exclude))


@pytest.mark.parametrize("batch_size", [1, 3, two_stage.EVAL_BATCH])
def test_retrieval_topk_equals_the_dense_ranking_with_ties(batch_size):
    U, N, K = 50, 30, 12
    users, items = grid_vectors(U, 1), grid_vectors(N, 2)
    users[7] = 0.0  # a user who ties every item
    exclude = np.random.default_rng(3).random((U, N)) < 0.3
    exclude[0, :N - K + 2] = True  # fewer than K rankable: NOT_RANKED at the end of the row
    targets = np.random.default_rng(4).integers(0, N, U)
    dense = two_stage.retrieval_scores(users, items, batch_size)  # [U, N]
    want_top = dense_topk_columns(dense, K, exclude)
    want_ranks = metrics.target_ranks(dense, targets, exclude)
    want_scores = np.take_along_axis(dense, np.where(want_top == metrics.NOT_RANKED, 0, want_top), axis=1)
    assert (want_top[0] == metrics.NOT_RANKED).any() and len(np.unique(dense[7])) == 1
    for chunk in {batch_size, 7 * batch_size, U * batch_size}:  # 7: a non-divisor of U
        got = two_stage.retrieval_topk(users, items, K, lambda a, b: exclude[a:b], targets, chunk, batch_size)
        np.testing.assert_array_equal(got.columns, want_top)
        np.testing.assert_array_equal(got.ranks, want_ranks)
        np.testing.assert_array_equal(got.scores, want_scores)
    with pytest.raises(ValueError, match="positive multiple of batch_size"):
        two_stage.retrieval_topk(users, items, K, lambda a, b: exclude[a:b], targets, 0, batch_size)


@pytest.mark.parametrize("which", ["val", "test"])
def test_stage_one_in_chunks_equals_the_dense_stage_one(split, which, monkeypatch):
    """StageOne's ranks, top-K and top-K cosines (what TwoStage re-ranks) = the old [U, N] StageOne."""
    U, N = len(split.eval_users()), len(split.item_ids)
    assert U > two_stage.EVAL_BATCH  # several chunks of EVAL_BATCH users
    users, items = grid_vectors(U, 5), grid_vectors(N, 6)
    monkeypatch.setattr(two_stage, "encode_users", lambda *args: users)
    exclude, target = dense_eval_mask(split, which), split.targets(which)
    dense = two_stage.retrieval_scores(users, items)  # [U, N], as the old StageOne held it
    K = 10
    want_top = dense_topk_columns(dense, K, exclude)
    for chunk in (two_stage.EVAL_BATCH, 2 * two_stage.EVAL_BATCH, None):  # None: eval_chunk(N)
        one = two_stage.StageOne(None, None, split, which, history_len=3, k=K, items=items, chunk=chunk)
        np.testing.assert_array_equal(one.ranks, metrics.target_ranks(dense, target, exclude))
        np.testing.assert_array_equal(one.topk, want_top)
        np.testing.assert_array_equal(one.topk_scores, np.take_along_axis(dense, want_top, axis=1))


def test_hard_negative_pool_in_chunks_equals_the_dense_pool(split, monkeypatch):
    E = len(split.target_positions("train")[0])
    users, items = grid_vectors(E, 7), grid_vectors(len(split.item_ids), 8)
    monkeypatch.setattr(two_stage, "encode_items", lambda *args: items)
    monkeypatch.setattr(two_stage, "example_representations", lambda *args: users)
    want = dense_hard_negative_pool(split, users, items, pool_size=5)
    for chunk in chunk_sizes(E):
        for subchunk in (3, two_stage.POOL_SUBCHUNK):  # rows masked and partitioned at once within a chunk
            monkeypatch.setattr(two_stage, "POOL_SUBCHUNK", subchunk)
            got = two_stage.hard_negative_pool(None, None, split, 3, pool_size=5, chunk=chunk)
            np.testing.assert_array_equal(got, want)


def test_retrieval_topk_never_holds_all_users_cosines():
    """Peak traced memory of ranking U users in chunks of EVAL_BATCH is below half of the [U, N]
    float32 cosines that the dense ranking held (~3 MB of one chunk's work here against 16 MB)."""
    U, N = 32 * two_stage.EVAL_BATCH, 500
    users, items = grid_vectors(U, 9), grid_vectors(N, 10)
    none = np.zeros((two_stage.EVAL_BATCH, N), bool)
    tracemalloc.start()
    try:
        two_stage.retrieval_topk(users, items, 10, lambda a, b: none[:b - a], chunk=two_stage.EVAL_BATCH)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < U * N * 4 / 2, f"peak {peak / 1e6:.1f} MB"

"""Ranking metrics: hand-computed golden values, the tie rule, exclusion, top-k vs brute force."""

import numpy as np
import pytest

import phoenix_metrics as metrics

INV_LOG2_3 = 0.6309297535714575  # 1 / log2(3): NDCG gain at rank 1
INV_LOG2_11 = 0.2890648263178879  # 1 / log2(11): NDCG gain at rank 9


def test_golden_ranks_table():
    # ranks 0, 1, 9 are in the top 10; 10 and 49 only in the top 50; 50 in neither.
    m = metrics.metrics_from_ranks([0, 1, 9, 10, 49, 50])
    assert m["HR@10"] == pytest.approx(3 / 6)
    assert m["NDCG@10"] == pytest.approx((1 + INV_LOG2_3 + INV_LOG2_11) / 6)
    assert m["HR@50"] == pytest.approx(5 / 6)
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 50 + 1 / 51) / 6)
    assert m["num_users"] == 6


@pytest.mark.parametrize("exclude, rank", [
    (None, 2),  # column 1 (0.9) and column 2 (0.5, same score, smaller column) come first
    ([0, 1, 0, 0, 0], 1),  # excluding column 1 moves the target up one place
    ([0, 1, 1, 1, 0], 0),  # the target (column 3) is marked but never excluded
], ids=["tie_to_smaller_column", "excluded_item", "target_never_excluded"])
def test_golden_single_user(exclude, rank):
    scores = np.array([[0.1, 0.9, 0.5, 0.5, 0.3]])
    mask = None if exclude is None else np.array([exclude], dtype=bool)
    assert metrics.target_ranks(scores, [3], mask).tolist() == [rank]
    m = metrics.evaluate_scores(scores, [3], mask)
    assert m["NDCG@10"] == pytest.approx([1.0, INV_LOG2_3, 0.5][rank])
    assert m["MRR"] == pytest.approx(1 / (rank + 1))


def test_all_ties_rank_by_column():
    # Constant scores (a popularity baseline on unseen items): the rank is the number of rankable
    # columns before the target.
    scores = np.zeros((3, 6))
    exclude = np.zeros((3, 6), dtype=bool)
    exclude[1, [0, 2]] = True
    exclude[2, 5] = True
    assert metrics.target_ranks(scores, [4, 4, 4], exclude).tolist() == [4, 2, 4]


def test_topk_columns_golden():
    scores = np.array([[3, 1, 3, 2, 1], [0, 0, 0, 0, 0]])
    exclude = np.array([[0, 0, 1, 0, 0], [1, 1, 1, 0, 1]], dtype=bool)
    top = metrics.topk_columns(scores, 3, exclude)
    assert top.tolist() == [[0, 3, 1], [3, metrics.NOT_RANKED, metrics.NOT_RANKED]]
    # k beyond the number of items pads too.
    assert metrics.topk_columns(scores[:1], 6).tolist() == [[0, 2, 3, 1, 4, metrics.NOT_RANKED]]


def test_topk_and_ranks_match_brute_force():
    rng = np.random.default_rng(0)
    U, N = 40, 12
    scores = rng.integers(0, 3, size=(U, N)).astype(np.float32)  # many ties
    exclude = rng.random((U, N)) < 0.3
    target = rng.integers(0, N, size=U)
    top = metrics.topk_columns(scores, N, exclude)
    ranks = metrics.target_ranks(scores, target, exclude)
    for u in range(U):
        rankable = [n for n in range(N) if not exclude[u, n]]
        expected = sorted(rankable, key=lambda n: (-scores[u, n], n))
        assert top[u, : len(expected)].tolist() == expected
        assert (top[u, len(expected):] == metrics.NOT_RANKED).all()
        with_target = sorted(set(rankable) | {target[u]}, key=lambda n: (-scores[u, n], n))
        assert ranks[u] == with_target.index(target[u])


def test_evaluate_rankings_golden():
    topk = np.arange(10)[None, :].repeat(3, axis=0) + 100  # items 100..109 for every user
    m = metrics.evaluate_rankings(topk, [100, 102, 7])  # ranks 0, 2, absent
    assert m["HR@10"] == pytest.approx(2 / 3)
    assert m["NDCG@10"] == pytest.approx((1 + 0.5) / 3)
    assert m["MRR@10"] == pytest.approx((1 + 1 / 3) / 3)
    assert "HR@50" not in m and "MRR" not in m


def test_evaluate_rankings_equals_evaluate_scores_for_full_lists():
    rng = np.random.default_rng(1)
    U, N = 30, 60
    scores = rng.integers(0, 5, size=(U, N))
    exclude = rng.random((U, N)) < 0.2
    target = rng.integers(0, N, size=U)
    exclude[np.arange(U), target] = False  # a full top-N list of rankable items holds the target
    full = metrics.evaluate_scores(scores, target, exclude)
    listed = metrics.evaluate_rankings(metrics.topk_columns(scores, N, exclude), target)
    for key in ("HR@10", "NDCG@10", "HR@50"):
        assert listed[key] == pytest.approx(full[key])
    assert listed[f"MRR@{N}"] == pytest.approx(full["MRR"])


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        metrics.target_ranks(np.array([[0.0, np.nan]]), [0])
    with pytest.raises(ValueError, match="list_len"):
        metrics.metrics_from_ranks([0, metrics.NOT_RANKED])
    with pytest.raises(ValueError, match="K>=10"):
        metrics.evaluate_rankings(np.zeros((2, 5), dtype=int), [0, 0])
    with pytest.raises(ValueError, match="target columns"):
        metrics.target_ranks(np.zeros((1, 3)), [3])

"""Table of bad inputs to the public API: each raises a clear error naming the argument.

Every row: (id, call, exception type, regex the message must match). The regex names the argument
and, where there is one, the expected value; no row may fail inside XLA or pass silently.
"""

import dataclasses
import io
import json
import os

import jax
import numpy as np
import pytest

import phoenix_checkpoint as checkpoint
import phoenix_configs as configs
import phoenix_hashing as hashing
import phoenix_inputs as inputs
import movielens
import phoenix_resume as resume
import phoenix_training as training
import phoenix_validation as validation
from conftest import A, C, D, S, tiny_ranker_config, tiny_retrieval_config, tiny_transformer
from recsys_model import HashConfig, PhoenixModelConfig, RecsysEmbeddings
from runners import (ModelRunner, RecsysInferenceRunner, RecsysRetrievalInferenceRunner, RetrievalModelRunner,
                     create_example_batch, create_example_corpus)

BATCH, EMB = create_example_batch(2, D, S, C, A, seed=0)


def emb_with(**fields):
    return dataclasses.replace(EMB, **fields)


@pytest.fixture(scope="module")
def ranker():
    r = RecsysInferenceRunner(ModelRunner(tiny_ranker_config()))
    r.initialize()
    return r


@pytest.fixture(scope="module")
def retriever():
    r = RecsysRetrievalInferenceRunner(RetrievalModelRunner(tiny_retrieval_config()))
    r.initialize()
    r.set_corpus(*create_example_corpus(40, D))
    return r


def nan_user():
    x = np.array(EMB.user_embeddings)
    x[1, 0, 3] = np.inf
    return emb_with(user_embeddings=x)


def no_candidates(batch):
    """The batch with C = 0 candidates."""
    return batch._replace(candidate_post_hashes=batch.candidate_post_hashes[:, :0],
                          candidate_author_hashes=batch.candidate_author_hashes[:, :0],
                          candidate_product_surface=batch.candidate_product_surface[:, :0])


def no_users(tree):
    """A batch (or embeddings) with B = 0 users."""
    return jax.tree.map(lambda x: x[:0], tree)


def beyond_default_table(batch):
    """The batch with one candidate hash equal to the default post table size (100000)."""
    post = np.array(batch.candidate_post_hashes)
    post[1, 0, 1] = HashConfig().post_table_size
    return batch._replace(candidate_post_hashes=post)


def actions_with(value, index=(0, 1, 2)):
    actions = np.array(BATCH.history_actions)
    actions[index] = value
    return BATCH._replace(history_actions=actions)


ACTIONS_01 = r"batch.history_actions: expected 0/1 multi-hot values \(bool, or 0 and 1 of a number dtype\), got "


# B = 0 or C = 0 used to reach an integer modulo by zero inside attention.
EMPTY_C = r"batch.candidate_post_hashes: expected at least 1 candidate \(C >= 1\), got shape \[2, 0, 2\]"
EMPTY_B = r"batch.user_hashes: expected at least 1 user \(B >= 1\), got shape \[0, 2\]"


RANK_CASES = [
    ("emb_width", lambda: (BATCH, emb_with(user_embeddings=EMB.user_embeddings[..., :8])), ValueError,
     r"recsys_embeddings.user_embeddings: expected shape \[2, 2, 16\]"),
    ("B_mismatch", lambda: (BATCH, emb_with(candidate_post_embeddings=EMB.candidate_post_embeddings[:1])),
     ValueError, r"candidate_post_embeddings: expected shape \[2, 4, 2, 16\]"),
    ("S_mismatch", lambda: (BATCH, emb_with(history_post_embeddings=EMB.history_post_embeddings[:, :3])),
     ValueError, r"history_post_embeddings: expected shape \[2, 6, 2, 16\]"),
    ("C_mismatch", lambda: (BATCH._replace(candidate_product_surface=BATCH.candidate_product_surface[:, :2]), EMB),
     ValueError, r"batch.candidate_product_surface: expected shape \[2, 4\]"),
    ("hash_count", lambda: (BATCH._replace(user_hashes=np.ones((2, 3), np.int32)), EMB), ValueError,
     r"batch.user_hashes: expected shape \[\*, 2\]"),
    ("rank_of_field", lambda: (BATCH._replace(history_product_surface=BATCH.history_product_surface[..., None]), EMB),
     ValueError, r"batch.history_product_surface: expected rank 2"),
    ("negative_hash", lambda: (BATCH._replace(candidate_author_hashes=-BATCH.candidate_author_hashes), EMB),
     ValueError, r"batch.candidate_author_hashes: hashes must lie in \[0, 100000\) \(HashConfig.author_table_size: "
                 r"rows of the author table; 0 = padding\), got -\d+ at index \[0, 0, 0\] \(16 bad of 16 entries\)"),
    # With explicit embeddings the model looks nothing up, and a hash beyond its table used to pass.
    ("hash_equals_table_size", lambda: (beyond_default_table(BATCH), EMB), ValueError,
     r"batch.candidate_post_hashes: hashes must lie in \[0, 100000\) \(HashConfig.post_table_size: rows of the "
     r"post table; 0 = padding\), got 100000 at index \[1, 0, 1\] \(1 bad of 16 entries\)"),
    ("hash_uint64_beyond_int64", lambda: (BATCH._replace(user_hashes=np.full((2, 2), 2**63, np.uint64)), EMB),
     ValueError, r"batch.user_hashes: hashes must lie in \[0, 100000\).*got 9223372036854775808 at index \[0, 0\]"),
    # Actions are 0/1 multi-hot; 1e30 (and -1, 0.5, NaN) used to be embedded as 2a - 1.
    ("actions_huge", lambda: (actions_with(1e30), EMB), ValueError, ACTIONS_01 + r"1e\+30 at index \[0, 1, 2\] "
                                                                         r"\(1 bad of 228 entries\)"),
    ("actions_negative", lambda: (actions_with(-1.0), EMB), ValueError, ACTIONS_01 + r"-1.0 at index \[0, 1, 2\]"),
    ("actions_half", lambda: (actions_with(0.5), EMB), ValueError, ACTIONS_01 + r"0.5 at index \[0, 1, 2\]"),
    ("actions_nan", lambda: (actions_with(np.nan), EMB), ValueError, ACTIONS_01 + r"nan at index \[0, 1, 2\]"),
    ("actions_int_two", lambda: (BATCH._replace(history_actions=2 * BATCH.history_actions.astype(np.int32)), EMB),
     ValueError, ACTIONS_01 + r"2 at index"),
    ("surface_huge_int64", lambda: (BATCH._replace(history_product_surface=np.full((2, S), 2**40)), EMB), ValueError,
     r"batch.history_product_surface: ids must lie in \[0, 16\).*got 1099511627776 at index \[0, 0\]"),
    # float64 beyond float32's range becomes inf in the model (and used to warn from NumPy's cast).
    ("embeddings_beyond_float32", lambda: (BATCH, emb_with(user_embeddings=np.full((2, 2, D), 1e300))), ValueError,
     r"recsys_embeddings.user_embeddings: contains NaN or inf \(as float32, the model's input dtype\): 1e\+300 "
     r"at index \[0, 0, 0\]"),
    ("surface_vocab", lambda: (BATCH._replace(history_product_surface=BATCH.history_product_surface + 16), EMB),
     ValueError, r"batch.history_product_surface: ids must lie in \[0, 16\)"),
    ("action_width", lambda: (BATCH._replace(history_actions=BATCH.history_actions[..., :18]), EMB), ValueError,
     r"batch.history_actions: expected shape \[2, 6, 19\]"),
    ("float_hashes", lambda: (BATCH._replace(user_hashes=BATCH.user_hashes.astype(np.float32)), EMB), TypeError,
     r"batch.user_hashes: expected int dtype"),
    ("int_embeddings", lambda: (BATCH, emb_with(user_embeddings=EMB.user_embeddings.astype(np.int32))), TypeError,
     r"recsys_embeddings.user_embeddings: expected float dtype"),
    ("nan_embeddings", lambda: (BATCH, nan_user()), ValueError,
     r"user_embeddings: contains NaN or inf .*: inf at index \[1, 0, 3\] \(1 bad of 64 entries\)"),
    ("not_a_batch", lambda: (dict(BATCH._asdict()), EMB), TypeError, r"batch: expected a RecsysBatch"),
    ("not_embeddings", lambda: (BATCH, tuple(jax.tree_util.tree_leaves(EMB))), TypeError,
     r"recsys_embeddings: expected RecsysEmbeddings"),
    ("zero_candidates", lambda: (no_candidates(BATCH), emb_with(
        candidate_post_embeddings=EMB.candidate_post_embeddings[:, :0],
        candidate_author_embeddings=EMB.candidate_author_embeddings[:, :0])), ValueError, EMPTY_C),
    ("zero_users", lambda: (no_users(BATCH), no_users(EMB)), ValueError, EMPTY_B),
]


@pytest.mark.parametrize("name,make,err,match", RANK_CASES, ids=[c[0] for c in RANK_CASES])
def test_rank_rejects(ranker, name, make, err, match):
    with pytest.raises(err, match=match):
        ranker.rank(*make())


VALUE_CASES = [c for c in RANK_CASES if c[0] in ("negative_hash", "surface_vocab", "nan_embeddings",
                                                 "hash_equals_table_size", "actions_huge")]


@pytest.mark.parametrize("name,make,err,match", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_rank_value_errors_are_the_same_before_and_after_a_shape_has_run(name, make, err, match):
    """rank checks the values of inputs whose shapes ran before while the computation works
    (`RecsysInferenceRunner.rank`), and a new shape whole before anything is traced: the same
    error either way, and no result is returned."""
    r = RecsysInferenceRunner(ModelRunner(tiny_ranker_config()))
    r.initialize()
    with pytest.raises(err, match=match):  # a first call: checked before tracing
        r.rank(*make())
    assert r.trace_counts["rank"] == 0
    good = r.rank(BATCH, EMB)  # these shapes now ran
    with pytest.raises(err, match=match):  # the same shapes: checked after dispatch
        r.rank(*make())
    assert r.trace_counts["rank"] == 1  # and nothing recompiled
    np.testing.assert_array_equal(np.asarray(r.rank(BATCH, EMB).scores), np.asarray(good.scores))


def _prefix_of(ranker):
    return ranker.encode_prefix(BATCH, EMB)


# Every public entry point that takes a RecsysBatch checks its values the same way (hashes against
# the tables whether or not embeddings are given, 0/1 actions): (id, call(ranker, retriever, batch)).
ENTRY_POINTS = [
    ("rank", lambda r, q, b: r.rank(b, EMB)),
    ("rank_large", lambda r, q, b: r.rank_large(b, EMB, chunk_size=3)),
    ("encode_prefix", lambda r, q, b: r.encode_prefix(b, EMB)),
    ("score_candidates", lambda r, q, b: r.score_candidates(_prefix_of(r), b, EMB)),
    ("retrieve_index", lambda r, q, b: q.retrieve(b, EMB, top_k=3)),
    ("retrieve_corpus", lambda r, q, b: q.retrieve(b, EMB, top_k=3, corpus_embeddings=create_example_corpus(9, D)[0])),
    ("encode_user", lambda r, q, b: q.encode_user(b, EMB)),
    ("encode_candidates", lambda r, q, b: q.encode_candidates(b, EMB)),
]
ENTRY_VALUE_CASES = [c for c in RANK_CASES if c[0] in ("hash_equals_table_size", "actions_huge")]


@pytest.mark.parametrize("entry,call", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
@pytest.mark.parametrize("name,make,err,match", ENTRY_VALUE_CASES, ids=[c[0] for c in ENTRY_VALUE_CASES])
def test_every_entry_point_checks_values(ranker, retriever, entry, call, name, make, err, match):
    with pytest.raises(err, match=match):
        call(ranker, retriever, make()[0])


RETRIEVE_CASES = [
    ("top_k_zero", dict(top_k=0), ValueError, r"top_k: expected 1 <= top_k <= 40"),
    ("top_k_above_N", dict(top_k=41), ValueError, r"top_k: expected 1 <= top_k <= 40 \(corpus size\), got 41"),
    ("top_k_float", dict(top_k=2.0), TypeError, r"top_k: expected an int"),
    ("corpus_width", dict(top_k=3, corpus_embeddings=np.ones((5, 8), np.float32)), ValueError,
     r"corpus_embeddings: expected shape \[\*, 16\]"),
    ("empty_corpus", dict(top_k=1, corpus_embeddings=np.ones((0, D), np.float32)), ValueError,
     r"corpus_embeddings: expected at least one row"),
    ("mask_length", dict(top_k=3, corpus_mask=np.ones(39, bool)), ValueError, r"corpus_mask: expected shape \[40\]"),
    ("mask_dtype", dict(top_k=3, corpus_mask=np.ones(40, np.float32)), TypeError, r"corpus_mask: expected bool"),
]


VALIDATION_CASES = [
    ("check_batch_C0", lambda: validation.check_batch(no_candidates(BATCH), HashConfig()), EMPTY_C),
    ("check_batch_B0", lambda: validation.check_batch(no_users(BATCH), HashConfig()), EMPTY_B),
    ("check_inputs_B0_user_only", lambda: validation.check_inputs(no_users(BATCH), no_users(EMB), HashConfig(), D,
                                                                  need_candidates=False), EMPTY_B),
    ("check_candidate_inputs_C0", lambda: validation.check_candidate_inputs(no_candidates(BATCH), EMB, HashConfig(),
                                                                            D), EMPTY_C),
    ("check_candidate_inputs_B0", lambda: validation.check_candidate_inputs(no_users(BATCH), EMB, HashConfig(), D),
     r"batch.candidate_post_hashes: expected at least 1 user \(B >= 1\), got shape \[0, 4, 2\]"),
]


@pytest.mark.parametrize("name,call,match", VALIDATION_CASES, ids=[c[0] for c in VALIDATION_CASES])
def test_shared_checks_reject_empty_batches(name, call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("name,kwargs,err,match", RETRIEVE_CASES, ids=[c[0] for c in RETRIEVE_CASES])
def test_retrieve_rejects(retriever, name, kwargs, err, match):
    with pytest.raises(err, match=match):
        retriever.retrieve(BATCH, EMB, **kwargs)


CONFIG_CASES = [
    ("gqa_heads", lambda: tiny_transformer(num_q_heads=3, num_kv_heads=2), r"num_q_heads \(3\) must be a multiple"),
    ("odd_key_size", lambda: tiny_transformer(key_size=5), r"key_size must be even"),
    ("zero_layers", lambda: tiny_transformer(num_layers=0), r"num_layers must be a positive int"),
    ("negative_widening", lambda: tiny_transformer(widening_factor=-1.0), r"widening_factor must be > 0"),
    ("emb_size_mismatch", lambda: PhoenixModelConfig(model=tiny_transformer(), emb_size=32, num_actions=A).initialize(),
     r"model.emb_size \(16\) must equal emb_size \(32\)"),
    ("zero_actions", lambda: PhoenixModelConfig(model=tiny_transformer(), emb_size=D, num_actions=0).initialize(),
     r"num_actions must be a positive int"),
    ("zero_vocab", lambda: PhoenixModelConfig(model=tiny_transformer(), emb_size=D, num_actions=A,
                                              product_surface_vocab_size=0).initialize(),
     r"product_surface_vocab_size must be a positive int"),
    ("zero_hashes", lambda: PhoenixModelConfig(model=tiny_transformer(), emb_size=D, num_actions=A,
                                               hash_config=HashConfig(num_item_hashes=0)).initialize(),
     r"HashConfig.num_item_hashes: expected an int >= 1, got 0"),
    ("ranker_path", lambda: RecsysInferenceRunner(ModelRunner(tiny_ranker_config()), path="fast"),
     r"path: expected 'isolated' or 'masked'"),
]


@pytest.mark.parametrize("name,make,match", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_rejects(name, make, match):
    with pytest.raises(ValueError, match=match):
        make()


LOGITS, MASK = np.zeros((2, 4, 3), np.float32), np.ones((2, 4), bool)  # [B, C, A], [B, C]
USER, IDS = np.eye(4, 8, dtype=np.float32), np.arange(4, dtype=np.int32)  # [R, D], [R]


def labels_with(value, index=(1, 2, 0)):
    labels = np.zeros((2, 4, 3), np.float32)
    labels[index] = value
    return labels


LOSS_CASES = [
    ("labels_shape", lambda: training.ranking_loss(np.zeros((2, 4, 3)), np.zeros((2, 1, 3)), np.ones((2, 4), bool)),
     ValueError, r"labels: expected shape \[2, 4, 3\]"),
    ("candidate_mask_shape", lambda: training.ranking_loss(np.zeros((2, 4, 3)), np.zeros((2, 4, 3)),
                                                           np.ones((2, 3), bool)),
     ValueError, r"candidate_mask: expected shape \[2, 4\]"),
    ("action_weights", lambda: training.ranking_loss(np.zeros((2, 4, 3)), np.zeros((2, 4, 3)), np.ones((2, 4), bool),
                                                     action_weights=np.ones(2)),
     ValueError, r"action_weights: expected shape \[3\]"),
    ("positive_shape", lambda: training.retrieval_loss(np.zeros((4, 8)), np.zeros((3, 8)), 0.1, np.arange(4)),
     ValueError, r"positive: expected shape \[4, 8\]"),
    ("temperature", lambda: training.retrieval_loss(np.zeros((4, 8)), np.zeros((4, 8)), 0.0, np.arange(4)),
     ValueError, r"temperature: expected > 0"),
    ("float_ids", lambda: training.retrieval_loss(np.zeros((4, 8)), np.zeros((4, 8)), 0.1, np.zeros(4)),
     TypeError, r"positive_ids: expected int dtype"),
    # Labels: NaN or values outside [0, 1] used to give a silently wrong (even negative) loss.
    ("labels_nan", lambda: training.ranking_loss(LOGITS, labels_with(np.nan), MASK), ValueError,
     r"labels: expected finite values in \[0, 1\] \(0/1 or soft labels\), got nan at index \[1, 2, 0\]"),
    ("labels_inf", lambda: training.ranking_loss_terms(LOGITS, labels_with(np.inf), MASK), ValueError,
     r"labels: expected finite values in \[0, 1\].*got inf"),
    ("labels_two", lambda: training.ranking_loss(LOGITS, labels_with(2.0), MASK), ValueError,
     r"labels: expected finite values in \[0, 1\].*got 2.0 at index \[1, 2, 0\] \(1 bad of 24 entries\)"),
    ("labels_negative", lambda: training.ranking_loss(LOGITS, labels_with(-1), MASK), ValueError,
     r"labels: expected finite values in \[0, 1\].*got -1.0"),
    # Masks: NaN, fractions and negatives used to be read as weights.
    ("label_mask_nan", lambda: training.ranking_loss(LOGITS, labels_with(1), MASK, label_mask=labels_with(np.nan)),
     ValueError, r"label_mask: expected a mask of 0/1 or bool values, got nan at index \[1, 2, 0\]"),
    ("label_mask_half", lambda: training.ranking_loss(LOGITS, labels_with(1), MASK, label_mask=labels_with(0.5)),
     ValueError, r"label_mask: expected a mask of 0/1 or bool values, got 0.5"),
    ("label_mask_negative", lambda: training.ranking_loss(LOGITS, labels_with(1), MASK, label_mask=labels_with(-1)),
     ValueError, r"label_mask: expected a mask of 0/1 or bool values, got -1.0"),
    ("candidate_mask_two", lambda: training.ranking_loss(LOGITS, labels_with(1), 2 * MASK.astype(np.int32)),
     ValueError, r"candidate_mask: expected a mask of 0/1 or bool values, got 2.0 at index \[0, 0\]"),
    # Action weights: negative or NaN weights used to reward wrong predictions / give NaN.
    ("action_weights_negative", lambda: training.ranking_loss(LOGITS, labels_with(1), MASK,
                                                              action_weights=np.array([1.0, -1.0, 1.0])),
     ValueError, r"action_weights: expected finite values >= 0, got -1.0 at index \[1\]"),
    ("action_weights_nan", lambda: training.ranking_loss(LOGITS, labels_with(1), MASK,
                                                         action_weights=[1.0, 1.0, np.nan]),
     ValueError, r"action_weights: expected finite values >= 0, got nan at index \[2\]"),
    ("action_weights_list_length", lambda: training.ranking_loss(LOGITS, labels_with(1), MASK,
                                                                 action_weights=[1.0, 1.0]),
     ValueError, r"action_weights: expected shape \[3\]"),
    # Retrieval: temperature, log_q, valid, positive_ids, R.
    ("temperature_nan", lambda: training.retrieval_loss(USER, USER, float("nan"), IDS), ValueError,
     r"temperature: expected > 0 and finite, got nan"),
    ("temperature_inf", lambda: training.retrieval_loss(USER, USER, np.inf, IDS), ValueError,
     r"temperature: expected > 0 and finite, got inf"),
    ("temperature_negative_np", lambda: training.retrieval_loss(USER, USER, np.float32(-0.1), IDS), ValueError,
     r"temperature: expected > 0 and finite, got -0.1"),
    ("temperature_vector", lambda: training.retrieval_loss(USER, USER, np.ones(4), IDS), ValueError,
     r"temperature: expected a scalar > 0, got shape \[4\]"),
    ("temperature_string", lambda: training.retrieval_loss(USER, USER, "0.1", IDS), TypeError,
     r"temperature: expected > 0 and finite, got str"),
    ("log_q_nan", lambda: training.retrieval_loss(USER, USER, 0.1, IDS, log_q=np.array([0, np.nan, 0, 0], np.float32)),
     ValueError, r"log_q: expected finite values \(log sampling probabilities.*got nan at index \[1\]"),
    ("log_q_shape", lambda: training.retrieval_loss(USER, USER, 0.1, IDS, log_q=np.zeros(3, np.float32)),
     ValueError, r"log_q: expected shape \[4\]"),
    ("valid_half", lambda: training.retrieval_loss(USER, USER, 0.1, IDS, valid=np.array([1, 0.5, 1, 1])),
     ValueError, r"valid: expected a mask of 0/1 or bool values, got 0.5 at index \[1\]"),
    ("positive_ids_none", lambda: training.retrieval_loss(USER, USER, 0.1, None), ValueError,
     r"positive_ids: expected \[R\] or \[R, H\] item ids, got None"),
    ("positive_ids_rank3", lambda: training.retrieval_loss(USER, USER, 0.1, IDS[:, None, None]), ValueError,
     r"positive_ids: expected \[R\] or \[R, H\] item ids, got shape \[4, 1, 1\]"),
    ("positive_ids_rows", lambda: training.retrieval_loss(USER, USER, 0.1, IDS[:3]), ValueError,
     r"positive_ids: expected shape \[4\]"),
    ("positive_ids_no_hashes", lambda: training.retrieval_loss(USER, USER, 0.1, np.zeros((4, 0), np.int32)),
     ValueError,
     r"positive_ids: expected at least 1 id per item \(H >= 1\), got shape \[4, 0\]"),
    ("positive_ids_list", lambda: training.retrieval_loss(USER, USER, 0.1, [0, 1, 2, 3]), TypeError,
     r"positive_ids: expected an array"),
    ("one_row", lambda: training.retrieval_loss(USER[:1], USER[:1], 0.1, IDS[:1]), ValueError,
     r"user: expected at least 2 rows \(R >= 2.*got shape \[1, 8\]"),
]


@pytest.mark.parametrize("name,call,err,match", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_losses_reject(name, call, err, match):
    with pytest.raises(err, match=match):
        call()


SMALL = HashConfig(user_table_size=101, post_table_size=211, author_table_size=53)


@pytest.fixture(scope="module")
def trainer_and_state():
    cfg = dataclasses.replace(tiny_ranker_config(), hash_config=SMALL).initialize()
    trainer = training.make_ranking_trainer(cfg)
    batch, _ = create_example_batch(2, D, S, C, A, num_user_embeddings=101, num_post_embeddings=211,
                                    num_author_embeddings=53)
    return trainer, trainer.init(jax.random.PRNGKey(0), batch), batch


def test_train_step_rejects_hashes_beyond_table(trainer_and_state):
    trainer, state, batch = trainer_and_state
    bad = np.array(batch.history_post_hashes)
    bad[0, 0, 1] = 211
    with pytest.raises(ValueError, match=r"batch.history_post_hashes: hashes must lie in \[0, 211\)"):
        trainer.step(state, batch._replace(history_post_hashes=bad), np.zeros((2, C, A), np.float32))


def test_train_step_rejects_label_shape(trainer_and_state):
    trainer, state, batch = trainer_and_state
    with pytest.raises(ValueError, match=rf"labels: expected rank 3 with shape \[2, {C}, {A}\]"):
        trainer.step(state, batch, np.zeros((2, C), np.float32))


def with_value(array, index, value):
    array = np.array(array)
    array[index] = value
    return array


def labels_for(batch, value=None, index=(0, 1, 2)):
    labels = np.zeros(batch.candidate_post_hashes.shape[:2] + (A,), np.float32)  # [B, C, A]
    return labels if value is None else with_value(labels, index, value)


def beyond_table(batch):
    """The batch with one candidate hash equal to the post table size (211): a gather past the table."""
    return batch._replace(candidate_post_hashes=with_value(batch.candidate_post_hashes, (1, 0, 1), 211))


BEYOND = (r"batch.candidate_post_hashes: hashes must lie in \[0, 211\) \(HashConfig.post_table_size.*got 211 "
          r"at index \[1, 0, 1\]")


def huge_action(batch):
    """The batch with one history action of 1e30 (actions are 0/1 multi-hot)."""
    return batch._replace(history_actions=with_value(batch.history_actions, (1, 0, 4), 1e30))


HUGE_ACTION = ACTIONS_01 + r"1e\+30 at index \[1, 0, 4\]"

# (id, call(trainer, state, batch), exception, message)
RANKING_TRAINER_CASES = [
    ("step_labels_nan", lambda t, s, b: t.step(s, b, labels_for(b, np.nan)), ValueError,
     r"labels: expected finite values in \[0, 1\].*got nan at index \[0, 1, 2\]"),
    ("step_labels_two", lambda t, s, b: t.step(s, b, labels_for(b, 2.0)), ValueError,
     r"labels: expected finite values in \[0, 1\].*got 2.0"),
    ("step_label_mask_nan", lambda t, s, b: t.step(s, b, labels_for(b), labels_for(b, np.nan)), ValueError,
     r"label_mask: expected a mask of 0/1 or bool values, got nan"),
    ("step_label_mask_negative", lambda t, s, b: t.step(s, b, labels_for(b), labels_for(b, -1.0)), ValueError,
     r"label_mask: expected a mask of 0/1 or bool values, got -1.0"),
    ("evaluate_labels_nan", lambda t, s, b: t.evaluate(s.params, b, labels_for(b, np.nan)), ValueError,
     r"labels: expected finite values in \[0, 1\]"),
    ("evaluate_labels_negative", lambda t, s, b: t.evaluate(s.params, b, labels_for(b, -0.5)), ValueError,
     r"labels: expected finite values in \[0, 1\].*got -0.5"),
    ("evaluate_label_mask_half", lambda t, s, b: t.evaluate(s.params, b, labels_for(b), labels_for(b, 0.5)),
     ValueError, r"label_mask: expected a mask of 0/1 or bool values, got 0.5"),
    ("evaluate_label_shape", lambda t, s, b: t.evaluate(s.params, b, labels_for(b)[:, :2]), ValueError,
     rf"labels: expected shape \[2, {C}, {A}\]"),
    ("predict_hash_beyond_table", lambda t, s, b: t.predict(s.params, beyond_table(b)), ValueError, BEYOND),
    ("evaluate_hash_beyond_table", lambda t, s, b: t.evaluate(s.params, beyond_table(b), labels_for(b)), ValueError,
     BEYOND),
    ("step_actions_huge", lambda t, s, b: t.step(s, huge_action(b), labels_for(b)), ValueError, HUGE_ACTION),
    ("predict_actions_huge", lambda t, s, b: t.predict(s.params, huge_action(b)), ValueError, HUGE_ACTION),
    ("step_zero_candidates", lambda t, s, b: t.step(s, no_candidates(b), labels_for(no_candidates(b))), ValueError,
     EMPTY_C),
    ("predict_zero_candidates", lambda t, s, b: t.predict(s.params, no_candidates(b)), ValueError, EMPTY_C),
    ("evaluate_zero_candidates", lambda t, s, b: t.evaluate(s.params, no_candidates(b),
                                                            labels_for(no_candidates(b))), ValueError, EMPTY_C),
    ("step_zero_users", lambda t, s, b: t.step(s, no_users(b), labels_for(no_users(b))), ValueError, EMPTY_B),
    ("predict_zero_users", lambda t, s, b: t.predict(s.params, no_users(b)), ValueError, EMPTY_B),
    ("evaluate_zero_users", lambda t, s, b: t.evaluate(s.params, no_users(b), labels_for(no_users(b))), ValueError,
     EMPTY_B),
]


@pytest.mark.parametrize("name,call,err,match", RANKING_TRAINER_CASES, ids=[c[0] for c in RANKING_TRAINER_CASES])
def test_ranking_trainer_rejects(trainer_and_state, name, call, err, match):
    trainer, state, batch = trainer_and_state
    with pytest.raises(err, match=match):
        call(trainer, state, batch)


@pytest.fixture(scope="module")
def retrieval_trainer_and_state():
    cfg = dataclasses.replace(tiny_retrieval_config(), hash_config=SMALL).initialize()
    trainer = training.make_retrieval_trainer(cfg)
    batch, _ = create_example_batch(2, D, S, C, A, num_user_embeddings=101, num_post_embeddings=211,
                                    num_author_embeddings=53)
    return trainer, trainer.init(jax.random.PRNGKey(0), batch), batch


LOG_Q_NAN = np.array([0.0, np.nan], np.float32)
RETRIEVAL_TRAINER_CASES = [
    ("predict_hash_beyond_table", lambda t, s, b: t.predict(s.params, beyond_table(b)), ValueError, BEYOND),
    ("evaluate_hash_beyond_table", lambda t, s, b: t.evaluate(s.params, beyond_table(b)), ValueError, BEYOND),
    ("step_actions_huge", lambda t, s, b: t.step(s, huge_action(b)), ValueError, HUGE_ACTION),
    ("step_log_q_nan", lambda t, s, b: t.step(s, b, log_q=LOG_Q_NAN), ValueError,
     r"log_q: expected finite values.*got nan at index \[1\]"),
    ("evaluate_log_q_nan", lambda t, s, b: t.evaluate(s.params, b, log_q=LOG_Q_NAN), ValueError,
     r"log_q: expected finite values.*got nan at index \[1\]"),
    ("evaluate_log_q_shape", lambda t, s, b: t.evaluate(s.params, b, log_q=np.zeros(3, np.float32)), ValueError,
     r"log_q: expected shape \[2\]"),
    ("step_positive_ids_rows", lambda t, s, b: t.step(s, b, positive_ids=np.arange(3, dtype=np.int32)), ValueError,
     r"positive_ids: expected shape \[2\]"),
    ("evaluate_positive_ids_rank3", lambda t, s, b: t.evaluate(s.params, b, positive_ids=np.zeros((2, 1, 1), int)),
     ValueError, r"positive_ids: expected \[B\] or \[B, H\] item ids, got shape \[2, 1, 1\]"),
    ("evaluate_positive_ids_float", lambda t, s, b: t.evaluate(s.params, b, positive_ids=np.zeros(2)), TypeError,
     r"positive_ids: expected int dtype"),
    ("step_one_user", lambda t, s, b: t.step(s, jax.tree.map(lambda x: x[:1], b)), ValueError,
     r"batch.user_hashes: expected at least 2 users \(B >= 2.*got shape \[1, 2\]"),
    ("evaluate_one_user", lambda t, s, b: t.evaluate(s.params, jax.tree.map(lambda x: x[:1], b)), ValueError,
     r"batch.user_hashes: expected at least 2 users"),
    ("step_zero_candidates", lambda t, s, b: t.step(s, no_candidates(b)), ValueError, EMPTY_C),
    ("predict_zero_users", lambda t, s, b: t.predict(s.params, no_users(b)), ValueError, EMPTY_B),
]


@pytest.mark.parametrize("name,call,err,match", RETRIEVAL_TRAINER_CASES,
                         ids=[c[0] for c in RETRIEVAL_TRAINER_CASES])
def test_retrieval_trainer_rejects(retrieval_trainer_and_state, name, call, err, match):
    trainer, state, batch = retrieval_trainer_and_state
    with pytest.raises(err, match=match):
        call(trainer, state, batch)


TRAINER_CONFIG_CASES = [
    ("action_weights_negative", lambda: training.make_ranking_trainer(
        tiny_ranker_config(), action_weights=-np.ones(A)), ValueError,
     r"action_weights: expected finite values >= 0, got -1.0 at index \[0\]"),
    ("action_weights_nan", lambda: training.make_ranking_trainer(
        tiny_ranker_config(), action_weights=with_value(np.ones(A), 3, np.nan)), ValueError,
     r"action_weights: expected finite values >= 0, got nan at index \[3\]"),
    ("action_weights_length", lambda: training.make_ranking_trainer(tiny_ranker_config(), action_weights=np.ones(3)),
     ValueError, rf"action_weights: expected shape \[{A}\], got shape \(3,\)"),
    ("temperature_zero", lambda: training.make_retrieval_trainer(tiny_retrieval_config(), temperature=0.0),
     ValueError, r"temperature: expected > 0 and finite, got 0.0"),
    ("temperature_nan", lambda: training.make_retrieval_trainer(tiny_retrieval_config(), temperature=float("nan")),
     ValueError, r"temperature: expected > 0 and finite, got nan"),
    ("temperature_inf", lambda: training.make_retrieval_trainer(tiny_retrieval_config(), temperature=float("inf")),
     ValueError, r"temperature: expected > 0 and finite, got inf"),
]


@pytest.mark.parametrize("name,call,err,match", TRAINER_CONFIG_CASES, ids=[c[0] for c in TRAINER_CONFIG_CASES])
def test_trainer_constructors_reject(name, call, err, match):
    with pytest.raises(err, match=match):
        call()


NAN = float("nan")
# (field, bad value, exception, message); the message names the field, the allowed values and the value.
OPTIMIZER_CASES = [
    ("learning_rate", NAN, ValueError, r"OptimizerConfig.learning_rate: expected a finite number > 0, got nan"),
    ("learning_rate", -1e-3, ValueError, r"OptimizerConfig.learning_rate: expected a finite number > 0, got -0.001"),
    ("learning_rate", 0.0, ValueError, r"OptimizerConfig.learning_rate: expected a finite number > 0, got 0.0"),
    ("learning_rate", "1e-3", TypeError, r"OptimizerConfig.learning_rate: expected a finite number > 0, got str"),
    ("table_learning_rate", NAN, ValueError, r"OptimizerConfig.table_learning_rate: expected .*> 0, or None"),
    ("warmup_steps", -1, ValueError, r"OptimizerConfig.warmup_steps: expected an int >= 0, got -1"),
    ("warmup_steps", 2.5, TypeError, r"OptimizerConfig.warmup_steps: expected an int >= 0, got float 2.5"),
    ("decay_steps", 50, ValueError, r"OptimizerConfig.decay_steps: expected an int > warmup_steps \(100\), or None, "
                                    r"got 50"),
    ("decay_steps", -5, ValueError, r"OptimizerConfig.decay_steps: expected an int > warmup_steps"),
    ("final_learning_rate_fraction", 1.5, ValueError,
     r"OptimizerConfig.final_learning_rate_fraction: expected a number in \[0, 1\], got 1.5"),
    ("b1", 1.0, ValueError, r"OptimizerConfig.b1: expected a number in \[0, 1\), got 1.0"),
    ("b1", -0.1, ValueError, r"OptimizerConfig.b1: expected a number in \[0, 1\), got -0.1"),
    ("b1", NAN, ValueError, r"OptimizerConfig.b1: expected a number in \[0, 1\), got nan"),
    ("b2", 1.0, ValueError, r"OptimizerConfig.b2: expected a number in \[0, 1\), got 1.0"),
    ("b2", -0.5, ValueError, r"OptimizerConfig.b2: expected a number in \[0, 1\)"),
    ("eps", 0.0, ValueError, r"OptimizerConfig.eps: expected a finite number > 0, got 0.0"),
    ("weight_decay", -0.01, ValueError, r"OptimizerConfig.weight_decay: expected a finite number >= 0, got -0.01"),
    ("weight_decay", NAN, ValueError, r"OptimizerConfig.weight_decay: expected a finite number >= 0, got nan"),
    ("clip_global_norm", -1.0, ValueError,
     r"OptimizerConfig.clip_global_norm: expected a finite number > 0, or None, got -1.0"),
    ("clip_global_norm", float("inf"), ValueError, r"OptimizerConfig.clip_global_norm: .*got inf"),
    ("table_optimizer", "sgd", ValueError, r"OptimizerConfig.table_optimizer: expected 'adamw' or 'rowwise_adagrad'"),
    ("sparse_table_updates", "yes", TypeError, r"OptimizerConfig.sparse_table_updates: expected a bool, got str"),
]


@pytest.mark.parametrize("field,value,err,match", OPTIMIZER_CASES,
                         ids=[f"{c[0]}={c[1]!r}" for c in OPTIMIZER_CASES])
def test_optimizer_config_rejects(field, value, err, match):
    with pytest.raises(err, match=match):
        training.OptimizerConfig(**{field: value})


def test_optimizer_config_accepts_edge_values():
    """The boundaries that are valid stay valid: no warmup, b1 = 0, no decay, no clipping."""
    config = training.OptimizerConfig(warmup_steps=0, decay_steps=1, final_learning_rate_fraction=0.0, b1=0.0,
                                      weight_decay=0.0, clip_global_norm=None, table_learning_rate=None)
    assert config.b1 == 0.0 and config.clip_global_norm is None


class NoWrite:
    pass


# (id, fit keyword arguments, exception, message); checked before the first step runs.
FIT_CASES = [
    ("log_every_zero", dict(log_every=0), ValueError, r"log_every: expected an int >= 1, got 0"),
    ("log_every_negative", dict(log_every=-2), ValueError, r"log_every: expected an int >= 1, got -2"),
    ("log_every_float", dict(log_every=1.5), TypeError, r"log_every: expected an int >= 1, got float 1.5"),
    ("num_steps_negative", dict(num_steps=-1), ValueError, r"num_steps: expected an int >= 0, got -1"),
    ("num_steps_float", dict(num_steps=2.0), TypeError, r"num_steps: expected an int >= 0, got float 2.0"),
    ("eval_every_negative", dict(eval_every=-1), ValueError, r"eval_every: expected an int >= 0"),
    ("eval_every_float", dict(eval_every=0.5), TypeError, r"eval_every: expected an int >= 0.*got float 0.5"),
    ("eval_fn_not_callable", dict(eval_fn="loss"), TypeError, r"eval_fn: expected a callable"),
    ("stream_without_write", dict(stream=NoWrite()), TypeError, r"stream: expected a text stream with .write\(\)"),
]


@pytest.mark.parametrize("name,kwargs,err,match", FIT_CASES, ids=[c[0] for c in FIT_CASES])
def test_fit_rejects(trainer_and_state, name, kwargs, err, match):
    trainer, state, batch = trainer_and_state
    args = {"num_steps": 2, "log_every": 1, "stream": io.StringIO(), **kwargs}
    with pytest.raises(err, match=match):
        training.fit(trainer, state, iter([(batch, labels_for(batch))] * 2), **args)


def _ranking_items(batch):
    labels = labels_for(batch)
    return {"list": [batch, labels], "tuple_too_long": (batch, labels, None, 5), "tuple_no_labels": (batch,),
            "lone_batch": batch, "dict_unknown_key": {"batch": batch, "lbl": labels}, "none": None, "string": "x"}


ITEM = (r"batch_iterator: expected each item to be a RecsysBatch, a tuple of RankingTrainer.step's arguments after the "
        r"state \(batch, labels, label_mask=None\) or a dict of them by name; got ")
# (id, exception, message) of fit over items of the wrong kind; they used to raise TypeError from
# inside RankingTrainer.step ("missing 1 required positional argument: 'labels'") or run a step.
FIT_ITEM_CASES = [
    ("list", TypeError, ITEM + r"a list of 2$"),
    ("tuple_too_long", TypeError, ITEM + r"a tuple of 4 \(too many positional arguments\)"),
    ("tuple_no_labels", TypeError, ITEM + r"a tuple of 1 \(missing a required argument: 'labels'\)"),
    ("lone_batch", TypeError, ITEM + r"a RecsysBatch alone \(missing a required argument: 'labels'\)"),
    ("dict_unknown_key", TypeError, ITEM + r"a dict of 2 \(missing a required argument: 'labels'\)"),
    ("none", TypeError, ITEM + r"a NoneType$"),
    ("string", TypeError, ITEM + r"a str$"),
]


@pytest.mark.parametrize("name,err,match", FIT_ITEM_CASES, ids=[c[0] for c in FIT_ITEM_CASES])
def test_fit_rejects_items_of_the_wrong_kind(trainer_and_state, name, err, match):
    trainer, state, batch = trainer_and_state
    before = trainer.trace_counts["step"]
    with pytest.raises(err, match=match):
        training.fit(trainer, state, iter([_ranking_items(batch)[name]] * 2), num_steps=2, stream=io.StringIO())
    assert trainer.trace_counts["step"] == before  # refused before any step ran


class RecordingTrainer(training.RankingTrainer):
    """RankingTrainer.step's signature; records its arguments instead of running a step."""

    def __init__(self):
        self.calls = []

    def step(self, state, batch, labels, label_mask=None):
        self.calls.append((batch, labels, label_mask))
        return state, {}


def test_fit_items_pass_their_arguments_and_a_list_of_them_is_refused():
    trainer, batch, labels = RecordingTrainer(), BATCH, np.zeros((2, C, A), np.float32)
    for item in ({"batch": batch, "labels": labels}, (batch, labels, labels)):
        training._call_step(trainer, None, item)
    assert [tuple(x is y for x, y in zip(c, want)) for c, want in
            zip(trainer.calls, [(batch, labels, None), (batch, labels, labels)])] == [(True,) * 3] * 2
    with pytest.raises(TypeError, match=ITEM.replace("RankingTrainer", "RecordingTrainer") + r"a list of 2$"):
        training._call_step(trainer, None, [batch, labels])
    assert len(trainer.calls) == 2


# (field, bad value, exception, message): HashConfig used to accept all of these.
HASH_CONFIG_CASES = [
    ("hash_seed", 1.5, TypeError, r"HashConfig.hash_seed: expected an int in \[0, 2\*\*64\), got float 1.5"),
    ("hash_seed", -1, ValueError, r"HashConfig.hash_seed: expected an int in \[0, 2\*\*64\), got -1"),
    ("hash_seed", 2**64, ValueError,
     r"HashConfig.hash_seed: expected an int in \[0, 2\*\*64\), got 18446744073709551616"),
    ("hash_seed", True, TypeError, r"HashConfig.hash_seed: expected an int in \[0, 2\*\*64\), got bool True"),
    ("hash_seed", "0", TypeError, r"HashConfig.hash_seed: expected an int in \[0, 2\*\*64\), got str '0'"),
    ("num_user_hashes", 0, ValueError, r"HashConfig.num_user_hashes: expected an int >= 1, got 0"),
    ("num_item_hashes", 2.0, TypeError, r"HashConfig.num_item_hashes: expected an int >= 1, got float 2.0"),
    ("num_author_hashes", True, TypeError, r"HashConfig.num_author_hashes: expected an int >= 1, got bool True"),
    ("user_table_size", 1, ValueError, r"HashConfig.user_table_size: expected an int in \[2, 2\*\*31\], got 1"),
    ("post_table_size", 2**31 + 1, ValueError, r"HashConfig.post_table_size: expected an int in \[2, 2\*\*31\]"),
    ("author_table_size", 1e5, TypeError,
     r"HashConfig.author_table_size: expected an int in \[2, 2\*\*31\], got float"),
    ("author_table_size", NAN, TypeError,
     r"HashConfig.author_table_size: expected an int in \[2, 2\*\*31\], got float nan"),
]


@pytest.mark.parametrize("field,value,err,match", HASH_CONFIG_CASES,
                         ids=[f"{c[0]}={c[1]!r}" for c in HASH_CONFIG_CASES])
def test_hash_config_rejects(field, value, err, match):
    with pytest.raises(err, match=match):
        HashConfig(**{field: value})


def test_hash_config_keeps_numpy_ints_as_ints():
    config = HashConfig(hash_seed=np.uint64(2**64 - 1), post_table_size=np.int32(2**31 - 1))
    assert type(config.hash_seed) is int and config.hash_seed == 2**64 - 1
    assert type(config.post_table_size) is int


def _changed(**fields):
    """A HashConfig changed after construction (its constructor's checks do not see it)."""
    config = HashConfig()
    for name, value in fields.items():
        setattr(config, name, value)
    return config


WORDS = hashing.split_ids(np.array([1, 2]))
HASHING_CASES = [
    ("float_ids", lambda: hashing.hash_ids(np.array([1.5, 2.0]), HashConfig(), "post"), TypeError,
     r"ids must be integers"),
    ("python_int_beyond_int64", lambda: hashing.hash_ids([2**64], HashConfig(), "post"), ValueError,
     r"ids must fit in int64 \(-2\*\*63 <= id < 2\*\*63\), got range \[18446744073709551616"),
    ("id_type", lambda: hashing.hash_ids(np.array([1, 2]), HashConfig(), "video"), ValueError,
     r"id_type must be one of"),
    ("config_not_a_hash_config", lambda: hashing.hash_ids([1], {"post_table_size": 10}, "post"), TypeError,
     r"cfg: expected a HashConfig, got dict"),
    ("changed_table_size", lambda: hashing.hash_ids([1], _changed(post_table_size=1), "post"), ValueError,
     r"HashConfig.post_table_size: expected an int in \[2, 2\*\*31\], got 1"),
    ("changed_zero_hashes", lambda: hashing.hash_ids([1], _changed(num_item_hashes=0), "post"), ValueError,
     r"HashConfig.num_item_hashes: expected an int >= 1, got 0"),
    ("changed_float_seed", lambda: hashing.hash_ids([1], _changed(hash_seed=0.5), "post"), TypeError,
     r"HashConfig.hash_seed: expected an int in \[0, 2\*\*64\), got float 0.5"),
    ("hash_seeds_float", lambda: hashing.hash_seeds(1.5, "post", 2), TypeError,
     r"hash_seed: expected an int in \[0, 2\*\*64\), got float 1.5"),
    ("hash_seeds_negative", lambda: hashing.hash_seeds(-1, "post", 2), ValueError,
     r"hash_seed: expected an int in \[0, 2\*\*64\), got -1"),
    ("hash_seeds_id_type", lambda: hashing.hash_seeds(0, "video", 2), ValueError, r"id_type must be one of"),
    ("hash_seeds_count", lambda: hashing.hash_seeds(0, "post", -1), ValueError,
     r"num_hashes: expected an int >= 1, got -1"),
    ("multi_hash_float_table", lambda: hashing.multi_hash(*WORDS, hashing.hash_seeds(0, "post", 2), 100.5),
     TypeError, r"table_size: expected an int in \[2, 2\*\*31\], got float 100.5"),
    ("multi_hash_negative_seed", lambda: hashing.multi_hash(*WORDS, [-1], 100), ValueError,
     r"seeds: expected values in \[0, 2\*\*32\), got range \[-1, -1\]"),
    ("multi_hash_float_seed", lambda: hashing.multi_hash(*WORDS, [1.5], 100), TypeError,
     r"seeds: expected a \[H\] integer array"),
    ("expected_share_table_1", lambda: hashing.expected_collision_share(10, 1, 1), ValueError,
     r"table_size: expected an int in \[2, 2\*\*31\], got 1"),
    ("expected_share_negative_vocab", lambda: hashing.expected_collision_share(-1, 10, 1), ValueError,
     r"vocab_size: expected an int >= 0, got -1"),
    ("colliding_mask_1d", lambda: hashing.colliding_mask(np.array([1, 2, 1])), ValueError,
     r"hashes: expected a \[V, H\] integer array, got shape \[3\]"),
    ("collision_report_empty", lambda: hashing.collision_report(0, 10, 1), ValueError,
     r"vocab_size: expected an int >= 1, got 0"),
]


@pytest.mark.parametrize("name,call,err,match", HASHING_CASES, ids=[c[0] for c in HASHING_CASES])
def test_hashing_rejects(name, call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_expected_collision_share_of_one_id_is_zero():
    # V = 0 used to give -0.125 (a negative probability) for M = 10, H = 1.
    assert hashing.expected_collision_share(0, 10, 1) == 0.0
    assert hashing.expected_collision_share(1, 10, 1) == 0.0


PARAMS = {"m": {"w": np.ones((2, 3), np.float32)}}
JSON_DATA = r"expected JSON data \(dicts with str keys, lists, tuples read back as lists, str, int, float, bool, None\)"


def saved_with_meta(tmp_path, **changes):
    """A checkpoint whose meta.json was then edited: {key: new value}."""
    path = checkpoint.save_checkpoint(str(tmp_path / "edited"), PARAMS)
    meta_path = os.path.join(path, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta.update(changes)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return path


def with_meta_replaced(tmp_path, make):
    """A checkpoint whose meta.json was replaced by make(path), e.g. a directory or a FIFO."""
    path = checkpoint.save_checkpoint(str(tmp_path / "replaced"), PARAMS)
    os.remove(os.path.join(path, "meta.json"))
    make(os.path.join(path, "meta.json"))
    return path


def circular():
    data = {}
    data["self"] = data
    return data


# (id, call(tmp_path), exception, message). Steps outside [0, 2**63) and non-JSON `extra` used to be
# saved (or fail in json.dumps without naming `extra`); a meta.json that is a directory raised
# IsADirectoryError naming only 'meta.json'; the other saves used to write checkpoints no load reads.
CHECKPOINT_CASES = [
    ("save_step_negative", lambda p: checkpoint.save_checkpoint(str(p / "c"), PARAMS, step=-1), ValueError,
     r"^step: expected an int in \[0, 2\*\*63\), got -1$"),
    ("save_step_2**70", lambda p: checkpoint.save_checkpoint(str(p / "c"), PARAMS, step=2**70), ValueError,
     r"^step: expected an int in \[0, 2\*\*63\), got 1180591620717411303424$"),
    ("save_step_2**63", lambda p: checkpoint.save_checkpoint(str(p / "c"), PARAMS, step=np.uint64(2**63)), ValueError,
     r"^step: expected an int in \[0, 2\*\*63\), got 9223372036854775808$"),
    ("save_step_bool", lambda p: checkpoint.save_checkpoint(str(p / "c"), PARAMS, step=True), TypeError,
     r"^step: expected an int in \[0, 2\*\*63\), got bool True$"),
    ("save_step_float", lambda p: checkpoint.save_checkpoint(str(p / "c"), PARAMS, step=3.0), TypeError,
     r"^step: expected an int in \[0, 2\*\*63\), got float 3.0$"),
    ("step_path_negative", lambda p: resume.step_checkpoint_path(str(p), -1), ValueError,
     r"^step: expected an int in \[0, 2\*\*63\), got -1$"),
    ("load_step_negative", lambda p: checkpoint.load_checkpoint(saved_with_meta(p, step=-1)),
     checkpoint.CheckpointError,
     r"edited/meta.json: 'step': expected an integer in \[0, 2\*\*63\), got int -1$"),
    ("read_meta_step_2**70", lambda p: checkpoint.read_meta(saved_with_meta(p, step=2**70)), checkpoint.CheckpointError,
     r"edited/meta.json: 'step': expected an integer in \[0, 2\*\*63\), got int 1180591620717411303424$"),
    ("extra_array", lambda p: checkpoint.save_checkpoint(str(p / "c"), PARAMS, extra={"arr": np.arange(3)}),
     TypeError, r"^extra\['arr'\]: " + JSON_DATA + r", got ndarray array\(\[0, 1, 2\]\) \(convert it with "
                r"\.tolist\(\), or pass arrays as `aux`\)$"),
    ("extra_numpy_scalar_deep", lambda p: checkpoint.save_checkpoint(str(p / "c"), PARAMS,
                                                                     extra={"a": [1, {"b": np.float32(1)}]}),
     TypeError, r"^extra\['a'\]\[1\]\['b'\]: " + JSON_DATA + r", got float32 .*\(convert it with \.item\(\)\)$"),
    ("extra_int_key", lambda p: checkpoint.save_checkpoint(str(p / "c"), PARAMS, extra={1: 2}), TypeError,
     r"^extra: " + JSON_DATA + r", got the int dict key 1$"),
    ("extra_set", lambda p: checkpoint.save_checkpoint(str(p / "c"), PARAMS, extra={"s": {1}}), TypeError,
     r"^extra\['s'\]: " + JSON_DATA + r", got set \{1\}$"),
    ("extra_circular", lambda p: checkpoint.save_checkpoint(str(p / "c"), PARAMS, extra=circular()), ValueError,
     r"^extra\['self'\]: " + JSON_DATA + r", got a container that holds itself \(a circular reference\)$"),
    ("meta_json_is_a_directory", lambda p: checkpoint.load_checkpoint(with_meta_replaced(p, os.mkdir)),
     checkpoint.CheckpointError, r"^/.*/replaced/meta.json: is a directory; a checkpoint's meta.json is a file$"),
    ("read_meta_of_directory_meta", lambda p: checkpoint.read_meta(with_meta_replaced(p, os.mkdir)),
     checkpoint.CheckpointError, r"^/.*/replaced/meta.json: is a directory"),
    # A FIFO used to block the load until something wrote to it.
    ("meta_json_is_a_fifo", lambda p: checkpoint.load_checkpoint(with_meta_replaced(p, os.mkfifo)),
     checkpoint.CheckpointError,
     r"^/.*/replaced/meta.json: is not a regular file; a checkpoint's meta.json is a file$"),
    ("checkpoint_is_a_fifo", lambda p: (os.mkfifo(p / "fifo"), checkpoint.load_checkpoint(str(p / "fifo"))),
     checkpoint.CheckpointError, r"fifo: is a FIFO, socket or device, not a checkpoint directory$"),
    ("save_bare_array", lambda p: checkpoint.save_checkpoint(str(p / "c"), np.ones(3)), ValueError,
     r"^parameter tree: a bare array at its root has no name to store it under"),
    ("save_string_array", lambda p: checkpoint.save_checkpoint(str(p / "c"), {"a": np.array(["x", "yz"])}),
     ValueError, r"^parameter 'a' has dtype <U2 \(str64\), which cannot be stored: expected numeric or bool arrays$"),
    ("save_record_aux", lambda p: checkpoint.save_checkpoint(str(p / "c"), PARAMS, aux={"r": np.zeros(2, "i4,f4")}),
     ValueError, r"^aux 'r' has dtype \|V8 \(void64\), which cannot be stored"),
    ("load_template_without_dtype", lambda p: checkpoint.load_checkpoint(
        checkpoint.save_checkpoint(str(p / "ok"), PARAMS), params_template={"m": {"w": "f32"}}), TypeError,
     r"^params_template: leaf 'm/w' is a str; expected arrays or jax.ShapeDtypeStruct"),
    ("load_config_types_not_a_tuple", lambda p: configs.load_checkpoint_config(
        checkpoint.save_checkpoint(str(p / "ok"), PARAMS), config_types=HashConfig), TypeError,
     r"^config_types: expected a tuple of dataclass types, got <class"),
]


@pytest.mark.parametrize("name,call,err,match", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_checkpoint_rejects(tmp_path, name, call, err, match):
    with pytest.raises(err, match=match):
        call(tmp_path)
    assert not os.path.exists(tmp_path / "c")  # a refused save writes nothing


def test_checkpoint_keeps_the_largest_step_and_json_extra(tmp_path):
    """The bounds are the bounds: 2**63 - 1 is saved and loaded back, and so is JSON `extra`."""
    extra = {"a": [1, 2.5, None, True, "x", {"b": (1, 2)}], "nan": float("nan")}
    path = checkpoint.save_checkpoint(str(tmp_path / "c"), PARAMS, step=np.int64(2**63 - 1), extra=extra)
    loaded = checkpoint.load_checkpoint(path)
    assert loaded.step == 2**63 - 1 and type(loaded.step) is int
    assert loaded.extra["a"] == [1, 2.5, None, True, "x", {"b": [1, 2]}] and np.isnan(loaded.extra["nan"])
    assert resume.prune_step_checkpoints(str(tmp_path), np.int64(1)) == []  # NumPy ints are ints


def test_trainer_refuses_a_step_beyond_its_int32_counter(trainer_and_state, tmp_path):
    trainer, state, batch = trainer_and_state
    path = trainer.save(str(tmp_path / "t"), state)
    meta_path = os.path.join(path, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["step"] = 2**31
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(checkpoint.CheckpointError, match=r"/t: step 2147483648 does not fit a trainer's int32 step "
                                                         r"counter \(at most 2\*\*31 - 1\)"):
        trainer.restore(path, like=state)


RAW = dict(user_ids=np.arange(2), history_post_ids=np.ones((2, 3), np.int64),
           history_author_ids=np.ones((2, 3), np.int64), history_actions=np.zeros((2, 3, A)),
           history_surfaces=np.zeros((2, 3), np.int32), candidate_post_ids=np.ones((2, 4), np.int64),
           candidate_author_ids=np.ones((2, 4), np.int64), candidate_surfaces=np.zeros((2, 4), np.int32))


def raw_with(**fields):
    return {**RAW, **fields}


# (id, call, exception, message): the batch builders and example factories of phoenix_inputs. They
# used to fail inside NumPy ("negative dimensions are not allowed", "low >= high") or pass silently.
INPUTS_CASES = [
    ("batch_from_ids_no_config", lambda: inputs.batch_from_ids(**RAW, hash_config=None), TypeError,
     r"^hash_config: expected a HashConfig, got NoneType$"),
    ("batch_from_ids_actions_huge", lambda: inputs.batch_from_ids(**raw_with(history_actions=np.full((2, 3, A), 1e30)),
                                                                  hash_config=HashConfig()), ValueError,
     r"^history_actions: expected 0/1 multi-hot values .*got 1e\+30 at index \[0, 0, 0\] \(114 bad of 114 entries\)"),
    ("batch_from_ids_negative_surface", lambda: inputs.batch_from_ids(
        **raw_with(history_surfaces=-np.ones((2, 3), np.int64)), hash_config=HashConfig()), ValueError,
     r"^history_surfaces: expected ids in \[0, 2\*\*31\) \(0 = padding\), got range \[-1, -1\]$"),
    ("example_batch_negative_size", lambda: create_example_batch(-1, D, S, C, A), ValueError,
     r"^batch_size: expected an int >= 0, got -1$"),
    ("example_batch_float_emb_size", lambda: create_example_batch(1, 8.5, S, C, A), TypeError,
     r"^emb_size: expected an int >= 0, got float 8.5$"),
    ("example_batch_table_of_one_row", lambda: create_example_batch(1, D, S, C, A, num_post_embeddings=1), ValueError,
     r"^num_post_embeddings: expected an int in \[2, 2\*\*31\], got 1$"),
    ("example_batch_no_surfaces", lambda: create_example_batch(1, D, S, C, A, product_surface_vocab_size=0),
     ValueError, r"^product_surface_vocab_size: expected an int >= 1, got 0$"),
    ("example_batch_negative_seed", lambda: create_example_batch(1, D, S, C, A, seed=-1), ValueError,
     r"^seed: expected an int >= 0, got -1$"),
    ("example_corpus_negative", lambda: create_example_corpus(-1, D), ValueError,
     r"^corpus_size: expected an int >= 0, got -1$"),
    ("example_corpus_no_width", lambda: create_example_corpus(3, 0), ValueError,
     r"^emb_size: expected an int >= 1, got 0$"),
    ("dummy_batch_float_history", lambda: inputs.create_dummy_batch_from_config(HashConfig(), 2.5, C, A), TypeError,
     r"^history_len: expected an int >= 0, got float 2.5$"),
    ("dummy_embeddings_negative_width", lambda: inputs.create_dummy_embeddings_from_config(HashConfig(), -3, S, C),
     ValueError, r"^emb_size: expected an int >= 0, got -3$"),
    ("dummy_batch_no_config", lambda: inputs.create_dummy_batch_from_config(None, S, C, A), TypeError,
     r"^hash_config: expected a HashConfig, got NoneType$"),
]


@pytest.mark.parametrize("name,call,err,match", INPUTS_CASES, ids=[c[0] for c in INPUTS_CASES])
def test_inputs_reject(name, call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_example_batch_without_history():
    """S = 0 used to fail inside NumPy (low >= high); other sizes draw exactly what they did."""
    batch, emb = create_example_batch(2, D, 0, C, A)
    assert batch.history_post_hashes.shape == (2, 0, 2) and emb.history_post_embeddings.shape == (2, 0, 2, D)


# (id, call, exception, message): runner arguments that used to be accepted and misread ("no" as
# True) or fail later inside JAX/NumPy (a seed beyond int64, a batch size of 1e30 users).
RUNNER_ARG_CASES = [
    ("data_parallel_string", lambda: RecsysInferenceRunner(ModelRunner(tiny_ranker_config()), data_parallel="no"),
     TypeError, r"^data_parallel: expected a bool, got str 'no'$"),
    ("name_int", lambda: RecsysRetrievalInferenceRunner(RetrievalModelRunner(tiny_retrieval_config()), name=5),
     TypeError, r"^name: expected a str, got int 5$"),
    ("rng_seed_float", lambda: ModelRunner(tiny_ranker_config(), rng_seed=1.5), TypeError,
     r"^rng_seed: expected an int in \[-2\*\*63, 2\*\*63\), got float 1.5$"),
    ("rng_seed_2**70", lambda: ModelRunner(tiny_ranker_config(), rng_seed=2**70), ValueError,
     r"^rng_seed: expected an int in \[-2\*\*63, 2\*\*63\), got 1180591620717411303424$"),
    ("checkpoint_path_int", lambda: ModelRunner(tiny_ranker_config(), checkpoint_path=5), TypeError,
     r"^checkpoint_path: expected a checkpoint directory's path \(str or os.PathLike\) or None, got int 5$"),
]


@pytest.mark.parametrize("name,call,err,match", RUNNER_ARG_CASES, ids=[c[0] for c in RUNNER_ARG_CASES])
def test_runner_arguments_reject(name, call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_set_corpus_refuses_a_non_bool_normalize(retriever):
    with pytest.raises(TypeError, match=r"^normalize: expected a bool, got str 'yes'$"):
        retriever.set_corpus(*create_example_corpus(40, D), normalize="yes")


def test_a_huge_bs_per_device_allocates_nothing(ranker):
    """Parameters do not depend on B: init builds its dummy inputs for one user, so a bs_per_device
    of 1e30 (used to fail in NumPy: "Maximum allowed dimension exceeded") initialises as 2 does."""
    huge = RecsysInferenceRunner(ModelRunner(tiny_ranker_config(), bs_per_device=1e30))
    huge.initialize()
    jax.tree.map(np.testing.assert_array_equal, huge.params, ranker.params)  # the default bs_per_device


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        checkpoint.load_checkpoint(str(tmp_path / "missing"))
    path = str(tmp_path / "ckpt")
    checkpoint.save_checkpoint(path, {"m": {"w": np.ones((3, 4), np.float32)}})
    arrays = os.path.join(path, "arrays.npz")
    with open(arrays, "r+b") as f:
        f.truncate(os.path.getsize(arrays) // 2)
    with pytest.raises(checkpoint.CheckpointError, match="arrays.npz.*truncated or corrupted"):
        checkpoint.load_checkpoint(path)


def test_dataset_loader_rejects_empty_directory(tmp_path):
    # The directory exists: what is wrong is its content, named as such (not "not found").
    with pytest.raises(movielens.RatingsFileError, match=f"{tmp_path}: is a directory holding none of"):
        movielens.load_ratings(str(tmp_path))


def test_validation_can_be_switched_off_for_hot_loops(ranker, monkeypatch):
    """PHOENIX_VALIDATE_VALUES=0 skips value scans (shape checks stay on)."""
    monkeypatch.setenv("PHOENIX_VALIDATE_VALUES", "0")
    ranker.rank(BATCH._replace(history_product_surface=BATCH.history_product_surface), nan_user())  # no raise
    with pytest.raises(ValueError, match="user_embeddings: expected shape"):
        ranker.rank(BATCH, emb_with(user_embeddings=EMB.user_embeddings[..., :8]))


def test_set_corpus_rejects_nan_and_warns_on_unnormalised(retriever):
    corpus, ids = create_example_corpus(40, D)
    bad = corpus.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"corpus_embeddings.*(NaN|finite)"):
        retriever.set_corpus(bad, ids)
    with pytest.raises(ValueError, match=r"corpus_embeddings: contains NaN or inf"):
        retriever.retrieve(BATCH, EMB, top_k=3, corpus_embeddings=bad)
    with pytest.warns(UserWarning, match=r"corpus_embeddings: rows are not L2-normalised"):
        retriever.set_corpus(3.0 * corpus, ids)
    retriever.set_corpus(3.0 * corpus, ids, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(retriever.corpus_embeddings), axis=1), 1.0, rtol=1e-5)
    retriever.set_corpus(corpus, ids)


def test_label_value_checks_follow_the_switch(monkeypatch):
    """The new host-side label/mask scans are value checks too: PHOENIX_VALIDATE_VALUES=0 skips them
    (shape checks stay on)."""
    monkeypatch.setenv("PHOENIX_VALIDATE_VALUES", "0")
    training.ranking_loss(LOGITS, labels_with(2.0), MASK, label_mask=labels_with(0.5))  # no raise
    with pytest.raises(ValueError, match=r"labels: expected shape \[2, 4, 3\]"):
        training.ranking_loss(LOGITS, labels_with(2.0)[:, :1], MASK)

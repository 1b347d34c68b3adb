"""Table of bad inputs to the public API: each raises a clear error naming the argument.

Every row: (id, call, exception type, regex the message must match). The regex names the argument
and, where there is one, the expected value; no row may fail inside XLA or pass silently.
"""

import dataclasses
import io
import os

import jax
import numpy as np
import pytest

import phoenix_checkpoint as checkpoint
import phoenix_hashing as hashing
import movielens
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
     ValueError, r"batch.candidate_author_hashes: hashes must be >= 0"),
    ("surface_vocab", lambda: (BATCH._replace(history_product_surface=BATCH.history_product_surface + 16), EMB),
     ValueError, r"batch.history_product_surface: ids must lie in \[0, 16\)"),
    ("action_width", lambda: (BATCH._replace(history_actions=BATCH.history_actions[..., :18]), EMB), ValueError,
     r"batch.history_actions: expected shape \[2, 6, 19\]"),
    ("float_hashes", lambda: (BATCH._replace(user_hashes=BATCH.user_hashes.astype(np.float32)), EMB), TypeError,
     r"batch.user_hashes: expected int dtype"),
    ("int_embeddings", lambda: (BATCH, emb_with(user_embeddings=EMB.user_embeddings.astype(np.int32))), TypeError,
     r"recsys_embeddings.user_embeddings: expected float dtype"),
    ("nan_embeddings", lambda: (BATCH, nan_user()), ValueError, r"user_embeddings: contains NaN or inf"),
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


VALUE_CASES = [c for c in RANK_CASES if c[0] in ("negative_hash", "surface_vocab", "nan_embeddings")]


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
     r"hash_config.num_item_hashes must be a positive int"),
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


BEYOND = r"batch.candidate_post_hashes: hashes must lie in \[0, 211\)"

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


@pytest.mark.parametrize("call,err,match", [
    (lambda: hashing.hash_ids(np.array([1.5, 2.0]), HashConfig(), "post"), TypeError, r"ids must be integers"),
    (lambda: hashing.hash_ids(np.array([1, 2]), HashConfig(post_table_size=1), "post"), ValueError,
     r"table_size must be in \[2, 2\*\*31\]"),
    (lambda: hashing.hash_ids(np.array([1, 2]), HashConfig(), "video"), ValueError, r"id_type must be one of"),
], ids=["float_ids", "table_size_1", "id_type"])
def test_hashing_rejects(call, err, match):
    with pytest.raises(err, match=match):
        call()


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
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
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

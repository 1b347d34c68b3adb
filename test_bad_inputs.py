"""Table of bad inputs to the public API: each raises a clear error naming the argument.

Every row: (id, call, exception type, regex the message must match). The regex names the argument
and, where there is one, the expected value; no row may fail inside XLA or pass silently.
"""

import dataclasses
import os

import jax
import numpy as np
import pytest

import phoenix_checkpoint as checkpoint
import phoenix_hashing as hashing
import movielens
import phoenix_training as training
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
]


@pytest.mark.parametrize("name,make,err,match", RANK_CASES, ids=[c[0] for c in RANK_CASES])
def test_rank_rejects(ranker, name, make, err, match):
    with pytest.raises(err, match=match):
        ranker.rank(*make())


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

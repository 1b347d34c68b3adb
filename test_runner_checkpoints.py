"""Runners load trainer checkpoints: same predictions as the trainer, clear errors on mismatch; what a
checkpoint holds, read before any model is built (describe_checkpoint)."""

import dataclasses

import jax
import numpy as np
import pytest

import phoenix_checkpoint as checkpoint
import phoenix_configs as configs
import phoenix_training as training
from conftest import A, C, D, S, tiny_ranker_config, tiny_retrieval_config
from phoenix_checkpoint import CheckpointError
from recsys_model import HashConfig
from runners import (ModelRunner, RecsysInferenceRunner, RecsysRetrievalInferenceRunner, RetrievalModelRunner,
                     create_example_batch, describe_checkpoint)
from test_phoenix_checkpoint import as_version_1

SMALL_TABLES = HashConfig(user_table_size=101, post_table_size=211, author_table_size=53)


def small_batch(seed=0, B=4):
    batch, _ = create_example_batch(B, D, S, C, A, num_user_embeddings=101, num_post_embeddings=211,
                                    num_author_embeddings=53, seed=seed)
    return batch


@pytest.fixture(scope="module")
def ranker_checkpoint(tmp_path_factory):
    cfg = dataclasses.replace(tiny_ranker_config(), hash_config=SMALL_TABLES).initialize()
    trainer = training.make_ranking_trainer(cfg)
    batch = small_batch()
    state = trainer.init(jax.random.PRNGKey(0), batch)
    labels = (np.random.default_rng(0).random((4, C, A)) < 0.3).astype(np.float32)
    for _ in range(2):
        state, _ = trainer.step(state, batch, labels)
    path = str(tmp_path_factory.mktemp("ckpt") / "ranker")
    trainer.save(path, state)
    return path, trainer, state


def test_ranker_from_checkpoint_matches_trainer(ranker_checkpoint):
    path, trainer, state = ranker_checkpoint
    runner = RecsysInferenceRunner.from_checkpoint(path)
    assert runner.runner.model.hash_config.post_table_size == 211
    batch = small_batch(seed=3)
    want = 1 / (1 + np.exp(-np.asarray(trainer.predict(state.params, batch))))
    got = runner.rank(batch)  # embeddings looked up in the checkpoint's hash tables
    np.testing.assert_allclose(got.scores, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runner.rank(batch, runner.embed(batch)).scores, got.scores, rtol=1e-6)


def test_checkpoint_shape_mismatch_names_parameter(ranker_checkpoint):
    path = ranker_checkpoint[0]
    wrong = dataclasses.replace(tiny_ranker_config(), hash_config=SMALL_TABLES,
                                model=dataclasses.replace(tiny_ranker_config().model, num_layers=3)).initialize()
    runner = RecsysInferenceRunner(ModelRunner(wrong, checkpoint_path=path))
    with pytest.raises(ValueError, match="decoder_layer_2") as err:
        runner.initialize()
    assert "arrays.npz" in str(err.value)


def test_hashes_outside_the_tables_are_rejected(ranker_checkpoint):
    runner = RecsysInferenceRunner.from_checkpoint(ranker_checkpoint[0])
    batch = small_batch()
    bad = np.array(batch.candidate_post_hashes)
    bad[0, 0, 0] = 211
    with pytest.raises(ValueError, match=r"batch.candidate_post_hashes: hashes must lie in \[0, 211\)"):
        runner.rank(batch._replace(candidate_post_hashes=bad))


def test_runner_without_tables_needs_embeddings():
    runner = RecsysInferenceRunner(ModelRunner(tiny_ranker_config()))
    runner.initialize()
    with pytest.raises(ValueError, match="recsys_embeddings: not given"):
        runner.rank(small_batch())


@pytest.fixture(scope="module")
def retrieval_checkpoint(tmp_path_factory):
    cfg = dataclasses.replace(tiny_retrieval_config(), hash_config=SMALL_TABLES).initialize()
    trainer = training.make_retrieval_trainer(cfg)
    batch = small_batch(seed=5)
    state = trainer.init(jax.random.PRNGKey(1), batch)
    state, _ = trainer.step(state, batch)
    path = str(tmp_path_factory.mktemp("ckpt") / "retrieval")
    trainer.save(path, state)
    return path, trainer, state


def test_retrieval_from_checkpoint_matches_trainer(retrieval_checkpoint):
    path, trainer, state = retrieval_checkpoint
    batch = small_batch(seed=5)
    runner = RecsysRetrievalInferenceRunner.from_checkpoint(path)
    user, cand, _ = trainer.predict(state.params, batch)
    np.testing.assert_allclose(runner.encode_user(batch), user, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runner.encode_candidates(batch), cand, rtol=1e-5, atol=1e-6)


RANKING_HELD = (r"holds a ranking model checkpoint \(PhoenixModelConfig\); "
                r"load it with RecsysInferenceRunner.from_checkpoint")
RETRIEVAL_HELD = (r"holds a retrieval model checkpoint \(PhoenixRetrievalModelConfig\); "
                  r"load it with RecsysRetrievalInferenceRunner.from_checkpoint")


def test_ranker_checkpoint_loaded_as_retrieval_names_the_right_runner(ranker_checkpoint):
    path = ranker_checkpoint[0]
    with pytest.raises(CheckpointError, match=RANKING_HELD) as err:
        RecsysRetrievalInferenceRunner.from_checkpoint(path)
    assert str(err.value).startswith(path)
    retrieval = dataclasses.replace(tiny_retrieval_config(), hash_config=SMALL_TABLES).initialize()
    runner = RecsysRetrievalInferenceRunner(RetrievalModelRunner(retrieval, checkpoint_path=path))
    with pytest.raises(CheckpointError, match=RANKING_HELD):
        runner.initialize()


def test_retrieval_checkpoint_loaded_as_ranker_names_the_right_runner(retrieval_checkpoint):
    path = retrieval_checkpoint[0]
    with pytest.raises(CheckpointError, match=RETRIEVAL_HELD) as err:
        RecsysInferenceRunner.from_checkpoint(path)
    assert str(err.value).startswith(path)
    ranker = dataclasses.replace(tiny_ranker_config(), hash_config=SMALL_TABLES).initialize()
    runner = RecsysInferenceRunner(ModelRunner(ranker, checkpoint_path=path))
    with pytest.raises(CheckpointError, match=RETRIEVAL_HELD):
        runner.initialize()


@pytest.mark.parametrize("config, kind, type_name", [
    (tiny_ranker_config(), "ranker", "PhoenixModelConfig"),
    (tiny_retrieval_config(), "retrieval", "PhoenixRetrievalModelConfig"),
    ({"model": tiny_retrieval_config(), "hash_config": HashConfig()}, "retrieval", "PhoenixRetrievalModelConfig"),
    (HashConfig(), None, "HashConfig"),
    (None, None, None),
], ids=["ranker", "retrieval", "trainer_dict", "other_config", "no_config"])
def test_describe_checkpoint(tmp_path, config, kind, type_name):
    params = {"m": {"w": np.zeros((4, 3), np.float32)}}
    checkpoint.save_checkpoint(tmp_path / "ckpt", params, step=4, config=configs.config_to_dict(config))
    info = describe_checkpoint(tmp_path / "ckpt")
    assert (info.kind, info.model_config_type, info.step, info.format_version) == (kind, type_name, 4, 2)
    assert info.save_id == checkpoint.read_meta(tmp_path / "ckpt")["save_id"]


def test_describe_a_version_1_checkpoint(tmp_path):
    """Format 1 recorded no save id (nor marker or hash): describe_checkpoint gives None for it."""
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, {"m": {"w": np.zeros(2, np.float32)}}, step=3,
                               config=configs.config_to_dict(tiny_ranker_config()))
    as_version_1(path)
    info = describe_checkpoint(path)
    assert (info.kind, info.step, info.format_version, info.save_id) == ("ranker", 3, 1, None)

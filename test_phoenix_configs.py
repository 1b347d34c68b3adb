"""Tests of phoenix_configs.py: configs to JSON and back (dtypes, tuples, defaults of fields added later), every
malformed value named by its location and, read from a checkpoint, by its file; the caller's own config types."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

import phoenix_checkpoint as checkpoint
import phoenix_configs as configs
from conftest import tiny_ranker_config, tiny_retrieval_config
from grok import TransformerConfig
from phoenix_optim import OptimizerConfig
from recsys_model import HashConfig, PhoenixModelConfig
from recsys_retrieval_model import PhoenixRetrievalModelConfig

PARAMS = {"m": {"w": np.zeros((4, 3), np.float32)}}


@pytest.mark.parametrize("make_config", [
    lambda: tiny_ranker_config(fprop_dtype=jnp.bfloat16),
    lambda: tiny_retrieval_config(fprop_dtype=jnp.float32),
    lambda: PhoenixModelConfig(model=TransformerConfig(emb_size=8, key_size=4, num_q_heads=2, num_kv_heads=2,
                                                       num_layers=3, name="tower", bidirectional_history=True),
                               emb_size=8, num_actions=3, name="ranker",
                               hash_config=HashConfig(3, 1, 2, user_table_size=7, hash_seed=9)),
    lambda: HashConfig(user_table_size=1_000_000),
    lambda: PhoenixRetrievalModelConfig(model=TransformerConfig(8, 4, 2, 1, 1), emb_size=8),  # hash_config None
    lambda: OptimizerConfig(decay_steps=1000, table_optimizer="rowwise_adagrad", clip_global_norm=None),
], ids=["ranker_bf16", "retrieval_f32", "named_nondefault", "hash_config", "uninitialised", "optimizer"])
def test_config_json_round_trip(make_config):
    config = make_config()
    text = configs.config_to_json(config)
    json.loads(text)  # plain JSON
    restored = configs.config_from_json(text)
    assert type(restored) is type(config) and restored == config
    if hasattr(config, "fprop_dtype"):
        assert jnp.dtype(restored.fprop_dtype) == jnp.dtype(config.fprop_dtype)


def test_config_json_errors():
    with pytest.raises(TypeError, match="config.model"):
        configs.config_to_json({"model": object()})
    with pytest.raises(ValueError, match="unknown config type 'Mystery'"):
        configs.config_from_json('{"__type__": "Mystery"}')
    with pytest.raises(ValueError, match="HashConfig has no field"):
        configs.config_from_json('{"__type__": "HashConfig", "num_buckets": 3}')


@dataclasses.dataclass
class DataConfig:
    """A caller's own config type, saved beside the model's."""

    path: str = "log.csv"
    window: tuple = (1, 2)


def test_a_callers_config_type_is_read_back_when_passed(tmp_path):
    config = {"model": tiny_ranker_config(), "data": DataConfig(window=(3, 4))}
    data = configs.config_to_dict(config)
    assert data["data"] == {"__type__": "DataConfig", "path": "log.csv", "window": {"__tuple__": [3, 4]}}
    with pytest.raises(ValueError, match=r"^config.data: unknown config type 'DataConfig'; pass it in extra_types$"):
        configs.config_from_dict(data)
    assert configs.config_from_dict(data, extra_types=(DataConfig,)) == config
    checkpoint.save_checkpoint(tmp_path / "ckpt", PARAMS, config=data)
    assert configs.load_checkpoint_config(tmp_path / "ckpt", config_types=[DataConfig]) == config
    with pytest.raises(TypeError, match=r"^extra_types: expected a tuple of dataclass types, got <class"):
        configs.config_from_dict(data, extra_types=DataConfig)


def with_config_field(field, value):
    def change(config):
        config[field] = value
        return config
    return change


# (id, change of a saved ranker config's JSON, error after "<meta.json>: ").
CONFIG_CORRUPTIONS = [
    ("unknown_type", lambda c: {**c, "__type__": "Mystery"}, r"config: unknown config type 'Mystery'"),
    ("unknown_field", with_config_field("num_buckets", 3), r"config: config type PhoenixModelConfig has no field"),
    ("int_field_string", with_config_field("emb_size", "8"),
     r"config.emb_size \(PhoenixModelConfig\): expected int, got '8'"),
    ("int_field_float", with_config_field("num_actions", 2.5), r"config.num_actions .*: expected int, got 2.5"),
    ("bool_field_int", lambda c: {**c, "model": {**c["model"], "bidirectional_history": 1}},
     r"config.model.bidirectional_history \(TransformerConfig\): expected bool, got 1"),
    ("config_field_scalar", with_config_field("model", 5),
     r"config.model \(PhoenixModelConfig\): expected TransformerConfig"),
    ("optional_config_list", with_config_field("hash_config", [1, 2]),
     r"config.hash_config \(PhoenixModelConfig\): expected HashConfig, got \[1, 2\]"),
    ("required_field_missing", lambda c: {**c, "model": {"__type__": "TransformerConfig", "emb_size": 8}},
     r"config.model: cannot build TransformerConfig: .*missing"),
    ("post_init_check", lambda c: {**c, "model": {**c["model"], "num_q_heads": 3, "num_kv_heads": 2}},
     r"config.model: cannot build TransformerConfig: .*num_q_heads \(3\) must be a multiple"),
    ("unknown_dtype", with_config_field("fprop_dtype", {"__dtype__": "float33"}),
     r"config.fprop_dtype: unknown dtype 'float33'"),
    ("dtype_tag", lambda c: {"fprop_dtype": {"__dtype__": 5}},
     r"config.fprop_dtype: expected \{'__dtype__': dtype name\}"),
    ("tuple_tag", lambda c: {"__tuple__": 3}, r"config: expected \{'__tuple__': \[items\]\}"),
    ("type_tag", lambda c: {"model": {"__type__": ["x"]}},
     r"config.model.__type__: expected a class name, got \['x'\]"),
]


@pytest.mark.parametrize("corrupt, expected", [c[1:] for c in CONFIG_CORRUPTIONS],
                         ids=[c[0] for c in CONFIG_CORRUPTIONS])
def test_malformed_config_names_file_and_field(tmp_path, corrupt, expected):
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, PARAMS, step=1, config=configs.config_to_dict(tiny_ranker_config()))
    meta_path = path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"] = corrupt(meta["config"])
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match=f"^{meta_path}: {expected}"):
        configs.load_checkpoint_config(path)
    with pytest.raises(checkpoint.CheckpointError, match=f"^{meta_path}: {expected}"):
        checkpoint.load_checkpoint(path, decode_config=configs.config_from_dict)
    # The format does not judge configs: its own load returns the parameters and the JSON as saved.
    ckpt = checkpoint.load_checkpoint(path)
    assert ckpt.config == meta["config"] and ckpt.params["m"]["w"].shape == (4, 3)


def test_no_config_saved(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "ckpt", PARAMS)
    with pytest.raises(checkpoint.CheckpointError, match="meta.json: no config saved"):
        configs.load_checkpoint_config(tmp_path / "ckpt")
    assert checkpoint.load_checkpoint(tmp_path / "ckpt", decode_config=configs.config_from_dict).config is None

"""Tests of phoenix_checkpoint.py: exact round trips, atomic saves, template checks, corrupt files, no pickle."""

import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import phoenix_checkpoint as checkpoint
from conftest import random_release_params, tiny_ranker_config, tiny_retrieval_config
from grok import TransformerConfig
from recsys_model import HashConfig, PhoenixModelConfig
from recsys_retrieval_model import PhoenixRetrievalModelConfig


def release_params(seed: int = 0) -> dict:
    """A ranker parameter tree in the release layout (spec section 8), plus a bf16 array holding
    values whose bits must survive: NaN, +-inf, -0, a subnormal, the largest finite bf16."""
    params = random_release_params(tiny_ranker_config(), "phoenix_model", seed=seed)
    params["extra_module"] = {"bf16": jnp.asarray([np.nan, np.inf, -np.inf, -0.0, 1e-40, 3.3895e38, 1.5],
                                                  jnp.bfloat16)}
    return params


def adam_state(params):
    optimizer = optax.adamw(1e-3)
    state = optimizer.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    _, state = optimizer.update(grads, state, params)  # non-zero moments and count 1
    return state


def assert_bit_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


def test_exact_round_trip_with_templates(tmp_path):
    params = release_params()
    float_params = {k: v for k, v in params.items() if k != "extra_module"}
    opt_state = adam_state(float_params)
    config = tiny_ranker_config(fprop_dtype=jnp.bfloat16)
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", params, opt_state, step=1234, config=config,
                                      extra={"note": "hello", "data_position": [3, 4]})
    ckpt = checkpoint.load_checkpoint(path, params_template=params, opt_state_template=opt_state)
    assert_bit_identical(ckpt.params, params)
    assert_bit_identical(ckpt.opt_state, opt_state)
    assert type(ckpt.opt_state[0]).__name__ == "ScaleByAdamState"
    assert ckpt.params["extra_module"]["bf16"].dtype == jnp.bfloat16
    assert ckpt.step == 1234 and ckpt.extra == {"note": "hello", "data_position": [3, 4]}
    assert ckpt.config == config and ckpt.config.fprop_dtype is jnp.bfloat16
    assert ckpt.meta["params"]["extra_module/bf16"]["stored_as"] == "uint16"


def test_round_trip_without_templates_rebuilds_haiku_dicts(tmp_path):
    params = release_params()
    checkpoint.save_checkpoint(tmp_path / "ckpt", params)
    ckpt = checkpoint.load_checkpoint(tmp_path / "ckpt")
    assert_bit_identical(ckpt.params, params)
    assert ckpt.opt_state is None and ckpt.step == 0 and ckpt.config is None


def test_arrays_are_keyed_by_release_parameter_paths(tmp_path):
    params = release_params()
    opt_state = adam_state({"phoenix_model": params["phoenix_model"]})
    checkpoint.save_checkpoint(tmp_path / "ckpt", params, opt_state)
    with np.load(tmp_path / "ckpt" / "arrays.npz", allow_pickle=False) as npz:
        keys = set(npz.files)
        np.testing.assert_array_equal(npz["phoenix_model/proj_mat_1"], params["phoenix_model"]["proj_mat_1"])
    assert "transformer/decoder_layer_1/multi_head_attention/query/w" in keys
    assert "transformer/decoder_layer_0/rms_norm_3/scale" in keys
    assert "opt_state/0/mu/phoenix_model/proj_mat_1" in keys and "opt_state/0/count" in keys


@pytest.mark.parametrize("make_config", [
    lambda: tiny_ranker_config(fprop_dtype=jnp.bfloat16),
    lambda: tiny_retrieval_config(fprop_dtype=jnp.float32),
    lambda: PhoenixModelConfig(model=TransformerConfig(emb_size=8, key_size=4, num_q_heads=2, num_kv_heads=2,
                                                       num_layers=3, name="tower", bidirectional_history=True),
                               emb_size=8, num_actions=3, name="ranker",
                               hash_config=HashConfig(3, 1, 2, user_table_size=7, hash_seed=9)),
    lambda: HashConfig(user_table_size=1_000_000),
    lambda: PhoenixRetrievalModelConfig(model=TransformerConfig(8, 4, 2, 1, 1), emb_size=8),  # hash_config None
], ids=["ranker_bf16", "retrieval_f32", "named_nondefault", "hash_config", "uninitialised"])
def test_config_json_round_trip(make_config):
    config = make_config()
    text = checkpoint.config_to_json(config)
    json.loads(text)  # plain JSON
    restored = checkpoint.config_from_json(text)
    assert type(restored) is type(config) and restored == config
    if hasattr(config, "fprop_dtype"):
        assert jnp.dtype(restored.fprop_dtype) == jnp.dtype(config.fprop_dtype)


def test_config_json_errors():
    with pytest.raises(TypeError, match="config.model"):
        checkpoint.config_to_json({"model": object()})
    with pytest.raises(ValueError, match="unknown config type 'Mystery'"):
        checkpoint.config_from_json('{"__type__": "Mystery"}')
    with pytest.raises(ValueError, match="HashConfig has no field"):
        checkpoint.config_from_json('{"__type__": "HashConfig", "num_buckets": 3}')


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    old = release_params(seed=0)
    checkpoint.save_checkpoint(path, old, step=1)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint, "_write_meta", crash)  # arrays.npz already written to the temp dir
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save_checkpoint(path, release_params(seed=1), step=2)
    monkeypatch.undo()
    ckpt = checkpoint.load_checkpoint(path, params_template=old)
    assert ckpt.step == 1
    assert_bit_identical(ckpt.params, old)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # the temp dir was cleaned up


def test_failed_final_rename_restores_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    old = release_params(seed=0)
    checkpoint.save_checkpoint(path, old, step=1)
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(os.fspath(src)).startswith(".ckpt.tmp-"):
            raise OSError("crash while moving the new checkpoint in (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save_checkpoint(path, release_params(seed=1), step=2)
    monkeypatch.undo()
    ckpt = checkpoint.load_checkpoint(path)
    assert ckpt.step == 1
    assert_bit_identical(ckpt.params, old)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_checkpoint_set_aside_by_a_killed_save_is_found(tmp_path):
    # A process killed between "rename old aside" and "rename new in" leaves only the aside copy.
    path = tmp_path / "ckpt"
    old = release_params(seed=0)
    checkpoint.save_checkpoint(path, old, step=5)
    os.rename(path, tmp_path / ".ckpt.old-abc123")
    with pytest.warns(UserWarning, match="interrupted"):
        ckpt = checkpoint.load_checkpoint(path)
    assert ckpt.step == 5
    assert_bit_identical(ckpt.params, old)
    # The next successful save supersedes and removes it.
    checkpoint.save_checkpoint(path, old, step=6)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert checkpoint.load_checkpoint(path).step == 6


def test_overwrite_replaces_contents(tmp_path):
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, release_params(seed=0), step=1)
    new = release_params(seed=1)
    checkpoint.save_checkpoint(path, new, step=2)
    ckpt = checkpoint.load_checkpoint(path, params_template=new)
    assert ckpt.step == 2
    assert_bit_identical(ckpt.params, new)


def edited(params, module, name, value=None, delete=False):
    out = {m: dict(v) for m, v in params.items()}
    if delete:
        del out[module][name]
    else:
        out[module][name] = value
    return out


@pytest.mark.parametrize("change, expected", [
    (lambda p: edited(p, "phoenix_model", "proj_mat_1", np.zeros((32, 8), np.float32)),
     r"parameter 'phoenix_model/proj_mat_1': expected shape \(32, 8\) float32, checkpoint has \(32, 16\) float32"),
    (lambda p: edited(p, "phoenix_model", "unembeddings", p["phoenix_model"]["unembeddings"].astype(np.float16)),
     r"'phoenix_model/unembeddings': expected shape \(16, 19\) float16, checkpoint has \(16, 19\) float32"),
    (lambda p: edited(p, "phoenix_model", "new_param", np.zeros(3, np.float32)),
     r"parameter 'phoenix_model/new_param' is missing from the checkpoint \(expected shape \(3,\) float32\)"),
    (lambda p: edited(p, "phoenix_model", "proj_mat_2", delete=True),
     r"parameter 'phoenix_model/proj_mat_2' in the checkpoint is not in the template"),
], ids=["shape", "dtype", "missing", "unexpected"])
def test_template_mismatch_names_file_and_parameter(tmp_path, change, expected):
    params = release_params()
    checkpoint.save_checkpoint(tmp_path / "ckpt", params)
    with pytest.raises(ValueError, match=expected) as info:
        checkpoint.load_checkpoint(tmp_path / "ckpt", params_template=change(params))
    assert str(tmp_path / "ckpt" / "arrays.npz") in str(info.value)


def test_ignore_unexpected_loads_a_subset(tmp_path):
    params = release_params()
    checkpoint.save_checkpoint(tmp_path / "ckpt", params)
    subset = {"phoenix_model": params["phoenix_model"]}
    ckpt = checkpoint.load_checkpoint(tmp_path / "ckpt", params_template=subset, ignore_unexpected=True)
    assert_bit_identical(ckpt.params, subset)


def test_optimizer_state_mismatch_names_path(tmp_path):
    params = {"phoenix_model": release_params()["phoenix_model"]}
    checkpoint.save_checkpoint(tmp_path / "ckpt", params, adam_state(params))
    other = optax.sgd(0.1, momentum=0.9).init(params)
    with pytest.raises(ValueError, match=r"optimiser state '0/mu/phoenix_model/proj_mat_1' in the checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "ckpt", opt_state_template=other)


def test_truncated_arrays_file_is_named(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "ckpt", release_params())
    arrays = tmp_path / "ckpt" / "arrays.npz"
    data = arrays.read_bytes()
    arrays.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=f"{arrays}: .* truncated"):
        checkpoint.load_checkpoint(tmp_path / "ckpt")


def test_corrupted_array_bytes_are_detected(tmp_path):
    params = release_params()
    checkpoint.save_checkpoint(tmp_path / "ckpt", params)
    arrays = tmp_path / "ckpt" / "arrays.npz"
    with zipfile.ZipFile(arrays) as zf:
        info = zf.getinfo("phoenix_model/proj_mat_3.npy")
    data = bytearray(arrays.read_bytes())
    # Flip a byte deep inside the member's data (past the local header and the .npy header); the
    # size is unchanged, so only the zip CRC can tell.
    data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF
    arrays.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=f"{arrays}: cannot read array 'phoenix_model/proj_mat_3'"):
        checkpoint.load_checkpoint(tmp_path / "ckpt")


def test_corrupted_meta_is_named(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "ckpt", release_params())
    meta = tmp_path / "ckpt" / "meta.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(checkpoint.CheckpointError, match=f"{meta}: corrupted or truncated JSON"):
        checkpoint.load_checkpoint(tmp_path / "ckpt")


def test_missing_checkpoint():
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        checkpoint.load_checkpoint("/nonexistent/ckpt")


def test_object_arrays_are_refused_on_save_and_load(tmp_path):
    with pytest.raises(ValueError, match="'m/obj' is an object array"):
        checkpoint.save_checkpoint(tmp_path / "bad", {"m": {"obj": np.array([{"a": 1}], dtype=object)}})
    assert not (tmp_path / "bad").exists()
    # A checkpoint whose arrays.npz was rewritten with a pickled object array must not unpickle it.
    checkpoint.save_checkpoint(tmp_path / "ckpt", {"m": {"w": np.zeros(3, np.float32)}})
    arrays = tmp_path / "ckpt" / "arrays.npz"
    np.savez(arrays, allow_pickle=True, **{"m/w": np.array([None, None, None], dtype=object)})
    meta_path = tmp_path / "ckpt" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["arrays_file_bytes"] = arrays.stat().st_size
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match=f"{arrays}: cannot read array 'm/w'.*allow_pickle"):
        checkpoint.load_checkpoint(tmp_path / "ckpt")


def test_unknown_format_version(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "ckpt", {"m": {"w": np.zeros(2, np.float32)}})
    meta_path = tmp_path / "ckpt" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="unsupported checkpoint format version 99"):
        checkpoint.load_checkpoint(tmp_path / "ckpt")

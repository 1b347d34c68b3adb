"""Tests of phoenix_checkpoint.py: exact round trips, atomic saves, template checks, corrupt files, no pickle,
saves that refuse to destroy what is not a checkpoint, loads concurrent with saves, meta.json schema, a format
that knows no model, and checkpoints written by earlier code (testdata/old_checkpoints) still loading."""

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import phoenix_checkpoint as checkpoint
import phoenix_configs as configs
import test_layering
from conftest import random_release_params, tiny_ranker_config


def release_params(seed: int = 0) -> dict:
    """A ranker parameter tree in the release layout, plus a bf16 array holding
    values whose bits must survive: NaN, +-inf, -0, a subnormal, the largest finite bf16."""
    params = random_release_params(tiny_ranker_config(), "phoenix_model", seed=seed)
    params["extra_module"] = {"bf16": jnp.asarray([np.nan, np.inf, -np.inf, -0.0, 1e-40, 3.3895e38, 1.5],
                                                  jnp.bfloat16)}
    return params


@jax.jit  # one compiled program per tree: eagerly, every update op of every leaf shape compiles on its own
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
    path = checkpoint.save_checkpoint(tmp_path / "ckpt", params, opt_state, step=1234,
                                      config=configs.config_to_dict(config),
                                      extra={"note": "hello", "data_position": [3, 4]})
    ckpt = checkpoint.load_checkpoint(path, params_template=params, opt_state_template=opt_state,
                                      decode_config=configs.config_from_dict)
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


# --------------------------------------------------------------------------- saves never destroy what is not ours


def snapshot(root) -> dict:
    """{relative path: bytes, or "<dir>" / "-> target" for directories and symlinks} under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                out[rel] = "-> " + os.readlink(full)
            elif os.path.isdir(full):
                out[rel] = "<dir>"
            else:
                with open(full, "rb") as f:
                    out[rel] = f.read()
    return out


def small_params(value=0.0) -> dict:
    return {"m": {"w": np.full((4, 3), value, np.float32)}}


def make_run_dir(root):
    """A parent directory holding a user's run: a checkpoint beside their own files."""
    checkpoint.save_checkpoint(root / "run1", small_params(1.0), step=1)
    (root / "notes.txt").write_text("my notes")
    (root / "data").mkdir()
    (root / "data" / "table.csv").write_text("a,b\n1,2\n")


def make_user_meta_dir(root):
    """A user's directory that happens to hold a meta.json (and an arrays.npz) of its own."""
    (root / "meta.json").write_text(json.dumps({"format_version": 1, "author": "me"}))
    np.savez(root / "arrays.npz", x=np.arange(3))


def make_checkpoint_with_user_file(root):
    checkpoint.save_checkpoint(root, small_params(), step=1)
    (root / "README").write_text("what this run was")


def make_checkpoint_with_subdir(root):
    checkpoint.save_checkpoint(root, small_params(), step=1)
    (root / "eval").mkdir()


def make_only_meta_json(root):
    (root / "meta.json").write_text('{"my": "settings"}')


def make_meta_json_directory(root):
    (root / "meta.json").mkdir()


@pytest.mark.parametrize("make, expected", [
    (make_run_dir, r"holds data, notes.txt, run1, which a save does not write"),
    (make_user_meta_dir, r"its meta.json is not a Phoenix checkpoint's .*'step': expected an integer in "
                         r"\[0, 2\*\*63\), got no such key"),
    (make_checkpoint_with_user_file, r"holds README, which a save does not write"),
    (make_checkpoint_with_subdir, r"holds eval, which a save does not write"),
    (make_only_meta_json, r"its meta.json is not a Phoenix checkpoint's .*unsupported checkpoint format version None"),
    (make_meta_json_directory, r"its meta.json is not a regular file"),
], ids=["parent_of_runs", "user_dir_with_meta_json", "checkpoint_plus_user_file", "checkpoint_plus_subdir",
        "only_a_foreign_meta_json", "meta_json_is_a_directory"])
def test_save_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, make, expected):
    target = tmp_path / "target"
    target.mkdir()
    make(target)
    before = snapshot(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=f"{target}: {expected}.*refusing to overwrite"):
        checkpoint.save_checkpoint(target, small_params(9.0), step=9)
    assert snapshot(tmp_path) == before  # nothing written, moved or deleted


def test_save_refuses_a_regular_file(tmp_path):
    target = tmp_path / "ckpt"
    target.write_text("not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match=f"{target}: is a file, not a directory; refusing"):
        checkpoint.save_checkpoint(target, small_params())
    assert os.listdir(tmp_path) == ["ckpt"] and target.read_text() == "not a checkpoint"


@pytest.mark.parametrize("name", ["", ".", "..", "/", "sub/.."])
def test_save_refuses_paths_naming_no_entry_of_their_own(tmp_path, monkeypatch, name):
    (tmp_path / "sub").mkdir()
    (tmp_path / "precious.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path / "sub" if name == ".." else tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=f"path: expected a checkpoint directory's name .*got {re.escape(repr(name))}"):
        checkpoint.save_checkpoint(name, small_params())
    assert snapshot(tmp_path) == before


def test_save_refuses_the_working_directory_by_its_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "precious.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="holds precious.txt"):
        checkpoint.save_checkpoint(os.getcwd(), small_params())
    assert sorted(os.listdir(tmp_path)) == ["precious.txt"]


def test_path_must_be_a_string(tmp_path):
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike of str, got int 3"):
        checkpoint.save_checkpoint(3, small_params())
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike of str, got bytes"):
        checkpoint.load_checkpoint(os.fsencode(tmp_path / "ckpt"))


def test_load_refuses_the_empty_path():
    with pytest.raises(ValueError, match="path: expected a checkpoint directory's name"):
        checkpoint.load_checkpoint("")
    with pytest.raises(ValueError, match="path: expected a checkpoint directory's name"):
        checkpoint.read_meta("")


def test_save_into_an_empty_directory(tmp_path):
    (tmp_path / "ckpt").mkdir()
    checkpoint.save_checkpoint(tmp_path / "ckpt", small_params(3.0), step=3)
    assert checkpoint.load_checkpoint(tmp_path / "ckpt").step == 3
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_save_through_a_symlink_replaces_the_link_target(tmp_path):
    (tmp_path / "runs").mkdir()
    real = tmp_path / "runs" / "ckpt"
    checkpoint.save_checkpoint(real, small_params(1.0), step=1)
    link = tmp_path / "latest"
    link.symlink_to(real)
    assert checkpoint.save_checkpoint(link, small_params(2.0), step=2) == str(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert checkpoint.load_checkpoint(real).step == 2 and checkpoint.load_checkpoint(link).step == 2
    assert sorted(os.listdir(tmp_path)) == ["latest", "runs"]
    assert sorted(os.listdir(tmp_path / "runs")) == ["ckpt"]


def test_save_through_a_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "latest"
    link.symlink_to(tmp_path / "runs" / "ckpt")
    checkpoint.save_checkpoint(link, small_params(1.0), step=1)
    assert link.is_symlink() and (tmp_path / "runs" / "ckpt" / "meta.json").is_file()
    assert checkpoint.load_checkpoint(link).step == 1


def test_save_under_a_symlinked_parent(tmp_path):
    (tmp_path / "disk").mkdir()
    (tmp_path / "runs").symlink_to(tmp_path / "disk")
    checkpoint.save_checkpoint(tmp_path / "runs" / "ckpt", small_params(1.0), step=1)
    checkpoint.save_checkpoint(tmp_path / "runs" / "ckpt", small_params(2.0), step=2)
    assert (tmp_path / "runs").is_symlink() and os.listdir(tmp_path / "disk") == ["ckpt"]
    assert checkpoint.load_checkpoint(tmp_path / "runs" / "ckpt").step == 2


def test_save_through_a_symlink_to_a_user_directory_is_refused(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "thesis.tex").write_text("chapter 1")
    (tmp_path / "ckpt").symlink_to(tmp_path / "work")
    before = snapshot(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=rf"ckpt \(-> {tmp_path / 'work'}\): holds thesis.tex"):
        checkpoint.save_checkpoint(tmp_path / "ckpt", small_params())
    assert snapshot(tmp_path) == before


def test_save_through_a_symlink_loop_is_refused(tmp_path):
    (tmp_path / "ckpt").symlink_to(tmp_path / "ckpt")
    with pytest.raises(checkpoint.CheckpointError, match="symlink that does not resolve"):
        checkpoint.save_checkpoint(tmp_path / "ckpt", small_params())
    assert os.listdir(tmp_path) == ["ckpt"]


def test_directory_changed_between_check_and_rename_is_put_back(tmp_path, monkeypatch):
    # A user writes into the old checkpoint just as the save moves it aside: it is not deleted.
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, small_params(1.0), step=1)
    real_rename = os.rename

    def rename(src, dst):
        if ".ckpt.old-" in os.fspath(dst):
            (path / "late_file.txt").write_text("written during the save")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(checkpoint.CheckpointError, match="changed while being saved over"):
        checkpoint.save_checkpoint(path, small_params(2.0), step=2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert sorted(os.listdir(path)) == ["arrays.npz", "late_file.txt", "meta.json"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_save_removes_only_our_orphans(tmp_path):
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, small_params(1.0), step=1)
    old_ckpt = snapshot(path)

    def leave(name, files):
        (tmp_path / name).mkdir()
        for file, data in files.items():
            (tmp_path / name / file).write_bytes(data)

    leave(".ckpt.tmp-abcd_123", {"arrays.npz": b"partial"})  # killed save (pre-pid naming)
    leave(f".ckpt.tmp-{dead_pid()}-0123456789abcdef", {"arrays.npz": b"x", "meta.json": b"{"})  # process gone
    leave(".ckpt.old-a1b2c3d4", old_ckpt)  # complete aside copy, superseded by the next save
    kept = {
        f".ckpt.tmp-{os.getpid()}-fedcba9876543210": {"arrays.npz": b"x"},  # a save still running
        ".ckpt.tmp-mine": {"results.csv": b"1,2"},  # our name pattern, not our files
        ".ckpt.old-mine": {"meta.json": b'{"mine": true}'},  # has a meta.json, not ours
        ".other.tmp-abcd1234": {"arrays.npz": b"x"},  # another checkpoint's
        ".ckpt.tmp-x.tmp-abc": {"arrays.npz": b"x"},  # not exactly our pattern
    }
    for name, files in kept.items():
        leave(name, files)
    checkpoint.save_checkpoint(path, small_params(2.0), step=2)
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", *kept])
    assert checkpoint.load_checkpoint(path).step == 2


def test_aside_copy_survives_a_failed_save(tmp_path, monkeypatch):
    # Killed between its renames, a save left only the aside copy; a failing save must keep it.
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, small_params(5.0), step=5)
    os.rename(path, tmp_path / ".ckpt.old-abc123")

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint, "_write_meta", crash)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save_checkpoint(path, small_params(6.0), step=6)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [".ckpt.old-abc123"]
    with pytest.warns(UserWarning, match="interrupted"):
        assert checkpoint.load_checkpoint(path).step == 5


@pytest.mark.parametrize("failing", ["_write_arrays", "_write_meta", "_fsync_path"])
def test_failed_write_keeps_the_previous_checkpoint_and_names_the_path(tmp_path, monkeypatch, failing):
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, small_params(1.0), step=1)

    def crash(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(checkpoint, failing, crash)
    with pytest.raises(OSError, match=f"saving checkpoint {path} failed.*No space left") as info:
        checkpoint.save_checkpoint(path, small_params(2.0), step=2)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    ckpt = checkpoint.load_checkpoint(path)
    assert ckpt.step == 1 and np.all(ckpt.params["m"]["w"] == 1.0)


def test_read_only_parent_names_the_directory(tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: simulate the kernel's refusal
        real_mkdir = os.mkdir

        def mkdir(p, *args, **kwargs):
            if os.path.dirname(os.fspath(p)) == str(parent):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(p))
            return real_mkdir(p, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    try:
        with pytest.raises(PermissionError, match=f"cannot save checkpoint {parent / 'ckpt'}: "
                                                  f"cannot create a directory in {parent}"):
            checkpoint.save_checkpoint(parent / "ckpt", small_params())
    finally:
        parent.chmod(0o755)
    assert os.listdir(parent) == []


def test_parent_that_is_a_file_names_the_path(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    path = tmp_path / "notes.txt" / "ckpt"
    with pytest.raises(FileExistsError, match=f"cannot save checkpoint {path}: cannot create a directory"):
        checkpoint.save_checkpoint(path, small_params())
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_step_must_be_an_integer(tmp_path):
    with pytest.raises(TypeError, match=r"step: expected an int in \[0, 2\*\*63\), got float 1.5"):
        checkpoint.save_checkpoint(tmp_path / "ckpt", small_params(), step=1.5)
    checkpoint.save_checkpoint(tmp_path / "ckpt", small_params(), step=np.int64(7))
    assert checkpoint.load_checkpoint(tmp_path / "ckpt").step == 7


# --------------------------------------------------------------------------- loads see one whole save


def params_of_step(step: int) -> dict:
    """Every array equal to the step, so a load that mixes two saves shows it."""
    return {"m": {"w": np.full((64, 32), step, np.float32), "b": np.full(5, step, np.int32)}}


def assert_consistent(ckpt):
    for name, value in ckpt.params["m"].items():
        assert np.all(value == ckpt.step), f"step {ckpt.step} loaded with {name} of step {value.flat[0]}"


def test_load_racing_a_save_sees_one_whole_checkpoint(tmp_path, monkeypatch):
    # A save lands between the load's read of meta.json and of arrays.npz (deterministically).
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, params_of_step(1), step=1)
    real_read_meta = checkpoint._read_meta
    saved = []

    def read_meta_then_save(*args, **kwargs):
        meta = real_read_meta(*args, **kwargs)
        if not saved:
            saved.append(True)
            checkpoint.save_checkpoint(path, params_of_step(2), step=2)
        return meta

    monkeypatch.setattr(checkpoint, "_read_meta", read_meta_then_save)
    ckpt = checkpoint.load_checkpoint(path)
    assert saved
    assert_consistent(ckpt)
    assert ckpt.step == 2  # the first directory was gone before its arrays were read


@pytest.mark.filterwarnings("ignore:.*interrupted")
def test_concurrent_saves_and_loads_never_mix(tmp_path):
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, params_of_step(0), step=0)
    done = threading.Event()
    loaded, clear_errors, failures = [], [], []

    def saver():
        try:
            for step in range(1, 31):
                checkpoint.save_checkpoint(path, params_of_step(step), step=step)
        except BaseException as e:
            failures.append(e)
        finally:
            done.set()

    def loader():
        while not done.is_set():
            try:
                ckpt = checkpoint.load_checkpoint(path)
            except checkpoint.CheckpointError as e:
                clear_errors.append(e)
                continue
            except BaseException as e:
                failures.append(e)
                return
            loaded.append((ckpt.step, {k: np.unique(v).tolist() for k, v in ckpt.params["m"].items()}))

    threads = [threading.Thread(target=saver)] + [threading.Thread(target=loader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    assert loaded
    mixed = [(step, values) for step, values in loaded if any(v != [step] for v in values.values())]
    assert not mixed, f"{len(mixed)} of {len(loaded)} loads mixed two saves, e.g. {mixed[:3]}"
    assert all("replaced" in str(e) for e in clear_errors), clear_errors[:3]  # retries ran out: said so
    assert checkpoint.load_checkpoint(path).step == 30


def test_arrays_copied_from_another_save_are_detected(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "a", params_of_step(1), step=1)
    checkpoint.save_checkpoint(tmp_path / "b", params_of_step(2), step=2)
    shutil.copyfile(tmp_path / "b" / "arrays.npz", tmp_path / "a" / "arrays.npz")  # same shapes, same size
    save_id = checkpoint.read_meta(tmp_path / "a")["save_id"]
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"{tmp_path / 'a' / 'arrays.npz'}: sha256 .* differs .* save {save_id}; "
                             "the file was copied from another save or corrupted"):
        checkpoint.load_checkpoint(tmp_path / "a")


def as_version_1(path):
    """Rewrites a checkpoint's meta.json as format version 1 wrote it (no marker, id or hash)."""
    meta_path = path / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("format", "save_id", "arrays_sha256"):
        del meta[key]
    meta["format_version"] = 1
    meta_path.write_text(json.dumps(meta))


def test_version_1_checkpoints_load_and_can_be_overwritten(tmp_path):
    path = tmp_path / "ckpt"
    params = release_params()
    checkpoint.save_checkpoint(path, params, step=3, config=configs.config_to_dict(tiny_ranker_config()))
    as_version_1(path)
    ckpt = checkpoint.load_checkpoint(path, params_template=params, decode_config=configs.config_from_dict)
    assert ckpt.step == 3 and ckpt.meta["format_version"] == 1 and ckpt.config == tiny_ranker_config()
    assert_bit_identical(ckpt.params, params)
    checkpoint.save_checkpoint(path, params, step=4)  # a version-1 directory is ours to replace
    assert checkpoint.read_meta(path)["format_version"] == checkpoint.FORMAT_VERSION
    assert checkpoint.load_checkpoint(path).step == 4


def test_meta_records_marker_save_id_and_hash(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "a", small_params(), step=1)
    checkpoint.save_checkpoint(tmp_path / "b", small_params(), step=1)
    a, b = checkpoint.read_meta(tmp_path / "a"), checkpoint.read_meta(tmp_path / "b")
    assert a["format"] == "phoenix-checkpoint" and a["format_version"] == 2
    assert a["save_id"] != b["save_id"]
    assert a["arrays_sha256"] == hashlib.sha256((tmp_path / "a" / "arrays.npz").read_bytes()).hexdigest()


# --------------------------------------------------------------------------- meta.json schema


def set_key(key, value):
    def change(meta):
        meta[key] = value
        return meta
    return change


def del_key(key):
    def change(meta):
        del meta[key]
        return meta
    return change


def set_entry(field, value, delete=False):
    def change(meta):
        entry = meta["params"]["m/w"]
        if delete:
            del entry[field]
        else:
            entry[field] = value
        return meta
    return change


def add_param(path, entry):
    def change(meta):
        meta["params"][path] = entry
        return meta
    return change


W_ENTRY = {"keys": ["m", "w"], "shape": [4, 3], "dtype": "float32", "stored_as": "float32"}

META_CORRUPTIONS = [
    ("list", lambda m: [m], r"expected a JSON object, got a JSON list"),
    ("null", lambda m: None, r"expected a JSON object, got a JSON null"),
    ("version_missing", del_key("format_version"), r"unsupported checkpoint format version None"),
    ("version_string", set_key("format_version", "2"), r"unsupported checkpoint format version '2'"),
    ("version_bool", set_key("format_version", True), r"unsupported checkpoint format version True"),
    ("marker_missing", del_key("format"), r"'format': expected 'phoenix-checkpoint', got no such key"),
    ("marker_wrong", set_key("format", "other"), r"'format': expected 'phoenix-checkpoint', got str 'other'"),
    ("step_string", set_key("step", "5"), r"'step': expected an integer in \[0, 2\*\*63\), got str '5'"),
    ("step_float", set_key("step", 1.5), r"'step': expected an integer in \[0, 2\*\*63\), got float 1.5"),
    ("step_negative", set_key("step", -1), r"'step': expected an integer in \[0, 2\*\*63\), got int -1"),
    ("step_2**63", set_key("step", 2**63),
     r"'step': expected an integer in \[0, 2\*\*63\), got int 9223372036854775808"),
    ("step_missing", del_key("step"), r"'step': expected an integer in \[0, 2\*\*63\), got no such key"),
    ("bytes_missing", del_key("arrays_file_bytes"), r"'arrays_file_bytes': expected a byte count, got no such key"),
    ("bytes_negative", set_key("arrays_file_bytes", -1), r"'arrays_file_bytes': expected a non-negative integer"),
    ("save_id_int", set_key("save_id", 7), r"'save_id': expected a string, got int 7"),
    ("sha_short", set_key("arrays_sha256", "abc"), r"'arrays_sha256': expected 64 lowercase hex digits"),
    ("params_missing", del_key("params"), r"'params': expected an object of arrays, got no such key"),
    ("params_list", set_key("params", []), r"'params': expected an object of arrays, got list \[\]"),
    ("opt_state_string", set_key("opt_state", "adam"), r"'opt_state': expected an object of arrays or null"),
    ("entry_not_object", set_key("params", {"m/w": [4, 3]}),
     r"params\['m/w'\]: expected an object with keys, shape, dtype, stored_as, got list"),
    ("no_shape", set_entry("shape", None, delete=True), r"params\['m/w'\]: expected a 'shape' field"),
    ("no_dtype", set_entry("dtype", None, delete=True), r"params\['m/w'\]: expected a 'dtype' field"),
    ("no_keys", set_entry("keys", None, delete=True), r"params\['m/w'\]: expected a 'keys' field"),
    ("no_stored_as", set_entry("stored_as", None, delete=True), r"params\['m/w'\]: expected a 'stored_as' field"),
    ("shape_string", set_entry("shape", "4x3"), r"params\['m/w'\].shape: expected a list of non-negative integers"),
    ("shape_floats", set_entry("shape", [4.0, 3]), r"params\['m/w'\].shape: expected a list of non-negative"),
    ("shape_negative", set_entry("shape", [-4, 3]), r"params\['m/w'\].shape: expected a list of non-negative"),
    ("keys_empty", set_entry("keys", []), r"params\['m/w'\].keys: expected a non-empty list"),
    ("keys_other_path", set_entry("keys", ["m", "v"]), r"params\['m/w'\].keys: expected components joining to 'm/w'"),
    ("dtype_unknown", set_entry("dtype", "float33"), r"params\['m/w'\].dtype: expected a numpy or ml_dtypes dtype"),
    ("dtype_not_string", set_entry("dtype", 5), r"params\['m/w'\].dtype: expected a dtype name, got 5"),
    ("dtype_object", set_entry("dtype", "object"), r"params\['m/w'\].dtype: expected a dtype a checkpoint can"),
    ("stored_as_wrong", set_entry("stored_as", "float64"),
     r"params\['m/w'\].stored_as: expected 'float32' \(how float32 is stored\), got 'float64'"),
    ("array_inside_array", add_param("m/w/x", {**W_ENTRY, "keys": ["m", "w", "x"]}),
     r"'params': array 'm/w/x' lies inside array 'm/w'"),
]


@pytest.mark.parametrize("corrupt, expected", [c[1:] for c in META_CORRUPTIONS], ids=[c[0] for c in META_CORRUPTIONS])
@pytest.mark.parametrize("reader", [checkpoint.load_checkpoint, checkpoint.read_meta, configs.load_checkpoint_config],
                         ids=["load_checkpoint", "read_meta", "load_checkpoint_config"])
def test_malformed_meta_names_file_and_key(tmp_path, corrupt, expected, reader):
    path = tmp_path / "ckpt"
    checkpoint.save_checkpoint(path, small_params(), step=1, config=configs.config_to_dict(tiny_ranker_config()))
    meta_path = path / "meta.json"
    meta_path.write_text(json.dumps(corrupt(json.loads(meta_path.read_text()))))
    with pytest.raises(checkpoint.CheckpointError, match=f"{meta_path}: {expected}"):
        reader(path)




# --------------------------------------------------------------------------- a format that knows no model


def test_the_format_imports_no_model_optimiser_or_trainer():
    """Every import in phoenix_checkpoint's source, lazy ones included: none of the project's but validation."""
    assert test_layering.imports_of("phoenix_checkpoint") <= {"phoenix_validation"}


def test_config_is_stored_and_returned_as_the_json_given(tmp_path):
    """The format keeps the config as opaque JSON: tags it does not read, keys of any name, no decoding
    unless asked; a dataclass is refused before anything is written, naming the codec that encodes it."""
    config = {"model": {"__type__": ["not", "a", "name"]}, "notes": [1, 2.5, None], "__dtype__": 7}
    checkpoint.save_checkpoint(tmp_path / "ckpt", small_params(), config=config)
    assert checkpoint.load_checkpoint(tmp_path / "ckpt").config == config
    assert checkpoint.read_meta(tmp_path / "ckpt")["config"] == config
    assert checkpoint.load_checkpoint(tmp_path / "ckpt", decode_config=lambda c: len(c)).config == 3
    with pytest.raises(TypeError, match=r"^config: expected JSON data .*got PhoenixModelConfig .*"
                                        r"\(encode configs with phoenix_configs.config_to_dict\)$"):
        checkpoint.save_checkpoint(tmp_path / "dataclass", small_params(), config=tiny_ranker_config())
    assert not os.path.exists(tmp_path / "dataclass")
    with pytest.raises(TypeError, match=r"^decode_config: expected a function of the config's JSON data .*got str"):
        checkpoint.load_checkpoint(tmp_path / "ckpt", decode_config="configs")


@pytest.mark.parametrize("name, home", [("config_to_json", "phoenix_configs"), ("TYPE_TAG", "phoenix_configs"),
                                        ("load_config", "phoenix_configs \\(as load_checkpoint_config\\)"),
                                        ("step_checkpoint_path", "phoenix_resume"), ("STEP_PATTERN", "phoenix_resume"),
                                        ("describe_checkpoint", "runners"), ("MODEL_KINDS", "runners")])
def test_a_name_that_moved_out_says_where_it_went(name, home):
    with pytest.raises(AttributeError, match=f"^phoenix_checkpoint.{name} moved to {home}: "):
        getattr(checkpoint, name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        checkpoint.no_such_name  # noqa: B018


# --------------------------------------------------------------------------- checkpoints written by earlier code

# Trainer checkpoints written by the code before configs left this module (testdata/old_checkpoints/README.md):
# format version 2 by the trainer of that time, version 1 by the format-1 writer, for both models, with AdamW
# (ranker) and row-wise Adagrad (retrieval) table state, after two training steps.
OLD_CHECKPOINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "old_checkpoints")
OLD_B, OLD_D, OLD_S, OLD_C, OLD_A = 2, 8, 4, 3, 19


def old_configs(kind: str) -> dict:
    """The configs the old checkpoints were written with, as a Trainer saves them."""
    from grok import TransformerConfig
    from phoenix_optim import OptimizerConfig
    from recsys_model import HashConfig, PhoenixModelConfig
    from recsys_retrieval_model import PhoenixRetrievalModelConfig

    transformer = TransformerConfig(emb_size=OLD_D, key_size=4, num_q_heads=2, num_kv_heads=1, num_layers=1,
                                    widening_factor=2)
    tables = HashConfig(user_table_size=11, post_table_size=13, author_table_size=7)
    sizes = dict(model=transformer, emb_size=OLD_D, history_seq_len=OLD_S, candidate_seq_len=OLD_C, hash_config=tables)
    if kind == "ranker":
        return {"model": PhoenixModelConfig(num_actions=OLD_A, fprop_dtype=np.float32, **sizes), "hash_config": tables,
                "optimizer": OptimizerConfig(warmup_steps=0)}
    return {"model": PhoenixRetrievalModelConfig(**sizes), "hash_config": tables,  # fprop_dtype bfloat16
            "optimizer": OptimizerConfig(warmup_steps=0, table_optimizer="rowwise_adagrad")}


def old_probe(seed: int):
    from phoenix_inputs import create_example_batch
    return create_example_batch(OLD_B, OLD_D, OLD_S, OLD_C, OLD_A, num_user_embeddings=11, num_post_embeddings=13,
                                num_author_embeddings=7, seed=seed)[0]


@pytest.fixture(scope="module")
def old_trainers():
    """One trainer per model for both versions, so each compiles its predict once."""
    import phoenix_training as training
    ranker, retrieval = old_configs("ranker"), old_configs("retrieval")
    return {"ranker": training.make_ranking_trainer(ranker["model"], ranker["hash_config"], ranker["optimizer"]),
            "retrieval": training.make_retrieval_trainer(retrieval["model"], retrieval["hash_config"],
                                                         retrieval["optimizer"])}


@pytest.mark.parametrize("kind", ["ranker", "retrieval"])
@pytest.mark.parametrize("version", [1, 2])
def test_checkpoints_written_by_earlier_code_still_load(version, kind, old_trainers):
    from runners import RecsysInferenceRunner, RecsysRetrievalInferenceRunner

    path = os.path.join(OLD_CHECKPOINTS, f"v{version}_{kind}")
    meta = checkpoint.read_meta(path)
    assert meta["format_version"] == version
    raw = checkpoint.load_checkpoint(path)  # the format alone: arrays, step, the config's JSON as saved
    assert raw.step == 2 and raw.config == meta["config"]
    # Decoded, the configs equal today's; encoded again they are the saved JSON, which a resume compares.
    assert configs.load_checkpoint_config(path) == old_configs(kind)
    assert configs.config_to_dict(old_configs(kind)) == meta["config"]

    # Today's trainer restores the saved arrays bit for bit (every path, shape and dtype matched its
    # templates) and predicts what the trainer that saved them predicted.
    trainer = old_trainers[kind]
    probe = old_probe(meta["extra"]["probe_seed"])
    state, ckpt = trainer.load(path, probe)
    assert ckpt.config == old_configs(kind) and int(state.step) == 2
    assert_bit_identical(jax.device_get(state.params), raw.params)
    assert len(jax.tree.leaves(state.opt_state)) == len(raw.opt_state)
    expected = meta["extra"]["expected"]
    runner_class = RecsysInferenceRunner if kind == "ranker" else RecsysRetrievalInferenceRunner
    runner = runner_class.from_checkpoint(path)  # the serving path: config, model and tables from the checkpoint
    if kind == "ranker":
        logits = np.asarray(expected["logits"], np.float32)
        np.testing.assert_allclose(trainer.predict(state.params, probe), logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(runner.rank(probe).scores, 1 / (1 + np.exp(-logits)), rtol=1e-5, atol=1e-6)
    else:
        user, candidates, _ = trainer.predict(state.params, probe)
        np.testing.assert_allclose(user, expected["user"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(candidates, expected["candidates"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(runner.encode_user(probe), expected["user"], rtol=1e-5, atol=1e-6)

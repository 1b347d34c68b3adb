"""Sharded checkpoints: row-split arrays written shard by shard, each by the process that holds it.

A format knows no model: the caller says which leaves are split by rows (`is_split(path)`, e.g. the
hash tables and their optimiser state: phoenix_sharding.is_table_path) and how many rows of each are
real (`rows_of(path)`: padding rows are not stored). Every other leaf is stored once, by process 0.

Layout of a sharded checkpoint directory `path/`:

  index.json               written last: format marker and version, save id, step, the shard count n,
                           per split leaf its tree ("params" / "opt_state"), pytree path, real rows and
                           the row range [lo, hi) each shard holds, and the save id of every part
  dense/                   a phoenix_checkpoint directory: step, config, extra, aux, and the params and
                           optimiser state with each split leaf stored as a 0-row placeholder
  shard-00003-of-00008/    a phoenix_checkpoint directory: rows [lo, hi) of every split leaf of shard 3,
                           as flat params `leaf_<k>` (k: the leaf's position in index.json)

Every part is a phoenix_checkpoint directory (pickle-free, sha256-verified on load); index.json names
each part's save id, so parts of two saves are never mixed. A save writes everything into a temporary
sibling `.NAME.tmp-sharded-<pid>-<save id>` (pid: process 0's) and, once all processes have written
their parts, process 0 writes index.json there and renames it over `path` (the previous checkpoint set
aside, then deleted): a save killed at any point leaves the previous checkpoint whole (killed between
the two renames, under `.NAME.old-sharded-<save id>`, which loads do not look for yet). Such leftovers
are deleted by the next save of `path` (`remove_leftovers`: a temporary directory only once the pid
that made it is gone). Multi-process runs need a file system all processes see (the same path).

Loading reads only the rows each device needs, from the shards that hold them: any shard count and
any sharding of the result (resharding is exact: the same float32 values in other places).

Shape glossary
  M  real rows of a split leaf   n  shards   lo, hi  a shard's first and one-past-last row
"""

import json
import os
import re
import shutil
import stat
import uuid
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

import phoenix_checkpoint as checkpoint

__all__ = ["INDEX_FILE", "DENSE_DIR", "SHARDED_MARKER", "is_sharded_checkpoint", "save_sharded_checkpoint",
           "load_sharded_checkpoint", "shard_dir_name", "read_meta", "why_not_ours", "remove_leftovers"]

INDEX_FILE = "index.json"
DENSE_DIR = "dense"
SHARDED_MARKER = "phoenix-sharded-checkpoint"  # index.json's "format"
SHARDED_VERSION = 1
SHARD_DIR_PATTERN = re.compile(r"shard-\d{5,}-of-\d{5,}")


def shard_dir_name(shard: int, shards: int) -> str:
    return f"shard-{shard:05d}-of-{shards:05d}"


def is_sharded_checkpoint(path) -> bool:
    """Whether `path` is a directory holding a sharded checkpoint's index.json."""
    return os.path.isfile(os.path.join(os.fspath(path), INDEX_FILE))


def read_meta(path) -> dict:
    """The schema-checked meta.json of a checkpoint: a sharded one's dense part (step, config, extra),
    refused unless its index.json names that part; a regular one's own (phoenix_checkpoint.read_meta)."""
    path = os.path.abspath(os.fspath(path))
    if not is_sharded_checkpoint(path):
        return checkpoint.read_meta(path)
    index = _read_index(path)
    meta = checkpoint.read_meta(os.path.join(path, DENSE_DIR))
    if meta.get("save_id") != index.get("parts", {}).get(DENSE_DIR):
        raise checkpoint.CheckpointError(f"{path}/{DENSE_DIR}: written by another save than {path}/{INDEX_FILE} "
                                         f"names (save id {meta.get('save_id')!r})")
    return meta


# The leftovers of a killed save of one part inside a sharded save's directory (phoenix_checkpoint's names).
_PART_LEFTOVER = re.compile(rf"\.({DENSE_DIR}|shard-\d+-of-\d+)\.(tmp|old)-[A-Za-z0-9_-]+")


def why_not_ours(path, complete: bool = True) -> str | None:
    """None if `path` is absent, an empty directory, or a directory that looks written by a sharded save:
    only index.json (a sharded checkpoint's), dense/ and shard-*-of-*/ parts, each a directory a
    phoenix_checkpoint save wrote (phoenix_checkpoint.why_not_ours). Otherwise why not. `complete=False`
    accepts an unfinished save's temporary directory or a deletion cut short: index.json or parts
    missing, parts unfinished, and the leftovers of the parts' own killed saves."""
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is a file, not a directory"
    entries = sorted(os.listdir(path))
    for entry in entries:
        full = os.path.join(path, entry)
        if entry == INDEX_FILE or (not complete and entry == INDEX_FILE + ".tmp"):
            problem = None if stat.S_ISREG(os.lstat(full).st_mode) else "is not a regular file"
        elif entry == DENSE_DIR or SHARD_DIR_PATTERN.fullmatch(entry):
            problem = checkpoint.why_not_ours(full, complete)
        elif not complete and _PART_LEFTOVER.fullmatch(entry):
            problem = checkpoint.why_not_ours(full, complete=False)
        else:
            return f"holds {entry}, which a sharded save does not write"
        if problem:
            return f"its {entry} {problem}"
    if complete and entries:
        if INDEX_FILE not in entries:
            return f"has no {INDEX_FILE}"
        try:
            _read_index(path)
        except checkpoint.CheckpointError as e:
            return f"its {INDEX_FILE} is not a sharded checkpoint's ({e})"
    return None


def _leftover_match(entry: str, name: str):
    """A match of the names a sharded save of `name` gives its temporary (`.name.tmp-sharded-<pid>-<id>`)
    and set-aside (`.name.old-sharded-<id>`) directories: groups kind ("tmp" / "old") and pid (None
    where not recorded)."""
    return re.fullmatch(rf"\.{re.escape(name)}\.(tmp|old)-sharded-(?:(\d+)-)?[0-9a-f]+", entry)


def remove_leftovers(parent, name: str) -> list:
    """Deletes the temporary and set-aside directories that killed sharded saves of `parent/name` left:
    only those that look like ours (why_not_ours), and a temporary one only once the process 0 that
    made it (its pid, on this host) is gone. Returns the paths deleted."""
    parent = os.fspath(parent)
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    deleted = []
    for entry in sorted(entries):
        match = _leftover_match(entry, name)
        if match is None:
            continue
        kind, pid = match.groups()
        if kind == "tmp" and pid is not None and checkpoint.pid_alive(int(pid)):
            continue  # a save still running
        full = os.path.join(parent, entry)
        try:
            ours = why_not_ours(full, complete=kind == "old") is None
        except OSError:  # unreadable: not ours to judge
            continue
        if ours:
            shutil.rmtree(full, ignore_errors=True)
            deleted.append(full)
    return deleted


def _split_leaves(tree, is_split) -> list:
    """[(path string, path, leaf)] of the split leaves of `tree`, in pytree order."""
    return [(jax.tree_util.keystr(p), p, leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if is_split(p)]


def _placeholders(tree, is_split):
    """`tree` with each split leaf replaced by a 0-row array of its dtype (stored in dense/)."""
    def swap(path, leaf):
        if not is_split(path):
            return leaf
        return np.zeros((0,) + tuple(leaf.shape[1:]), np.dtype(leaf.dtype))
    return jax.tree_util.tree_map_with_path(swap, tree)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _shared_save_id() -> tuple[str, int]:
    """(a random id, process 0's pid), the same in every process (process 0's)."""
    value = np.concatenate([np.frombuffer(uuid.uuid4().bytes[:8], np.uint32),
                            np.array([os.getpid()], np.uint32)])  # [3]: the id's two words, the pid
    if jax.process_count() > 1:
        value = np.asarray(multihost_utils.broadcast_one_to_all(value))
    return "".join(f"{int(v):08x}" for v in value[:2]), int(value[2])


def _check_target(target: str) -> None:
    """A save replaces only nothing, an empty directory, a Phoenix checkpoint or a sharded one."""
    if not os.path.lexists(target):
        return
    if os.path.isdir(target) and (not os.listdir(target) or is_sharded_checkpoint(target)
                                  or checkpoint.why_not_ours(target) is None):
        return
    raise checkpoint.CheckpointError(f"{target}: not a checkpoint (a sharded save replaces only an empty "
                                     f"directory or a Phoenix checkpoint), refused; nothing written")


def save_sharded_checkpoint(path, params, opt_state=None, step=0, config=None, extra=None, aux=None, *,
                            is_split: Callable, rows_of: Callable) -> str:
    """Writes a sharded checkpoint (module docstring); every process calls it with the same global
    arrays. Split leaves must be jax Arrays split by rows into equal blocks (any other axis whole);
    each process writes the blocks its devices hold (replica 0), rows beyond `rows_of(path)` dropped.
    Returns the absolute path."""
    target = os.path.abspath(os.fspath(path))
    step = checkpoint.check_step(step)
    checkpoint.check_json(config, "config")
    checkpoint.check_json(extra, "extra")
    _check_target(target)
    parent, name = os.path.dirname(target), os.path.basename(target)
    trees = {"params": params, "opt_state": opt_state}
    leaves = [(tree, key, p, leaf) for tree, t in trees.items() if t is not None
              for key, p, leaf in _split_leaves(t, is_split)]
    if not leaves:
        raise ValueError("save_sharded_checkpoint: no leaf is split (is_split selected none)")
    blocks = {}  # leaf position -> {shard: (lo, hi, host rows)} held here
    shards = None
    for k, (tree, key, p, leaf) in enumerate(leaves):
        if not isinstance(leaf, jax.Array):
            raise TypeError(f"{tree}{key}: a split leaf must be a jax.Array, got {type(leaf).__name__}")
        count = len({s.index[0].start or 0 for s in leaf.global_shards}) if hasattr(leaf, "global_shards") else None
        block = leaf.shape[0] // (count or 1)
        shards = count if shards is None else shards
        if count != shards or block * count != leaf.shape[0]:
            raise ValueError(f"{tree}{key}: expected {shards} equal row blocks, got shape {list(leaf.shape)} "
                             f"in {count}")
        rows = int(rows_of(p))
        mine = {}
        for s in leaf.addressable_shards:
            if s.replica_id != 0:
                continue
            lo = s.index[0].start or 0
            hi = min(lo + block, rows)
            mine[lo // block] = (lo, max(lo, hi), np.asarray(s.data)[:max(0, hi - lo)])
        blocks[k] = mine

    save_id, pid = _shared_save_id()
    tmp = os.path.join(parent, f".{name}.tmp-sharded-{pid}-{save_id}")  # the pid: is this save still running
    if jax.process_index() == 0:
        os.makedirs(tmp)
    _barrier(f"phoenix sharded save {save_id} start")
    mine_shards = sorted({i for held in blocks.values() for i in held})
    for i in mine_shards:
        flat = {f"leaf_{k}": blocks[k][i][2] for k in range(len(leaves))}
        checkpoint.save_checkpoint(os.path.join(tmp, shard_dir_name(i, shards)), flat, step=step,
                                   extra={"sharded_save_id": save_id, "shard": i, "process": jax.process_index()})
    if jax.process_index() == 0:
        # split leaves become placeholders before anything is read: only replicated leaves reach the host
        dense = {t: None if tree is None else jax.device_get(_placeholders(tree, is_split))
                 for t, tree in trees.items()}
        checkpoint.save_checkpoint(os.path.join(tmp, DENSE_DIR), dense["params"], dense["opt_state"], step=step,
                                   config=config, extra=extra, aux=aux)
    # Every process's row ranges, by shard (a block's range depends only on its index).
    ranges = []
    for k, (tree, key, p, leaf) in enumerate(leaves):
        block, rows = leaf.shape[0] // shards, int(rows_of(p))
        ranges.append([[min(i * block, rows), min((i + 1) * block, rows)] for i in range(shards)])
    _barrier(f"phoenix sharded save {save_id} parts")
    if jax.process_index() == 0:
        parts = {DENSE_DIR: checkpoint.read_meta(os.path.join(tmp, DENSE_DIR))["save_id"]}
        for i in range(shards):
            part = shard_dir_name(i, shards)
            parts[part] = checkpoint.read_meta(os.path.join(tmp, part))["save_id"]
        index = {"format": SHARDED_MARKER, "format_version": SHARDED_VERSION, "save_id": save_id, "step": step,
                 "shards": shards, "parts": parts,
                 "leaves": [{"tree": tree, "path": key, "rows": int(rows_of(p)), "shape": list(leaf.shape[1:]),
                             "dtype": str(np.dtype(leaf.dtype)), "ranges": ranges[k]}
                            for k, (tree, key, p, leaf) in enumerate(leaves)]}
        index_tmp = os.path.join(tmp, INDEX_FILE + ".tmp")
        with open(index_tmp, "w") as f:
            json.dump(index, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(index_tmp, os.path.join(tmp, INDEX_FILE))
        aside = None
        if os.path.lexists(target):
            aside = os.path.join(parent, f".{name}.old-sharded-{save_id}")
            os.rename(target, aside)
        os.rename(tmp, target)
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        remove_leftovers(parent, name)  # of earlier saves of `path` that were killed
    _barrier(f"phoenix sharded save {save_id} done")
    return target


def _read_index(path: str) -> dict:
    index_path = os.path.join(path, INDEX_FILE)
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{index_path}: cannot read the sharded checkpoint's index: {e}") from None
    if not isinstance(index, dict) or index.get("format") != SHARDED_MARKER:
        raise checkpoint.CheckpointError(f"{index_path}: expected format {SHARDED_MARKER!r}, got "
                                         f"{index.get('format') if isinstance(index, dict) else index!r}")
    if index.get("format_version") != SHARDED_VERSION:
        raise checkpoint.CheckpointError(f"{index_path}: expected format_version {SHARDED_VERSION}, got "
                                         f"{index.get('format_version')!r}")
    return index


def load_sharded_checkpoint(path, params_template, opt_state_template=None, *, is_split: Callable,
                            shardings=None, decode_config=None, ignore_unexpected: bool = False
                            ) -> checkpoint.Checkpoint:
    """Reads a sharded checkpoint into the templates' structure. Split leaves take the template's rows
    (at least the saved rows; rows beyond them are zeros, e.g. padding). `shardings`: a pytree
    {"params": ..., "opt_state": ...} of shardings for the split leaves' results (jax Arrays, each
    device's rows read from the shards that hold them); None: host NumPy arrays. Other leaves come
    back as host arrays. Parts of another save, a missing part or a shape mismatch raise
    CheckpointError naming the file. `ignore_unexpected`: parameters absent from the template are skipped
    (phoenix_checkpoint.load_checkpoint's), e.g. a model-only template (the runners)."""
    path = os.path.abspath(os.fspath(path))
    index = _read_index(path)
    templates = {"params": params_template, "opt_state": opt_state_template}
    dense_templates = {t: None if tree is None else _placeholders(tree, is_split) for t, tree in templates.items()}
    dense = checkpoint.load_checkpoint(os.path.join(path, DENSE_DIR), dense_templates["params"],
                                       dense_templates["opt_state"], decode_config=decode_config,
                                       ignore_unexpected=ignore_unexpected)
    if dense.meta.get("save_id") != index["parts"].get(DENSE_DIR):
        raise checkpoint.CheckpointError(f"{path}/{DENSE_DIR}: written by another save than {path}/{INDEX_FILE} "
                                         f"names (save id {dense.meta.get('save_id')!r})")
    position = {(leaf["tree"], leaf["path"]): k for k, leaf in enumerate(index["leaves"])}
    cache = {}

    def shard(i: int) -> dict:
        if i not in cache:
            part = shard_dir_name(i, index["shards"])
            loaded = checkpoint.load_checkpoint(os.path.join(path, part))
            if loaded.meta.get("save_id") != index["parts"].get(part):
                raise checkpoint.CheckpointError(f"{path}/{part}: written by another save than {path}/{INDEX_FILE} "
                                                 f"names")
            cache[i] = loaded.params
        return cache[i]

    def rows(k: int, lo: int, hi: int, like) -> np.ndarray:
        """Rows [lo, hi) of split leaf k, zeros past its saved rows."""
        leaf = index["leaves"][k]
        out = np.zeros((hi - lo,) + tuple(like.shape[1:]), np.dtype(like.dtype))
        for i, (a, b) in enumerate(leaf["ranges"]):
            start, stop = max(a, lo), min(b, hi)
            if start < stop:
                out[start - lo:stop - lo] = shard(i)[f"leaf_{k}"][start - a:stop - a]
        return out

    results = {}
    for tree_name, template in templates.items():
        if template is None:
            results[tree_name] = None
            continue
        given = getattr(dense, tree_name)
        tree_shardings = None if shardings is None else shardings[tree_name]

        def fill(p, like, stored, tree_name=tree_name, tree_shardings=tree_shardings):
            if not is_split(p):
                return stored
            key = jax.tree_util.keystr(p)
            if (tree_name, key) not in position:
                raise checkpoint.CheckpointError(f"{path}/{INDEX_FILE}: no split leaf {tree_name}{key}")
            k = position[(tree_name, key)]
            saved = index["leaves"][k]
            if like.shape[0] < saved["rows"] or list(like.shape[1:]) != saved["shape"] or \
                    str(np.dtype(like.dtype)) != saved["dtype"]:
                raise checkpoint.CheckpointError(
                    f"{path}/{INDEX_FILE}: {tree_name}{key}: expected at most {like.shape[0]} rows of "
                    f"{list(like.shape[1:])} {np.dtype(like.dtype)}, checkpoint has {saved['rows']} of "
                    f"{saved['shape']} {saved['dtype']}")
            if tree_shardings is None:
                return rows(k, 0, like.shape[0], like)
            sharding = _leaf_at(tree_shardings, p)
            return jax.make_array_from_callback(
                tuple(like.shape), sharding,
                lambda idx, k=k, like=like: rows(k, idx[0].start or 0,
                                                 like.shape[0] if idx[0].stop is None else idx[0].stop, like)
                [(slice(None),) + tuple(idx[1:])])

        results[tree_name] = jax.tree_util.tree_map_with_path(
            lambda p, like, stored: fill(p, like, stored), template, given)
    return dense._replace(params=results["params"], opt_state=results["opt_state"])


def _leaf_at(tree, path):
    for entry in path:
        tree = tree[entry.key] if isinstance(entry, jax.tree_util.DictKey) else (
            tree[entry.idx] if isinstance(entry, jax.tree_util.SequenceKey) else getattr(tree, entry.name))
    return tree

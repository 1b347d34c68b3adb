"""Portable serving artifacts of a run: jax.export (StableHLO) of both stages, their parameters and
the vocabulary, loadable with JAX and NumPy alone (phoenix_exported.py).

    import phoenix_export, phoenix_pipeline as pipeline
    path = phoenix_export.export_run(pipeline.load_run("runs/mine"))   # -> runs/mine/export
    import phoenix_exported                                           # jax + numpy only
    served = phoenix_exported.load("runs/mine/export")
    served.recommend("u17", k=10)                                     # == pipeline.recommend(run, "u17", 10)

Two exported functions, each with a symbolic batch dimension `b` (jax.export.symbolic_shape):

  retrieve(params, items, inputs) -> (scores [b, K] float32, columns [b, K] int32)
      the user tower (each retrieval member; an ensemble's vectors concatenated / sqrt(M), as
      phoenix_two_stage.RetrievalEnsemble) on the last S items of each history, cosines with the
      catalog `items` [N, D] (encoded once at export time, stored as a parameter), excluded items
      (inputs["exclude"] [b, N] bool: the user's history) at -inf, then exact top-K (lax.top_k:
      ties in column order, phoenix_metrics' rule). Columns whose score is -inf are not ranked.
  rank(params, inputs) -> logits [b, c, A] float32, `c` symbolic too
      candidate-isolated ranking with prefix reuse: user + history through every layer once
      (encode_prefix), each candidate against that prefix and itself (score_candidates). Candidate
      c sits at rotary slot c mod C (C: the ranker's training candidate count), the slot
      phoenix_two_stage.ranker_logits scores it in, so a list of any length is ranked as the
      evaluation ranked it; candidates with post hash 0 are padding. Ensembles: the members' mean.

Inputs are hashes (int32; 0 = padding), as phoenix_inputs.RecsysBatch holds them: the loader looks
them up in the vocabulary (each user's and item's hashes computed at export time), so it needs no
hashing code. Every product surface is phoenix_split.SURFACE.

The directory (written atomically: a temporary sibling renamed into place):
  retrieve.stablehlo, rank.stablehlo   jax.export serialized functions
  params.npz                           every member's parameters, keys "<stage>.<member>/<module>/<name>"
  vocab.npz                            users, catalog, histories (CSR), hashes, popularity (phoenix_exported)
  manifest.json                        format, versions, recipe fields serving reads, the functions'
                                       input/output shapes and dtypes, symbolic dims, parameter
                                       tree, sha256 of every file

Shape glossary
  b  batch (symbolic)   c  candidates (symbolic)   N  catalog items   U  users   R  interactions
  S  history length     K  retrieved per user      D  embedding size (M*D for an ensemble of M)
  A  actions (19)       Hu / Hi / Ha  user / item / author hashes   M  ensemble members
"""

import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

import phoenix_serving as serving
import phoenix_two_stage as two_stage
from phoenix_hashing import hash_author_ids, hash_post_ids, hash_user_ids
from phoenix_inputs import ACTIONS, RecsysBatch
from phoenix_split import SURFACE

__all__ = ["export_run", "export_retrieve", "export_rank", "EXPORT_DIR", "EXPORT_FORMAT", "EXPORT_VERSION",
           "PLATFORMS", "flat_params", "retrieve_function", "rank_function"]

EXPORT_DIR = "export"  # in the run directory, beside serving/
EXPORT_FORMAT = "phoenix-export"
EXPORT_VERSION = 1
# Lowered for both so one directory serves on a CPU host and on an NVIDIA GPU (jax.export checks the
# platform at call time).
PLATFORMS = ("cpu", "cuda")
PARAMS_FILE, VOCAB_FILE, MANIFEST_FILE = "params.npz", "vocab.npz", "manifest.json"
FUNCTION_FILES = {"retrieve": "retrieve.stablehlo", "rank": "rank.stablehlo"}


# ---------------------------------------------------------------------------------------------
# The functions
# ---------------------------------------------------------------------------------------------


def _batch(inputs: dict, candidate_post, candidate_author) -> RecsysBatch:
    """A RecsysBatch of exported inputs; every surface is SURFACE (a log has one)."""
    history = inputs["history_post_hashes"]  # [b, S, Hi]
    return RecsysBatch(user_hashes=inputs["user_hashes"], history_post_hashes=history,
                       history_author_hashes=inputs["history_author_hashes"],
                       history_actions=inputs["history_actions"],
                       history_product_surface=jnp.full(history.shape[:2], SURFACE, jnp.int32),
                       candidate_post_hashes=candidate_post, candidate_author_hashes=candidate_author,
                       candidate_product_surface=jnp.full(candidate_post.shape[:2], SURFACE, jnp.int32))


def _user_tower(model, batch, embeddings):
    user, _ = model.build_user_representation(batch, embeddings)  # [b, D]
    return user.astype(jnp.float32)


def retrieve_function(trainers: Sequence, k: int):
    """retrieve(params (one per member), items [N, D], inputs) of the module docstring."""
    scale = 1.0 / math.sqrt(len(trainers))

    def retrieve(params, items, inputs):
        B = inputs["user_hashes"].shape[0]
        hi = inputs["history_post_hashes"].shape[2]
        ha = inputs["history_author_hashes"].shape[2]
        # The user tower reads no candidate: one padding slot keeps the batch well formed.
        batch = _batch(inputs, jnp.zeros((B, 1, hi), jnp.int32), jnp.zeros((B, 1, ha), jnp.int32))
        users = [t.forward.apply(p, batch, call=_user_tower) for t, p in zip(trainers, params)]  # M x [b, D]
        user = users[0] if len(users) == 1 else jnp.concatenate(users, axis=-1) * scale  # [b, M*D]
        cosines = jnp.matmul(user, items.T, precision=jax.lax.Precision.HIGHEST)  # [b, N]
        cosines = jnp.where(inputs["exclude"], -jnp.inf, cosines)
        scores, columns = jax.lax.top_k(cosines, k)  # [b, K] each, ties in column order
        return scores, columns.astype(jnp.int32)

    return retrieve


def rank_function(trainers: Sequence, num_candidates: int):
    """rank(params (one per member), inputs) of the module docstring; `num_candidates` the training C."""

    def isolated(model, batch, embeddings):
        C = batch.candidate_post_hashes.shape[1]
        slots = jnp.arange(C, dtype=jnp.int32)  # [c]
        start = -(slots // num_candidates) * num_candidates  # [c]: slot c -> rotary slot c mod C
        prefix = model.encode_prefix(batch, embeddings)
        return model.score_candidates(batch, embeddings, prefix, candidate_start=start).logits.astype(jnp.float32)

    def rank(params, inputs):
        batch = _batch(inputs, inputs["candidate_post_hashes"], inputs["candidate_author_hashes"])
        logits = [t.forward.apply(p, batch, call=isolated) for t, p in zip(trainers, params)]  # M x [b, c, A]
        return logits[0] if len(logits) == 1 else sum(logits) / len(logits)

    return rank


def _members(model, params) -> tuple[list, list]:
    """(trainers, params) of a single model or an ensemble (phoenix_two_stage._Ensemble)."""
    if hasattr(model, "members"):
        return list(model.members), list(params)
    return [model], [params]


def _history_spec(b, history_len: int, hashes) -> dict:
    return {"user_hashes": jax.ShapeDtypeStruct((b, hashes.num_user_hashes), jnp.int32),
            "history_post_hashes": jax.ShapeDtypeStruct((b, history_len, hashes.num_item_hashes), jnp.int32),
            "history_author_hashes": jax.ShapeDtypeStruct((b, history_len, hashes.num_author_hashes), jnp.int32),
            "history_actions": jax.ShapeDtypeStruct((b, history_len, len(ACTIONS)), jnp.float32)}


def _spec(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def export_retrieve(model, params, items: np.ndarray, history_len: int, k: int,
                    platforms=PLATFORMS) -> tuple[export.Exported, dict]:
    """(The exported retrieve function (symbolic batch) of a retrieval trainer or ensemble, its
    non-parameter inputs as ShapeDtypeStructs)."""
    trainers, member_params = _members(model, params)
    (b,) = export.symbolic_shape("b")
    inputs = _history_spec(b, history_len, trainers[0].hash_config)
    inputs["exclude"] = jax.ShapeDtypeStruct((b, items.shape[0]), jnp.bool_)
    fn = jax.jit(retrieve_function(trainers, k))
    exported = export.export(fn, platforms=platforms)(_spec(member_params), _spec(items), inputs)
    return exported, {**inputs, "items": _spec(items)}


def export_rank(model, params, history_len: int, num_candidates: int,
                platforms=PLATFORMS) -> tuple[export.Exported, dict]:
    """(The exported rank function (symbolic batch and candidates) of a ranking trainer or ensemble,
    its non-parameter inputs as ShapeDtypeStructs)."""
    trainers, member_params = _members(model, params)
    hashes = trainers[0].hash_config
    b, c = export.symbolic_shape("b, c")
    inputs = _history_spec(b, history_len, hashes)
    inputs["candidate_post_hashes"] = jax.ShapeDtypeStruct((b, c, hashes.num_item_hashes), jnp.int32)
    inputs["candidate_author_hashes"] = jax.ShapeDtypeStruct((b, c, hashes.num_author_hashes), jnp.int32)
    fn = jax.jit(rank_function(trainers, num_candidates))
    return export.export(fn, platforms=platforms)(_spec(member_params), inputs), inputs


# ---------------------------------------------------------------------------------------------
# The directory
# ---------------------------------------------------------------------------------------------


def flat_params(stage: str, params_list: list) -> tuple[dict, list]:
    """({npz key: array}, tree) of members' haiku params: tree[m] = {module: [names]} (manifest)."""
    arrays, tree = {}, []
    for m, params in enumerate(params_list):
        modules = {}
        for module in sorted(params):
            names = sorted(params[module])
            modules[module] = names
            for name in names:
                arrays[f"{stage}.{m}/{module}/{name}"] = np.asarray(params[module][name])
        tree.append(modules)
    return arrays, tree


def _vocab(served: serving.ServedRun) -> dict:
    """The arrays of vocab.npz: everything the loader needs to turn original ids into hashes."""
    split, hashes = served.split, two_stage.hash_config(served.recipe)
    arrays = {"user_ids": split.user_ids.astype(np.int64), "item_ids": split.item_ids.astype(np.int64),
              "offsets": split.offsets.astype(np.int64), "history_columns": split.item_columns.astype(np.int32),
              "history_actions": serving._pack_actions(split.actions),
              "popularity": served.popularity.astype(np.int64),
              "user_hashes": hash_user_ids(split.user_ids, hashes),  # [U, Hu]
              "item_post_hashes": hash_post_ids(split.item_ids, hashes),  # [N, Hi]
              "item_author_hashes": hash_author_ids(split.item_authors, hashes),  # [N, Ha]
              "items": np.asarray(served.item_vectors, np.float32)}  # [N, D]
    if served.transition_weight:  # the transition prior's counts (phoenix_serving's CSR)
        arrays.update(zip(("transition_indptr", "transition_to", "transition_count"), served.transitions))
    for kind, names in served.names.items():
        if kind in ("user", "item"):
            for key, value in serving._encode_strings(names).items():
                arrays[f"{kind}_names_{key}"] = value
    return arrays


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _savez(path: str, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, allow_pickle=False, **arrays)
        f.flush()
        os.fsync(f.fileno())


def _describe(exported: export.Exported, inputs: dict) -> dict:
    """Shapes (symbolic dims by name) and dtypes of an exported function's non-parameter inputs
    (`inputs`: their ShapeDtypeStructs) and outputs; the parameters are the manifest's "params"."""
    def entry(a):
        return {"shape": "[" + ", ".join(str(d) for d in a.shape) + "]", "dtype": str(np.dtype(a.dtype))}
    return {"inputs": {name: entry(a) for name, a in sorted(inputs.items())},
            "outputs": [entry(a) for a in exported.out_avals], "platforms": list(exported.platforms)}


def _replace_dir(tmp: str, target: str) -> None:
    """Moves the finished `tmp` to `target`, the old `target` (if any) aside first and then removed."""
    old = None
    if os.path.lexists(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
        os.replace(target, os.path.join(old, "x"))
    os.replace(tmp, target)
    fd = os.open(os.path.dirname(target) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old)


def export_run(served: serving.ServedRun, out_dir=None, platforms=PLATFORMS) -> str:
    """Writes the export directory (module docstring) of a served run; default RUN/export (RUN: the
    run directory load_run read). Returns its path."""
    if out_dir is None:
        if served.path is None:
            raise ValueError("out_dir: expected a directory (the run was not read from one, so there is no "
                             "RUN/export default), got None")
        out_dir = os.path.join(served.path, EXPORT_DIR)
    out_dir = os.path.abspath(os.fspath(out_dir))
    recipe = served.recipe
    vocab = _vocab(served)
    exported = {"retrieve": export_retrieve(served.retrieval, served.retrieval_params, vocab["items"],
                                            recipe.history_len, recipe.retrieve_k, platforms),
                "rank": export_rank(served.ranker, served.ranker_params, recipe.ranker_history_len,
                                    recipe.num_candidates, platforms)}
    params, tree = {}, {}
    for stage, model, stage_params in (("retrieval", served.retrieval, served.retrieval_params),
                                       ("ranker", served.ranker, served.ranker_params)):
        arrays, tree[stage] = flat_params(stage, _members(model, stage_params)[1])
        params.update(arrays)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        for name, fn in exported.items():
            _write(os.path.join(tmp, FUNCTION_FILES[name]), bytes(fn[0].serialize()))
        _savez(os.path.join(tmp, PARAMS_FILE), params)
        _savez(os.path.join(tmp, VOCAB_FILE), vocab)
        files = [*FUNCTION_FILES.values(), PARAMS_FILE, VOCAB_FILE]
        manifest = {
            "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "jax_version": jax.__version__,
            "numpy_version": np.__version__, "source": served.info.get("source"), "run": served.path,
            "symbolic_dims": {"b": "batch (users)", "c": "candidates per user (rank)"},
            "functions": {name: {"file": FUNCTION_FILES[name], **_describe(*fn)} for name, fn in exported.items()},
            "params": {"file": PARAMS_FILE, "tree": tree},
            "vocabulary": {"file": VOCAB_FILE, "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                                                          for k, v in vocab.items()},
                           "id_kinds": {kind: "string" if kind in served.names else "integer"
                                        for kind in ("user", "item")}},
            "serving": {"retrieve_k": recipe.retrieve_k, "history_len": recipe.history_len,
                        "ranker_history_len": recipe.ranker_history_len, "num_candidates": recipe.num_candidates,
                        "temperature": recipe.temperature, "score_action": recipe.score_action,
                        "retrieval_weight": float(served.retrieval_weight),
                        "popularity_weight": float(served.popularity_weight),
                        "transition_weight": float(served.transition_weight), "actions": list(ACTIONS),
                        "eval_batch": two_stage.EVAL_BATCH},
            "sha256": {name: _sha256(os.path.join(tmp, name)) for name in files},
        }
        with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

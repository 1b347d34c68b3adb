"""Serving an export directory (phoenix_export.py wrote it) with JAX and NumPy alone: no Phoenix
model code, no Haiku.

    import phoenix_exported
    served = phoenix_exported.load("runs/mine/export")     # checks every file's sha256
    served.recommend("u17", k=10)      # [(original item id, two-stage score)] best first
    served.rank("u17", ["i3", "i9"])   # per-action probabilities [C, A] (served.actions names A)

recommend computes what phoenix_serving.recommend computes for a user of the run, from the two
exported functions: retrieve (user tower + exact top-K of the items not in the history), rank (the
ranker's logits of those K), then the re-ranking score of phoenix_two_stage.rerank_scores, in the
same NumPy arithmetic, and a stable sort (ties keep retrieval order). Users and items are the run's
(original ids; an unknown one is refused with a ValueError naming it): the vocabulary holds their
hashes, so no hashing code is needed here.

Shape glossary
  U  users   N  catalog items   R  interactions   S  history length   K  retrieved per user
  C  candidates   A  actions   Hu / Hi / Ha  user / item / author hashes
"""

import hashlib
import json
import os
from typing import Optional

import jax
import numpy as np
from jax import export

__all__ = ["ExportedRun", "load", "EXPORT_FORMAT", "EXPORT_VERSION"]

EXPORT_FORMAT = "phoenix-export"  # phoenix_export.EXPORT_FORMAT (this module imports no Phoenix code)
EXPORT_VERSION = 1
MAX_ROWS = 256  # users per exported call (memory bound; any batch size gives the same rows)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _strings(arrays, prefix: str) -> Optional[np.ndarray]:
    """[V] object array of str from UTF-8 bytes + offsets, or None where the column was integer."""
    if f"{prefix}_utf8" not in arrays:
        return None
    data, offsets = arrays[f"{prefix}_utf8"].tobytes(), arrays[f"{prefix}_offsets"].tolist()
    return np.array([data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])], dtype=object)


class ExportedRun:
    """An export directory ready to serve (load)."""

    def __init__(self, path: str, manifest: dict, functions: dict, params: dict, vocab: dict):
        self.path, self.manifest = path, manifest
        self.serving = manifest["serving"]
        self.actions = list(self.serving["actions"])
        self.retrieve_k = int(self.serving["retrieve_k"])
        self._retrieve = jax.jit(functions["retrieve"].call)
        self._rank = jax.jit(functions["rank"].call)
        self.params = params  # {"retrieval": [member dicts], "ranker": [...]} on device
        self.vocab = vocab
        self.items = jax.device_put(vocab["items"])  # [N, D] the catalog's candidate-tower vectors
        self.user_names = _strings(vocab, "user_names")
        self.item_names = _strings(vocab, "item_names")
        self._user_row = {name: row for row, name in enumerate(
            self.user_names.tolist() if self.user_names is not None else vocab["user_ids"].tolist())}
        self._item_column = {name: col for col, name in enumerate(
            self.item_names.tolist() if self.item_names is not None else vocab["item_ids"].tolist())}
        self.num_items = len(vocab["item_ids"])
        self.log_popularity = np.log1p(vocab["popularity"].astype(np.float64))  # [N]
        if self.serving.get("transition_weight"):  # pair keys i * N + j, ascending, of the transition counts
            indptr = vocab["transition_indptr"]
            self.pair_keys = np.repeat(np.arange(self.num_items), np.diff(indptr)) * self.num_items + \
                vocab["transition_to"]  # [P]

    # ---- ids --------------------------------------------------------------------------------

    def _key(self, value, names, kind: str, name: str):
        if names is not None:
            if not isinstance(value, str):
                raise ValueError(f"{name}: expected a string {kind} id (the log's {kind} ids are strings), "
                                 f"got {value!r}")
            return value
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, str) and value.isascii() and value.isdigit():
            return int(value)
        raise ValueError(f"{name}: expected a non-negative integer {kind} id (the log's {kind} ids are "
                         f"integers), got {value!r}")

    def user_row(self, user, name: str = "user") -> int:
        """The row of original user id `user`; ValueError if the run's log does not hold it."""
        row = self._user_row.get(self._key(user, self.user_names, "user", name))
        if row is None:
            raise ValueError(f"{name}: expected a user of the run's log ({len(self._user_row)} users), "
                             f"got {user!r}")
        return row

    def item_columns(self, items, name: str = "items") -> np.ndarray:
        """Catalog columns [C] of original item ids; ValueError naming the first unknown position."""
        if isinstance(items, (str, bytes)) or not hasattr(items, "__len__"):
            raise ValueError(f"{name}: expected a list of item ids, got {type(items).__name__}")
        if len(items) == 0:
            raise ValueError(f"{name}: expected at least one item id, got an empty list")
        columns = np.empty(len(items), np.int64)
        for i, item in enumerate(items):
            column = self._item_column.get(self._key(item, self.item_names, "item", f"{name}[{i}]"))
            if column is None:
                raise ValueError(f"{name}[{i}]: expected an item of the run's catalog ({self.num_items} items), "
                                 f"got {item!r}")
            columns[i] = column
        return columns

    def item_tokens(self, columns) -> list:
        columns = np.asarray(columns).ravel()
        return (self.item_names if self.item_names is not None else self.vocab["item_ids"])[columns].tolist()

    # ---- inputs -----------------------------------------------------------------------------

    def history_inputs(self, rows: np.ndarray, history_len: int) -> dict:
        """The exported functions' user and history inputs of user rows [U]: the last S items of each
        whole sequence, oldest first, then padding (phoenix_split.histories)."""
        v = self.vocab
        ends = v["offsets"][rows + 1]  # [U]
        valid_len = np.minimum(ends - v["offsets"][rows], history_len)  # [U]
        slots = np.arange(history_len)[None, :]  # [1, S]
        valid = slots < valid_len[:, None]  # [U, S]
        positions = np.where(valid, ends[:, None] - valid_len[:, None] + slots, 0)  # [U, S]
        columns = v["history_columns"][positions]  # [U, S]
        bits = (v["history_actions"][positions][..., None] >> np.arange(len(self.actions), dtype=np.uint32)) & 1
        return {"user_hashes": v["user_hashes"][rows],  # [U, Hu]
                "history_post_hashes": np.where(valid[..., None], v["item_post_hashes"][columns], 0),  # [U, S, Hi]
                "history_author_hashes": np.where(valid[..., None], v["item_author_hashes"][columns], 0),
                "history_actions": ((bits == 1) & valid[..., None]).astype(np.float32)}  # [U, S, A]

    def history_mask(self, rows: np.ndarray) -> np.ndarray:
        """[U, N] bool: every item of each user's sequence (never recommended)."""
        v = self.vocab
        lengths = v["offsets"][rows + 1] - v["offsets"][rows]  # [U]
        owner = np.repeat(np.arange(len(rows)), lengths)  # [sum lengths]
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        mask = np.zeros((len(rows), self.num_items), bool)
        mask[owner, v["history_columns"][v["offsets"][rows][owner] + within]] = True
        return mask

    # ---- the exported functions ---------------------------------------------------------------

    def retrieve(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(cosines [U, K], columns [U, K]) of retrieval's top K items not in each user's history;
        -inf where fewer than K are left."""
        rows = np.asarray(rows, np.int64)
        scores, columns = [], []
        for start in range(0, len(rows), MAX_ROWS):
            part = rows[start:start + MAX_ROWS]
            inputs = self.history_inputs(part, self.serving["history_len"])
            inputs["exclude"] = self.history_mask(part)
            s, c = self._retrieve(self.params["retrieval"], self.items, inputs)
            scores.append(np.asarray(s))
            columns.append(np.asarray(c).astype(np.int64))
        return np.concatenate(scores), np.concatenate(columns)

    def rank_columns(self, rows, columns) -> np.ndarray:
        """Ranker logits [U, C, A] of catalog columns [U, C] (-1: padding) for each user's history."""
        rows, columns = np.asarray(rows, np.int64), np.asarray(columns, np.int64)
        out = []
        for start in range(0, len(rows), MAX_ROWS):
            part, cols = rows[start:start + MAX_ROWS], columns[start:start + MAX_ROWS]
            inputs = self.history_inputs(part, self.serving["ranker_history_len"])
            pad = (cols < 0)[..., None]  # [U, C, 1]
            safe = np.maximum(cols, 0)
            inputs["candidate_post_hashes"] = np.where(pad, 0, self.vocab["item_post_hashes"][safe])
            inputs["candidate_author_hashes"] = np.where(pad, 0, self.vocab["item_author_hashes"][safe])
            out.append(np.asarray(self._rank(self.params["ranker"], inputs)))
        return np.concatenate(out)

    # ---- serving ------------------------------------------------------------------------------

    def top_items(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(catalog columns [U, K], two-stage scores [U, K]) best first, as phoenix_serving.top_items
        ranks a user's whole sequence; unranked slots (fewer than K items left) are -1 with -inf."""
        s = self.serving
        rows = np.asarray(rows, np.int64)
        cosines, top = self.retrieve(rows)  # [U, K]
        ranked = np.isfinite(cosines)  # [U, K]
        top = np.where(ranked, top, -1)
        logits = self.rank_columns(rows, top)  # [U, K, A]
        popularity = self.log_popularity[np.where(ranked, top, 0)]  # [U, K]
        # phoenix_two_stage.rerank_scores, operation for operation (float32, then float64 with popularity)
        final = logits[..., self.actions.index(s["score_action"])] + \
            s["retrieval_weight"] * np.where(ranked, cosines, 0).astype(np.float32) / s["temperature"]
        if s["popularity_weight"]:
            final = final + s["popularity_weight"] * popularity
        if s.get("transition_weight"):  # + t x log(1 + times the item followed the history's last item)
            last = self.vocab["history_columns"][self.vocab["offsets"][rows + 1] - 1].astype(np.int64)  # [U]
            wanted = last[:, None] * self.num_items + np.where(ranked, top, 0)  # [U, K]
            at = np.minimum(np.searchsorted(self.pair_keys, wanted), len(self.pair_keys) - 1)
            count = np.where((self.pair_keys[at] == wanted) & ranked, self.vocab["transition_count"][at], 0)
            final = final + s["transition_weight"] * np.log1p(count.astype(np.float64))
        final = np.where(ranked, final, -np.inf)
        order = np.argsort(-final, axis=1, kind="stable")  # [U, K]
        return np.take_along_axis(top, order, axis=1), np.take_along_axis(final, order, axis=1)

    def check_k(self, k, row: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.retrieve_k:
            raise ValueError(f"k: expected an int in [1, {self.retrieve_k}] (retrieve_k: the items retrieval "
                             f"hands to the ranker), got {k!r}")
        available = self.num_items - int(self.history_mask(np.array([row])).sum())
        if k > available:
            raise ValueError(f"k: expected at most {available} for this user (the {self.num_items} catalog items "
                             f"minus the {self.num_items - available} in their history), got {k}")
        return int(k)

    def recommend(self, user, k: int = 10) -> list[tuple]:
        """Top-k new items of a user of the run: [(original item id, score)] best first."""
        row = self.user_row(user)
        k = self.check_k(k, row)
        columns, scores = self.top_items(np.array([row]))
        return list(zip(self.item_tokens(columns[0, :k]), scores[0, :k].tolist()))

    def rank(self, user, items) -> np.ndarray:
        """Per-action probabilities [C, A] (sigmoid of the ranker's logits) of original item ids
        `items` for a user of the run, on their whole logged sequence."""
        row = self.user_row(user)
        columns = self.item_columns(items)
        logits = self.rank_columns(np.array([row]), columns[None, :])[0]  # [C, A]
        return 1.0 / (1.0 + np.exp(-logits))


def _load_npz(path: str) -> dict:
    with np.load(path, allow_pickle=False) as stored:
        return {key: stored[key] for key in stored.files}


def load(path, verify: bool = True) -> ExportedRun:
    """The export directory at `path`; `verify`: check every file against the manifest's sha256."""
    path = os.fspath(path)
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"{manifest_path}: missing; write the directory with phoenix_export.export_run "
                                "(or `run_serve.py --export`)")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("format") != EXPORT_FORMAT or manifest.get("format_version") != EXPORT_VERSION:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r} version "
                         f"{manifest.get('format_version')!r}, this loader reads {EXPORT_FORMAT!r} version "
                         f"{EXPORT_VERSION}")
    if verify:
        for name, digest in manifest["sha256"].items():
            actual = _sha256(os.path.join(path, name))
            if actual != digest:
                raise ValueError(f"{os.path.join(path, name)}: sha256 {actual}, the manifest says {digest} "
                                 "(changed or truncated after export)")
    functions = {}
    for name, entry in manifest["functions"].items():
        with open(os.path.join(path, entry["file"]), "rb") as f:
            functions[name] = export.deserialize(bytearray(f.read()))
    flat = _load_npz(os.path.join(path, manifest["params"]["file"]))
    params = {stage: [jax.device_put({module: {n: flat[f"{stage}.{m}/{module}/{n}"] for n in names}
                                      for module, names in member.items()})
                      for m, member in enumerate(tree)]
              for stage, tree in manifest["params"]["tree"].items()}
    vocab = _load_npz(os.path.join(path, manifest["vocabulary"]["file"]))
    return ExportedRun(path, manifest, functions, params, vocab)

"""Serving a run from its directory: original ids in, the evaluated two-stage top-k out.

    import phoenix_pipeline as pipeline
    run = pipeline.load_run("runs/mine")                 # a fresh process: no log, no split
    pipeline.recommend(run, "u17", k=10)                 # [(item id, score)] best first
    pipeline.recommend(run, "new-user", history=["i3", "i9"])   # oldest first

    uv run run_recommend.py --run runs/mine --out recs.csv     # every user of the log, batched

phoenix_pipeline.run writes `serving/` into the run directory after its evaluation
(save_serving); load_run reads it back with the best checkpoints. recommend ranks exactly as the
evaluation ranked (test_phoenix_serving.py pins it: for every test user, recommend with their
evaluation history equals their --dump-topk row): retrieval's top retrieve_k of the items not in
the history, re-ranked by the ranker's score_action logit + w x retrieval cosine / temperature
+ b x log(1 + popularity) + t x log(1 + how often the item followed the history's last item), with
(w, b, t) the weights chosen on validation, ensembles as trained.
Both go through `top_items` here and phoenix_two_stage.retrieval_topk (retrieval_scores), which score every user in
blocks of EVAL_BATCH rows, so a user's scores do not depend on who is scored with them.

What serving decides
  popularity   the counts the test evaluation used: interactions visible before the test targets
               (phoenix_evaluation.popularity_counts(split, "test")). Serving after the end of the
               log then leaves out one interaction per evaluated user (their test target); in
               exchange a served list equals the evaluated one.
  history=None the user's whole sequence in the split (leave-one-out: every interaction of the log,
               repeats dropped as the split drops them; time split: what the split keeps, the
               interactions before its cut plus each evaluated user's test target), oldest first;
               each item's actions as logged.
  history=[...] original item ids, oldest first; every item gets the action `click_score` unless
               `actions` gives them ([L, A] bool, or one collection of ACTIONS names per item).
               An item not in the run's catalog is refused (ValueError naming its position): the
               models never trained on it. An empty history is refused.
  unknown user without a history: refused (ValueError); with one, it is served (its id hashed as
               the log's ids were: string_id for a string column).
  k            1 .. retrieve_k, and at most the items not in the history; else ValueError naming k.

The serving directory (a phoenix_checkpoint directory: written atomically, arrays.npz verified by
its sha256, no pickle; its meta.json `extra` holds SERVING_FORMAT, SERVING_VERSION and the JSON
below). Arrays, all NumPy (sizes proportional to the log: 8 bytes per interaction, 24 per item,
16 per user, plus the original strings):
  user_ids [U] int64, offsets [U + 1] int64       users (raw ids, ascending) and their sequences
  history_columns [R] int32                       catalog columns of each user's items, oldest first
  history_actions [R] uint32                      bit a set: ACTIONS[a] of that interaction
  item_ids [N] int64, item_authors [N] int64      the catalog (raw ids, ascending) and its authors
  popularity [N] int64                            the counts serving adds (above)
  transition_indptr [N + 1], transition_to [P],   with a transition weight t != 0: the consecutive pairs
  transition_count [P] int64                      (i -> j) of the sequences, counted as popularity is
                                                  (phoenix_evaluation.transition_table(split, "test"))
  names/<user|item|author>/utf8 [bytes] uint8, names/<kind>/offsets [V + 1] int64
                                                  original string ids of a string column, aligned
                                                  with user_ids / item_ids / item_authors
JSON: recipe (resolved), retrieval_weight, popularity_weight, transition_weight, score rule, id kinds, columns,
source, protocol, the evaluation's batch size, the counts of users, items and interactions, and the
save id of every checkpoint the evaluation read (load_run refuses checkpoints a later run replaced).

Shape glossary
  U  users   N  catalog items   R  interactions   K  retrieved per user   A  actions (19)
"""

import dataclasses
import functools
import os
from typing import Optional

import numpy as np

import phoenix_checkpoint as checkpoint
import phoenix_metrics as metrics
import phoenix_run_dir as run_dir
import phoenix_split
import phoenix_training as training
import phoenix_two_stage as two_stage
from phoenix_evaluation import popularity_counts, transition_table
from phoenix_inputs import ACTIONS
from phoenix_log import INTERACTION_ACTION, NUM_ACTIONS, Columns, string_id
from phoenix_split import LogSplit, Split
from phoenix_two_stage import EVAL_BATCH, FINAL_K, Recipe

__all__ = ["ServedRun", "load_run", "recommend", "recommend_users", "save_serving", "top_items", "SERVING_DIR",
           "SERVING_FORMAT", "SERVING_VERSION", "ServingError"]

SERVING_DIR = "serving"  # in the run directory (phoenix_pipeline.RUN_ENTRIES: a checkpoint directory)
SERVING_FORMAT = "phoenix-serving"
SERVING_VERSION = 1
ID_KINDS = ("user", "item", "author")
POPULARITY_SPLIT = "test"  # whose visible interactions the served popularity counts (module docstring)
# Rows of the [U, N] score matrix serving holds at once (recommend_users): ~256 MB of float32 at 2**26.
SCORE_CELLS = 1 << 26


class ServingError(ValueError):
    """A run directory that cannot be served: no serving/ (a run from before it existed, or one that
    stopped before its evaluation), another format or version, or checkpoints that do not match."""


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _pack_actions(actions: np.ndarray) -> np.ndarray:
    """[R, A] bool -> [R] uint32 bitmasks (bit a: ACTIONS[a])."""
    bits = np.left_shift(np.uint32(1), np.arange(actions.shape[1], dtype=np.uint32))  # [A]
    return (actions.astype(np.uint32) * bits).sum(axis=1, dtype=np.uint32)


def _unpack_actions(packed: np.ndarray) -> np.ndarray:
    """[R] uint32 bitmasks -> [R, A] bool."""
    return (packed[:, None] >> np.arange(NUM_ACTIONS, dtype=np.uint32)) & 1 == 1


def _encode_strings(values) -> dict:
    """Strings as their UTF-8 bytes concatenated [bytes] uint8 and offsets [V + 1] int64 (no pickle)."""
    encoded = [v.encode("utf-8") for v in values]
    lengths = np.fromiter((len(b) for b in encoded), np.int64, len(encoded))
    return {"utf8": np.frombuffer(b"".join(encoded), np.uint8).copy(),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}


def _decode_strings(stored: dict) -> np.ndarray:
    """[V] object array of str from _encode_strings' arrays."""
    data, offsets = stored["utf8"].tobytes(), stored["offsets"]
    return np.array([data[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())],
                    dtype=object)


def serving_arrays(split: LogSplit, transition_weight: float = 0.0) -> dict:
    """The arrays of the serving directory (module docstring) of a split."""
    arrays = {"user_ids": split.user_ids.astype(np.int64), "offsets": split.offsets.astype(np.int64),
              "history_columns": split.item_columns.astype(np.int32),
              "history_actions": _pack_actions(split.actions), "item_ids": split.item_ids.astype(np.int64),
              "item_authors": split.item_authors.astype(np.int64),
              "popularity": popularity_counts(split, POPULARITY_SPLIT).astype(np.int64)}
    aligned = {"user": split.user_ids, "item": split.item_ids, "author": split.item_authors}
    names = {kind: _encode_strings(split.log.tokens(kind, aligned[kind]))
             for kind in ID_KINDS if kind in split.log.names}
    if names:
        arrays["names"] = names
    if transition_weight:
        indptr, following, counts = transition_table(split, POPULARITY_SPLIT)
        arrays.update(transition_indptr=indptr.astype(np.int64), transition_to=following.astype(np.int64),
                      transition_count=counts.astype(np.int64))
    return arrays


def _members(recipe: Recipe) -> list:
    """Checkpoint names of every member of both stages (retrieval, retrieval.1, ..., ranker, ...)."""
    return [two_stage.member_stage(m, stage) for stage, members in (("retrieval", recipe.retrieval_members),
                                                                      ("ranker", recipe.ranker_members))
            for m in range(members)]


def _save_ids(checkpoint_dir, recipe: Recipe) -> dict:
    """{checkpoint name: its save id} of the checkpoints the evaluation read: serving/ belongs to them."""
    return {name: checkpoint.read_meta(os.path.join(os.fspath(checkpoint_dir), name))["save_id"]
            for name in _members(recipe)}


def save_serving(checkpoint_dir, split: LogSplit, recipe: Recipe, retrieval_weight: float, popularity_weight: float,
                 columns: Optional[Columns] = None, transition_weight: float = 0.0) -> str:
    """Writes `serving/` into the run directory (module docstring): what load_run needs besides the
    checkpoints, so that recommend ranks as the evaluation of `split` did. Returns its path."""
    info = {"format": SERVING_FORMAT, "format_version": SERVING_VERSION, "recipe": dataclasses.asdict(recipe),
            "retrieval_weight": float(retrieval_weight), "popularity_weight": float(popularity_weight),
            "transition_weight": float(transition_weight),
            "score": f"ranker {recipe.score_action} logit + retrieval_weight x retrieval cosine / temperature "
                     "+ popularity_weight x log(1 + popularity) + transition_weight x log(1 + transition count "
                     "from the history's last item)",
            "popularity": f"interactions visible before the {POPULARITY_SPLIT} targets",
            "id_kinds": {kind: "string (string_id: BLAKE2b-64 >> 1)" if kind in split.log.names else "integer"
                         for kind in ID_KINDS},
            "columns": None if columns is None else dataclasses.asdict(columns), "source": split.log.source,
            "protocol": split.protocol, "eval_batch": EVAL_BATCH,
            "counts": {"users": len(split.user_ids), "items": len(split.item_ids), "interactions": len(split.items)},
            "members": {"retrieval": recipe.retrieval_members, "ranker": recipe.ranker_members},
            "checkpoints": _save_ids(checkpoint_dir, recipe)}
    path = os.path.join(os.fspath(checkpoint_dir), SERVING_DIR)
    return checkpoint.save_checkpoint(path, serving_arrays(split, transition_weight), extra=info)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ServedRun:
    """A run ready to serve: the models, the re-ranking weights, and the split's vocabulary and
    histories as a phoenix_split.Split (ratings, timestamps and targets left out)."""

    recipe: Recipe
    retrieval: object  # SequenceRetrievalTrainer or RetrievalEnsemble
    retrieval_params: object
    ranker: object  # RankingTrainer or RankerEnsemble
    ranker_params: object
    retrieval_weight: float
    popularity_weight: float
    popularity: np.ndarray  # [N] int64 counts (module docstring)
    split: Split  # users, catalog, each user's sequence (CSR), actions
    names: dict  # {"user"/"item"/"author": [U] / [N] / [N] original strings} of string columns
    info: dict  # the serving directory's JSON
    path: Optional[str] = None  # the run directory it was read from
    transition_weight: float = 0.0
    transitions: Optional[tuple] = None  # (indptr [N + 1], to [P], counts [P]) with a transition weight
    _items: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)  # [N, D] encoded once

    @functools.cached_property
    def transition_pairs(self) -> tuple:
        """two_stage.transition_pairs of `transitions`, built once for every request."""
        return two_stage.transition_pairs(self.transitions)

    @property
    def item_vectors(self) -> np.ndarray:
        """Candidate-tower representations [N, D] of the catalog (one call, as the evaluation's)."""
        if self._items is None:
            self._items = two_stage.encode_items(self.retrieval, self.retrieval_params, self.split)
        return self._items

    def user_tokens(self, rows) -> list:
        """Original ids of user rows [U] (str for a string column, int otherwise)."""
        return self._tokens("user", self.split.user_ids, rows)

    def item_tokens(self, columns) -> list:
        """Original ids of catalog columns [...] (flattened)."""
        return self._tokens("item", self.split.item_ids, columns)

    def _tokens(self, kind, raw, index) -> list:
        index = np.asarray(index).ravel()
        return self.names[kind][index].tolist() if kind in self.names else raw[index].tolist()

    def raw_id(self, kind: str, value, name: str) -> int:
        """The raw (hashed) id of original id `value` of column `kind`, as the log made it."""
        if kind in self.names:
            return string_id(str(value))
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
            return int(value)
        if isinstance(value, str) and value.isdigit() and value.isascii() and str(int(value)) == value:
            return int(value)
        raise ValueError(f"{name}: expected a non-negative integer id (the log's {kind} ids are integers), "
                         f"got {value!r}")

    def user_row(self, user) -> Optional[int]:
        """The row of original user id `user`, or None if the log does not hold it."""
        raw = self.raw_id("user", user, "user")
        row = int(np.searchsorted(self.split.user_ids, raw))
        if row < len(self.split.user_ids) and self.split.user_ids[row] == raw and (
                "user" not in self.names or self.names["user"][row] == str(user)):
            return row
        return None


def _member_paths(checkpoint_dir: str, stage: str, members: int) -> list:
    return [os.path.join(checkpoint_dir, two_stage.member_stage(m, stage)) for m in range(members)]


def _load_params(paths: list, save_ids: dict):
    """The params of the checkpoints at `paths` (one, or a tuple for an ensemble); ServingError if one
    is missing or is not the save serving/ was written for (`save_ids`)."""
    params = []
    for path in paths:
        try:
            saved = checkpoint.load_checkpoint(path)
        except FileNotFoundError:
            raise ServingError(f"{path}: missing; the run directory holds serving/ but not this checkpoint") from None
        expected = save_ids.get(os.path.basename(path))
        if saved.meta["save_id"] != expected:
            raise ServingError(f"{path}: save {saved.meta['save_id']}, but serving/ was written for save {expected} "
                               "(a later run replaced the checkpoint and stopped before its evaluation?); train the "
                               "run again to serve it")
        params.append(saved.params)
    return params[0] if len(params) == 1 else tuple(params)


def _model(members: list, kind):
    """One member as it is, or the ensemble (`kind`) of several: what run() evaluated."""
    return members[0] if len(members) == 1 else kind(members)


def load_run(checkpoint_dir) -> ServedRun:
    """The run in `checkpoint_dir` ready to serve (phoenix_pipeline.run wrote it): serving/ and the
    best checkpoints of both stages (every ensemble member). Needs no log and no split."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    manifest = run_dir.read_manifest(checkpoint_dir)
    if manifest.get("kind") != "pipeline":
        raise ServingError(f"{checkpoint_dir}: a {manifest.get('kind')!r} run; only runs of phoenix_pipeline.run "
                           "(run_train.py --data LOG) are served")
    path = os.path.join(checkpoint_dir, SERVING_DIR)
    if not os.path.isdir(path):
        raise ServingError(f"{path}: missing; the run was written before serving/ existed or stopped before its "
                           "evaluation: train it again to serve it")
    saved = checkpoint.load_checkpoint(path)
    info = saved.extra or {}
    if info.get("format") != SERVING_FORMAT or info.get("format_version") != SERVING_VERSION:
        raise ServingError(f"{path}: serving format {info.get('format')!r} version {info.get('format_version')!r}, "
                           f"this Phoenix reads {SERVING_FORMAT!r} version {SERVING_VERSION}")
    recipe = Recipe(**info["recipe"])
    arrays = saved.params
    items = arrays["item_ids"][arrays["history_columns"]]  # [R] raw ids
    split = Split(user_ids=arrays["user_ids"], offsets=arrays["offsets"], items=items,
                  ratings=np.zeros(len(items), np.float32), timestamps=np.zeros(len(items), np.int64),
                  item_columns=arrays["history_columns"].astype(np.int64), train_len=np.diff(arrays["offsets"]),
                  has_eval=np.zeros(len(arrays["user_ids"]), bool), item_ids=arrays["item_ids"],
                  item_authors=arrays["item_authors"], actions=_unpack_actions(arrays["history_actions"]))
    names = {kind: _decode_strings(stored) for kind, stored in arrays.get("names", {}).items()}
    retrieval = _model([two_stage.SequenceRetrievalTrainer(two_stage.retrieval_config(recipe),
                                                           two_stage.hash_config(recipe),
                                                           temperature=recipe.temperature)
                        for _ in range(recipe.retrieval_members)], two_stage.RetrievalEnsemble)
    ranker = _model([training.make_ranking_trainer(two_stage.ranker_config(recipe), two_stage.hash_config(recipe))
                     for _ in range(recipe.ranker_members)], two_stage.RankerEnsemble)
    return ServedRun(recipe=recipe, retrieval=retrieval,
                     retrieval_params=_load_params(_member_paths(checkpoint_dir, "retrieval",
                                                                 recipe.retrieval_members), info["checkpoints"]),
                     ranker=ranker,
                     ranker_params=_load_params(_member_paths(checkpoint_dir, "ranker", recipe.ranker_members),
                                                info["checkpoints"]),
                     retrieval_weight=info["retrieval_weight"], popularity_weight=info["popularity_weight"],
                     popularity=arrays["popularity"], split=split, names=names, info=info, path=checkpoint_dir,
                     transition_weight=float(info.get("transition_weight", 0.0)), transitions=_transitions(arrays))


def _transitions(arrays: dict) -> Optional[tuple]:
    """The transition counts' CSR (indptr, to, counts) of serving arrays, or None without them."""
    if "transition_indptr" not in arrays:
        return None
    return arrays["transition_indptr"], arrays["transition_to"], arrays["transition_count"]


def served_in_memory(split: LogSplit, recipe: Recipe, retrieval, retrieval_params, ranker, ranker_params,
                     retrieval_weight: float, popularity_weight: float, checkpoint_dir=None,
                     transition_weight: float = 0.0) -> ServedRun:
    """The ServedRun that load_run(checkpoint_dir) would return, from what run() holds in memory."""
    arrays = serving_arrays(split, transition_weight)
    names = {kind: _decode_strings(stored) for kind, stored in arrays.get("names", {}).items()}
    return ServedRun(recipe=recipe, retrieval=retrieval, retrieval_params=retrieval_params, ranker=ranker,
                     ranker_params=ranker_params, retrieval_weight=float(retrieval_weight),
                     popularity_weight=float(popularity_weight), popularity=arrays["popularity"], split=split,
                     names=names, info={"source": split.log.source, "protocol": split.protocol},
                     path=None if checkpoint_dir is None else os.fspath(checkpoint_dir),
                     transition_weight=float(transition_weight), transitions=_transitions(arrays))


# ---------------------------------------------------------------------------------------------
# Ranking: one code path for one user, every user, and (through the same functions) the evaluation
# ---------------------------------------------------------------------------------------------


def history_mask(split: Split, rows: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """[U, N] bool: the items of positions offsets[row] .. ends - 1 of each user (never recommended)."""
    lengths = ends - split.offsets[rows]  # [U]
    owner = np.repeat(np.arange(len(rows)), lengths)  # [sum lengths]
    first = np.cumsum(lengths) - lengths
    positions = split.offsets[rows][owner] + np.arange(lengths.sum()) - first[owner]
    mask = np.zeros((len(rows), len(split.item_ids)), bool)
    mask[owner, split.item_columns[positions]] = True
    return mask


def top_items(served: ServedRun, split: Split, rows, ends) -> tuple[np.ndarray, np.ndarray]:
    """(catalog columns [U, K], scores [U, K]) best first: the two-stage ranking of each user `rows`
    [U] whose history is positions offsets[row] .. ends - 1 of `split` (oldest first), K = retrieve_k.

    The evaluation's computation (phoenix_pipeline.evaluate_stages: StageOne, TwoStage.evaluate)
    step by step: the last S items into the user tower (encode_users, padded EVAL_BATCH chunks),
    cosines and retrieval's top K of the items not in the history (retrieval_topk: retrieval_scores'
    blocks, topk_columns' tie rule, a chunk of users at a time), the ranker's logits of those (ranker_logits), the re-ranking score (rerank_scores)
    and a stable sort. Where fewer than K items are left, the row ends in NOT_RANKED columns with
    score -inf.
    """
    recipe = served.recipe
    rows, ends = np.asarray(rows, np.int64), np.asarray(ends, np.int64)
    examples = phoenix_split.histories(split, rows, ends, recipe.history_len)
    examples["target_post_ids"] = split.items[ends - 1]  # a placeholder candidate: the user tower alone is read
    users = two_stage.encode_users(served.retrieval, served.retrieval_params, split, examples)  # [U, D]
    found = two_stage.retrieval_topk(users, served.item_vectors, recipe.retrieve_k,
                                     lambda start, stop: history_mask(split, rows[start:stop], ends[start:stop]))
    top = found.columns  # [U, K]
    ranked = top != metrics.NOT_RANKED  # [U, K]
    columns = np.where(ranked, top, 0)  # [U, K]
    ranker_examples = phoenix_split.histories(split, rows, ends, recipe.ranker_history_len)
    logits = two_stage.ranker_logits(served.ranker, served.ranker_params, split, ranker_examples, top,
                                     recipe.num_candidates)  # [U, K, A]; NOT_RANKED columns are padding
    popularity = np.log1p(served.popularity.astype(np.float64))[columns]  # [U, K] as two_stage.log_popularity
    transition = (two_stage.transition_prior(served.transition_pairs, len(split.item_ids), split.item_columns[ends - 1],
                                             top)
                  if served.transition_weight else None)  # [U, K] from each history's last item
    final = two_stage.rerank_scores(logits, found.scores, served.retrieval_weight,
                                    recipe.temperature, recipe.score_action, popularity,
                                    served.popularity_weight, transition, served.transition_weight)  # [U, K]
    final = np.where(ranked, final, -np.inf)
    order = np.argsort(-final, axis=1, kind="stable")  # [U, K] ties keep retrieval order
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(final, order, axis=1)


def _check_k(k, recipe: Recipe) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= recipe.retrieve_k:
        raise ValueError(f"k: expected an int in [1, {recipe.retrieve_k}] (retrieve_k: the items retrieval hands "
                         f"to the ranker), got {k!r}")
    return int(k)


def _actions_of(actions, length: int) -> np.ndarray:
    """[L, A] bool of a given history's actions: click_score each (None), an [L, A] bool array, or one
    collection of ACTIONS names per item."""
    if actions is None:
        out = np.zeros((length, NUM_ACTIONS), bool)
        out[:, ACTIONS.index(INTERACTION_ACTION)] = True
        return out
    if isinstance(actions, np.ndarray) and actions.dtype == bool:
        if actions.shape != (length, NUM_ACTIONS):
            raise ValueError(f"actions: expected [{length}, {NUM_ACTIONS}] bool (one row per history item), got "
                             f"shape {list(actions.shape)}")
        return actions
    if len(actions) != length:
        raise ValueError(f"actions: expected one entry per history item ({length}), got {len(actions)}")
    out = np.zeros((length, NUM_ACTIONS), bool)
    for i, names in enumerate(actions):
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in ACTIONS]
        if unknown:
            raise ValueError(f"actions[{i}]: expected names of phoenix_inputs.ACTIONS, got {unknown!r}")
        out[i, [ACTIONS.index(n) for n in names]] = True
    return out


def given_history(served: ServedRun, user, history, actions=None) -> Split:
    """A one-user Split of `user` (raw id as the log made it) whose sequence is `history` (original
    item ids, oldest first): its catalog and authors are the run's."""
    history = list(history) if not isinstance(history, (str, bytes)) else None
    if history is None:
        raise ValueError("history: expected a list of original item ids (oldest first), got a single string")
    if not history:
        raise ValueError("history: expected at least one item (an empty history says nothing to rank by); "
                         "serve a new user once they have an interaction")
    split = served.split
    raw = np.array([served.raw_id("item", item, f"history[{i}]") for i, item in enumerate(history)], np.int64)
    columns = np.clip(np.searchsorted(split.item_ids, raw), 0, len(split.item_ids) - 1)
    known = split.item_ids[columns] == raw
    if "item" in served.names:
        known &= served.names["item"][columns] == np.array([str(item) for item in history], dtype=object)
    if not known.all():
        bad = np.flatnonzero(~known)
        listed = ", ".join(f"history[{i}]={history[i]!r}" for i in bad[:10].tolist())
        raise ValueError(f"history: {len(bad)} item(s) not in the run's catalog of {len(split.item_ids)} items "
                         f"({listed}{', ...' if len(bad) > 10 else ''}); the models never trained on them: "
                         "leave them out")
    return Split(user_ids=np.array([served.raw_id("user", user, "user")], np.int64),
                 offsets=np.array([0, len(raw)], np.int64), items=raw, ratings=np.zeros(len(raw), np.float32),
                 timestamps=np.zeros(len(raw), np.int64), item_columns=columns.astype(np.int64),
                 train_len=np.array([len(raw)], np.int64), has_eval=np.zeros(1, bool), item_ids=split.item_ids,
                 item_authors=split.item_authors, actions=_actions_of(actions, len(raw)))


def recommend(run, user, k: int = FINAL_K, history=None, actions=None) -> list[tuple]:
    """Top-k new items for `user` (an original id): [(original item id, two-stage score)] best first.

    `run`: load_run(DIR), or the dict phoenix_pipeline.run returned. history=None: the user's
    sequence as the run saved it (module docstring); history=[original item ids, oldest first]: that
    history instead (each item a click_score unless `actions` says otherwise). The ranking is the
    evaluation's (top_items); an unknown user needs a history; k must fit (ValueError naming k).
    """
    served = run["served"] if isinstance(run, dict) else run
    if not isinstance(served, ServedRun):
        raise TypeError(f"run: expected phoenix_pipeline.load_run(DIR) or the dict phoenix_pipeline.run returned, "
                        f"got {type(run).__name__}")
    k = _check_k(k, served.recipe)
    if history is None:
        if actions is not None:
            raise ValueError("actions: applies to a given history only (history=None uses the logged actions)")
        row = served.user_row(user)
        if row is None:
            raise ValueError(f"user: {user!r} is not a user of the run's log ({served.info.get('source')}); pass "
                             "history=[item ids, oldest first] to serve a new user")
        split, rows, ends = served.split, np.array([row]), served.split.offsets[row + 1:row + 2]
    else:
        split = given_history(served, user, history, actions)
        rows, ends = np.array([0]), split.offsets[1:]
    available = len(split.item_ids) - int(history_mask(split, rows, ends).sum())
    if k > available:
        raise ValueError(f"k: expected at most {available} for user {user!r} (the {len(split.item_ids)} catalog items "
                         f"minus the {len(split.item_ids) - available} in their history), got {k}")
    columns, scores = top_items(served, split, rows, ends)
    return list(zip(served.item_tokens(columns[0, :k]), scores[0, :k].tolist()))


def recommend_users(served: ServedRun, rows, k: int = FINAL_K, progress=None):
    """Yields (user rows [u], catalog columns [u, k], scores [u, k]) of users `rows` on their whole
    sequence, a chunk at a time (at most SCORE_CELLS scores held; a multiple of EVAL_BATCH users);
    each row equals recommend(served, user, k) (same computation, top_items). Rows with fewer than k
    items left end in NOT_RANKED columns. `progress(n)` is called after each chunk of n users."""
    k = _check_k(k, served.recipe)
    rows = np.asarray(rows, np.int64)
    chunk = max(1, SCORE_CELLS // max(1, len(served.split.item_ids)) // EVAL_BATCH) * EVAL_BATCH
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        columns, scores = top_items(served, served.split, part, served.split.offsets[part + 1])
        yield part, columns[:, :k], scores[:, :k]
        if progress is not None:
            progress(len(part))

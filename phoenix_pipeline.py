"""Train Phoenix on your own interaction log: a CSV (or a dict of arrays) in, evaluated checkpoints out.

    uv run run_train.py --data LOG.csv [--user-col U --item-col I --time-col T --rating-col R]
                        [--dump-topk top10.csv] [--plot] [--overwrite] [--checkpoint-dir DIR]
                        [--split time --cut-quantile 0.9]   # every Recipe field is a flag too

    import phoenix_pipeline as pipeline
    log = pipeline.read_csv("log.csv")               # or pipeline.from_arrays({"user_id": ..., ...})
    split = pipeline.split_log(log)                  # chronological leave-one-out
    result = pipeline.run(split, pipeline.Recipe(), "runs/mine")   # both stages, best checkpoints, table
    pipeline.recommend(result, split, "u17")         # retrieve + re-rank for one user

Prints on stderr each stage's progress (phoenix_training.fit: step, loss, steps/s, ETA) and its
validation HR@10 / NDCG@10; on stdout a markdown table of HR@10, NDCG@10, HR@50 and MRR on
validation and test for the popularity and transition baselines (movielens.py's code), retrieval
alone and two-stage; with --dump-topk, every test user's top-10 (original ids) as CSV and
check_dump's HR@10 / NDCG@10 of that file. Time grows with the number of training examples.
docs/notes.md gives the measurements behind the recipe; train_movielens.py runs MovieLens through it.

The log (reading, splitting) is phoenix_log.py; the recipe, batches and both stages'
evaluators are phoenix_two_stage.py; this module trains a run and serves its results.

Outputs (the run directory: --checkpoint-dir, default $PHOENIX_CACHE_DIR/checkpoints/<log name>)
  retrieval/, ranker/  the best checkpoints by validation NDCG@10 (Trainer.save; load them with
                       RecsysRetrievalInferenceRunner / RecsysInferenceRunner.from_checkpoint). A
                       run refuses a directory holding an earlier run's unless overwrite=True.
  retrieval.1/, ...    with Recipe.retrieval_members > 1, the other members' best checkpoints (each
                       loads into RecsysRetrievalInferenceRunner; the ensemble's user and item
                       vectors are the members' concatenated / sqrt(members), RetrievalEnsemble).
  ranker.1/, ...       with Recipe.ranker_members > 1, likewise (the ensemble averages the logits).
  metrics.jsonl        one JSON object per line after the header line phoenix_run_dir.METRICS_HEADER:
                       {"stage", "step", "loss", ...} per progress log, {"stage", "step",
                       "eval/HR@10", ...} per validation, one per table row (read_metrics).
  curves.png           with --plot (needs matplotlib: `uv sync --extra plot`).
  run.json             the manifest, written first (phoenix_run_dir): kind, source, seed, recipe.
  Nothing else in the directory is touched. Before the log is read, the command line refuses
  outputs over its inputs (a dump or run directory that is the log, a link to it, ...), an
  existing --dump-topk file without --overwrite, and, with or without --overwrite, anything at
  these names that Phoenix did not write (phoenix_run_dir.check_outputs lists them all).


Shape glossary
  U  users   N  catalog items   K  retrieved per user
"""

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Optional

import numpy as np

import movielens as ml
import phoenix_checkpoint as checkpoint
import phoenix_hashing as hashing
import phoenix_metrics as metrics
import phoenix_protocols as protocols
import phoenix_run_dir as run_dir
import phoenix_training as training
from phoenix_inputs import HashConfig
# The log's and the two stages' public names are re-exported: `pipeline.X` is the one-stop API.
from phoenix_log import (AUTO_COLUMN_NAMES, COLUMN_FLAGS, DEFAULT_CUT_QUANTILE, DEFAULT_RATING_ACTIONS,  # noqa: F401
                         DUPLICATE_RULES, SPLIT_PROTOCOLS, STDIN, Columns, Log, LogError, LogSplit, check_log_path,
                         check_rating_actions, check_split_options, describe, from_arrays, histories,
                         phoenix_examples, read_csv, read_log, split_log, string_id)
from phoenix_two_stage import (FINAL_K, POPULARITY_WEIGHTS, RETRIEVAL_WEIGHTS, RETRIEVE_K, Recipe, RecipeError,  # noqa: F401
                               RankerEnsemble, RetrievalEnsemble, SequenceRetrievalTrainer, StageOne, TwoStage,
                               action_weights, check_recipe, ensemble, member_stage,
                               encode_items, encode_users, example_representations, hard_negative_pool,
                               hash_config, item_examples, optimizer_config, prefix_user_representations,
                               ranker_batches, ranker_candidates, ranker_config, ranker_logits, recommendable,
                               choose_rerank_weights, log_popularity, rerank_scores, resolve_recipe,
                               retrieval_batches, retrieval_config,
                               training_windows, window_examples, host_copy, warm_start, start_retrieval,
                               start_ranker, stage_steps, eval_mask)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
STAGES = ("retrieval", "ranker")
DUMP_TOLERANCE = 1e-9  # the table's and check_dump's HR / NDCG sum the same hits in another order
# What a run writes in its directory ({name regex: phoenix_run_dir kind}): nothing else there is touched,
# and whatever is at these names must be Phoenix's own (phoenix_run_dir.check_outputs).
RUN_ENTRIES = {r"(retrieval|ranker)(\.[0-9]+)?": "checkpoint",  # member_stage's names
               re.escape(METRICS_FILE): "metrics", re.escape(PLOT_FILE): "plot",
               re.escape(run_dir.MANIFEST_FILE): "manifest",
               re.escape("train+val"): "checkpoints"}  # phoenix_protocols.retrain_stages' checkpoints


class MissingExtraError(ImportError):
    """An optional dependency (an extra of pyproject.toml) that a feature asked for is not installed."""


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class MetricsLog:
    """Appends JSON lines to `path` (flushed per line, so a crashed run keeps what it logged); the
    first line, phoenix_run_dir.METRICS_HEADER, marks the file as Phoenix's for a later --overwrite."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(run_dir.METRICS_HEADER) + "\n")

    def write(self, **entry) -> None:
        entry = {k: _json_number(v) for k, v in entry.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _json_number(value):
    """NumPy/JAX scalars and arrays as Python numbers and lists; NaN and inf (an unmeasured steps/s)
    as null, so every line is valid JSON."""
    if isinstance(value, str) or value is None:
        return value
    if np.ndim(value):
        return [_json_number(v) for v in np.asarray(value).tolist()]
    value = float(value) if not isinstance(value, (bool, int, np.integer)) else int(value)
    return value if math.isfinite(value) else None


def read_metrics(path) -> list[dict]:
    """The entries of a metrics.jsonl (its header line left out); a bad line raises LogError naming it."""
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise LogError(f"{path}:{number}: not JSON ({error})") from None
    return entries[1:] if entries[:1] == [run_dir.METRICS_HEADER] else entries


def _fit_keeping_best(trainer, state, batches, steps: int, evaluate, path: str, extra: dict, evals: int, stream,
                      stage: str, log: Optional[MetricsLog]):
    """training.fit with `evaluate(params) -> metrics` on validation `evals` times (the last at the
    end); the best by NDCG@10 is saved to `path` and returned as (host params, its metrics). Each fit
    history entry goes to `log` with the stage name as it is made (so metrics.jsonl grows during training)."""
    best = {"NDCG@10": -math.inf}
    kept = {}

    def validate(state):
        nonlocal best
        result = evaluate(state.params)
        if result["NDCG@10"] > best["NDCG@10"]:
            best = {**result, "step": int(state.step)}
            kept["params"] = host_copy(state.params)
            trainer.save(path, state, extra={**extra, "val": best})
        return {k: result[k] for k in ("HR@10", "NDCG@10")}

    try:
        training.fit(trainer, state, batches, steps, log_every=max(1, min(50, steps // 10)),
                     eval_fn=validate, eval_every=max(1, -(-steps // evals)), stream=stream,
                     on_log=None if log is None else (lambda entry: log.write(stage=stage, **entry)))
    except training.TrainingStopped as stop:  # a clean stop (phoenix_stop): say where the best so far is
        stop.stage = stop.stage or stage
        if "params" in kept:
            stop.kept.append(_best_at(path, best))
        raise
    return kept["params"], best


# What a stopped run's line says instead of a resume command (phoenix_stop.TrainingStopped.line).
NOT_RESUMABLE = "resuming a CSV or MovieLens run is not supported yet; rerunning it needs --overwrite"


def _best_at(path: str, best: dict) -> str:
    return f"{path} (best val NDCG@10 {best['NDCG@10']:.4f} at step {best['step']})"


def _extra(recipe: Recipe, seed: int, split: LogSplit) -> dict:
    """What a checkpoint records about its run: recipe, seed, and how raw ids were made."""
    return {"recipe": dataclasses.asdict(recipe), "seed": seed, "source": split.log.source,
            "string_id_columns": sorted(split.log.names)}


def _train_members(stage: str, members: int, start, evaluate, unit: str, split: LogSplit, recipe: Recipe,
                   seed: int, checkpoint_dir: str, stream, log, kind):
    """Trains `members` models of `stage` (start(member) -> (trainer, state, batches, steps);
    evaluate(trainer, params) -> val metrics; `unit`: what one step takes, for the log), each
    keeping its own best checkpoint in member_stage(m, stage). Returns (model, params, best): one
    member as it is, or the ensemble (`kind`) of all and the tuple of their params, whose best val
    metrics are then the ensemble's, with "step" the first member's and "steps" every member's."""
    trainers, params, bests = [], [], []
    for member in range(members):
        trainer, state, batches, steps = start(member)
        name = member_stage(member, stage)
        print(f"{name}: {steps} steps of {unit}", file=stream)
        try:
            kept, best = _fit_keeping_best(trainer, state, batches, steps, lambda p: evaluate(trainer, p),
                                           os.path.join(checkpoint_dir, name), _extra(recipe, seed, split),
                                           recipe.evals_per_stage, stream, name, log)
        except training.TrainingStopped as stop:  # the members trained before keep their best checkpoints
            stop.kept[:0] = [_best_at(os.path.join(checkpoint_dir, member_stage(m, stage)), b)
                             for m, b in enumerate(bests)]
            stop.why_not = stop.why_not or NOT_RESUMABLE
            raise
        trainers.append(trainer)
        params.append(kept)
        bests.append(best)
    model, params = ensemble(trainers, params, kind)
    if members == 1:
        return model, params, bests[0]
    for member, member_best in enumerate(bests):
        print(f"{member_stage(member, stage)}: best val NDCG@10 {member_best['NDCG@10']:.4f} at step "
              f"{member_best['step']}", file=stream)
    best = evaluate(model, params)
    return model, params, {**best, "step": bests[0]["step"], "steps": [b["step"] for b in bests]}


def train_retrieval(split: LogSplit, recipe: Recipe, seed: int, checkpoint_dir: str, stream=None,
                    log: Optional[MetricsLog] = None, data_parallel=False):
    """Trains the two-tower model, or each of Recipe.retrieval_members (each keeping its own best
    checkpoint, in member_stage(m)); returns (model, best params, best val metrics): the trainer and
    its params, or a RetrievalEnsemble and the tuple of the members' params, whose val metrics are
    then the ensemble's (with "step" the first member's and "steps" every member's best step).
    `data_parallel`: training.Trainer's (each batch split over the devices, the state replicated)."""
    return _train_members(
        "retrieval", recipe.retrieval_members,
        lambda member: start_retrieval(split, recipe, seed, data_parallel, member=member),
        lambda model, params: StageOne(model, params, split, "val", recipe.history_len, recipe.retrieve_k).metrics(),
        f"{recipe.retrieval_batch_size} windows ({len(training_windows(split, recipe.history_len)[0])} windows "
        "per epoch)", split, recipe, seed, checkpoint_dir, stream, log, RetrievalEnsemble)


def train_ranker(split: LogSplit, pool, recipe: Recipe, seed: int, checkpoint_dir: str, val_stage_one: StageOne,
                 retrieval_params=None, stream=None, log: Optional[MetricsLog] = None, data_parallel=False):
    """Trains the ranker, or each of Recipe.ranker_members (checkpoints and return value as
    train_retrieval's, a RankerEnsemble for several). Model selection by the validation two-stage
    NDCG@10 of the ranker's own score (retrieval weight 0)."""
    return _train_members(
        "ranker", recipe.ranker_members,
        lambda member: start_ranker(split, pool, recipe, seed, retrieval_params, data_parallel, member=member),
        lambda model, params: TwoStage(val_stage_one, model, params, split, "val", recipe).evaluate(
            0.0, recipe.temperature)[0],
        f"{recipe.ranker_batch_size} examples x {recipe.num_candidates} candidates",
        split, recipe, seed, checkpoint_dir, stream, log, RankerEnsemble)


def load_members(checkpoint_dir: str, params, stage: str = "retrieval"):
    """The best params of `stage` read back from checkpoint_dir (`params`, as train_retrieval /
    train_ranker returned them, gives the tree to fill: one model's, or the tuple of an ensemble's)."""
    if not isinstance(params, tuple):
        return checkpoint.load_checkpoint(os.path.join(checkpoint_dir, stage), params_template=params).params
    return tuple(checkpoint.load_checkpoint(os.path.join(checkpoint_dir, member_stage(m, stage)),
                                            params_template=p).params for m, p in enumerate(params))


def _at(best: dict) -> str:
    """Where a stage's best checkpoint was: "step N", or each ensemble member's step."""
    return f"steps {best['steps']} ({len(best['steps'])} members)" if "steps" in best else f"step {best['step']}"


def first_member(params):
    """A retrieval model's params, or the first ensemble member's (what the ranker warm-starts from)."""
    return params[0] if isinstance(params, tuple) else params


def evaluate_stages(split: LogSplit, retrieval, retrieval_params, ranker, ranker_params, recipe: Recipe):
    """Validation and test rows of the table, baselines included.

    The re-ranking weights (of the retrieval logit and of the popularity prior) are the recipe's,
    or the pair with the best validation NDCG@10 (choose_rerank_weights). Returns (table
    {(split, name): metrics}, re-ranked top-K columns {split: [U, K]}, StageOne per split, TwoStage
    per split, (retrieval weight, popularity weight)).
    """
    table, reranked, stage_one, two_stage = {}, {}, {}, {}
    for which in ("val", "test"):
        stage_one[which] = StageOne(retrieval, retrieval_params, split, which, recipe.history_len, recipe.retrieve_k)
        two_stage[which] = TwoStage(stage_one[which], ranker, ranker_params, split, which, recipe)
    weights = choose_rerank_weights(two_stage["val"], recipe)
    for which in ("val", "test"):
        for name in ml.BASELINES:
            table[(which, name)] = ml.evaluate_baseline(split, which, name)
        table[(which, "retrieval")] = stage_one[which].metrics()
        table[(which, "two-stage")], reranked[which] = two_stage[which].evaluate(
            weights[0], recipe.temperature, weights[1])
    return table, reranked, stage_one, two_stage, weights


def hash_collisions(split: ml.Split, hashes: HashConfig) -> dict:
    """{id type: (ids, ids sharing both their rows with another id, ids sharing at least one row)}."""
    out = {}
    for name, ids in (("user", split.user_ids), ("post", split.item_ids), ("author", np.unique(split.item_authors))):
        values = hashing.hash_ids(ids, hashes, name)  # [V, H]
        one = np.zeros(len(ids), bool)
        for h in range(values.shape[1]):
            one |= hashing.colliding_mask(values[:, h:h + 1])
        out[name] = (len(ids), int(hashing.colliding_mask(values).sum()), int(one.sum()))
    return out


def format_table(rows: dict) -> str:
    """Markdown table from {(split, name): metrics dict}."""
    lines = ["| split | model | HR@10 | NDCG@10 | HR@50 | MRR |", "|---|---|---:|---:|---:|---:|"]
    for (which, name), m in rows.items():
        cells = [f"{m[k]:.4f}" if k in m else "n/a" for k in ("HR@10", "NDCG@10", "HR@50", "MRR")]
        lines.append(f"| {which} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_run_dir(path, overwrite: bool = False, inputs=(), files=None) -> None:
    """Refuses, before anything is written, a run directory where a run would replace what it must
    not: an earlier run's checkpoints or metrics unless `overwrite` (FileExistsError), anything at
    RUN_ENTRIES' names that Phoenix did not write even with `overwrite` (ForeignFilesError, all of
    them listed), a file, an input. `inputs` (phoenix_run_dir.Input) and `files` ({flag: path} of
    other outputs, such as the dump) are checked with it (phoenix_run_dir.check_outputs)."""
    run_dir.check_outputs(inputs, [path], RUN_ENTRIES, files, overwrite)


def run(split: LogSplit, recipe: Recipe, checkpoint_dir, seed: int = 0, overwrite: bool = False,
        plot: bool = False, stream=None, title: Optional[str] = None, data_parallel=False, extra_rows=None) -> dict:
    """Trains both stages, keeps the best checkpoints, evaluates them read back; prints the table.

    Progress goes to `stream` (default stderr), the table to stdout. Returns {"table": {(split, name):
    metrics}, "reranked": {split: [U, K] columns}, "retrieval_weight", "popularity_weight" (the re-ranking
    weights chosen), "retrieval" / "ranker" (trainers),
    "retrieval_params" / "ranker_params" (best, as saved), "retrieval_best" / "ranker_best" (their val
    metrics and step), "stage_one" / "two_stage" (per split), "times", "wall_s", "checkpoint_dir",
    "recipe" (with table sizes resolved), "split", "extra"}.

    extra_rows (phoenix_protocols.extra_rows): called after the evaluation with {"split", "recipe",
    "seed", "checkpoint_dir", "stream", "retrieval_best", "ranker_best", "retrieval_weight",
    "popularity_weight", "data_parallel"}; returns (more table rows, info kept as result["extra"]).
    """
    stream = sys.stderr if stream is None else stream
    checkpoint_dir = str(checkpoint_dir)
    check_run_dir(checkpoint_dir, overwrite)
    if plot:
        _pyplot()  # a missing matplotlib fails now, not after training
    recipe = resolve_recipe(recipe, split)
    check_recipe(split, recipe)
    start = time.perf_counter()
    run_dir.write_manifest(checkpoint_dir, "pipeline", RUN_ENTRIES, source=split.log.source, seed=seed,
                           protocol=split.protocol, recipe=dataclasses.asdict(recipe))
    log = MetricsLog(os.path.join(checkpoint_dir, METRICS_FILE))
    print(f"{describe(split)}; seed {seed}\n{recipe}", file=stream)
    print("hash collisions (ids, sharing all rows, sharing a row): " + ", ".join(
        f"{name}s {c}" for name, c in hash_collisions(split, hash_config(recipe)).items()), file=stream)

    print("\n== stage 1: retrieval (in-batch softmax, logQ correction, accidental-hit masking)", file=stream)
    t0 = time.perf_counter()
    retrieval, retrieval_params, retrieval_best = train_retrieval(split, recipe, seed, checkpoint_dir, stream, log,
                                                                  data_parallel)
    times = {"retrieval": time.perf_counter() - t0}
    print(f"retrieval: best val NDCG@10 {retrieval_best['NDCG@10']:.4f} at {_at(retrieval_best)}, "
          f"{times['retrieval']:.0f} s", file=stream)

    t0 = time.perf_counter()
    pool = (hard_negative_pool(retrieval, retrieval_params, split, recipe.history_len, recipe.negative_pool)
            if recipe.hard_negatives else None)
    val_one = StageOne(retrieval, retrieval_params, split, "val", recipe.history_len, recipe.retrieve_k)
    times["mining"] = time.perf_counter() - t0

    print(f"\n== stage 2: ranker (target + {recipe.hard_negatives} hard + {recipe.random_negatives} random "
          f"negatives, multi-action BCE); negatives mined in {times['mining']:.0f} s", file=stream)
    t0 = time.perf_counter()
    try:
        ranker, ranker_params, ranker_best = train_ranker(
            split, pool, recipe, seed, checkpoint_dir, val_one,
            first_member(retrieval_params) if recipe.ranker_init_from_retrieval else None, stream, log, data_parallel)
    except training.TrainingStopped as stop:  # a clean stop: the trained retrieval stage is kept
        paths = [os.path.join(checkpoint_dir, member_stage(m, "retrieval")) for m in range(recipe.retrieval_members)]
        stop.kept.insert(0, f"{', '.join(paths)} (retrieval, best val NDCG@10 {retrieval_best['NDCG@10']:.4f} at "
                            f"{_at(retrieval_best)})")
        raise
    times["ranker"] = time.perf_counter() - t0
    print(f"ranker: best val NDCG@10 {ranker_best['NDCG@10']:.4f} at {_at(ranker_best)}, "
          f"{times['ranker']:.0f} s", file=stream)

    t0 = time.perf_counter()
    # The final evaluation reads the best weights back from the saved checkpoints.
    retrieval_params = load_members(checkpoint_dir, retrieval_params, "retrieval")
    ranker_params = load_members(checkpoint_dir, ranker_params, "ranker")
    table, reranked, stage_one, two_stage, (weight, prior) = evaluate_stages(
        split, retrieval, retrieval_params, ranker, ranker_params, recipe)
    times["evaluation"] = time.perf_counter() - t0
    extra = {}
    if extra_rows is not None:  # other protocols and reference models (phoenix_protocols.py)
        t0 = time.perf_counter()
        more, extra = extra_rows({"split": split, "recipe": recipe, "seed": seed, "checkpoint_dir": checkpoint_dir,
                                  "stream": stream, "retrieval_best": retrieval_best, "ranker_best": ranker_best,
                                  "retrieval_weight": weight, "popularity_weight": prior,
                                  "data_parallel": data_parallel})
        table = protocols.ordered({**table, **more})
        times["extra"] = time.perf_counter() - t0
    wall = time.perf_counter() - start
    for (which, name), m in table.items():
        log.write(stage="evaluation", split=which, model=name, **m)
    print(f"evaluation {times['evaluation']:.0f} s; re-ranking score = ranker {recipe.score_action} logit + "
          f"{weight:g} x retrieval cosine / {recipe.temperature:g} + {prior:g} x log(1 + item interactions) "
          "(weights chosen on validation)", file=stream)
    if plot:
        print(f"curves: {plot_curves(log.path, os.path.join(checkpoint_dir, PLOT_FILE))}", file=stream)

    title = title or f"{split.log.source}, {split.protocol}"
    print(f"\n{title}, all {len(split.item_ids)} items ranked, seed {seed}, wall time {wall:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")\n")
    print(format_table(table))
    return {"table": table, "reranked": reranked, "retrieval_weight": weight, "popularity_weight": prior,
            "retrieval": retrieval,
            "retrieval_params": retrieval_params, "ranker": ranker, "ranker_params": ranker_params,
            "retrieval_best": retrieval_best, "ranker_best": ranker_best, "stage_one": stage_one,
            "two_stage": two_stage, "times": times, "wall_s": wall, "checkpoint_dir": checkpoint_dir,
            "recipe": recipe, "split": split, "extra": extra}


# ---------------------------------------------------------------------------------------------
# Serving one user, dumps, curves
# ---------------------------------------------------------------------------------------------


def user_row(split: LogSplit, user) -> int:
    """The split's row of `user`, an original id (a string for a string column); ValueError if absent."""
    try:
        raw = string_id(str(user)) if "user" in split.log.names else int(user)
    except ValueError:
        raise ValueError(f"user: expected an integer id (the log's user ids are integers), got {user!r}") from None
    row = int(np.searchsorted(split.user_ids, raw))
    if row >= len(split.user_ids) or split.user_ids[row] != raw:
        raise ValueError(f"user: {user!r} is not in {split.log.source}")
    return row


def user_examples(split: LogSplit, user, history_len: int) -> dict:
    """Examples dict (phoenix_examples keys but the targets) of one user whose history is the last
    S of everything the log holds for them: what serving sees."""
    row = user_row(split, user)
    rows, ends = np.array([row]), np.array([split.offsets[row + 1]])
    examples = histories(split, rows, ends, history_len)
    examples["target_post_ids"] = split.items[ends - 1]  # a placeholder candidate for user-tower-only calls
    return examples


def user_batch(split: LogSplit, user, history_len: int, hashes: HashConfig, candidate_ids=None):
    """RecsysBatch [1, S] of `user`'s latest history with candidates `candidate_ids` [C] (raw item ids,
    default one placeholder): the input of the runners' retrieve / rank for that user."""
    candidates = None if candidate_ids is None else np.asarray(candidate_ids, np.int64)[None, :]  # [1, C]
    return ml.phoenix_batch(split, user_examples(split, user, history_len), hashes, candidates)


def items_batch(split: ml.Split, hashes: HashConfig):
    """RecsysBatch [1, N] whose candidates are every catalog item: the corpus for the candidate tower."""
    return ml.phoenix_batch(split, item_examples(split), hashes, split.item_ids[None, :])


def seen_items(split: LogSplit, user) -> np.ndarray:
    """[N] bool: the catalog items the log holds for `user` (never recommended again)."""
    row = user_row(split, user)
    seen = np.zeros(len(split.item_ids), bool)
    seen[split.item_columns[split.offsets[row]:split.offsets[row + 1]]] = True
    return seen


def recommend(result: dict, split: LogSplit, user, k: int = FINAL_K) -> list[tuple]:
    """Top-k new items for `user` (an original id) after everything the log holds for them.

    Retrieval's top retrieve_k of the items the user has not seen, re-ranked as in the evaluation
    (ranker logit + the chosen weights x retrieval logit and popularity prior, the prior counting
    every interaction of the log). Returns [(item id, score)] best first.
    """
    recipe, retrieval, ranker = result["recipe"], result["retrieval"], result["ranker"]
    seen = seen_items(split, user)[None, :]  # [1, N]
    items = encode_items(retrieval, result["retrieval_params"], split)  # [N, D]
    users = encode_users(retrieval, result["retrieval_params"], split, user_examples(split, user, recipe.history_len))
    scores = users @ items.T  # [1, N]
    top = metrics.topk_columns(scores, min(recipe.retrieve_k, int((~seen).sum())), seen)  # [1, K]
    logits = ranker_logits(ranker, result["ranker_params"], split, user_examples(split, user, recipe.ranker_history_len),
                           top, recipe.num_candidates)  # [1, K, A]
    final = rerank_scores(logits, np.take_along_axis(scores, top, axis=1), result["retrieval_weight"],
                          recipe.temperature, recipe.score_action, log_popularity(split, None)[top],
                          result["popularity_weight"])[0]  # [K]
    order = np.argsort(-final, kind="stable")[:k]
    return list(zip(split.log.tokens("item", split.item_ids[top[0, order]]), final[order].tolist()))


def dump_topk(path, split: LogSplit, topk_columns: np.ndarray) -> None:
    """CSV `user_id,item_1,...,item_K` of every evaluated user, original ids, written atomically
    (its directory created if missing). A directory or other non-file at `path` is refused."""
    path = Path(path)
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise run_dir.OutputError(f"dump path {path}: is {run_dir.path_kind(path)}, not a file")
    users = split.log.tokens("user", split.user_ids[split.eval_users()])
    items = split.log.tokens("item", split.item_ids[topk_columns])
    K = topk_columns.shape[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["user_id"] + [f"item_{j + 1}" for j in range(K)])
            for u, user in enumerate(users):
                writer.writerow([user] + items[u * K:(u + 1) * K])
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_dump(path, log: Log, k: int = FINAL_K) -> dict:
    """HR@k / NDCG@k of a dump against leave-one-out test targets rebuilt from the log in plain Python
    (independent of split_log and phoenix_metrics.py, as an outside evaluator would be): per user,
    interactions by (timestamp, input order), each item's first one kept, the last = the target."""
    by_user = {}
    for r, (user, item, stamp) in enumerate(zip(log.tokens("user", log.user), log.tokens("item", log.item),
                                                log.timestamp.tolist())):
        by_user.setdefault(str(user), []).append((stamp, r, str(item)))
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    dumped = {row[0]: row[1:k + 1] for row in rows[1:] if row}
    hits = gain = evaluated = history_hits = 0
    for user, events in by_user.items():
        sequence = list(dict.fromkeys(item for _, _, item in sorted(events)))  # first occurrences, in time order
        if len(sequence) < ml.MIN_EVAL_RATINGS:
            continue
        evaluated += 1
        target, top = sequence[-1], dumped.get(user, [])
        history_hits += len(set(top) & set(sequence[:-1]))
        if target in top:
            hits += 1
            gain += 1.0 / math.log2(top.index(target) + 2)
    return {f"HR@{k}": hits / evaluated, f"NDCG@{k}": gain / evaluated, "num_users": evaluated,
            "missing_users": len(set(by_user) - set(dumped)) if evaluated else 0,
            "history_items_in_topk": history_hits}


_PLOT_TITLES = {"retrieval": "retrieval (validation: retrieval alone)",
                "ranker": "ranker (validation: two-stage, ranker score alone)"}


def _pyplot():
    """matplotlib.pyplot with the file-only backend, or MissingExtraError saying how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtraError("--plot (plot_curves) needs matplotlib, the 'plot' extra, which is not installed: "
                                "in a clone, `uv sync --extra plot` (or `pip install '.[plot]'`); an installed "
                                "package, `pip install 'phoenix-recsys[plot]'`") from None
    return plt


def plot_curves(metrics_path, png_path) -> str:
    """PNG of each stage's training loss and validation HR@10 / NDCG@10 by step; returns its path.
    Needs matplotlib (the `plot` extra)."""
    plt = _pyplot()
    entries = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(STAGES), figsize=(6 * len(STAGES), 4.5), squeeze=False)
    for ax, stage in zip(axes[0], STAGES):
        train = [e for e in entries if e.get("stage") == stage and "loss" in e]
        val = [e for e in entries if e.get("stage") == stage and "eval/NDCG@10" in e]
        ax.plot([e["step"] for e in train], [e["loss"] for e in train], color="tab:blue", label="training loss")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss", color="tab:blue")
        ax.set_title(_PLOT_TITLES[stage])
        right = ax.twinx()
        for key, style in (("eval/HR@10", "o-"), ("eval/NDCG@10", "s--")):
            right.plot([e["step"] for e in val], [e[key] for e in val], style, color="tab:orange",
                       label="validation " + key.split("/")[1])
        right.set_ylabel("validation", color="tab:orange")
        lines = ax.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3,
                  frameon=False)  # below the axes: curves are never hidden
    fig.tight_layout()
    fig.savefig(png_path, dpi=100, metadata={"Source": run_dir.PLOT_SOURCE})  # marks it ours (--overwrite)
    plt.close(fig)
    return str(png_path)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _optional(kind):
    """argparse type for an Optional field: "none"/"auto" -> None, else kind(value)."""
    return lambda text: None if text.lower() in ("none", "auto") else kind(text)


# Command-line bounds of Recipe fields ({name: (lowest value, whether it is allowed)}): a value out
# of range is refused by argparse, naming the flag, before anything is read (floats must be finite too).
RECIPE_FLAG_BOUNDS = {
    **{name: (1, True) for name in ("emb_size", "num_layers", "num_heads", "history_len", "ranker_history_len",
                                    "retrieval_batch_size", "ranker_batch_size", "negative_pool", "retrieve_k",
                                    "num_hashes", "evals_per_stage", "retrieval_members", "ranker_members")},
    **{name: (2, True) for name in ("user_table_size", "post_table_size", "author_table_size")},
    **{name: (0, True) for name in ("warmup_steps", "hard_negatives", "random_negatives", "ranker_listwise_weight")},
    **{name: (0, False) for name in ("retrieval_epochs", "ranker_epochs", "learning_rate", "temperature",
                                     "table_init_stddev")},
    **{name: (-math.inf, False) for name in ("retrieval_weight", "popularity_weight")},  # any finite number
}
_BOOLEAN_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _bounded(kind, low, inclusive: bool):
    """argparse type: kind(text), refused unless finite and >= `low` (> `low` if not `inclusive`)."""
    def parse(text):
        value = kind(text)
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            expected = ("a finite number" if low == -math.inf
                        else f"{'an int' if kind is int else 'a finite number'} {'>=' if inclusive else '>'} {low}")
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def _boolean(text: str) -> bool:
    """argparse type: 1/true/yes or 0/false/no (any other word is refused, never read as False)."""
    try:
        return _BOOLEAN_WORDS[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(_BOOLEAN_WORDS)}, got {text!r}") from None


def add_run_flags(parser: argparse.ArgumentParser, default_checkpoint_dir, defaults: Optional["Recipe"] = None) -> None:
    """--seed, --checkpoint-dir, --overwrite, --dump-topk, --plot, --data-parallel and one flag per Recipe field,
    each defaulting to `defaults`' value (default Recipe())."""
    parser.add_argument("--seed", type=_bounded(int, 0, True), default=0)
    parser.add_argument("--checkpoint-dir", default=default_checkpoint_dir,
                        help="the run directory: retrieval/, ranker/ (and retrieval.1/, ranker.1/, ... with "
                             "--retrieval-members / --ranker-members), "
                             "metrics.jsonl (default: "
                             "$PHOENIX_CACHE_DIR/checkpoints/<data name>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in --checkpoint-dir (only what Phoenix wrote there: anything "
                             "else at the paths a run writes is refused) and an existing --dump-topk file")
    parser.add_argument("--dump-topk", default=None, metavar="PATH",
                        help="write every test user's final top-10 (original ids) as CSV and re-check it (a new "
                             "file unless --overwrite; never an input of the run)")
    parser.add_argument("--plot", action="store_true",
                        help=f"write {PLOT_FILE} (training loss, validation curves) to the run directory (matplotlib)")
    parser.add_argument("--data-parallel", action="store_true",
                        help="split each training batch over all devices JAX finds (batch sizes must divide evenly)")
    protocols.add_flags(parser)
    defaults = Recipe() if defaults is None else defaults
    hints = typing.get_type_hints(Recipe)
    for field in dataclasses.fields(Recipe):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        kind = next((t for t in typing.get_args(hints[field.name]) if t is not type(None)), hints[field.name])
        if field.name in RECIPE_FLAG_BOUNDS:
            kind = _bounded(kind, *RECIPE_FLAG_BOUNDS[field.name])
        if kind is bool:
            parser.add_argument(flag, type=_boolean, default=default, help=f"Recipe.{field.name}, default {default}")
        else:
            parser.add_argument(flag, type=_optional(kind) if default is None else kind, default=default,
                                help=f"Recipe.{field.name}, default {default}")


def recipe_from_args(args) -> Recipe:
    return Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})


def parse_rating_actions(text: str) -> dict:
    """"favorite_score=4:5,not_interested_score=:2" -> {action: (low, high)}; an empty bound is open."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, bounds = part.partition("=")
        low, sep, high = bounds.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"--rating-actions: expected ACTION=LOW:HIGH, got {part!r}")
        try:
            out[name.strip()] = (float(low) if low.strip() else -math.inf, float(high) if high.strip() else math.inf)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--rating-actions: expected numbers in {part!r}") from None
    try:
        return check_rating_actions(out)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class _Given(argparse.Namespace):
    """A namespace in which argparse sets only the flags given (it fills in defaults only where an
    attribute is missing, and this one has them all)."""

    def __getattr__(self, name):
        if name.startswith("_"):  # argparse's own attributes; no flag's destination starts so
            raise AttributeError(name)
        return None


def given_flags(parser: argparse.ArgumentParser, argv) -> set:
    """The destinations of the flags that `argv` gives explicitly (defaults left out), abbreviations included."""
    return set(vars(parser.parse_args(argv, _Given())))


def check_run_flags(args, given: set, error) -> None:
    """error(message) for flags `argv` gives that this run would ignore or cannot use (shared by the CSV
    and MovieLens command lines): --sasrec-* without --sasrec, --sasrec-train-val without --protocol
    train+val, --retrieve-k below the dumped and evaluated cut-off (FINAL_K) with --dump-topk, an
    --emb-size that --num-heads does not divide."""
    if args.emb_size % args.num_heads:
        error(f"--emb-size {args.emb_size}: expected a multiple of --num-heads {args.num_heads} (each head gets "
              "emb_size / num_heads dimensions)")
    for name in ("sasrec_epochs", "sasrec_history_len", "sasrec_dropout", "sasrec_train_val"):
        if name in given and not args.sasrec:
            error(f"--{name.replace('_', '-')}: applies to the SASRec reference only; add --sasrec")
    if "sasrec_train_val" in given and args.protocol != "train+val":
        error(f"--sasrec-train-val: applies to --protocol train+val only, got --protocol {args.protocol}")
    if args.dump_topk and args.retrieve_k is not None and args.retrieve_k < FINAL_K:
        error(f"--retrieve-k {args.retrieve_k}: with --dump-topk, expected at least {FINAL_K} (the dump holds each "
              f"user's top {FINAL_K} and the table's HR@{FINAL_K} is checked against it)")


def exact_number(text: str):
    """argparse type: an int when `text` is an integer (exact, even beyond 2**53: nanosecond times), else a float."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def default_run_name(data: str) -> str:
    """The run directory's name for --data: the log's stem; "stdin" for "-", "pipe" for a FIFO
    (`<(zcat log.csv.gz)` is /dev/fd/63, a name that says nothing)."""
    if data == STDIN:
        return "stdin"
    if run_dir.path_kind(data) == "a FIFO":
        return "pipe"
    return Path(data).stem or "log"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, metavar="LOG.csv",
                        help="the interaction log: a CSV with a header, a pipe (<(zcat log.csv.gz)) or - (stdin)")
    for role, flag in COLUMN_FLAGS.items():
        default = getattr(Columns(), role)
        parser.add_argument(flag, default=default,
                            help=f"{role} column (default {default or AUTO_COLUMN_NAMES[role] + ' if present'})")
    parser.add_argument("--delimiter", default=",", help="field separator (\\t for TSV)")
    parser.add_argument("--rating-actions", type=parse_rating_actions, default=DEFAULT_RATING_ACTIONS,
                        metavar="ACTION=LOW:HIGH,...",
                        help="actions a rating sets (inclusive ranges, an empty bound is open); default "
                             "click_score=:,favorite_score=4:,share_score=5:,not_interested_score=:2")
    parser.add_argument("--duplicates", choices=DUPLICATE_RULES, default="first",
                        help="a repeated (user, item): keep the earliest (default) or refuse the log")
    parser.add_argument("--split", choices=SPLIT_PROTOCOLS, default="leave-one-out")
    parser.add_argument("--cut-time", type=exact_number, default=None,
                        help="time split: the cut T (same unit as the log)")
    parser.add_argument("--cut-quantile", type=float, default=None,
                        help=f"time split: the cut at this quantile of all timestamps (default {DEFAULT_CUT_QUANTILE})")
    add_run_flags(parser, None)
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    for name in ("cut_time", "cut_quantile"):
        if name in given and args.split != "time":
            parser.error(f"--{name.replace('_', '-')}: applies to --split time only, got --split {args.split}")
    if args.cut_time is not None and args.cut_quantile is not None:
        parser.error(f"--cut-time {args.cut_time} and --cut-quantile {args.cut_quantile}: give one of them (the cut)")
    try:
        check_split_options(args.split, args.cut_time, args.cut_quantile)
    except ValueError as error:
        parser.error("--" + str(error).replace("_", "-", 1))
    check_run_flags(args, given, parser.error)
    args.rating_actions_given = "rating_actions" in given
    if args.checkpoint_dir is None:
        args.checkpoint_dir = str(ml.cache_dir() / "checkpoints" / default_run_name(args.data))
    args.delimiter = "\t" if args.delimiter in ("\\t", "tab") else args.delimiter
    return args, recipe_from_args(args)


class DumpCheckError(RuntimeError):
    """A dump's figures, recomputed from the file, disagree with the table's: one of them is wrong."""


def check_dump_figures(path, table_row: dict, check: dict, k: int = FINAL_K) -> None:
    """DumpCheckError unless HR@k and NDCG@k recomputed from a dump equal the table's (to rounding)."""
    keys = (f"HR@{k}", f"NDCG@{k}")
    if any(abs(check[key] - table_row[key]) > DUMP_TOLERANCE for key in keys):
        raise DumpCheckError(f"dump {path}: recomputed from the file, " + ", ".join(
            f"{key} {check[key]:.4f}" for key in keys) + " disagree with the table's " + ", ".join(
            f"{key} {table_row[key]:.4f}" for key in keys) + "; the dump is kept for inspection, the figures are not "
            "to be trusted")


def main(argv=None) -> dict:
    """The whole experiment on a CSV log (module docstring); returns run()'s dict plus "dump_check".
    Every check of the command line (the log's path, outputs never over it, the run directory, the
    plot extra) runs before the log is read."""
    args, recipe = parse_args(sys.argv[1:] if argv is None else argv)
    check_log_path(args.data)
    check_run_dir(args.checkpoint_dir, args.overwrite, [run_dir.Input("--data", args.data)],
                  {"--dump-topk": args.dump_topk})
    if args.plot:
        _pyplot()
    columns = Columns(user=args.user_col, item=args.item_col, time=args.time_col, rating=args.rating_col,
                      author=args.author_col)
    log = read_log(args.data, columns, args.rating_actions, delimiter=args.delimiter)
    if getattr(args, "rating_actions_given", False) and log.rating is None:
        raise RecipeError(f"--rating-actions: {log.source} has no rating column for it to apply to (name it with "
                          "--rating-col)")
    split = split_log(log, args.split, args.duplicates, args.cut_time, args.cut_quantile)
    k = resolve_recipe(recipe, split).retrieve_k
    if args.dump_topk and k < FINAL_K:
        raise RecipeError(f"--dump-topk: --retrieve-k resolves to {k} on {log.source}, fewer than the {FINAL_K} items "
                          "a dump holds")
    result = run(split, recipe, args.checkpoint_dir, args.seed, args.overwrite, args.plot,
                 data_parallel=args.data_parallel, extra_rows=protocols.extra_rows(args))
    result["dump_check"] = None
    if args.dump_topk:
        dump_topk(args.dump_topk, split, result["reranked"]["test"][:, :FINAL_K])
        ours = result["table"][("test", "two-stage")]
        line = f"\ndump {args.dump_topk}: table HR@10 {ours['HR@10']:.4f} NDCG@10 {ours['NDCG@10']:.4f}"
        if split.protocol == "leave-one-out":
            check = result["dump_check"] = check_dump(args.dump_topk, log)
            line += (f"; recomputed from the dump HR@10 {check['HR@10']:.4f} NDCG@10 {check['NDCG@10']:.4f} "
                     f"({check['num_users']} users, history items in the top-10s: {check['history_items_in_topk']})")
            print(line)
            check_dump_figures(args.dump_topk, ours, check)
        else:
            print(line + f" (not recomputed: check_dump rebuilds leave-one-out targets, this is a {split.protocol} "
                         "split)")
    return result


if __name__ == "__main__":
    main()

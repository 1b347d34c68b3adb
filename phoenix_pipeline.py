"""Train Phoenix on your own interaction log: a CSV (or a dict of arrays) in, evaluated checkpoints out.

    import phoenix_pipeline as pipeline
    log = pipeline.read_csv("log.csv")               # or pipeline.from_arrays({"user_id": ..., ...})
    split = pipeline.split_log(log)                  # chronological leave-one-out
    result = pipeline.run(split, pipeline.Recipe(), "runs/mine")   # both stages, best checkpoints, table
    pipeline.recommend(result, "u17")                # the evaluated two-stage top-10 of one user
    run = pipeline.load_run("runs/mine")             # later, in another process: no log needed
    pipeline.recommend(run, "u17", k=10, history=None)   # the same list, from the run directory

    uv run run_train.py --data LOG.csv [--dump-topk top10.csv] [--plot]   # the same from the command line
    uv run run_train.py --data LOG.csv --checkpoint-every 50 --resume     # resumable: rerun it after a kill

`run` prints on stderr each stage's progress (phoenix_training.fit: step, loss, steps/s, ETA) and its
validation HR@10 / NDCG@10; on stdout a markdown table of HR@10, NDCG@10, HR@50 and MRR on
validation and test for the popularity and transition baselines (phoenix_evaluation.py), retrieval
alone and two-stage. `run_experiment` adds what a command line asks for: several seeds and their
summary table, and every test user's top-10 (original ids) dumped as CSV and recomputed from the file
(check_dump). Time grows with the number of training examples. docs/notes.md gives the measurements
behind the recipe; `run_train.py --data movielens-100k` runs MovieLens (movielens.py) through it.

The log is phoenix_log.py, its split and examples phoenix_split.py; the recipe, batches and both
stages' evaluators are phoenix_two_stage.py; this module trains a run and serves its results. Its
`__all__` is the one-stop API of a notebook; everything else lives in the module named for it.

Outputs (the run directory: checkpoint_dir, on the command line --checkpoint-dir, default
$PHOENIX_CACHE_DIR/checkpoints/<log name>)
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
  curves.png           with plot=True (needs matplotlib: `uv sync --extra plot`).
  run.json             the manifest, written first (phoenix_run_dir): kind, source, seed, recipe, the
                       run's configuration (run_config), the stages finished with their best val
                       metrics and, under Recipe.time_budget, each stage's planned steps (what
                       --resume checks and reads back).
  steps/<stage>/       with checkpoint_every or resume, each stage member's step checkpoints while it
                       trains (deleted once it finishes); .lock, the run lock (docs/resume.md).
  serving/             after the evaluation: the id vocabulary, each user's history, the re-ranking
                       weights and popularity counts (phoenix_serving.save_serving), so that
                       load_run(DIR) serves what was evaluated (recommend; run_recommend.py).
  seed<N>/             with RunOptions.seeds, each seed's run directory.
  Nothing else in the directory is touched. Before the log is read, a command line refuses outputs
  over its inputs (a dump or run directory that is the log, a link to it, ...), an existing dump
  without overwrite, and, with or without it, anything at these names that Phoenix did not write
  (check_run_outputs; phoenix_run_dir.check_outputs lists them all).


Shape glossary
  U  users   N  catalog items   K  retrieved per user
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np

import phoenix_checkpoint as checkpoint
import phoenix_evaluation as evaluation
import phoenix_hashing as hashing
import phoenix_protocols
import phoenix_resume
import phoenix_run_dir as run_dir
import phoenix_serving
import phoenix_split
import phoenix_training as training
import phoenix_two_stage as two_stage
from phoenix_inputs import HashConfig
# The one-stop names of a notebook, from the modules that own them (module docstring).
from phoenix_evaluation import DumpCheckError, check_dump, check_dump_figures
from phoenix_log import Columns, Log, LogError, from_arrays, read_csv, read_log, string_id
from phoenix_paths import cache_dir
from phoenix_protocols import Protocols
from phoenix_resume import ResumeError
from phoenix_serving import SERVING_DIR, ServedRun, load_run, recommend
from phoenix_split import LogSplit, describe, split_log
from phoenix_two_stage import (FINAL_K, LOG_RECIPE, MOVIELENS_RECIPE, RECIPES, Recipe, RecipeError, encode_items,
                               encode_users)

__all__ = [
    # the log and its split
    "read_csv", "read_log", "from_arrays", "Columns", "Log", "LogError", "string_id", "split_log", "LogSplit",
    "describe",
    # training and evaluation
    "Recipe", "RecipeError", "MOVIELENS_RECIPE", "LOG_RECIPE", "RECIPES", "run", "RunOptions", "run_experiment",
    "Protocols", "check_run_outputs", "format_table", "baseline_warning", "FINAL_K", "fingerprint", "run_config",
    "ResumeError",
    # serving: a run directory, one user
    "load_run", "ServedRun", "recommend", "user_row", "user_examples", "user_batch", "items_batch", "seen_items",
    "encode_users", "encode_items", "load_members",
    # outputs
    "dump_topk", "check_dump", "check_dump_figures", "DumpCheckError", "read_metrics", "plot_curves",
    "MissingExtraError", "cache_dir",
]

METRICS_FILE = "metrics.jsonl"
FINISHED_KEY = "finished"  # run.json: {member_stage name: best val metrics} of the stages trained
PLAN_KEY = "plan"  # run.json: {member_stage name: its steps under Recipe.time_budget}, kept for --resume
CALIBRATION_STEPS = 15  # train steps timed (after one that compiles) for a stage's budget: their median
RUN_CONFIG_KEY = "run_config"  # run.json: what shapes the run's results (run_config), checked on resume
STEPS_DIR = "steps"  # a resumable run's step checkpoints, one directory per member_stage
PLOT_FILE = "curves.png"
STAGES = ("retrieval", "ranker")
# What a run writes in its directory ({name regex: phoenix_run_dir kind}): nothing else there is touched,
# and whatever is at these names must be Phoenix's own (phoenix_run_dir.check_outputs).
RUN_ENTRIES = {r"(retrieval|ranker)(\.[0-9]+)?": "checkpoint",  # member_stage's names
               re.escape(METRICS_FILE): "metrics", re.escape(PLOT_FILE): "plot",
               re.escape(run_dir.MANIFEST_FILE): "manifest",
               re.escape("train+val"): "checkpoints",  # phoenix_protocols.retrain_stages' checkpoints
               re.escape(SERVING_DIR): "checkpoint",  # phoenix_serving.save_serving
               re.escape(STEPS_DIR): "steps",  # resumable runs: steps/<member_stage>/step-N
               re.escape(phoenix_resume.LOCK_FILE): "lock"}  # resumable runs: the run lock


class MissingExtraError(ImportError):
    """An optional dependency (an extra of pyproject.toml) that a feature asked for is not installed."""


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class MetricsLog:
    """Appends JSON lines to `path` (flushed per line, so a crashed run keeps what it logged); the
    first line, phoenix_run_dir.METRICS_HEADER, marks the file as Phoenix's for a later --overwrite.

    `resume`: continue an earlier run's file. Its complete lines are kept (a line cut short by a kill
    is dropped), and an entry it already holds (same stage, step and kind: a resumed stage logs again
    the steps after its last step checkpoint) is not written twice."""

    def __init__(self, path, resume: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._written = set()
        kept = [json.dumps(run_dir.METRICS_HEADER)]
        if resume and self.path.is_file():
            for line in self.path.read_text().splitlines()[1:]:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict):
                    kept.append(line)
                    self._written.add(self._key(entry))
        _write_atomically(self.path, "".join(line + "\n" for line in kept))

    @staticmethod
    def _key(entry: dict) -> tuple:
        """What makes an entry the same entry when a resumed run logs it again (its steps/s differ)."""
        kind = "eval" if any(k.startswith("eval/") for k in entry) else "loss" if "loss" in entry else "other"
        return entry.get("stage"), entry.get("step"), entry.get("split"), entry.get("model"), kind

    def write(self, **entry) -> None:
        entry = {k: _json_number(v) for k, v in entry.items()}
        key = self._key(entry)
        if key in self._written:
            return
        self._written.add(key)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    """`text` as the file at `path`: a temporary file beside it, then os.replace."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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


class Steps(NamedTuple):
    """How a resumable run keeps its stages' step checkpoints (RunOptions' checkpoint_every,
    keep_checkpoints, resume) and the run's configuration that each step checkpoint records and a
    resume must match (run_config)."""

    every: int  # a step checkpoint every N steps of each stage (0: at its end and at a clean stop only)
    keep: int  # the newest K step checkpoints of each stage are kept
    resume: bool  # continue from the newest step checkpoint there
    config: dict  # run_config(...): compared with each step checkpoint's on resume


class _BestSoFar:
    """The best validation metrics of a stage so far ({"NDCG@10", ..., "step"}), travelling in its step
    checkpoints as training.fit's `aux` (JSON bytes): a resumed stage compares its next evaluations with
    the best as it was at that checkpoint, so it keeps the same checkpoint an uninterrupted run keeps."""

    def __init__(self):
        self.metrics = {"NDCG@10": -math.inf}
        self.since = 0  # evaluations since the best (Recipe.patience)

    def state_dict(self) -> dict:
        text = json.dumps(training.encode_json(self.metrics))
        return {"best_json": np.frombuffer(text.encode(), np.uint8), "since": np.array(self.since, np.int64)}

    def load_state_dict(self, arrays: dict) -> None:
        self.metrics = training.decode_json(json.loads(np.asarray(arrays["best_json"], np.uint8).tobytes()))
        self.since = int(arrays.get("since", 0))


def _fit_keeping_best(trainer, state, batches, steps: int, evaluate, path: str, extra: dict, evals: int, stream,
                      stage: str, log: Optional[MetricsLog], resumable: Optional[Steps] = None, patience: int = 0):
    """training.fit with `evaluate(params) -> metrics` on validation `evals` times (the last at the
    end); the best by NDCG@10 is saved to `path` and returned as (host params, its metrics). Each fit
    history entry goes to `log` with the stage name as it is made (so metrics.jsonl grows during training).

    `resumable`: step checkpoints in <run dir>/steps/<stage> (fit's), the best so far among them
    (_BestSoFar). Killed after a new best was saved and before the next step checkpoint, the resumed
    stage evaluates that step again, finds the same best and saves the same checkpoint over it; its
    params are read back from `path` when this process did not evaluate them itself.

    `patience` > 0: the stage stops after that many evaluations in a row without a better NDCG@10
    (training.fit's should_stop; the count travels in the step checkpoints with the best)."""
    best = _BestSoFar()
    kept = {}

    def validate(state):
        result = evaluate(state.params)
        if result["NDCG@10"] > best.metrics["NDCG@10"]:
            best.metrics = {**result, "step": int(state.step)}
            best.since = 0
            kept["params"] = trainer.host_params(state.params)
            trainer.save(path, state, extra={**extra, "val": best.metrics})
        else:
            best.since += 1
        return {k: result[k] for k in ("HR@10", "NDCG@10")}

    resume_args = {}
    if resumable is not None:
        resume_args = {"checkpoint_dir": os.path.join(os.path.dirname(path), STEPS_DIR, os.path.basename(path)),
                       "checkpoint_every": resumable.every, "keep_checkpoints": resumable.keep,
                       "resume": resumable.resume, "aux": best,
                       "run_config": {**resumable.config, "stage": os.path.basename(path)}}
    try:
        state, _ = training.fit(trainer, state, batches, steps, log_every=max(1, min(50, steps // 10)),
                                eval_fn=validate, eval_every=max(1, -(-steps // evals)), stream=stream,
                                on_log=None if log is None else (lambda entry: log.write(stage=stage, **entry)),
                                should_stop=(lambda: best.since >= patience) if patience else None, **resume_args)
    except training.TrainingStopped as stop:  # a clean stop (phoenix_stop): say where the best so far is
        stop.stage = stop.stage or stage
        if stop.saved:
            stop.kept.append(f"{stop.saved} (step {stop.step} of {stop.end_step})")
        if best.metrics.get("step") is not None:
            stop.kept.append(_best_at(path, best.metrics))
        raise
    if "params" not in kept:  # a resumed stage whose best was evaluated before the kill
        kept["params"] = checkpoint.load_checkpoint(path, params_template=trainer.host_params(state.params)).params
    return kept["params"], best.metrics


# What a stopped run's line says when it kept no step checkpoints (phoenix_stop.TrainingStopped.line).
NOT_RESUMABLE = "--checkpoint-every is off"


def _best_at(path: str, best: dict) -> str:
    return f"{path} (best val NDCG@10 {best['NDCG@10']:.4f} at step {best['step']})"


def _extra(recipe: Recipe, seed: int, split: LogSplit) -> dict:
    """What a checkpoint records about its run: recipe, seed, and how raw ids were made."""
    return {"recipe": dataclasses.asdict(recipe), "seed": seed, "source": split.log.source,
            "string_id_columns": sorted(split.log.names)}


def seconds_per_step(trainer, state, batches, steps: int = CALIBRATION_STEPS) -> float:
    """A stage's measured seconds per train step (training.seconds_per_step on the stream's first
    batch: `batches.first` (two_stage.resumable_stream), else `batches(0)`'s first item); the state and
    the stream are left as they were."""
    first = getattr(batches, "first", None)
    return training.seconds_per_step(trainer, state, next(iter(batches(0))) if first is None else first, steps)


def budget_steps(planned: int, step_seconds: float, seconds: float) -> int:
    """The steps a stage runs in `seconds` at `step_seconds` each: at most `planned` (its epochs), at least 1."""
    return max(1, min(int(planned), int(seconds / step_seconds)))


def _planned_steps(name: str, start, member: int, seconds: float, checkpoint_dir: str, stream, resuming: bool):
    """(trainer, state, batches, steps) of member `member` with its steps cut to `seconds` of training
    (budget_steps at seconds_per_step). The decision is recorded in run.json (PLAN_KEY): a resumed run
    reads it back rather than timing again, so it trains the schedule the interrupted run began."""
    trainer, state, batches, steps = start(member, None)
    try:
        plan = run_dir.read_manifest(checkpoint_dir).get(PLAN_KEY) or {}
    except run_dir.OutputError:  # train_retrieval / train_ranker called alone: nothing to record in
        plan = None
    if resuming and plan and name in plan:
        planned = int(plan[name]["steps"])
    else:
        step_seconds = seconds_per_step(trainer, state, batches)
        planned = budget_steps(steps, step_seconds, seconds)
        print(f"{name}: time budget {seconds:.0f} s at {step_seconds * 1e3:.1f} ms per step: "
              + (f"{planned} of the epochs' {steps} steps" if planned < steps else f"all {steps} steps fit"),
              file=stream)
        if plan is not None:
            plan[name] = {"steps": planned, "epoch_steps": steps, "seconds": seconds,
                          "ms_per_step": round(step_seconds * 1e3, 3)}
            run_dir.update_manifest(checkpoint_dir, **{PLAN_KEY: plan})
    if planned != steps:
        trainer, state, batches, steps = start(member, planned)
    return trainer, state, batches, steps


def _train_members(stage: str, members: int, start, evaluate, unit: str, split: LogSplit, recipe: Recipe,
                   seed: int, checkpoint_dir: str, stream, log, kind, resumable: Optional[Steps] = None):
    """Trains `members` models of `stage` (start(member, steps) -> (trainer, state, batches, steps);
    steps None: the recipe's epochs, cut to Recipe.time_budget's share by _planned_steps;
    evaluate(trainer, params) -> val metrics; `unit`: what one step takes, for the log), each
    keeping its own best checkpoint in member_stage(m, stage). Returns (model, params, best): one
    member as it is, or the ensemble (`kind`) of all and the tuple of their params, whose best val
    metrics are then the ensemble's, with "step" the first member's and "steps" every member's.
    A member this run finished before (run.json's "finished", resumable.resume) is not trained again:
    its best params and metrics are read back."""
    trainers, params, bests = [], [], []
    resuming = resumable is not None and resumable.resume
    finished = _finished(checkpoint_dir) if resuming else {}
    for member in range(members):
        name = two_stage.member_stage(member, stage)
        path = os.path.join(checkpoint_dir, name)
        if recipe.time_budget and name not in finished:
            trainer, state, batches, steps = _planned_steps(
                name, start, member, recipe.time_budget * two_stage.BUDGET_SHARES[stage] / members, checkpoint_dir,
                stream, resuming)
        else:
            trainer, state, batches, steps = start(member, None)
        if name in finished:
            best = finished[name]
            kept = checkpoint.load_checkpoint(path, params_template=trainer.host_params(state.params)).params
            print(f"{name}: already trained by this run (best val NDCG@10 {best['NDCG@10']:.4f} at step "
                  f"{best['step']}), read back from {path}", file=stream)
        else:
            print(f"{name}: {steps} steps of {unit}", file=stream)
            try:
                kept, best = _fit_keeping_best(trainer, state, batches, steps, lambda p: evaluate(trainer, p), path,
                                               _extra(recipe, seed, split), recipe.evals_per_stage, stream, name, log,
                                               resumable, recipe.patience)
            except training.TrainingStopped as stop:  # the members trained before keep their best checkpoints
                stop.kept[:0] = [_best_at(os.path.join(checkpoint_dir, two_stage.member_stage(m, stage)), b)
                                 for m, b in enumerate(bests)]
                if resumable is None:
                    stop.why_not = stop.why_not or NOT_RESUMABLE
                raise
            _mark_finished(checkpoint_dir, name, best)
        trainers.append(trainer)
        params.append(kept)
        bests.append(best)
    model, params = two_stage.ensemble(trainers, params, kind)
    if members == 1:
        return model, params, bests[0]
    for member, member_best in enumerate(bests):
        print(f"{two_stage.member_stage(member, stage)}: best val NDCG@10 {member_best['NDCG@10']:.4f} at step "
              f"{member_best['step']}", file=stream)
    best = evaluate(model, params)
    return model, params, {**best, "step": bests[0]["step"], "steps": [b["step"] for b in bests]}


def _finished(checkpoint_dir: str) -> dict:
    """{member_stage name: its best val metrics} of the stages this run's directory records as finished."""
    try:
        manifest = run_dir.read_manifest(checkpoint_dir)
    except run_dir.OutputError:
        return {}
    return training.decode_json(manifest.get(FINISHED_KEY) or {})


def _mark_finished(checkpoint_dir: str, name: str, best: dict) -> None:
    """Records in run.json (atomically) that stage `name` is trained, with its best val metrics: a
    resumed run reads them back instead of training it again. Then its step checkpoints, no longer
    needed, are deleted. A directory without a manifest (train_retrieval called alone) records nothing."""
    try:
        manifest = run_dir.read_manifest(checkpoint_dir)
    except run_dir.OutputError:
        return
    finished = {**(manifest.get(FINISHED_KEY) or {}), name: training.encode_json(best)}
    run_dir.update_manifest(checkpoint_dir, **{FINISHED_KEY: finished})
    steps = os.path.join(checkpoint_dir, STEPS_DIR, name)
    if os.path.isdir(steps) and run_dir.entry_problem(steps, "checkpoints") is None:
        shutil.rmtree(steps)


def train_retrieval(split: LogSplit, recipe: Recipe, seed: int, checkpoint_dir: str, stream=None,
                    log: Optional[MetricsLog] = None, data_parallel=False, resumable: Optional[Steps] = None,
                    shard_tables: bool = False):
    """Trains the two-tower model, or each of Recipe.retrieval_members (each keeping its own best
    checkpoint, in member_stage(m)); returns (model, best params, best val metrics): the trainer and
    its params, or a RetrievalEnsemble and the tuple of the members' params, whose val metrics are
    then the ensemble's (with "step" the first member's and "steps" every member's best step).
    `data_parallel`: training.Trainer's (each batch split over the devices, the state replicated);
    `shard_tables`: its hash tables' rows split over them too (phoenix_sharding).
    `resumable`: step checkpoints and resume (Steps; None: none)."""
    return _train_members(
        "retrieval", recipe.retrieval_members,
        lambda member, steps: two_stage.start_retrieval(split, recipe, seed, data_parallel, steps, member=member,
                                                        shard_tables=shard_tables),
        lambda model, params: two_stage.StageOne(model, params, split, "val", recipe.history_len,
                                                 recipe.retrieve_k, rows=two_stage.validation_rows(split)).metrics(),
        f"{recipe.retrieval_batch_size} windows ({len(two_stage.training_windows(split, recipe.history_len)[0])} "
        "windows per epoch)", split, recipe, seed, checkpoint_dir, stream, log, two_stage.RetrievalEnsemble,
        resumable)


def train_ranker(split: LogSplit, pool, recipe: Recipe, seed: int, checkpoint_dir: str,
                 val_stage_one: two_stage.StageOne, retrieval_params=None, stream=None,
                 log: Optional[MetricsLog] = None, data_parallel=False, resumable: Optional[Steps] = None,
                 shard_tables: bool = False):
    """Trains the ranker, or each of Recipe.ranker_members (checkpoints and return value as
    train_retrieval's, a RankerEnsemble for several). Model selection by the validation two-stage
    NDCG@10 of the ranker's own score (retrieval weight 0)."""
    return _train_members(
        "ranker", recipe.ranker_members,
        lambda member, steps: two_stage.start_ranker(split, pool, recipe, seed, retrieval_params, data_parallel,
                                                     steps, member=member, shard_tables=shard_tables),
        lambda model, params: two_stage.TwoStage(val_stage_one, model, params, split, "val", recipe).evaluate(
            0.0, recipe.temperature)[0],
        f"{recipe.ranker_batch_size} examples x {recipe.num_candidates} candidates",
        split, recipe, seed, checkpoint_dir, stream, log, two_stage.RankerEnsemble, resumable)


def load_members(checkpoint_dir: str, params, stage: str = "retrieval"):
    """The best params of `stage` read back from checkpoint_dir (`params`, as train_retrieval /
    train_ranker returned them, gives the tree to fill: one model's, or the tuple of an ensemble's)."""
    if not isinstance(params, tuple):
        return checkpoint.load_checkpoint(os.path.join(checkpoint_dir, stage), params_template=params).params
    return tuple(checkpoint.load_checkpoint(os.path.join(checkpoint_dir, two_stage.member_stage(m, stage)),
                                            params_template=p).params for m, p in enumerate(params))


def _at(best: dict) -> str:
    """Where a stage's best checkpoint was: "step N", or each ensemble member's step."""
    return f"steps {best['steps']} ({len(best['steps'])} members)" if "steps" in best else f"step {best['step']}"


def first_member(params):
    """A retrieval model's params, or the first ensemble member's (what the ranker warm-starts from)."""
    return params[0] if isinstance(params, tuple) else params


def evaluate_stages(split: LogSplit, retrieval, retrieval_params, ranker, ranker_params, recipe: Recipe):
    """Validation and test rows of the table, baselines included.

    The re-ranking weights (of the retrieval logit, the popularity prior and the transition prior)
    are the recipe's, or the triple with the best validation NDCG@10 (choose_rerank_weights). Returns
    (table {(split, name): metrics}, re-ranked top-K columns {split: [U, K]}, StageOne per split,
    TwoStage per split, (retrieval weight, popularity weight, transition weight)).
    """
    table, reranked, stage_one, two_stages = {}, {}, {}, {}
    for which in ("val", "test"):
        stage_one[which] = two_stage.StageOne(retrieval, retrieval_params, split, which, recipe.history_len,
                                              recipe.retrieve_k)
        two_stages[which] = two_stage.TwoStage(stage_one[which], ranker, ranker_params, split, which, recipe)
    weights = two_stage.choose_rerank_weights(two_stages["val"], recipe)
    for which in ("val", "test"):
        for name in evaluation.BASELINES:
            table[(which, name)] = evaluation.evaluate_baseline(split, which, name)
        table[(which, "retrieval")] = stage_one[which].metrics()
        table[(which, "two-stage")], reranked[which] = two_stages[which].evaluate(
            weights[0], recipe.temperature, weights[1], weights[2])
    return table, reranked, stage_one, two_stages, weights


def hash_collisions(split: phoenix_split.Split, hashes: HashConfig) -> dict:
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


MODELS = ("retrieval", "two-stage")  # the table's rows a baseline is a warning light for
WARNING_METRIC = "NDCG@10"  # on validation: what the checkpoints are chosen on


def baseline_warning(table: dict, recipe: Recipe) -> Optional[str]:
    """The line a run prints when a baseline (phoenix_evaluation.BASELINES) beats retrieval or two-stage on
    validation NDCG@10, with what to try among the recipe's own knobs (as run_train.py flags); None
    when no baseline does. `table`: {(split, name): metrics}, as run returns it."""
    val = {name: m[WARNING_METRIC] for (which, name), m in table.items() if which == "val" and WARNING_METRIC in m}
    baselines = [name for name in evaluation.BASELINES if name in val]
    if not baselines:
        return None
    best = max(baselines, key=lambda name: val[name])
    beaten = [name for name in MODELS if name in val and val[name] < val[best]]
    if not beaten:
        return None
    tries = [f"--pooling last (now {recipe.pooling})"] if recipe.pooling != "last" else []
    tries.append(f"a longer --history-len (now {recipe.history_len})")
    tries.append(f"more --retrieval-epochs (now {recipe.retrieval_epochs:g})")
    if "two-stage" in beaten:
        tries.append(f"more --ranker-epochs (now {recipe.ranker_epochs:g})")
    if recipe.time_budget:  # the epochs may not all have run
        tries.append(f"a larger --time-budget (now {recipe.time_budget:g} s)")
    figures = ", ".join(f"{val[name]:.4f}" for name in beaten)
    return (f"warning: the {best} baseline beats {' and '.join(beaten)} on validation {WARNING_METRIC} "
            f"({val[best]:.4f} vs {figures}); try " + ", ".join(tries) + " (README: the table)")


def report_baseline_warning(table: dict, recipe: Recipe, stream, log: MetricsLog) -> Optional[str]:
    """baseline_warning's line, if any, printed on `stream` and logged (stage "warning"); returns it."""
    warning = baseline_warning(table, recipe)
    if warning is not None:
        print(warning, file=stream, flush=True)
        log.write(stage="warning", split="val", model="baseline", message=warning)
    return warning


def check_run_dir(path, overwrite: bool = False, inputs=(), files=None, resume: bool = False) -> None:
    """Refuses, before anything is written, a run directory where a run would replace what it must
    not: an earlier run's checkpoints or metrics unless `overwrite` or `resume` (FileExistsError),
    anything at RUN_ENTRIES' names that Phoenix did not write even with `overwrite` (ForeignFilesError,
    all of them listed), a file, an input. `inputs` (phoenix_run_dir.Input) and `files` ({flag: path} of
    other outputs, such as the dump) are checked with it (phoenix_run_dir.check_outputs)."""
    if overwrite and resume:
        raise phoenix_resume.ResumeError(f"--overwrite and --resume: --resume continues the run in {path}, "
                                         "--overwrite replaces it; give one")
    run_dir.check_outputs(inputs, [path], RUN_ENTRIES, files, overwrite, earlier_run=resume)


def fingerprint(split: LogSplit) -> str:
    """sha256 of what a split holds (every array of the Split but the log rows it came from, and its
    protocol): the same for the same interactions however they were read (file, format, standard
    input, input row order), different when a user, item, time, rating, action or the split differs."""
    digest = hashlib.sha256(split.protocol.encode())
    for field in dataclasses.fields(split):
        value = getattr(split, field.name)
        if field.name == "rows" or not isinstance(value, np.ndarray):
            continue
        value = np.ascontiguousarray(value)
        digest.update(f"{field.name} {value.dtype.str} {value.shape}".encode())
        digest.update(value.data)
    return digest.hexdigest()


def run_config(split: LogSplit, recipe: Recipe, seed: int, data_parallel=False, flags: Optional[dict] = None,
               shard_tables: bool = False) -> dict:
    """What shapes a run's results, as JSON: the log's content (fingerprint), the split protocol, the
    seed, the recipe (resolved on the split), data parallelism, and the caller's `flags` (the command
    line's data and protocol flags). run.json records it; a resume must match it (ResumeError).
    `shard_tables` is recorded only when on, so runs from before it resume unchanged."""
    return training.json_normal({"log_fingerprint": fingerprint(split), "protocol": split.protocol, "seed": seed,
                                 "recipe": dataclasses.asdict(recipe), "data_parallel": bool(data_parallel),
                                 **({"shard_tables": True} if shard_tables else {}), "flags": flags or {}})


def check_resume(checkpoint_dir: str, config: dict) -> bool:
    """Whether `checkpoint_dir` holds a run to continue (False: nothing there, start afresh); ResumeError,
    before anything is trained, when its run.json records another configuration (one line per
    difference) or none."""
    try:
        manifest = run_dir.read_manifest(checkpoint_dir)
    except run_dir.OutputError:
        if os.path.exists(os.path.join(checkpoint_dir, run_dir.MANIFEST_FILE)):
            raise
        return False
    saved = manifest.get(RUN_CONFIG_KEY)
    if manifest.get("kind") != "pipeline" or saved is None:
        raise phoenix_resume.ResumeError(
            f"{checkpoint_dir}: cannot resume, its run.json records no two-stage run configuration (a "
            f"{manifest.get('kind')!r} run, or one written before runs were resumable); start afresh with "
            "--overwrite or in another directory")
    problems = phoenix_resume.config_differences(saved, config)
    if problems:
        raise phoenix_resume.ResumeError(
            f"{checkpoint_dir}: cannot resume, the run there was configured otherwise ({len(problems)} "
            "difference(s), run.json's value first):\n  " + "\n  ".join(problems)
            + "\nRun with the same log and flags, or start afresh with --overwrite or in another directory.")
    return True


def run(split: LogSplit, recipe: Recipe, checkpoint_dir, seed: int = 0, overwrite: bool = False,
        plot: bool = False, stream=None, title: Optional[str] = None, data_parallel=False, extra_rows=None,
        checkpoint_every: int = 0, keep_checkpoints: int = phoenix_resume.DEFAULT_KEEP_CHECKPOINTS,
        resume: bool = False, flags: Optional[dict] = None,
        columns: Optional[Columns] = None, shard_tables: bool = False) -> dict:
    """Trains both stages, keeps the best checkpoints, evaluates them read back; prints the table.

    Progress goes to `stream` (default stderr), the table to stdout. Returns {"table": {(split, name):
    metrics}, "reranked": {split: [U, K] columns}, "retrieval_weight", "popularity_weight" (the re-ranking
    weights chosen), "retrieval" / "ranker" (trainers),
    "retrieval_params" / "ranker_params" (best, as saved), "retrieval_best" / "ranker_best" (their val
    metrics and step), "stage_one" / "two_stage" (per split), "times", "wall_s", "checkpoint_dir",
    "recipe" (with table sizes resolved), "split", "extra", "served" (the ServedRun that load_run of the
    directory gives: recommend(result, user) serves from memory), "warning" (baseline_warning's line,
    printed on `stream` and logged in metrics.jsonl with stage "warning", or None)}. After the
    evaluation the directory gets serving/ (phoenix_serving.save_serving; `columns`, the log's, are
    recorded there).

    extra_rows (phoenix_protocols.extra_rows): called after the evaluation with {"split", "recipe",
    "seed", "checkpoint_dir", "stream", "retrieval_best", "ranker_best", "retrieval_weight",
    "popularity_weight", "data_parallel"}; returns (more table rows, info kept as result["extra"]).

    Resuming (docs/resume.md). With `checkpoint_every` N (or `resume`) each stage keeps step
    checkpoints in steps/<member_stage> (the newest `keep_checkpoints`) and the run holds a lock on its
    directory. run.json records run_config(split, recipe, seed, data_parallel, `flags`) and each stage as
    it finishes. With `resume`, a run there is continued: refused before anything is trained when its
    configuration differs (ResumeError, one line per difference); a finished stage is read back, not
    trained again; the others continue from their newest step checkpoint; mining, the evaluation and
    the extra rows are computed again. The result is bit for bit an uninterrupted run's (on CPU, on the
    same devices). An empty or absent directory starts afresh.
    """
    stream = sys.stderr if stream is None else stream
    checkpoint_dir = str(checkpoint_dir)
    check_run_dir(checkpoint_dir, overwrite, resume=resume)
    if plot:
        _pyplot()  # a missing matplotlib fails now, not after training
    recipe = two_stage.resolve_recipe(recipe, split)
    two_stage.check_recipe(split, recipe)
    config = run_config(split, recipe, seed, data_parallel, flags, shard_tables)
    resuming = resume and check_resume(checkpoint_dir, config)
    if resume and not resuming:
        print(f"nothing to resume in {checkpoint_dir}: starting afresh", file=stream)
    steps = (Steps(checkpoint_every, keep_checkpoints, resuming, config) if checkpoint_every or resume else None)
    lock = (phoenix_resume.RunLock(checkpoint_dir, lambda m: print(m, file=stream, flush=True))
            if steps is not None else None)
    try:
        return _run(split, recipe, checkpoint_dir, seed, plot, stream, title, data_parallel, extra_rows, config,
                    steps, overwrite, resuming, columns, shard_tables)
    finally:
        if lock is not None:
            lock.release()


def _run(split, recipe, checkpoint_dir, seed, plot, stream, title, data_parallel, extra_rows, config, steps,
         overwrite, resuming, columns, shard_tables=False) -> dict:
    """run's work, in its directory (checked, and locked for a resumable run)."""
    start = time.perf_counter()
    if not resuming:
        if overwrite and os.path.isdir(os.path.join(checkpoint_dir, STEPS_DIR)):
            shutil.rmtree(os.path.join(checkpoint_dir, STEPS_DIR))  # an earlier run's, checked to be Phoenix's
        run_dir.write_manifest(checkpoint_dir, "pipeline", RUN_ENTRIES, source=split.log.source, seed=seed,
                               protocol=split.protocol, recipe=dataclasses.asdict(recipe),
                               **{RUN_CONFIG_KEY: config, FINISHED_KEY: {}})
    log = MetricsLog(os.path.join(checkpoint_dir, METRICS_FILE), resume=resuming)
    print(f"{describe(split)}; seed {seed}\n{recipe}", file=stream)
    print("hash collisions (ids, sharing all rows, sharing a row): " + ", ".join(
        f"{name}s {c}" for name, c in hash_collisions(split, two_stage.hash_config(recipe)).items()), file=stream)

    print("\n== stage 1: retrieval (in-batch softmax, logQ correction, accidental-hit masking)", file=stream)
    t0 = time.perf_counter()
    retrieval, retrieval_params, retrieval_best = train_retrieval(split, recipe, seed, checkpoint_dir, stream, log,
                                                                  data_parallel, steps, shard_tables)
    times = {"retrieval": time.perf_counter() - t0}
    print(f"retrieval: best val NDCG@10 {retrieval_best['NDCG@10']:.4f} at {_at(retrieval_best)}, "
          f"{times['retrieval']:.0f} s", file=stream)

    t0 = time.perf_counter()
    pool = (two_stage.hard_negative_pool(retrieval, retrieval_params, split, recipe.history_len, recipe.negative_pool)
            if recipe.hard_negatives else None)
    val_one = two_stage.StageOne(retrieval, retrieval_params, split, "val", recipe.history_len, recipe.retrieve_k,
                                 rows=two_stage.validation_rows(split))  # the ranker's validations' users
    times["mining"] = time.perf_counter() - t0

    print(f"\n== stage 2: ranker (target + {recipe.hard_negatives} hard + {recipe.random_negatives} random "
          f"negatives, multi-action BCE); negatives mined in {times['mining']:.0f} s", file=stream)
    t0 = time.perf_counter()
    try:
        ranker, ranker_params, ranker_best = train_ranker(
            split, pool, recipe, seed, checkpoint_dir, val_one,
            first_member(retrieval_params) if recipe.ranker_init_from_retrieval else None, stream, log, data_parallel,
            steps, shard_tables)
    except training.TrainingStopped as stop:  # a clean stop: the trained retrieval stage is kept
        paths = [os.path.join(checkpoint_dir, two_stage.member_stage(m, "retrieval"))
                 for m in range(recipe.retrieval_members)]
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
    table, reranked, stage_one, two_stages, (weight, prior, follow) = evaluate_stages(
        split, retrieval, retrieval_params, ranker, ranker_params, recipe)
    times["evaluation"] = time.perf_counter() - t0
    served = _save_serving(split, recipe, checkpoint_dir, retrieval, retrieval_params, ranker, ranker_params,
                           weight, prior, columns, follow)
    extra = {}
    if extra_rows is not None:  # other protocols and reference models (phoenix_protocols.py)
        t0 = time.perf_counter()
        more, extra = extra_rows({"split": split, "recipe": recipe, "seed": seed, "checkpoint_dir": checkpoint_dir,
                                  "stream": stream, "retrieval_best": retrieval_best, "ranker_best": ranker_best,
                                  "retrieval_weight": weight, "popularity_weight": prior,
                                  "transition_weight": follow, "data_parallel": data_parallel,
                                  "shard_tables": shard_tables})
        table = phoenix_protocols.ordered({**table, **more})
        times["extra"] = time.perf_counter() - t0
    wall = time.perf_counter() - start
    for (which, name), m in table.items():
        log.write(stage="evaluation", split=which, model=name, **m)
    print(f"evaluation {times['evaluation']:.0f} s; re-ranking score = ranker {recipe.score_action} logit + "
          f"{weight:g} x retrieval cosine / {recipe.temperature:g} + {prior:g} x log(1 + item interactions) + "
          f"{follow:g} x log(1 + times the item followed the user's last item) (weights chosen on validation)",
          file=stream)
    print("each term's share, validation NDCG@10: " + contributions(two_stages["val"], recipe, (weight, prior, follow)),
          file=stream)
    if plot:
        print(f"curves: {plot_curves(log.path, os.path.join(checkpoint_dir, PLOT_FILE))}", file=stream)

    title = title or f"{split.log.source}, {split.protocol}"
    print(f"\n{title}, all {len(split.item_ids)} items ranked, seed {seed}, wall time {wall:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")\n")
    print(format_table(table), flush=True)  # before the warning line on stderr
    warning = report_baseline_warning(table, recipe, stream, log)  # after the table: the last line a reader sees
    return {"table": table, "warning": warning, "reranked": reranked, "retrieval_weight": weight,
            "popularity_weight": prior, "transition_weight": follow,
            "retrieval": retrieval,
            "retrieval_params": retrieval_params, "ranker": ranker, "ranker_params": ranker_params,
            "retrieval_best": retrieval_best, "ranker_best": ranker_best, "stage_one": stage_one,
            "two_stage": two_stages, "times": times, "wall_s": wall, "checkpoint_dir": checkpoint_dir,
            "recipe": recipe, "split": split, "extra": extra, "served": served}


def _save_serving(split: LogSplit, recipe: Recipe, checkpoint_dir: str, retrieval, retrieval_params, ranker,
                  ranker_params, weight: float, prior: float, columns: Optional[Columns],
                  follow: float = 0.0) -> ServedRun:
    """Writes serving/ (what load_run reads beside the checkpoints) and returns the ServedRun it describes."""
    phoenix_serving.save_serving(checkpoint_dir, split, recipe, weight, prior, columns, follow)
    return phoenix_serving.served_in_memory(split, recipe, retrieval, retrieval_params, ranker, ranker_params,
                                            weight, prior, checkpoint_dir, follow)


def contributions(two_stage_val: two_stage.TwoStage, recipe: Recipe, weights: tuple) -> str:
    """Validation NDCG@10 of the re-ranking score built up term by term with the chosen `weights`
    (retrieval, popularity, transition): the ranker alone, then + each term in turn (what each adds)."""
    parts, chosen = [], [0.0, 0.0, 0.0]
    names = ("ranker alone", "+ retrieval", "+ popularity", "+ transition")
    for step, name in enumerate(names):
        if step:
            chosen[step - 1] = weights[step - 1]
        ndcg = two_stage_val.evaluate(chosen[0], recipe.temperature, chosen[1], chosen[2])[0]["NDCG@10"]
        parts.append(f"{name} {ndcg:.4f}")
    return ", ".join(parts)


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
    examples = phoenix_split.histories(split, rows, ends, history_len)
    examples["target_post_ids"] = split.items[ends - 1]  # a placeholder candidate for user-tower-only calls
    return examples


def user_batch(split: LogSplit, user, history_len: int, hashes: HashConfig, candidate_ids=None):
    """RecsysBatch [1, S] of `user`'s latest history with candidates `candidate_ids` [C] (raw item ids,
    default one placeholder): the input of the runners' retrieve / rank for that user."""
    candidates = None if candidate_ids is None else np.asarray(candidate_ids, np.int64)[None, :]  # [1, C]
    return phoenix_split.phoenix_batch(split, user_examples(split, user, history_len), hashes, candidates)


def items_batch(split: phoenix_split.Split, hashes: HashConfig):
    """RecsysBatch [1, N] whose candidates are every catalog item: the corpus for the candidate tower."""
    return phoenix_split.phoenix_batch(split, two_stage.item_examples(split), hashes, split.item_ids[None, :])


def seen_items(split: LogSplit, user) -> np.ndarray:
    """[N] bool: the catalog items the log holds for `user` (never recommended again)."""
    row = user_row(split, user)
    seen = np.zeros(len(split.item_ids), bool)
    seen[split.item_columns[split.offsets[row]:split.offsets[row + 1]]] = True
    return seen


def dump_topk(path, split: LogSplit, topk_columns: np.ndarray) -> None:
    """CSV `user_id,item_1,...,item_K` of every evaluated user, original ids (phoenix_evaluation.dump_topk:
    written atomically, its directory created if missing). A directory or other non-file at `path` is refused."""
    path = Path(path)
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise run_dir.OutputError(f"dump path {path}: is {run_dir.path_kind(path)}, not a file")
    users = split.log.tokens("user", split.user_ids[split.eval_users()])
    items = split.log.tokens("item", split.item_ids[topk_columns])
    K = topk_columns.shape[1]
    evaluation.dump_topk(path, np.array(users, dtype=object), np.array(items, dtype=object).reshape(-1, K))


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
# Experiments: seeds, dumps and their checks (what run_train.py's flags ask for)
# ---------------------------------------------------------------------------------------------


SEED_COLUMNS = (("test", "retrieval"), ("test", "two-stage"), ("val", "retrieval"), ("val", "two-stage"))
EXTRA_MODELS = ("sasrec",)  # rows of phoenix_protocols (and other protocols' rows) get columns too


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Where an experiment's runs go and what they write beside their checkpoints."""

    checkpoint_dir: str  # the run directory (with seeds: one seed<N>/ per seed in it)
    seed: int = 0  # parameters, batch streams and negatives
    seeds: Optional[tuple] = None  # run each of these seeds in turn instead of `seed`, then a summary table
    overwrite: bool = False  # replace an earlier run there (only what Phoenix wrote) and existing dumps
    plot: bool = False  # curves.png in each run directory (the plot extra)
    data_parallel: bool = False  # split each training batch over all devices (training.Trainer)
    shard_tables: bool = False  # with data_parallel: hash-table rows split over the devices (phoenix_sharding)
    dump_topk: Optional[str] = None  # every test user's final top-10 as CSV (seeds: PATH with .seed<N>)
    columns: Optional[Columns] = None  # the log's columns, recorded in serving/ (None: not recorded)
    checkpoint_every: int = 0  # step checkpoints of each stage every N steps (0: none unless resume)
    keep_checkpoints: int = phoenix_resume.DEFAULT_KEEP_CHECKPOINTS  # the newest K step checkpoints kept
    resume: bool = False  # continue the run in checkpoint_dir where it stopped (run: Resuming)
    flags: Optional[dict] = None  # the command line's data and protocol flags, JSON (run_config's `flags`)

    def __post_init__(self):
        if self.overwrite and self.resume:
            raise ValueError("overwrite and resume: resume continues the run in checkpoint_dir, overwrite replaces "
                             "it; give one")
        for name, low in (("checkpoint_every", 0), ("keep_checkpoints", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)
                                       or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                              for s in self.seeds)):
            raise ValueError(f"seeds: expected distinct non-negative ints, got {self.seeds!r}")


def seed_path(path: str, seed, tag: str = "seed") -> str:
    """top10.csv -> top10.seed0.csv (a path without a suffix gets .seed0 appended); another tag:
    seed_path("top10.seed0.csv", "", "trainval") -> top10.seed0.trainval.csv."""
    root, dot, suffix = path.rpartition(".")
    if not dot or "/" in suffix:
        return f"{path}.{tag}{seed}"
    return f"{root}.{tag}{seed}.{suffix}"


def run_outputs(options: RunOptions, protocols: Protocols = Protocols()) -> tuple[dict, dict]:
    """({seed or None: run directory}, {label: dump path}) of an experiment: one of each, or with seeds
    each seed's; with protocol train+val each dump's .trainval twin too."""
    seeds = options.seeds
    dirs = ({seed: os.path.join(options.checkpoint_dir, f"seed{seed}") for seed in seeds} if seeds
            else {None: options.checkpoint_dir})
    files = {}
    if options.dump_topk:
        for seed in dirs:
            path = options.dump_topk if seed is None else seed_path(options.dump_topk, seed)
            which = [] if seed is None else [f"seed {seed}"]
            files[f"--dump-topk ({', '.join(which)})" if which else "--dump-topk"] = path
            if protocols.protocol == "train+val":
                files[f"--dump-topk ({', '.join(which + ['train+val'])})"] = seed_path(path, "", "trainval")
    return dirs, files


def check_run_outputs(options: RunOptions, protocols: Protocols = Protocols(), inputs=()) -> None:
    """Everything an experiment will write, checked before its data is read (phoenix_run_dir.check_outputs:
    never over `inputs`, phoenix_run_dir.Input; never over what Phoenix did not write; an earlier run only
    with overwrite), and the plot extra when a plot is asked for."""
    dirs, files = run_outputs(options, protocols)
    if options.resume:  # the dumps the run being resumed wrote are its own to write again
        ours = {flag: path for flag, path in files.items() if _is_dump(path)}
        files = {flag: path for flag, path in files.items() if flag not in ours}
        run_dir.check_outputs(inputs, list(dirs.values()), RUN_ENTRIES, ours, overwrite=True, earlier_run=True)
    run_dir.check_outputs(inputs, list(dirs.values()), RUN_ENTRIES, files, options.overwrite,
                          earlier_run=options.resume)
    if options.plot:
        _pyplot()  # a missing matplotlib fails now, not after training


def _is_dump(path) -> bool:
    """Whether `path` is a regular file that starts as dump_topk's CSV does (a dump a resumed run wrote)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return os.path.isfile(path) and not os.path.islink(path) and head.startswith(b"user_id,item_1")


def check_dump_k(options: RunOptions, recipe: Recipe, split: LogSplit) -> None:
    """RecipeError if the recipe, resolved on `split`, would hand fewer than FINAL_K items to a dump."""
    k = two_stage.resolve_recipe(recipe, split).retrieve_k
    if options.dump_topk and k < FINAL_K:
        raise RecipeError(f"--dump-topk: --retrieve-k resolves to {k} on {split.log.source}, fewer than the "
                          f"{FINAL_K} items a dump holds")


def seed_table(tables: dict) -> tuple[str, dict]:
    """Markdown table of {seed: run table}: HR@10 / NDCG@10 of SEED_COLUMNS per seed, then their mean
    and sample standard deviation over seeds. Returns (text, {(split, model, metric): (mean, sd)})."""
    present = [key for key in next(iter(tables.values())) if all(key in t for t in tables.values())]
    columns = SEED_COLUMNS + tuple(key for key in present if key[1] in EXTRA_MODELS or key[0] not in ("val", "test"))
    keys = [(which, model, metric) for which, model in dict.fromkeys(columns) for metric in ("HR@10", "NDCG@10")]
    head = " | ".join(f"{which} {model} {metric}" for which, model, metric in keys)
    lines = [f"| seed | {head} |", "|---|" + "---:|" * len(keys)]
    for seed, table in tables.items():
        lines.append(f"| {seed} | " + " | ".join(f"{table[(w, m)][k]:.4f}" for w, m, k in keys) + " |")
    stats = {}
    for w, m, k in keys:
        values = np.array([table[(w, m)][k] for table in tables.values()])
        stats[(w, m, k)] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    lines.append("| mean +- sd | " + " | ".join(f"{stats[key][0]:.4f} +- {stats[key][1]:.4f}" for key in keys) + " |")
    return "\n".join(lines), stats


def _run_seed(split: LogSplit, recipe: Recipe, options: RunOptions, protocols: Protocols, seed: int,
              checkpoint_dir: str, dump_path: Optional[str], check: Optional[Callable], title: str, stream) -> dict:
    """One seed of an experiment (table on stdout); run()'s dict plus "dump_check"."""
    result = run(split, recipe, checkpoint_dir, seed, options.overwrite, options.plot, stream, title=title,
                 data_parallel=options.data_parallel, shard_tables=options.shard_tables,
                 extra_rows=phoenix_protocols.extra_rows(protocols),
                 columns=options.columns, checkpoint_every=options.checkpoint_every,
                 keep_checkpoints=options.keep_checkpoints, resume=options.resume,
                 flags={**(options.flags or {}), "protocols": dataclasses.asdict(protocols)})
    first_check = None
    retrained = result.get("extra", {}).get("train+val")
    dumps = [(dump_path, result["reranked"]["test"], ("test", "two-stage"))] if dump_path else []
    if dump_path and retrained:  # protocol train+val: its two-stage top-10s beside, PATH with .trainval
        dumps.append((seed_path(dump_path, "", "trainval"), retrained["reranked_test"],
                      (phoenix_protocols.TRAIN_VAL, "two-stage")))
    for path, reranked, row in dumps:
        dump_topk(path, split, reranked[:, :FINAL_K])
        ours = result["table"][row]
        label = "" if row[0] == "test" else f" ({row[0]})"
        line = f"\ndump {path}{label}: table HR@10 {ours['HR@10']:.4f} NDCG@10 {ours['NDCG@10']:.4f}"
        if check is None:
            print(line + f" (not recomputed: check_dump rebuilds leave-one-out targets, this is a {split.protocol} "
                         "split)")
            continue
        recomputed = check(path)
        first_check = recomputed if first_check is None else first_check
        print(line + f"; recomputed from the dump HR@10 {recomputed['HR@10']:.4f} NDCG@10 {recomputed['NDCG@10']:.4f} "
                     f"({recomputed['num_users']} users, history items in the top-10s: "
                     f"{recomputed['history_items_in_topk']})")
        check_dump_figures(path, ours, recomputed)
    return {**result, "dump_check": first_check}


def run_experiment(split: LogSplit, recipe: Recipe, options: RunOptions, protocols: Protocols = Protocols(),
                   check: Optional[Callable] = None, title: Optional[str] = None, stream=None) -> dict:
    """run() with what a command line asks for: each dump written (original ids) and its HR@10 / NDCG@10
    recomputed from the file by `check(path) -> dict` (check_dump's keys; None: leave-one-out's check_dump
    of split.log, none for a time split) and compared with the table's (DumpCheckError); with
    options.seeds, each seed in turn (its own checkpoint_dir/seed<N> and dump PATH.seed<N>), then the
    per-seed table with mean +- sd. Returns run()'s dict plus "dump_check" (the first dump's), or with
    seeds {"seeds": {seed: that dict}, "summary": seed_table's stats, "wall_s"}. Call check_run_outputs
    first: this writes where it was told to."""
    if check is None and split.protocol == "leave-one-out":
        check = lambda path: check_dump(path, split.log, FINAL_K)  # noqa: E731
    check_dump_k(options, recipe, split)
    title = title or f"{split.log.source}, {split.protocol}"
    if not options.seeds:
        return _run_seed(split, recipe, options, protocols, options.seed, options.checkpoint_dir, options.dump_topk,
                         check, title, stream)
    run_dirs = run_outputs(options, protocols)[0]
    start = time.perf_counter()
    results = {seed: _run_seed(split, recipe, options, protocols, seed, run_dirs[seed],
                               seed_path(options.dump_topk, seed) if options.dump_topk else None, check, title, stream)
               for seed in options.seeds}
    wall = time.perf_counter() - start
    text, stats = seed_table({seed: result["table"] for seed, result in results.items()})
    print(f"\n{title}, seeds {','.join(map(str, options.seeds))}: HR@10 / NDCG@10 per seed, mean +- sample sd; "
          f"wall time {wall:.0f} s (" + ", ".join(f"seed {seed} {result['wall_s']:.0f} s"
                                                  for seed, result in results.items()) + ")\n")
    print(text)
    return {"seeds": results, "summary": stats, "wall_s": wall}

"""The synthetic experiment: train both Phoenix models on the synthetic world and show that they learn.

    uv run run_train.py --data synthetic [--seed 0] [--steps-ranker 1200] [--steps-retrieval 800]
                                         [--checkpoint-dir DIR] [--checkpoint-every N --resume]
                                         [--keep-checkpoints K] [sizes, see --help]
    train_synthetic.run(train_synthetic.SyntheticRun(steps_ranker=300))     # the same from Python

Every flag of `run_train.py --data synthetic` is a field of SyntheticRun (run_train.py parses them);
the world, its streams and the evaluators are phoenix_synthetic.py's.

Shape glossary
  B batch (users)   S history length   C candidates   D embedding size   A actions (19)
  N posts (corpus)  E evaluation examples   U' distinct evaluated users   K recall cut-off (100)

What it prints. Training progress of each model on stderr (the first step's trace + compile time
on its own line, then step, loss, steps/s and ETA every --log-every steps without a host sync in
between), then a markdown table: every figure beside the world's oracle and a popularity baseline,
measured on users held out of training (10% of the world's users, `SyntheticWorld.split_users`):

  ranker     AUC of the favorite action and mean AUC over all 19 actions on held-out users'
             candidates (labels sampled from the oracle, AUC pooled over all candidates), with
             "gap closed" = (AUC - 0.5) / (oracle AUC - 0.5);
  retrieval  recall@100 of each held-out example's next engaged post over the FULL corpus: every
             post encoded by the candidate tower, scored against the user tower's representation;

then one row per action, and the wall times. Checkpoints (trainer format: parameters, hash tables,
optimiser state, config; `runners.*.from_checkpoint` loads them) go to `<checkpoint-dir>/ranker` and
`<checkpoint-dir>/retrieval`, by default under the cache directory: $PHOENIX_CACHE_DIR/checkpoints/synthetic
($PHOENIX_CACHE_DIR defaults to ~/.cache/phoenix). `run` returns the figures as a dict.

Resuming (preemptible machines). With --checkpoint-every N the training state is saved every N
steps to <checkpoint-dir>/steps/{ranker,retrieval}/step-NNNNNNNN (the newest --keep-checkpoints,
default 3, are kept). After a kill, run the same command with --resume: each model continues from
its newest complete checkpoint, a model whose final checkpoint is there is not trained again, and
the final parameters, figures and training history are bit for bit those of an uninterrupted run
(on CPU, on the same devices). Training batches are a function of (world seed, --seed, step) alone (`step_rng`), so a
resume at step k draws exactly the batches k, k+1, ...; the popularity counts travel in the
checkpoint. A step checkpoint holds parameters and hash tables, optimiser state, step, PRNG key,
the metric sums not yet logged, the history, the popularity counts and the run config (every field
that changes results, `run_config`); a resume with other flags stops and lists what differs.
--resume on an empty directory starts afresh. Without --resume, a directory holding an earlier
run (ranker/, retrieval/, steps/) is refused before the world is built, unless --overwrite, which
replaces it (its step checkpoints removed first); whatever is there that Phoenix did not write
is refused either way, and nothing else in the directory is touched; run.json, written first,
records the run (phoenix_run_dir.py). A saving or deleting process killed at any moment leaves the
newest complete checkpoint intact (resume_harness.py checks it with SIGKILLs). SIGTERM or Ctrl-C
stops a run between two steps: the step in flight is saved (with --checkpoint-every or --resume) and
one line says what is saved and the command that resumes; exit status 143 / 130 (docs/resume.md).
The devices are part of the run: a resume with another device count, --data-parallel or, on CPU,
XLA thread pool size (which change float32 sums) is refused, naming the difference.
What a save costs (a step checkpoint is fsynced): docs/resume.md.

Measured figures, the world's knobs and the recipe's reasons: docs/notes.md ("The synthetic world").
"""


import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import phoenix_checkpoint as checkpoint
import phoenix_run_dir as run_dir
import phoenix_sizes
import phoenix_training as training
from phoenix_inputs import ACTIONS, HashConfig
from phoenix_paths import checkpoint_path
from phoenix_synthetic import (FAVORITE, RECALL_K, STREAM_VERSION, TABLE_INIT_STDDEV, WORLD_OVERRIDES, PopularityCounts,
                               SyntheticWorld, WorldConfig, evaluate_ranker, evaluate_retrieval, example_ranking_batch,
                               gap_closed, held_out_examples, optimizer_config, ranking_stream, retrieval_stream,
                               to_retrieval_batch, unknown_user_id, world_config)

__all__ = ["SyntheticRun", "run", "run_config", "check_run_dir", "prepare_run_dir", "describe_stop", "format_table",
           "format_action_table"]

# What the experiment checks its figures against: the ranker closes at least this share of the gap
# from chance to the oracle, retrieval's recall beats popularity's by at least this factor.
MIN_GAP_CLOSED = 0.8
MIN_RECALL_RATIO = 3.0
# Fields that do not change what a run computes, left out of the config a resume must match.
NOT_RUN_CONFIG = {"data", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "log_every", "only",
                  "overwrite"}
# Fields of one phase only: the other phase's checkpoints do not depend on them.
PHASE_FLAGS = {"ranker": {"steps_ranker", "batch_size", "eval_every"},
               "retrieval": {"steps_retrieval", "retrieval_batch_size", "temperature"}}
# Bounds of the numeric fields (and their flags), checked before anything runs: (fields, lowest value,
# whether it is allowed).
FLAG_BOUNDS = (
    (("num_users", "num_posts", "num_authors", "history_len", "min_history_len", "num_candidates", "emb_size",
      "num_layers", "num_heads", "key_size", "batch_size", "retrieval_batch_size", "steps_ranker", "steps_retrieval",
      "eval_repeats", "log_every"), 1, True),
    (("user_table_size", "post_table_size", "author_table_size"), 2, True),
    (("seed", "world_seed", "eval_every", "user_id_dropout"), 0, True),
    (("widening_factor", "learning_rate", "temperature", "impression_temperature", "table_init_stddev"), 0, False),
)
PHASES = ("ranker", "retrieval")
# What a run writes in --checkpoint-dir ({name regex: phoenix_run_dir kind}); nothing else there is touched.
RUN_ENTRIES = {"ranker|retrieval": "checkpoint", "steps": "steps", re.escape(run_dir.MANIFEST_FILE): "manifest",
               re.escape(training.LOCK_FILE): "lock"}


def out_of_bounds(name: str, value) -> Optional[str]:
    """What is wrong with field `name`'s `value` by FLAG_BOUNDS ("expected an int >= 1, got 0"), or None."""
    for names, low, inclusive in FLAG_BOUNDS:
        if name in names and (not math.isfinite(value) or value < low or (value == low and not inclusive)):
            kind, relation = "an int" if isinstance(value, int) else "a number", ">=" if inclusive else ">"
            return f"expected {kind} {relation} {low}, got {value}"
    return None


@dataclasses.dataclass(frozen=True)
class SyntheticRun:
    """One run of the experiment: every field is a flag of `run_train.py --data synthetic` (--help says
    what each does); the defaults are the command's."""

    seed: int = 0  # parameter init, batch streams, evaluation examples
    steps_ranker: int = 1200
    steps_retrieval: int = 800
    checkpoint_dir: Optional[str] = None  # ranker/ and retrieval/; None: <cache>/checkpoints/synthetic
    overwrite: bool = False  # replace an earlier run there (only what Phoenix wrote)
    only: Optional[str] = None  # "ranker" or "retrieval": train one model only
    checkpoint_every: int = 0  # step checkpoints every N steps under <checkpoint_dir>/steps (0: off)
    keep_checkpoints: int = training.DEFAULT_KEEP_CHECKPOINTS  # step checkpoints kept per model
    resume: bool = False  # continue the run in checkpoint_dir where it stopped
    world_seed: int = WorldConfig.seed
    num_users: int = WorldConfig.num_users
    num_posts: int = WorldConfig.num_posts
    num_authors: int = WorldConfig.num_authors
    history_len: int = WorldConfig.history_len
    min_history_len: int = WORLD_OVERRIDES["min_history_len"]
    num_candidates: int = WorldConfig.num_candidates
    impression_temperature: float = WORLD_OVERRIDES["impression_temperature"]
    emb_size: int = 32  # a model that learns the world in minutes on a CPU
    num_layers: int = 2
    num_heads: int = 2
    key_size: int = 16  # emb_size / num_heads
    widening_factor: float = 2.0
    user_table_size: int = 2003  # the tables: primes just above twice each vocabulary, so few ids collide
    post_table_size: int = 10007
    author_table_size: int = 401
    table_init_stddev: float = TABLE_INIT_STDDEV  # small rows move fast under Adam
    batch_size: int = 128  # ranker users per step
    retrieval_batch_size: int = 256  # retrieval softmax rows per step
    learning_rate: float = 6e-3
    data_parallel: bool = False  # split each batch over all devices JAX finds
    shard_tables: bool = False  # with data_parallel: each hash table's rows split over the devices
    temperature: float = training.DEFAULT_TEMPERATURE
    user_id_dropout: float = 1.0  # share of training rows whose user id is replaced by the unknown user
    eval_repeats: int = 50  # evaluation examples per held-out user
    eval_every: int = 0  # ranker learning curve every N steps (0: off)
    log_every: int = 100

    def __post_init__(self):
        if self.checkpoint_dir is None:  # the cache directory as of now, not as of import
            object.__setattr__(self, "checkpoint_dir", checkpoint_path("synthetic"))
        problems = [f"{name}: {problem}" for name, value in sorted(dataclasses.asdict(self).items())
                    if (problem := out_of_bounds(name, value))]
        if self.only not in (None, *PHASES):
            problems.append(f"only: expected one of {PHASES} or None, got {self.only!r}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            problems.append(f"checkpoint_every, keep_checkpoints: expected >= 0 and >= 1, got {self.checkpoint_every}, "
                            f"{self.keep_checkpoints}")
        if self.user_id_dropout > 1 or self.min_history_len > self.history_len:
            problems.append(f"user_id_dropout, min_history_len: expected a share in [0, 1] and <= history_len "
                            f"{self.history_len}, got {self.user_id_dropout}, {self.min_history_len}")
        if self.overwrite and self.resume:
            problems.append("overwrite and resume: resume continues the run in checkpoint_dir, overwrite replaces it")
        if self.shard_tables and not self.data_parallel:
            problems.append("shard_tables: splits the tables over the data-parallel devices; add data_parallel")
        if problems:
            raise ValueError("SyntheticRun: " + "; ".join(problems))

    def world(self) -> WorldConfig:
        """The run's world: the experiments' (phoenix_synthetic.world_config) with its sizes."""
        return world_config(num_users=self.num_users, num_posts=self.num_posts, num_authors=self.num_authors,
                            history_len=self.history_len, min_history_len=self.min_history_len,
                            num_candidates=self.num_candidates, impression_temperature=self.impression_temperature,
                            seed=self.world_seed)


# --------------------------------------------------------------------------- configs


def hash_config(options: SyntheticRun) -> HashConfig:
    return HashConfig(user_table_size=options.user_table_size, post_table_size=options.post_table_size,
                      author_table_size=options.author_table_size)


def model_sizes(options: SyntheticRun) -> phoenix_sizes.ModelSizes:
    return phoenix_sizes.ModelSizes(emb_size=options.emb_size, num_layers=options.num_layers,
                                    num_heads=options.num_heads, key_size=options.key_size,
                                    widening_factor=options.widening_factor)


def ranker_config(options: SyntheticRun, world_cfg: WorldConfig):
    return phoenix_sizes.ranker_config(model_sizes(options), world_cfg.history_len, world_cfg.num_candidates,
                                       hash_config(options), fprop_dtype=jnp.float32)


def retrieval_config(options: SyntheticRun, world_cfg: WorldConfig):
    return phoenix_sizes.retrieval_config(model_sizes(options), world_cfg.history_len, hash_config(options),
                                          fprop_dtype=jnp.float32)


# --------------------------------------------------------------------------- report


def format_table(ranker: dict | None, retrieval: dict | None, num_posts: int) -> str:
    lines = ["| model | metric | trained | oracle | popularity | trained vs oracle/popularity |",
             "|---|---|---|---|---|---|"]
    if ranker is not None:
        for label, pick in (("AUC favorite", lambda v: v[FAVORITE]),
                            (f"mean AUC, {len(ACTIONS)} actions", np.nanmean)):
            m, o, p = (float(pick(ranker[k])) for k in ("model", "oracle", "popularity"))
            lines.append(f"| ranker | {label} | {m:.3f} | {o:.3f} | {p:.3f} | "
                         f"gap closed {gap_closed(m, o):.1%} (popularity {gap_closed(p, o):.1%}) |")
    if retrieval is not None:
        m, o, p = retrieval["model"], retrieval["oracle"], retrieval["popularity"]
        lines.append(f"| retrieval | recall@{RECALL_K} of {num_posts:,} posts | {m:.3f} | {o:.3f} | {p:.3f} | "
                     f"{m / p:.2f}x popularity, {m / o:.1%} of oracle |")
    return "\n".join(lines)


def format_action_table(ranker: dict) -> str:
    lines = ["| action | positives | trained AUC | oracle AUC | popularity AUC | gap closed |",
             "|---|---|---|---|---|---|"]
    for a, name in enumerate(ACTIONS):
        m, o, p = ranker["model"][a], ranker["oracle"][a], ranker["popularity"][a]
        lines.append(f"| {name} | {int(ranker['positives'][a])} | {m:.3f} | {o:.3f} | {p:.3f} | "
                     f"{gap_closed(m, o):.1%} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- training


def run_config(options: SyntheticRun, phase: str) -> dict:
    """What a `phase` ("ranker" or "retrieval") of this run computes from: every flag but those in
    NOT_RUN_CONFIG and the other phase's, and the batch stream's formula. A resume must match it."""
    other = PHASE_FLAGS["retrieval" if phase == "ranker" else "ranker"]
    flags = {k: v for k, v in sorted(dataclasses.asdict(options).items()) if k not in NOT_RUN_CONFIG | other}
    if not flags.get("shard_tables"):  # absent unless on: runs from before the flag resume unchanged
        flags.pop("shard_tables", None)
    return {"phase": phase, "stream": STREAM_VERSION, **flags}


def resumable(options: SyntheticRun, phase: str) -> dict:
    """fit's keyword arguments for a phase: step checkpoints in <checkpoint-dir>/steps/<phase> when
    --checkpoint-every or --resume asks for them (the final checkpoint alone otherwise, as before)."""
    if not (options.checkpoint_every or options.resume):
        return {}
    return {"checkpoint_dir": os.path.join(options.checkpoint_dir, "steps", phase),
            "checkpoint_every": options.checkpoint_every, "keep_checkpoints": options.keep_checkpoints,
            "resume": options.resume, "run_config": run_config(options, phase)}


def final_differences(options: SyntheticRun, phase: str) -> tuple[list[str], dict]:
    """How the phase's final checkpoint (which exists) differs from this run: its run config and its
    devices (training.run_devices; one written before they were recorded is taken to be this run's).
    Returns (differences, the checkpoint's extra)."""
    extra = checkpoint.read_meta(os.path.join(options.checkpoint_dir, phase)).get("extra") or {}
    expected = json.loads(json.dumps(run_config(options, phase)))  # as it reads back from meta.json
    devices = training.run_devices(options.data_parallel)
    return (training.config_differences(extra.get("run_config"), expected)
            + training.config_differences(extra.get("devices", devices), devices, "devices")), extra


def finished_phase(options: SyntheticRun, phase: str, log) -> dict | None:
    """With --resume, the figures of a phase already finished by this run: its final checkpoint is
    written last (atomically) and records the run config, devices and figures. None if it still has
    to run."""
    path = os.path.join(options.checkpoint_dir, phase)
    if not options.resume or not os.path.exists(path):
        return None
    differences, extra = final_differences(options, phase)
    if differences or "result" not in extra:
        why = "; ".join(differences[:3]) if differences else "no figures recorded"
        log.write(f"{phase}: {path} holds another run's checkpoint ({why}); this run replaces it when its "
                  f"{phase} is trained\n")
        return None
    log.write(f"{phase}: already trained by this run, figures read from {path}\n")
    return {**training.decode_json(extra["result"]), "checkpoint": path}


def save_final(trainer, options: SyntheticRun, phase: str, state, world, result: dict, **extra) -> str:
    """The phase's final checkpoint, `runners.*.from_checkpoint`'s input, which also marks the phase
    finished for --resume (run config, and the figures with the training history, in its extra)."""
    return trainer.save(os.path.join(options.checkpoint_dir, phase), state, extra={
        "world": dataclasses.asdict(world.cfg), "seed": options.seed, "unknown_user_id": unknown_user_id(world.cfg),
        **extra, "run_config": run_config(options, phase), "devices": training.run_devices(trainer.mesh),
        "result": training.encode_json(result)})


def describe_stop(stop: training.TrainingStopped, options: SyntheticRun, argv: list) -> None:
    """Fills in a clean stop's line (phoenix_stop): what each phase of this run has saved (its final
    checkpoint, or its newest step checkpoint) and, when the run keeps step checkpoints, the command
    that resumes it: `argv` with --resume (without --overwrite, which would start afresh)."""
    resumable_run = bool(options.checkpoint_every or options.resume)
    for phase in [p for p in ("ranker", "retrieval") if options.only in (None, p)]:
        final = os.path.join(options.checkpoint_dir, phase)
        steps = training.list_step_checkpoints(os.path.join(options.checkpoint_dir, "steps", phase))
        try:
            finished = os.path.exists(final) and not final_differences(options, phase)[0]
        except (checkpoint.CheckpointError, OSError):  # unreadable: not this run's finished phase
            finished = False
        if finished:
            stop.kept.append(f"{phase} finished ({final})")
        else:
            stop.stage = stop.stage or phase  # the first phase not finished is the one that stopped
            if resumable_run and steps:
                stop.kept.append(f"{phase} at step {steps[-1][0]} of {getattr(options, 'steps_' + phase)} "
                                 f"({steps[-1][1]})")
    if resumable_run:
        kept = [a for a in argv if not (a.startswith("--ov") and "--overwrite".startswith(a))]
        stop.resume_argv = kept if options.resume else [*kept, "--resume"]
    else:
        stop.why_not = "--checkpoint-every is off"


def train_ranker(options: SyntheticRun, world, train_ids, held_out, log=sys.stderr) -> dict:
    if (done := finished_phase(options, "ranker", log)) is not None:
        return done
    cfg = ranker_config(options, world.cfg)
    hashes = cfg.hash_config
    trainer = training.make_ranking_trainer(cfg, hashes, optimizer_config(options.learning_rate, options.steps_ranker),
                                            table_init_stddev=options.table_init_stddev,
                                            data_parallel=options.data_parallel, shard_tables=options.shard_tables)
    counts = PopularityCounts(world.cfg.num_posts, world.cfg.num_product_surfaces, len(ACTIONS))

    def stream(first_step):
        return ranking_stream(world, train_ids, options.batch_size, options.seed, hashes, options.user_id_dropout,
                              counts, start_step=first_step)

    state = trainer.init(jax.random.PRNGKey(options.seed), example_ranking_batch(world, hashes))
    examples = held_out_examples(world, held_out, options.eval_repeats, "ranking", options.seed)

    def curve(state):
        r = evaluate_ranker(trainer, state.params, examples, counts)
        return {"auc_favorite": r["model"][FAVORITE], "mean_auc": np.nanmean(r["model"])}

    log.write(f"ranker: {options.steps_ranker} steps of {options.batch_size} users x {world.cfg.num_candidates} "
              f"candidates\n")
    t0 = time.perf_counter()
    state, history = training.fit(trainer, state, stream, options.steps_ranker, log_every=options.log_every,
                                  eval_fn=curve if options.eval_every else None, eval_every=options.eval_every,
                                  stream=log, aux=counts, **resumable(options, "ranker"))
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = evaluate_ranker(trainer, state.params, examples, counts)
    result.update(train_s=train_s, eval_s=time.perf_counter() - t0, history=history)
    path = save_final(trainer, options, "ranker", state, world, result,
                      auc_favorite=float(result["model"][FAVORITE]), mean_auc=float(np.nanmean(result["model"])))
    return {**result, "checkpoint": path}


def train_retrieval(options: SyntheticRun, world, train_ids, held_out, log=sys.stderr) -> dict:
    if (done := finished_phase(options, "retrieval", log)) is not None:
        return done
    cfg = retrieval_config(options, world.cfg)
    hashes = cfg.hash_config
    trainer = training.make_retrieval_trainer(cfg, hashes,
                                              optimizer_config(options.learning_rate, options.steps_retrieval),
                                              temperature=options.temperature,
                                              table_init_stddev=options.table_init_stddev,
                                              data_parallel=options.data_parallel,
                                              shard_tables=options.shard_tables)
    t0 = time.perf_counter()
    freq = world.positive_frequencies(train_ids)  # [N] logQ of in-batch negatives; popularity baseline
    freq_s = time.perf_counter() - t0

    def stream(first_step):
        return retrieval_stream(world, train_ids, options.retrieval_batch_size, options.seed, hashes,
                                options.user_id_dropout, np.log(freq), start_step=first_step)

    state = trainer.init(jax.random.PRNGKey(options.seed), to_retrieval_batch(
        world.retrieval_examples(np.zeros(2, np.int64), 0), hashes))
    examples = held_out_examples(world, held_out, options.eval_repeats, "retrieval", options.seed)
    log.write(f"retrieval: {options.steps_retrieval} steps of {options.retrieval_batch_size} (user, next engaged post) "
              f"rows, in-batch softmax with logQ\n")
    t0 = time.perf_counter()
    state, history = training.fit(trainer, state, stream, options.steps_retrieval, log_every=options.log_every,
                                  stream=log, **resumable(options, "retrieval"))
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = evaluate_retrieval(trainer, state.params, world, examples, freq)
    result.update(train_s=train_s, eval_s=time.perf_counter() - t0 + freq_s, history=history)
    path = save_final(trainer, options, "retrieval", state, world, result,
                      **{f"recall_at_{RECALL_K}": result["model"]})
    return {**result, "checkpoint": path}


def check_run_dir(options: SyntheticRun) -> None:
    """Refuses, before the world is built, a --checkpoint-dir where this run would replace what it must
    not (phoenix_run_dir.check_outputs: anything Phoenix did not write; an earlier run's checkpoints
    unless --overwrite or --resume). With --overwrite, the earlier run's step checkpoints (checked to be
    Phoenix's) are removed: a fresh run would refuse them as another run's."""
    run_dir.check_outputs([], [options.checkpoint_dir], RUN_ENTRIES, overwrite=options.overwrite,
                          earlier_run=options.resume)
    steps = os.path.join(options.checkpoint_dir, "steps")
    if options.overwrite and os.path.isdir(steps):
        shutil.rmtree(steps)


def prepare_run_dir(options: SyntheticRun) -> None:
    """check_run_dir and the manifest, by the first process of a multi-process run (it writes the run
    directory; every process writes its shards of the step checkpoints). The others wait for it (so that
    none reads the directory before an --overwrite has cleared it) and stop too if it refused."""
    refused = None
    if jax.process_index() == 0:
        try:
            check_run_dir(options)
            if not (options.resume and os.path.exists(os.path.join(options.checkpoint_dir, run_dir.MANIFEST_FILE))):
                run_dir.write_manifest(options.checkpoint_dir, "synthetic", RUN_ENTRIES, seed=options.seed,
                                       flags=dict(sorted({"data": "synthetic", **dataclasses.asdict(options)}.items())))
        except Exception as e:  # every process hears of it: the others would wait for it in a collective
            refused = e
    if jax.process_count() > 1 and int(multihost_utils.broadcast_one_to_all(np.int32(refused is not None))):
        if refused is None:
            raise run_dir.OutputError(f"--checkpoint-dir {options.checkpoint_dir}: process 0 refused it (its error "
                                      "says why); nothing trained")
    if refused is not None:
        raise refused


def run(options: SyntheticRun, argv: Optional[list] = None) -> dict:
    """The experiment (module docstring); returns the figures. A clean stop (SIGTERM / Ctrl-C under a
    command-line entry, phoenix_stop) raises TrainingStopped filled in by describe_stop, whose resume
    command is `argv` (the command line's arguments) with --resume."""
    try:
        return _run(options)
    except training.TrainingStopped as stop:
        describe_stop(stop, options, list(argv or []))
        raise


def _run(options: SyntheticRun) -> dict:
    """run's work."""
    prepare_run_dir(options)
    t_start = time.perf_counter()
    world = SyntheticWorld(options.world())
    train_ids, held_out = world.split_users()
    print(f"world: {world.cfg.num_users:,} users ({len(held_out)} held out), {world.cfg.num_posts:,} posts, "
          f"{world.cfg.num_authors} authors, S={world.cfg.history_len}, C={world.cfg.num_candidates}, "
          f"histories of {world.cfg.min_history_len}-{world.cfg.history_len}, impression temperature "
          f"{world.cfg.impression_temperature}; seed {options.seed}", flush=True)
    # One process at a time trains a resumable run (a resume started while a killed run's process
    # is still exiting waits for it).
    lock = (training.RunLock(options.checkpoint_dir, lambda m: print(m, file=sys.stderr, flush=True))
            if (options.checkpoint_every or options.resume) and jax.process_index() == 0 else None)
    try:
        ranker = None if options.only == "retrieval" else train_ranker(options, world, train_ids, held_out)
        retrieval = None if options.only == "ranker" else train_retrieval(options, world, train_ids, held_out)
    finally:
        if lock is not None:
            lock.release()
    total_s = time.perf_counter() - t_start

    print(f"\nHeld-out users: {len(held_out)} x {options.eval_repeats} examples each, user ids unknown to the models\n")
    print(format_table(ranker, retrieval, world.cfg.num_posts))
    result = {"total_s": total_s, "ranker": ranker, "retrieval": retrieval}
    checks = []
    if ranker is not None:
        print("\n" + format_action_table(ranker))
        fav = gap_closed(ranker["model"][FAVORITE], ranker["oracle"][FAVORITE])
        mean = gap_closed(np.nanmean(ranker["model"]), np.nanmean(ranker["oracle"]))
        result.update(gap_closed_favorite=fav, gap_closed_mean=mean)
        checks.append(f"ranker gap closed >= {MIN_GAP_CLOSED:.0%}: favorite {fav:.1%}, mean {mean:.1%} -> "
                      f"{'yes' if min(fav, mean) >= MIN_GAP_CLOSED else 'NO'}")
        print(f"\nranker: trained {ranker['train_s']:.0f} s (compile included), evaluated {ranker['eval_s']:.0f} s, "
              f"checkpoint {ranker['checkpoint']}")
    if retrieval is not None:
        ratio = retrieval["model"] / retrieval["popularity"]
        result.update(recall_ratio=ratio)
        checks.append(f"retrieval recall@{RECALL_K} >= {MIN_RECALL_RATIO:.0f}x popularity: {ratio:.2f}x -> "
                      f"{'yes' if ratio >= MIN_RECALL_RATIO else 'NO'}")
        print(f"retrieval: trained {retrieval['train_s']:.0f} s (compile included), evaluated "
              f"{retrieval['eval_s']:.0f} s, checkpoint {retrieval['checkpoint']}")
    print(f"total wall time: {total_s:.0f} s")
    for line in checks:
        print(line)
    return result

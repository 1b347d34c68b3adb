"""Train both Phoenix models on the synthetic world and show that they learn.

    uv run run_train.py --data synthetic [--seed 0] [--steps-ranker 1200] [--steps-retrieval 800]
                                         [--checkpoint-dir DIR] [--checkpoint-every N --resume]
                                         [--keep-checkpoints K] [sizes, see --help]

Shape glossary
  B batch (users)   S history length   C candidates   D embedding size   A actions (19)
  N posts (corpus)  n evaluation examples   U' distinct evaluated users   K recall cut-off (100)

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
($PHOENIX_CACHE_DIR defaults to ~/.cache/phoenix). `main` returns the figures as a dict.

Resuming (preemptible machines). With --checkpoint-every N the training state is saved every N
steps to <checkpoint-dir>/steps/{ranker,retrieval}/step-NNNNNNNN (the newest --keep-checkpoints,
default 3, are kept). After a kill, run the same command with --resume: each model continues from
its newest complete checkpoint, a model whose final checkpoint is there is not trained again, and
the final parameters, figures and training history are bit for bit those of an uninterrupted run
(on CPU, on the same devices). Training batches are a function of (world seed, --seed, step) alone (`step_rng`), so a
resume at step k draws exactly the batches k, k+1, ...; the popularity counts travel in the
checkpoint. A step checkpoint holds parameters and hash tables, optimiser state, step, PRNG key,
the metric sums not yet logged, the history, the popularity counts and the run config (every flag
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
Cost: a save takes ~0.1 s at the default sizes (6 MB; fsync included), ~1-2% of the step time
at --checkpoint-every 50.

Measured figures, the world's knobs and the recipe's reasons: docs/notes.md ("The synthetic world").
"""

import argparse
import dataclasses
import itertools
import json
import math
import os
import queue
import re
import shutil
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

import phoenix_checkpoint as checkpoint
import phoenix_stop
import phoenix_run_dir as run_dir
from phoenix_experiment import TABLE_INIT_STDDEV, checkpoint_path, chunks, optimizer_config, take, world_config
import phoenix_training as training
from phoenix_datasets import SyntheticWorld, WorldConfig, to_recsys_batch, to_retrieval_batch
from phoenix_metrics import auc, recall_at_k
from grok import TransformerConfig
from phoenix_inputs import ACTIONS, PAD_ID, RawBatch
from recsys_model import HashConfig, PhoenixModelConfig, RecsysBatch
from recsys_retrieval_model import PhoenixRetrievalModelConfig

FAVORITE = ACTIONS.index("favorite_score")
RECALL_K = 100
EVAL_BATCH = 250  # rows per predict call in evaluation; the default 5,000 examples split evenly
# Knobs that differ from WorldConfig's defaults (module docstring: why). Everything else, the
# oracle included, is the default world.
MIN_GAP_CLOSED = 0.8
MIN_RECALL_RATIO = 3.0
# Keys of the per-step batch generators (step_rng), one per training stream.
RANKING_STREAM, RETRIEVAL_STREAM = 1, 2
# How training batches are drawn; recorded in checkpoints so that a resume never mixes two ways.
STREAM_VERSION = "per-step rng of (world seed, stream, seed, step)"
# Flags that do not change what a run computes, left out of the config a resume must match.
NOT_RUN_CONFIG = {"data", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "log_every", "only",
                  "overwrite"}
# Flags of one phase only: the other phase's checkpoints do not depend on them.
PHASE_FLAGS = {"ranker": {"steps_ranker", "batch_size", "eval_every"},
               "retrieval": {"steps_retrieval", "retrieval_batch_size", "temperature"}}
# Bounds of the numeric flags, checked before anything runs: (flags, lowest value, whether it is allowed).
FLAG_BOUNDS = (
    (("num_users", "num_posts", "num_authors", "history_len", "min_history_len", "num_candidates", "emb_size",
      "num_layers", "num_heads", "key_size", "batch_size", "retrieval_batch_size", "steps_ranker", "steps_retrieval",
      "eval_repeats", "log_every"), 1, True),
    (("user_table_size", "post_table_size", "author_table_size"), 2, True),
    (("seed", "world_seed", "eval_every", "user_id_dropout"), 0, True),
    (("widening_factor", "learning_rate", "temperature", "impression_temperature", "table_init_stddev"), 0, False),
)
# What a run writes in --checkpoint-dir ({name regex: phoenix_run_dir kind}); nothing else there is touched.
RUN_ENTRIES = {"ranker|retrieval": "checkpoint", "steps": "steps", re.escape(run_dir.MANIFEST_FILE): "manifest",
               re.escape(training.LOCK_FILE): "lock"}


# --------------------------------------------------------------------------- configs


def hash_config(args) -> HashConfig:
    return HashConfig(user_table_size=args.user_table_size, post_table_size=args.post_table_size,
                      author_table_size=args.author_table_size)


def transformer_config(args) -> TransformerConfig:
    return TransformerConfig(emb_size=args.emb_size, key_size=args.key_size, num_q_heads=args.num_heads,
                             num_kv_heads=args.num_heads, num_layers=args.num_layers,
                             widening_factor=args.widening_factor,
                             attn_output_multiplier=1 / math.sqrt(args.key_size))


def ranker_config(args, world_cfg: WorldConfig) -> PhoenixModelConfig:
    return PhoenixModelConfig(model=transformer_config(args), emb_size=args.emb_size, num_actions=len(ACTIONS),
                              history_seq_len=world_cfg.history_len, candidate_seq_len=world_cfg.num_candidates,
                              fprop_dtype=jnp.float32, hash_config=hash_config(args)).initialize()


def retrieval_config(args, world_cfg: WorldConfig) -> PhoenixRetrievalModelConfig:
    return PhoenixRetrievalModelConfig(model=transformer_config(args), emb_size=args.emb_size,
                                       history_seq_len=world_cfg.history_len, candidate_seq_len=1,
                                       fprop_dtype=jnp.float32, hash_config=hash_config(args)).initialize()


# --------------------------------------------------------------------------- data


def unknown_user_id(world_cfg: WorldConfig) -> int:
    """The id standing for "a user without a trained row": one past the last real user."""
    return world_cfg.num_users


def drop_user_ids(user_ids: np.ndarray, rate: float, rng: np.random.Generator, unknown: int) -> np.ndarray:
    """User ids [B] with a share `rate` (each independently) replaced by the unknown-user id."""
    if rate <= 0:
        return user_ids
    return np.where(rng.random(user_ids.shape) < rate, unknown, user_ids)


def prefetch(iterator, size: int = 2):
    """Yields the items of `iterator`, produced `size` ahead in a background thread, so that NumPy
    batch generation overlaps the device step. The thread stops when this generator is closed."""
    items: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    end = object()

    def work():
        for item in iterator:
            while not stop.is_set():
                try:
                    items.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if stop.is_set():
                return
        items.put(end)

    threading.Thread(target=work, daemon=True).start()
    try:
        while (item := items.get()) is not end:
            yield item
    finally:
        stop.set()


class PopularityCounts:
    """Non-personal ranking baseline: label rates per (post, action) and per (surface, action),
    counted on training examples and added in logit space (a naive-Bayes popularity x surface)."""

    PRIOR = 5.0  # pseudo-impressions at the action's overall rate, so rarely seen posts stay sane

    def __init__(self, num_posts: int, num_surfaces: int, num_actions: int):
        self.post = np.zeros((num_posts, num_actions))  # [N, A] label sums
        self.post_n = np.zeros(num_posts)  # [N] impressions
        self.surface = np.zeros((num_surfaces, num_actions))
        self.surface_n = np.zeros(num_surfaces)

    def state_dict(self) -> dict:
        """The counts as arrays, for a checkpoint (a resumed run continues counting from them)."""
        return {"post": self.post, "post_n": self.post_n, "surface": self.surface, "surface_n": self.surface_n}

    def load_state_dict(self, arrays: dict) -> None:
        for name, current in self.state_dict().items():
            value = np.asarray(arrays.get(name))
            if value.shape != current.shape:
                raise ValueError(f"PopularityCounts.{name}: expected shape {list(current.shape)}, "
                                 f"got {list(value.shape)}")
            setattr(self, name, value.astype(current.dtype))

    def add(self, examples: dict) -> None:
        posts = examples["candidate_post_ids"].ravel()  # [B*C]
        surfaces = examples["candidate_surfaces"].ravel()  # [B*C]
        labels = examples["labels"].reshape(len(posts), -1)  # [B*C, A]
        np.add.at(self.post, posts, labels)
        self.post_n += np.bincount(posts, minlength=len(self.post_n))
        np.add.at(self.surface, surfaces, labels)
        self.surface_n += np.bincount(surfaces, minlength=len(self.surface_n))

    def scores(self, examples: dict) -> np.ndarray:
        """Logits [B, C, A] for the examples' candidates."""
        overall = (self.post.sum(0) + 1.0) / (self.post_n.sum() + 2.0)  # [A]
        post_rate = (self.post + self.PRIOR * overall) / (self.post_n[:, None] + self.PRIOR)  # [N, A]
        surface_rate = (self.surface + self.PRIOR * overall) / (self.surface_n[:, None] + self.PRIOR)  # [P, A]

        def logit(p):
            return np.log(p) - np.log1p(-p)

        return (logit(post_rate)[examples["candidate_post_ids"]]
                + logit(surface_rate)[examples["candidate_surfaces"]] - logit(overall))


def step_rng(world_cfg: WorldConfig, stream: int, seed: int, step: int) -> np.random.Generator:
    """The generator of one training batch, a function of (world seed, stream, seed, step) alone:
    a run resumed at step k draws exactly the batches k, k+1, ... of an uninterrupted one."""
    mask = 2**63 - 1  # SeedSequence takes non-negative entropy; seeds may be negative
    return np.random.default_rng(np.random.SeedSequence([world_cfg.seed & mask, stream, seed & mask, step]))


def ranking_examples_stream(world, user_ids, batch_size, seed, hashes, user_id_dropout, start_step=0):
    """Endless (examples dict, RecsysBatch, labels [B, C, A]) of `user_ids` for the steps
    start_step, start_step + 1, ...: users drawn with replacement, ids dropped as configured."""
    unknown = unknown_user_id(world.cfg)
    for step in itertools.count(start_step):
        rng = step_rng(world.cfg, RANKING_STREAM, seed, step)
        examples = world.ranking_examples(rng.choice(user_ids, size=batch_size), rng)
        batch_ids = drop_user_ids(examples["user_ids"], user_id_dropout, rng, unknown)
        batch, labels, _ = to_recsys_batch({**examples, "user_ids": batch_ids}, hashes)
        yield examples, batch, labels


def ranking_stream(world, user_ids, batch_size, seed, hashes, user_id_dropout, counts=None, start_step=0):
    """Endless (RecsysBatch, labels) step arguments from `start_step` on, generated in a background
    thread; `counts` (PopularityCounts) sees exactly the examples handed to the trainer."""
    items = prefetch(ranking_examples_stream(world, user_ids, batch_size, seed, hashes, user_id_dropout,
                                             start_step))
    try:
        for examples, batch, labels in items:
            if counts is not None:
                counts.add(examples)
            yield batch, labels
    finally:
        items.close()


def retrieval_stream(world, user_ids, batch_size, seed, hashes, user_id_dropout, log_freq, start_step=0):
    """Endless {"batch", "log_q" [B]} step arguments (positive in candidate slot 0) from
    `start_step` on, prefetched."""
    def generate():
        unknown = unknown_user_id(world.cfg)
        for step in itertools.count(start_step):
            rng = step_rng(world.cfg, RETRIEVAL_STREAM, seed, step)
            examples = world.retrieval_examples(rng.choice(user_ids, size=batch_size), rng)
            examples["user_ids"] = drop_user_ids(examples["user_ids"], user_id_dropout, rng, unknown)
            yield {"batch": to_retrieval_batch(examples, hashes),
                   "log_q": log_freq[examples["positive_post_ids"]].astype(np.float32)}

    return prefetch(generate())


def example_ranking_batch(world, hashes) -> RecsysBatch:
    """A small batch of the world's shapes, for parameter init."""
    return to_recsys_batch(world.ranking_examples(np.zeros(2, np.int64), 0), hashes)[0]


def corpus_batch(world, hashes) -> RecsysBatch:
    """One unknown user with an empty history and every post of the world as its candidates
    [1, N]: what the candidate tower encodes to build the full corpus."""
    corpus = world.corpus()
    n = len(corpus["post_ids"])
    return RawBatch(np.array([unknown_user_id(world.cfg)]), np.full((1, 1), PAD_ID), np.full((1, 1), PAD_ID),
                    np.zeros((1, 1, len(ACTIONS)), np.float32), np.zeros((1, 1), np.int32),
                    corpus["post_ids"][None], corpus["author_ids"][None], np.zeros((1, n), np.int32)).hashed(hashes)


# --------------------------------------------------------------------------- evaluation


def held_out_examples(world, held_out, repeats: int, kind: str, seed: int) -> dict:
    """`repeats` examples per held-out user ("ranking" or "retrieval"). `user_ids` is the
    unknown-user id (their rows were never trained); `true_user_ids` keeps who they are."""
    users = np.repeat(np.asarray(held_out, np.int64), repeats)
    make = world.ranking_examples if kind == "ranking" else world.retrieval_examples
    examples = make(users, 10_000 + seed)  # example streams 10_000+: disjoint from demo displays
    examples["true_user_ids"] = examples["user_ids"]
    examples["user_ids"] = np.full_like(users, unknown_user_id(world.cfg))
    return examples


def ranker_logits(trainer, params, examples: dict, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Model logits [n, C, A] of ranking examples."""
    out = []
    for rows in chunks(len(examples["user_ids"]), batch_size):
        batch, _, _ = to_recsys_batch(take(examples, rows), trainer.hash_config)
        out.append(np.asarray(trainer.predict(params, batch)))
    return np.concatenate(out)


def per_action_auc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUC [A] of scores [..., A] against labels [..., A], pooled over all leading axes."""
    return np.array([auc(scores[..., a], labels[..., a]) for a in range(labels.shape[-1])])


def gap_closed(value: float, oracle: float, chance: float = 0.5) -> float:
    """Share of the way from chance to the oracle: (value - chance) / (oracle - chance)."""
    return (value - chance) / (oracle - chance)


def evaluate_ranker(trainer, params, examples: dict, counts: PopularityCounts) -> dict:
    """Per-action AUC [A] of the model, the oracle and the popularity baseline, and positives [A]."""
    labels = examples["labels"]
    return {"model": per_action_auc(ranker_logits(trainer, params, examples), labels),
            "oracle": per_action_auc(examples["oracle"], labels),
            "popularity": per_action_auc(counts.scores(examples), labels),
            "positives": labels.sum(axis=(0, 1))}


def retrieval_oracle_scores(world, user_ids) -> np.ndarray:
    """True P(next engaged post = n | user) up to a per-user factor, [U', N]: impressions are
    i.i.d. given the user, so it is P(impression = n | u) x P(engaged | u, n), surfaces averaged."""
    cfg = world.cfg
    posts = np.arange(cfg.num_posts)
    scores = np.empty((len(user_ids), cfg.num_posts))
    for i, user in enumerate(np.asarray(user_ids)):
        impression = world.impression_probabilities([user])  # [N]
        engage = np.mean([world.engagement_probability(user, posts, s)
                          for s in range(cfg.num_product_surfaces)], axis=0)  # [N]
        scores[i] = impression * engage
    return scores


def encode_corpus(trainer, params, world) -> np.ndarray:
    """Candidate-tower representations [N, D] of every post."""
    _, candidates, _ = trainer.predict(params, corpus_batch(world, trainer.hash_config))
    return np.asarray(candidates[0])


def user_representations(trainer, params, examples: dict, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """User-tower representations [n, D] of retrieval examples."""
    out = []
    for rows in chunks(len(examples["user_ids"]), batch_size):
        batch = to_retrieval_batch(take(examples, rows), trainer.hash_config)
        out.append(np.asarray(trainer.predict(params, batch)[0]))
    return np.concatenate(out)


def evaluate_retrieval(trainer, params, world, examples: dict, popularity: np.ndarray, k: int = RECALL_K) -> dict:
    """Recall@k over the full corpus of the model, the oracle and the popularity baseline [N]."""
    model_scores = user_representations(trainer, params, examples) @ encode_corpus(trainer, params, world).T
    positives = examples["positive_post_ids"]
    unique, inverse = np.unique(examples["true_user_ids"], return_inverse=True)
    oracle_scores = retrieval_oracle_scores(world, unique)[inverse]  # [n, N]
    popularity_scores = np.broadcast_to(popularity, model_scores.shape)
    return {name: recall_at_k(scores, positives, k)
            for name, scores in (("model", model_scores), ("oracle", oracle_scores),
                                 ("popularity", popularity_scores))}


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


def run_config(args, phase: str) -> dict:
    """What a `phase` ("ranker" or "retrieval") of this run computes from: every flag but those in
    NOT_RUN_CONFIG and the other phase's, and the batch stream's formula. A resume must match it."""
    other = PHASE_FLAGS["retrieval" if phase == "ranker" else "ranker"]
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_RUN_CONFIG | other}
    return {"phase": phase, "stream": STREAM_VERSION, **flags}


def resumable(args, phase: str) -> dict:
    """fit's keyword arguments for a phase: step checkpoints in <checkpoint-dir>/steps/<phase> when
    --checkpoint-every or --resume asks for them (the final checkpoint alone otherwise, as before)."""
    if not (args.checkpoint_every or args.resume):
        return {}
    return {"checkpoint_dir": os.path.join(args.checkpoint_dir, "steps", phase),
            "checkpoint_every": args.checkpoint_every, "keep_checkpoints": args.keep_checkpoints,
            "resume": args.resume, "run_config": run_config(args, phase)}


def final_differences(args, phase: str) -> tuple[list[str], dict]:
    """How the phase's final checkpoint (which exists) differs from this run: its run config and its
    devices (training.run_devices; one written before they were recorded is taken to be this run's).
    Returns (differences, the checkpoint's extra)."""
    extra = checkpoint.read_meta(os.path.join(args.checkpoint_dir, phase)).get("extra") or {}
    expected = json.loads(json.dumps(run_config(args, phase)))  # as it reads back from meta.json
    devices = training.run_devices(args.data_parallel)
    return (training.config_differences(extra.get("run_config"), expected)
            + training.config_differences(extra.get("devices", devices), devices, "devices")), extra


def finished_phase(args, phase: str, log) -> dict | None:
    """With --resume, the figures of a phase already finished by this run: its final checkpoint is
    written last (atomically) and records the run config, devices and figures. None if it still has
    to run."""
    path = os.path.join(args.checkpoint_dir, phase)
    if not args.resume or not os.path.exists(path):
        return None
    differences, extra = final_differences(args, phase)
    if differences or "result" not in extra:
        why = "; ".join(differences[:3]) if differences else "no figures recorded"
        log.write(f"{phase}: {path} holds another run's checkpoint ({why}); this run replaces it when its "
                  f"{phase} is trained\n")
        return None
    log.write(f"{phase}: already trained by this run, figures read from {path}\n")
    return {**training.decode_json(extra["result"]), "checkpoint": path}


def save_final(trainer, args, phase: str, state, world, result: dict, **extra) -> str:
    """The phase's final checkpoint, `runners.*.from_checkpoint`'s input, which also marks the phase
    finished for --resume (run config, and the figures with the training history, in its extra)."""
    return trainer.save(os.path.join(args.checkpoint_dir, phase), state, extra={
        "world": dataclasses.asdict(world.cfg), "seed": args.seed, "unknown_user_id": unknown_user_id(world.cfg),
        **extra, "run_config": run_config(args, phase), "devices": training.run_devices(trainer.mesh),
        "result": training.encode_json(result)})


def describe_stop(stop: training.TrainingStopped, args, argv: list) -> None:
    """Fills in a clean stop's line (phoenix_stop): what each phase of this run has saved (its final
    checkpoint, or its newest step checkpoint) and, when the run keeps step checkpoints, the command
    that resumes it: `argv` with --resume (without --overwrite, which would start afresh)."""
    resumable_run = bool(args.checkpoint_every or args.resume)
    for phase in [p for p in ("ranker", "retrieval") if args.only in (None, p)]:
        final = os.path.join(args.checkpoint_dir, phase)
        steps = checkpoint.list_step_checkpoints(os.path.join(args.checkpoint_dir, "steps", phase))
        try:
            finished = os.path.exists(final) and not final_differences(args, phase)[0]
        except (checkpoint.CheckpointError, OSError):  # unreadable: not this run's finished phase
            finished = False
        if finished:
            stop.kept.append(f"{phase} finished ({final})")
        else:
            stop.stage = stop.stage or phase  # the first phase not finished is the one that stopped
            if resumable_run and steps:
                stop.kept.append(f"{phase} at step {steps[-1][0]} of {getattr(args, 'steps_' + phase)} "
                                 f"({steps[-1][1]})")
    if resumable_run:
        kept = [a for a in argv if not (a.startswith("--ov") and "--overwrite".startswith(a))]
        stop.resume_argv = kept if args.resume else [*kept, "--resume"]
    else:
        stop.why_not = "--checkpoint-every is off"


def train_ranker(args, world, train_ids, held_out, log=sys.stderr) -> dict:
    if (done := finished_phase(args, "ranker", log)) is not None:
        return done
    cfg = ranker_config(args, world.cfg)
    hashes = cfg.hash_config
    trainer = training.make_ranking_trainer(cfg, hashes, optimizer_config(args.learning_rate, args.steps_ranker),
                                            table_init_stddev=args.table_init_stddev,
                                            data_parallel=args.data_parallel)
    counts = PopularityCounts(world.cfg.num_posts, world.cfg.num_product_surfaces, len(ACTIONS))

    def stream(first_step):
        return ranking_stream(world, train_ids, args.batch_size, args.seed, hashes, args.user_id_dropout, counts,
                              start_step=first_step)

    state = trainer.init(jax.random.PRNGKey(args.seed), example_ranking_batch(world, hashes))
    examples = held_out_examples(world, held_out, args.eval_repeats, "ranking", args.seed)

    def curve(state):
        r = evaluate_ranker(trainer, state.params, examples, counts)
        return {"auc_favorite": r["model"][FAVORITE], "mean_auc": np.nanmean(r["model"])}

    log.write(f"ranker: {args.steps_ranker} steps of {args.batch_size} users x {world.cfg.num_candidates} "
              f"candidates\n")
    t0 = time.perf_counter()
    state, history = training.fit(trainer, state, stream, args.steps_ranker, log_every=args.log_every,
                                  eval_fn=curve if args.eval_every else None, eval_every=args.eval_every,
                                  stream=log, aux=counts, **resumable(args, "ranker"))
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = evaluate_ranker(trainer, state.params, examples, counts)
    result.update(train_s=train_s, eval_s=time.perf_counter() - t0, history=history)
    path = save_final(trainer, args, "ranker", state, world, result,
                      auc_favorite=float(result["model"][FAVORITE]), mean_auc=float(np.nanmean(result["model"])))
    return {**result, "checkpoint": path}


def train_retrieval(args, world, train_ids, held_out, log=sys.stderr) -> dict:
    if (done := finished_phase(args, "retrieval", log)) is not None:
        return done
    cfg = retrieval_config(args, world.cfg)
    hashes = cfg.hash_config
    trainer = training.make_retrieval_trainer(cfg, hashes,
                                              optimizer_config(args.learning_rate, args.steps_retrieval),
                                              temperature=args.temperature, table_init_stddev=args.table_init_stddev,
                                              data_parallel=args.data_parallel)
    t0 = time.perf_counter()
    freq = world.positive_frequencies(train_ids)  # [N] logQ of in-batch negatives; popularity baseline
    freq_s = time.perf_counter() - t0

    def stream(first_step):
        return retrieval_stream(world, train_ids, args.retrieval_batch_size, args.seed, hashes,
                                args.user_id_dropout, np.log(freq), start_step=first_step)

    state = trainer.init(jax.random.PRNGKey(args.seed), to_retrieval_batch(
        world.retrieval_examples(np.zeros(2, np.int64), 0), hashes))
    examples = held_out_examples(world, held_out, args.eval_repeats, "retrieval", args.seed)
    log.write(f"retrieval: {args.steps_retrieval} steps of {args.retrieval_batch_size} (user, next engaged post) "
              f"rows, in-batch softmax with logQ\n")
    t0 = time.perf_counter()
    state, history = training.fit(trainer, state, stream, args.steps_retrieval, log_every=args.log_every,
                                  stream=log, **resumable(args, "retrieval"))
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = evaluate_retrieval(trainer, state.params, world, examples, freq)
    result.update(train_s=train_s, eval_s=time.perf_counter() - t0 + freq_s, history=history)
    path = save_final(trainer, args, "retrieval", state, world, result,
                      **{f"recall_at_{RECALL_K}": result["model"]})
    return {**result, "checkpoint": path}


def parse_args(argv):
    world = world_config()
    p = argparse.ArgumentParser(prog="run_train.py --data synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="synthetic", choices=("synthetic",), help="run_train.py's dispatch flag")
    p.add_argument("--seed", type=int, default=0, help="parameter init, batch streams, evaluation examples")
    p.add_argument("--steps-ranker", type=int, default=1200)
    p.add_argument("--steps-retrieval", type=int, default=800)
    p.add_argument("--checkpoint-dir", default=checkpoint_path("synthetic"),
                   help="where ranker/ and retrieval/ are saved (default: under $PHOENIX_CACHE_DIR); one holding "
                        "an earlier run is refused unless --overwrite or --resume")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the earlier run in --checkpoint-dir (what Phoenix wrote there only; anything "
                        "else at ranker/, retrieval/, steps/ is refused)")
    p.add_argument("--only", choices=("ranker", "retrieval"), default=None, help="train one model only")
    g = p.add_argument_group("preemption (module docstring: resuming)")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save the training state every N steps under <checkpoint-dir>/steps (0: off)")
    g.add_argument("--keep-checkpoints", type=int, default=training.DEFAULT_KEEP_CHECKPOINTS, metavar="K",
                   help="step checkpoints kept per model (the newest K)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --checkpoint-dir where it stopped (a fresh start if it has none)")
    g = p.add_argument_group("world (defaults: module docstring)")
    g.add_argument("--world-seed", type=int, default=world.seed)
    g.add_argument("--num-users", type=int, default=world.num_users)
    g.add_argument("--num-posts", type=int, default=world.num_posts)
    g.add_argument("--num-authors", type=int, default=world.num_authors)
    g.add_argument("--history-len", type=int, default=world.history_len)
    g.add_argument("--min-history-len", type=int, default=world.min_history_len)
    g.add_argument("--num-candidates", type=int, default=world.num_candidates)
    g.add_argument("--impression-temperature", type=float, default=world.impression_temperature)
    g = p.add_argument_group("model")
    g.add_argument("--emb-size", type=int, default=32)
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--num-heads", type=int, default=2)
    g.add_argument("--key-size", type=int, default=16)
    g.add_argument("--widening-factor", type=float, default=2.0)
    g.add_argument("--user-table-size", type=int, default=2003)
    g.add_argument("--post-table-size", type=int, default=10007)
    g.add_argument("--author-table-size", type=int, default=401)
    g.add_argument("--table-init-stddev", type=float, default=TABLE_INIT_STDDEV)
    g = p.add_argument_group("optimisation and evaluation")
    g.add_argument("--batch-size", type=int, default=128, help="ranker users per step")
    g.add_argument("--retrieval-batch-size", type=int, default=256, help="retrieval softmax rows per step")
    g.add_argument("--learning-rate", type=float, default=6e-3)
    g.add_argument("--data-parallel", action="store_true",
                   help="split each batch over all devices JAX finds (batch sizes must divide evenly)")
    g.add_argument("--temperature", type=float, default=training.DEFAULT_TEMPERATURE)
    g.add_argument("--user-id-dropout", type=float, default=1.0,
                   help="share of training rows whose user id is replaced by the unknown user")
    g.add_argument("--eval-repeats", type=int, default=50, help="evaluation examples per held-out user")
    g.add_argument("--eval-every", type=int, default=0, help="ranker learning curve every N steps (0: off)")
    g.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    if args.checkpoint_every < 0:
        p.error(f"--checkpoint-every: expected an int >= 0 (0: off), got {args.checkpoint_every}")
    if args.keep_checkpoints < 1:
        p.error(f"--keep-checkpoints: expected an int >= 1 (the newest is always kept), got {args.keep_checkpoints}")
    for names, low, inclusive in FLAG_BOUNDS:
        for name in names:
            value = getattr(args, name)
            if not math.isfinite(value) or value < low or (value == low and not inclusive):
                p.error(f"--{name.replace('_', '-')}: expected {'an int' if isinstance(value, int) else 'a number'} "
                        f"{'>=' if inclusive else '>'} {low}, got {value}")
    if args.user_id_dropout > 1:
        p.error(f"--user-id-dropout: expected a share in [0, 1], got {args.user_id_dropout}")
    if args.min_history_len > args.history_len:
        p.error(f"--min-history-len {args.min_history_len}: expected <= --history-len {args.history_len}")
    given = set(vars(p.parse_args(argv, _Given())))
    if args.overwrite and args.resume:
        p.error("--overwrite and --resume: --resume continues the run in --checkpoint-dir, --overwrite replaces it; "
                "give one")
    if "keep_checkpoints" in given and not (args.checkpoint_every or args.resume):
        p.error("--keep-checkpoints: applies to step checkpoints only; add --checkpoint-every N")
    if args.only is not None:
        other = "retrieval" if args.only == "ranker" else "ranker"
        for name in sorted(PHASE_FLAGS[other] & given):
            p.error(f"--{name.replace('_', '-')}: applies to the {other} only, which --only {args.only} does not train")
    return args


class _Given(argparse.Namespace):
    """A namespace in which argparse sets only the flags given (phoenix_pipeline.given_flags)."""

    def __getattr__(self, name):
        if name.startswith("_"):  # argparse's own attributes; no flag's destination starts so
            raise AttributeError(name)
        return None


def check_run_dir(args) -> None:
    """Refuses, before the world is built, a --checkpoint-dir where this run would replace what it must
    not (phoenix_run_dir.check_outputs: anything Phoenix did not write; an earlier run's checkpoints
    unless --overwrite or --resume). With --overwrite, the earlier run's step checkpoints (checked to be
    Phoenix's) are removed: a fresh run would refuse them as another run's."""
    run_dir.check_outputs([], [args.checkpoint_dir], RUN_ENTRIES, overwrite=args.overwrite, earlier_run=args.resume)
    steps = os.path.join(args.checkpoint_dir, "steps")
    if args.overwrite and os.path.isdir(steps):
        shutil.rmtree(steps)


def main(argv=None) -> dict:
    """The experiment (module docstring); returns the figures. A clean stop (SIGTERM / Ctrl-C under a
    command-line entry, phoenix_stop) raises TrainingStopped filled in by describe_stop."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except training.TrainingStopped as stop:
        describe_stop(stop, parse_args(argv), argv)
        raise


def _run(argv: list) -> dict:
    """main's work, on an argument list."""
    args = parse_args(argv)
    check_run_dir(args)
    if not (args.resume and os.path.exists(os.path.join(args.checkpoint_dir, run_dir.MANIFEST_FILE))):
        run_dir.write_manifest(args.checkpoint_dir, "synthetic", RUN_ENTRIES, seed=args.seed,
                               flags={k: v for k, v in sorted(vars(args).items())})
    t_start = time.perf_counter()
    world = SyntheticWorld(world_config(
        num_users=args.num_users, num_posts=args.num_posts, num_authors=args.num_authors,
        history_len=args.history_len, min_history_len=args.min_history_len, num_candidates=args.num_candidates,
        impression_temperature=args.impression_temperature, seed=args.world_seed))
    train_ids, held_out = world.split_users()
    print(f"world: {world.cfg.num_users:,} users ({len(held_out)} held out), {world.cfg.num_posts:,} posts, "
          f"{world.cfg.num_authors} authors, S={world.cfg.history_len}, C={world.cfg.num_candidates}, "
          f"histories of {world.cfg.min_history_len}-{world.cfg.history_len}, impression temperature "
          f"{world.cfg.impression_temperature}; seed {args.seed}", flush=True)
    # One process at a time trains a resumable run (a resume started while a killed run's process
    # is still exiting waits for it).
    lock = (training.RunLock(args.checkpoint_dir, lambda m: print(m, file=sys.stderr, flush=True))
            if args.checkpoint_every or args.resume else None)
    try:
        ranker = None if args.only == "retrieval" else train_ranker(args, world, train_ids, held_out)
        retrieval = None if args.only == "ranker" else train_retrieval(args, world, train_ids, held_out)
    finally:
        if lock is not None:
            lock.release()
    total_s = time.perf_counter() - t_start

    print(f"\nHeld-out users: {len(held_out)} x {args.eval_repeats} examples each, user ids unknown to the models\n")
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


if __name__ == "__main__":
    phoenix_stop.command_line(main)()

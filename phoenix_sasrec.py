"""A SASRec-style reference model built from the same library, evaluated by the same code.

    import phoenix_sasrec as sasrec
    rows, info = sasrec.reference_rows(split, sasrec.SasrecRecipe(), seed=0)   # {("val"|"test", "sasrec"): metrics}

Model (Kang and McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018, in this library's parts)
  One item-embedding table [M, D] (row 0 = padding, always multiplied by 0), dropout on the
  input embeddings while training, grok.py's causal Transformer (rotary positions, sandwich RMS
  norms, gated GELU feed-forward; no user id, no authors, no actions), an RMS norm on its outputs,
  and logits against the same table: logits[b, p, n] = h[b, p] . E[1 + n]. The output at position p
  is the user state after items 0..p (causal attention), so one pass over a window of S items
  scores all S next-item predictions. Loss: FULL softmax cross-entropy over all N catalog items at
  every valid position (no sampled, no in-batch negatives, no logQ), averaged over valid positions.

Training data: phoenix_two_stage.training_windows (windows of up to S + 1 consecutive training items
  that cover every training target once, cut at a random offset per user and epoch), input = slots
  0..S-1, target = slots 1..S. The training part is split.train_len's (the validation and test
  targets are never trained on; protocol "train+val" passes a split whose train_len includes the
  validation target). AdamW with warmup and cosine decay (phoenix_training.make_optimizer).

Evaluation: the user state at the last position of the up-to-S items before the target (for test,
  the validation item included), scored against every catalog item, then exactly the pipeline's
  rule: phoenix_two_stage.eval_mask (every earlier item of the user excluded, never the target),
  phoenix_metrics.target_ranks / metrics_from_ranks / topk_columns, the functions StageOne uses.
  Model selection as the pipeline's stages: `evals` validation evaluations, the best by NDCG@10 kept,
  test evaluated once with it.

Shape glossary
  B  batch (windows or users)   S  sequence length (positions)   D  model width
  N  catalog items               M = N + 1 table rows (row 0 = padding)
  U  evaluated users             Nw training windows              K  top-k
"""

import dataclasses
import math
import sys
import time
from typing import Callable, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import phoenix_metrics as metrics
from grok import layer_norm
from phoenix_optim import OptimizerConfig, make_optimizer
from phoenix_sizes import ModelSizes

__all__ = ["SasrecRecipe", "Sasrec", "reference_rows", "train", "evaluate"]

PAD = 0  # table row of padding; catalog column n is row n + 1
EVAL_BATCH = 256


@dataclasses.dataclass(frozen=True)
class SasrecRecipe:
    """Sizes and schedule of the reference model (chosen on MovieLens-100K: docs/notes.md)."""

    emb_size: int = 64  # D
    num_layers: int = 2
    num_heads: int = 2
    history_len: int = 50  # S (SASRec's ML-100K/ML-1M practice: long histories, last position)
    dropout: float = 0.2  # on the input embeddings, training only
    batch_size: int = 128  # windows per step
    epochs: float = 60.0
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    table_init_stddev: float = 0.05
    evals: int = 6  # validation evaluations (best by NDCG@10 kept)


def make_model(recipe: SasrecRecipe, num_items: int) -> hk.Transformed:
    """hk.transform of forward(items [B, S] int32 table rows, is_training) -> logits [B, S, N] float32."""
    config = ModelSizes(recipe.emb_size, recipe.num_layers, recipe.num_heads).transformer()

    def forward(items, is_training: bool = False):
        table = hk.get_parameter("item_embeddings", [num_items + 1, recipe.emb_size], jnp.float32,
                                 init=hk.initializers.TruncatedNormal(recipe.table_init_stddev))  # [M, D]
        mask = items != PAD  # [B, S]
        x = table[items] * mask[..., None]  # [B, S, D]; padding rows contribute 0
        if is_training and recipe.dropout > 0:
            x = hk.dropout(hk.next_rng_key(), recipe.dropout, x)
        h = layer_norm(config.make()(x, mask, candidate_start_offset=None).embeddings)  # [B, S, D]
        return jnp.einsum("bsd,nd->bsn", h, table[1:])  # [B, S, N]

    return hk.transform(forward)


def full_softmax_loss(logits, targets, valid):
    """Mean over valid positions of -log softmax(logits)[target]: logits [B, S, N], targets [B, S]
    catalog columns, valid [B, S] bool. 0 when nothing is valid."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, S]
    picked = jnp.take_along_axis(logits, jnp.clip(targets, 0, logits.shape[-1] - 1)[..., None], axis=-1)[..., 0]
    valid = valid.astype(jnp.float32)
    return jnp.sum((log_z - picked) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def window_arrays(split, rows, starts, lengths, history_len: int):
    """Windows (phoenix_two_stage.training_windows) as (inputs [Nw, S] table rows, targets [Nw, S]
    catalog columns, valid [Nw, S]): input slot j holds item j of the window, its target item j + 1."""
    slots = np.arange(history_len + 1)[None, :]  # [1, S+1]
    present = slots < lengths[:, None]  # [Nw, S+1]
    positions = np.where(present, starts[:, None] + slots, 0)
    columns = np.where(present, split.item_columns[positions], -1)  # [Nw, S+1]
    inputs = np.where(present[:, :-1], columns[:, :-1] + 1, PAD).astype(np.int32)  # [Nw, S]
    valid = present[:, 1:]  # [Nw, S]: slot j has a next item
    if getattr(split, "first_time", None) is not None:  # a kept repeat (duplicates="keep") is never a target
        valid = valid & split.first_time[positions[:, 1:]]
    targets = np.where(valid, columns[:, 1:], 0).astype(np.int32)
    return inputs, targets, valid


def histories(split, which: str, history_len: int):
    """(inputs [U, S] table rows, right-padded, the up-to-S items before each `which` target of the
    evaluated users, oldest first; last [U] index of the last valid slot)."""
    rows, ends = split.target_positions(which)  # [U], [U]
    length = np.minimum(ends - split.offsets[rows], history_len)  # [U]
    slots = np.arange(history_len)[None, :]
    valid = slots < length[:, None]
    positions = np.where(valid, ends[:, None] - length[:, None] + slots, 0)
    inputs = np.where(valid, split.item_columns[positions] + 1, PAD).astype(np.int32)
    return inputs, np.maximum(length - 1, 0)


class Sasrec:
    """The model, its jitted train step and its scores. step(state, inputs, targets, valid) -> (state, loss)."""

    def __init__(self, recipe: SasrecRecipe, num_items: int, optimizer: OptimizerConfig):
        self.recipe, self.num_items = recipe, num_items
        self.model = make_model(recipe, num_items)
        self.optimizer = make_optimizer(optimizer)

        def loss_fn(params, rng, inputs, targets, valid):
            return full_softmax_loss(self.model.apply(params, rng, inputs, True), targets, valid)

        def step(params, opt_state, rng, inputs, targets, valid):
            loss, grads = jax.value_and_grad(loss_fn)(params, rng, inputs, targets, valid)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        def last_scores(params, inputs, last):
            logits = self.model.apply(params, None, inputs, False)  # [B, S, N]
            return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]  # [B, N]

        self._step = jax.jit(step, donate_argnums=(0, 1))
        self._scores = jax.jit(last_scores)
        self.logits = jax.jit(lambda params, inputs: self.model.apply(params, None, inputs, False))

    def init(self, seed: int, inputs):
        params = self.model.init(jax.random.PRNGKey(seed), inputs, True)
        return params, self.optimizer.init(params)

    def step(self, params, opt_state, rng, inputs, targets, valid):
        return self._step(params, opt_state, rng, inputs, targets, valid)

    def scores(self, params, inputs, last, batch_size: int = EVAL_BATCH) -> np.ndarray:
        """[U, N]: logits of every catalog item for the state at slot `last` of each row of inputs [U, S]."""
        out = []
        for start in range(0, len(inputs), batch_size):
            rows = np.arange(start, min(start + batch_size, len(inputs)))
            padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])  # one compilation
            out.append(np.asarray(self._scores(params, inputs[padded], last[padded]))[:len(rows)])
        return np.concatenate(out)


def evaluate(split, which: str, scores: np.ndarray, eval_mask: Callable, k: int = 10):
    """(metrics, top-k columns [U, K]) of scores [U, N] through the pipeline's evaluation functions:
    eval_mask(split, which) [U, N] (phoenix_two_stage.eval_mask), phoenix_metrics' ranks and top-k."""
    exclude = eval_mask(split, which)
    ranks = metrics.target_ranks(scores, split.targets(which), exclude)
    return metrics.metrics_from_ranks(ranks), metrics.topk_columns(scores, k, exclude)


def train(split, recipe: SasrecRecipe, seed: int, windows: Callable, num_steps: Optional[int] = None,
          validate: Optional[Callable] = None, stream=None, total_steps: Optional[int] = None):
    """Trains on `split`'s training part. windows(split, S, rng) -> (rows, starts, lengths) per epoch
    (phoenix_two_stage.training_windows). The schedule decays over the recipe's epochs; `num_steps`
    (default all of them) stops earlier (protocol train+val: the step validation chose), and
    `total_steps` replaces the schedule's length (train+val: that of the val-select run).
    validate(params) -> metrics, called `recipe.evals` times: returns (params of the best by NDCG@10,
    its metrics with "step"); without it, (last params, {"step": steps run}). Host params."""
    rng = np.random.default_rng([seed, 3])
    per_epoch = len(windows(split, recipe.history_len)[0])
    total = max(1, round(recipe.epochs * per_epoch / recipe.batch_size)) if total_steps is None else int(total_steps)
    num_steps = total if num_steps is None else int(num_steps)
    warmup = min(recipe.warmup_steps, max(total // 4, 1))
    model = Sasrec(recipe, len(split.item_ids), OptimizerConfig(
        learning_rate=recipe.learning_rate, warmup_steps=warmup, decay_steps=max(total, warmup + 1),
        weight_decay=recipe.weight_decay))
    pending = np.zeros((0, 3), np.int64)

    def batch():
        nonlocal pending
        while len(pending) < recipe.batch_size:
            w = np.stack(windows(split, recipe.history_len, rng), axis=1)  # [Nw, 3]
            pending = np.concatenate([pending, w[rng.permutation(len(w))]])
        (rows, starts, lengths), pending = pending[:recipe.batch_size].T, pending[recipe.batch_size:]
        return window_arrays(split, rows, starts, lengths, recipe.history_len)

    first = batch()
    params, opt_state = model.init(seed, first[0])
    key = jax.random.PRNGKey(seed + 2)
    every = max(1, -(-total // recipe.evals))
    best, kept, start, losses = {"NDCG@10": -math.inf}, None, time.perf_counter(), []
    print(f"sasrec: {num_steps} of {total} steps of {recipe.batch_size} windows ({per_epoch} windows per epoch, "
          f"S={recipe.history_len})", file=stream)
    for step in range(num_steps):
        inputs, targets, valid = first if step == 0 else batch()
        key, sub = jax.random.split(key)
        params, opt_state, loss = model.step(params, opt_state, sub, inputs, targets, valid)
        losses.append(loss)
        done = step + 1
        if validate is not None and (done % every == 0 or done == num_steps):
            result = validate(model, params)
            print(f"sasrec: step {done}, loss {float(np.mean(jax.device_get(losses[-every:]))):.4f}, val HR@10 "
                  f"{result['HR@10']:.4f} NDCG@10 {result['NDCG@10']:.4f}, {time.perf_counter() - start:.0f} s",
                  file=stream)
            if result["NDCG@10"] > best["NDCG@10"]:
                best, kept = {**result, "step": done}, jax.tree.map(np.array, jax.device_get(params))
    if validate is None:
        kept, best = jax.tree.map(np.array, jax.device_get(params)), {"step": num_steps}
    best["total_steps"] = total
    print(f"sasrec: {num_steps} steps in {time.perf_counter() - start:.0f} s, final loss "
          f"{float(jax.device_get(losses[-1])):.4f}", file=stream)
    return model, kept, best


def reference_rows(split, recipe: SasrecRecipe, seed: int, windows: Callable, eval_mask: Callable,
                   stream=None, train_split=None, num_steps: Optional[int] = None,
                   total_steps: Optional[int] = None):
    """The "sasrec" rows: {("val", "sasrec"): metrics, ("test", "sasrec"): metrics} and info
    {"best": val metrics and step, "test_topk": [U, K], "seconds"}.

    Protocol val-select (train_split None): trained on split's training part, best of recipe.evals
    validation evaluations. Protocol train+val: trained on `train_split` (its train_len includes the
    validation target) for `num_steps` of a `total_steps` schedule, no validation; only the test row
    (evaluated on `split`). info["best"]["total_steps"]: the schedule's length."""
    start = time.perf_counter()
    stream = sys.stderr if stream is None else stream
    val_inputs, val_last = histories(split, "val", recipe.history_len)
    test_inputs, test_last = histories(split, "test", recipe.history_len)

    def validate(model, params):
        return evaluate(split, "val", model.scores(params, val_inputs, val_last), eval_mask)[0]

    if train_split is None:
        model, params, best = train(split, recipe, seed, windows, validate=validate, stream=stream)
    else:
        model, params, best = train(train_split, recipe, seed, windows, num_steps=num_steps, stream=stream,
                                    total_steps=total_steps)
    rows = {}
    if train_split is None:
        rows[("val", "sasrec")] = evaluate(split, "val", model.scores(params, val_inputs, val_last), eval_mask)[0]
    rows[("test", "sasrec")], topk = evaluate(split, "test", model.scores(params, test_inputs, test_last), eval_mask)
    return rows, {"best": best, "test_topk": topk, "seconds": time.perf_counter() - start, "params": params}

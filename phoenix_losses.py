"""The training losses of both models, computed in float32, with their input checks.

Shape glossary
  B  batch (users)          C  candidates per user     A  actions
  R  rows of the in-batch softmax                      D  embedding size
  Hi number of post hashes (positive ids given as hash tuples)
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phoenix_validation import (check_array, check_at_least_one, check_binary, check_finite, check_number,
                                check_range)

__all__ = [
    # ranking
    "ranking_loss", "ranking_loss_terms", "RankingLossTerms", "listwise_loss", "sigmoid_cross_entropy",
    "check_ranking_targets", "check_action_weights",
    # retrieval
    "retrieval_loss", "retrieval_loss_terms", "RetrievalLossTerms", "check_retrieval_targets", "check_temperature",
    "DEFAULT_TEMPERATURE", "MASKED_LOGIT",
]

# A finite stand-in for -inf on masked softmax logits: exp() underflows to exactly 0, and unlike
# -inf it never produces inf - inf = NaN in a row whose entries are all masked.
MASKED_LOGIT = -1e9
# Default softmax temperature of the retrieval loss. Scores are cosines in [-1, 1]; dividing by
# 0.05 spans logits over [-20, 20], enough for a sharp softmax (the common range is 0.02-0.1).
DEFAULT_TEMPERATURE = 0.05


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Elementwise -[y log s(x) + (1-y) log(1-s(x))] in the overflow-free form
    max(x, 0) - x*y + log(1 + exp(-|x|)), computed in float32."""
    x = logits.astype(jnp.float32)
    y = labels.astype(jnp.float32)
    return jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _guarded(denominator: jax.Array) -> jax.Array:
    """The denominator where positive, 1 where zero, so an all-masked batch gives loss 0, not NaN."""
    return jnp.where(denominator > 0, denominator, 1.0)


class RankingLossTerms(NamedTuple):
    loss: jax.Array  # [] weighted mean cross-entropy over unmasked labels
    per_action_loss: jax.Array  # [A] mean cross-entropy over each action's unmasked labels
    label_weight: jax.Array  # [] the loss's normaliser: sum of label weights


def check_ranking_targets(labels, label_mask, B: int, C: int, A: int) -> None:
    """Shapes [B, C, A] of labels and label_mask; on host values (not traced ones), labels finite
    in [0, 1] and masks 0/1. NaN or a label of 2 would otherwise give a silently wrong loss."""
    check_array(labels, "labels", (B, C, A), "number")
    check_range(labels, "labels", 0.0, 1.0, " (0/1 or soft labels)")
    if label_mask is not None:
        check_array(label_mask, "label_mask", (B, C, A), "number")
        check_binary(label_mask, "label_mask")


def check_action_weights(action_weights, A: int) -> None:
    """[A] weights, finite and >= 0 (a negative weight would reward the wrong predictions)."""
    weights = action_weights if hasattr(action_weights, "shape") else np.asarray(action_weights)
    check_array(weights, "action_weights", (A,), "number")
    check_range(weights, "action_weights", 0.0)


def ranking_loss_terms(logits, labels, candidate_mask, label_mask=None, action_weights=None) -> RankingLossTerms:
    """Per-action sigmoid cross-entropy of the ranker's multi-action logits.

    logits, labels [B, C, A]; candidate_mask [B, C] (False for padded candidates);
    label_mask [B, C, A] (optional, False/0 where a label is unknown); action_weights [A] (optional).
    Labels lie in [0, 1]: 0/1 engagements, or soft labels (e.g. smoothed), which sigmoid
    cross-entropy takes as target probabilities. Masks hold 0/1; action weights are >= 0.
    Each label's weight is candidate_mask * label_mask * action_weight; the loss is the weighted sum
    of cross-entropies divided by the sum of weights (0 if every label is masked). Masked entries
    are selected away with `where`, so their logits, even inf/NaN, reach neither loss nor gradient.
    """
    check_array(logits, "logits", (None, None, None), "float")
    B, C, A = logits.shape
    check_ranking_targets(labels, label_mask, B, C, A)
    check_array(candidate_mask, "candidate_mask", (B, C), "number")
    check_binary(candidate_mask, "candidate_mask")
    if action_weights is not None:
        check_action_weights(action_weights, A)
    mask = jnp.broadcast_to(candidate_mask[:, :, None], logits.shape).astype(jnp.float32)  # [B, C, A]
    if label_mask is not None:
        mask = mask * label_mask.astype(jnp.float32)
    keep = mask > 0  # [B, C, A]
    safe_logits = jnp.where(keep, logits.astype(jnp.float32), 0.0)
    ce = jnp.where(keep, sigmoid_cross_entropy(safe_logits, labels), 0.0)  # [B, C, A]
    action_sum = jnp.sum(ce * mask, axis=(0, 1))  # [A]
    action_count = jnp.sum(mask, axis=(0, 1))  # [A]
    weights = jnp.ones(logits.shape[-1], jnp.float32) if action_weights is None else (
        jnp.asarray(action_weights, jnp.float32))  # [A]
    total_weight = jnp.sum(weights * action_count)
    loss = jnp.sum(weights * action_sum) / _guarded(total_weight)
    return RankingLossTerms(loss, action_sum / _guarded(action_count), total_weight)


def ranking_loss(logits, labels, candidate_mask, label_mask=None, action_weights=None) -> jax.Array:
    """Scalar ranking loss; see `ranking_loss_terms` (which also gives the per-action losses)."""
    return ranking_loss_terms(logits, labels, candidate_mask, label_mask, action_weights).loss


def listwise_loss(logits, labels, candidate_mask) -> jax.Array:
    """Softmax cross-entropy over each user's candidates: one action's logits [B, C] against its
    labels [B, C] normalised over the valid candidates into the target distribution.

    The pointwise loss scores each candidate alone; this one asks that a user's positives outrank
    that user's other candidates, which is what re-ranking needs. Users whose valid candidates have
    no positive label give no loss; the mean is over the users that have one (0 if none does).
    Padded candidates (candidate_mask False) take no part, whatever their logits.
    """
    x = logits.astype(jnp.float32)
    keep = candidate_mask.astype(jnp.bool_)  # [B, C]
    y = jnp.where(keep, labels.astype(jnp.float32), 0.0)  # [B, C]
    mass = jnp.sum(y, axis=1)  # [B]
    log_p = jax.nn.log_softmax(jnp.where(keep, x, MASKED_LOGIT), axis=1)  # [B, C]
    ce = -jnp.sum(jnp.where(keep, y * log_p, 0.0), axis=1) / _guarded(mass)  # [B]
    has = (mass > 0).astype(jnp.float32)  # [B]
    return jnp.sum(ce * has) / _guarded(jnp.sum(has))


class RetrievalLossTerms(NamedTuple):
    loss: jax.Array  # [] mean over valid rows
    accuracy: jax.Array  # [] share of valid rows whose positive outscores every in-batch negative
    num_valid: jax.Array  # [] number of valid rows


def _same_item(positive_ids: jax.Array) -> jax.Array:
    """[R] or [R, H] ids -> [R, R] bool: rows i, j hold the same item (all H ids equal)."""
    ids = positive_ids if positive_ids.ndim == 2 else positive_ids[:, None]  # [R, H]
    return jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)  # [R, R]


def check_temperature(temperature) -> None:
    """A finite scalar > 0 (0 or NaN would make every logit inf or NaN); traced values pass."""
    if isinstance(temperature, jax.core.Tracer):
        return
    value = np.asarray(temperature)
    if value.ndim:
        raise ValueError(f"temperature: expected a scalar > 0, got shape {list(value.shape)}")
    check_number(value.item(), "temperature", "> 0 and finite", lambda t: t > 0)


def check_retrieval_targets(positive_ids, log_q, valid, num_rows: int, letter: str) -> None:
    """positive_ids [R] or [R, H] ints (H >= 1), log_q [R] finite floats, valid [R] 0/1 (R = num_rows,
    called `letter` in messages); None skips a check. An [R, 0] id array would make every pair an
    accidental hit, leaving no negatives."""
    if positive_ids is not None:
        if hasattr(positive_ids, "shape") and np.ndim(positive_ids) not in (1, 2):
            raise ValueError(f"positive_ids: expected [{letter}] or [{letter}, H] item ids, got shape "
                             f"{list(np.shape(positive_ids))}")
        check_array(positive_ids, "positive_ids", (num_rows,) + (None,) * (np.ndim(positive_ids) - 1), "int")
        if np.ndim(positive_ids) == 2:
            check_at_least_one(positive_ids, "positive_ids", 1, "id per item (H >= 1)")
    if log_q is not None:
        check_array(log_q, "log_q", (num_rows,), "float")
        check_finite(log_q, "log_q", " (log sampling probabilities; an item sampled with probability 0?)")
    if valid is not None:
        check_array(valid, "valid", (num_rows,), "number")
        check_binary(valid, "valid")


def retrieval_loss_terms(user, positive, temperature, positive_ids, log_q=None, valid=None) -> RetrievalLossTerms:
    """In-batch sampled softmax for the two-tower model.

    user, positive [R, D]: row i's user and the item it engaged with; the other rows' positives
    are its negatives. logits = user @ positive.T / temperature, in float32.
    log_q [R]: log probability with which each positive was sampled into batches; it is subtracted
      from every logit of that item's column (logQ correction, Yi et al. 2019, "Sampling-bias-
      corrected neural modeling for large corpus item recommendations", eq. 3), which removes the
      popularity bias of in-batch negatives.
    positive_ids [R] (or [R, H], e.g. an item's hash values: equal iff all H equal): a column j != i
      holding the same item as row i is an accidental hit, not a negative, and is masked out.
    valid [R] bool: invalid rows add nothing to the loss, and their items are no one's negative.
    R >= 2: with one row there is no negative, and the loss would be 0 whatever the model.
    Returns the mean over valid rows of logsumexp(row) - logit(positive) (0 if none is valid).
    """
    check_array(user, "user", (None, None), "float")
    num_rows, D = user.shape
    if num_rows < 2:
        raise ValueError(f"user: expected at least 2 rows (R >= 2; a row's negatives are the other rows' "
                         f"positives), got shape {list(user.shape)}")
    check_array(positive, "positive", (num_rows, D), "float")
    if positive_ids is None:
        raise ValueError("positive_ids: expected [R] or [R, H] item ids, got None")
    check_retrieval_targets(positive_ids, log_q, valid, num_rows, "R")
    check_temperature(temperature)
    logits = jnp.einsum("id,jd->ij", user.astype(jnp.float32), positive.astype(jnp.float32))  # [R, R]
    logits = logits / temperature
    if log_q is not None:
        logits = logits - log_q.astype(jnp.float32)[None, :]
    valid = jnp.ones(num_rows, bool) if valid is None else valid.astype(bool)  # [R]
    diagonal = jnp.eye(num_rows, dtype=bool)  # [R, R]
    accidental_hit = _same_item(positive_ids) & ~diagonal  # [R, R]
    keep = (diagonal | ~accidental_hit) & valid[None, :]  # [R, R]
    logits = jnp.where(keep, logits, MASKED_LOGIT)
    positive_logit = jnp.diagonal(logits)  # [R]
    row_loss = jax.nn.logsumexp(logits, axis=1) - positive_logit  # [R]
    num_valid = jnp.sum(valid.astype(jnp.float32))
    loss = jnp.sum(jnp.where(valid, row_loss, 0.0)) / _guarded(num_valid)
    # Ties count as misses; negatives are the kept off-diagonal columns.
    best_negative = jnp.max(jnp.where(diagonal, MASKED_LOGIT, logits), axis=1)  # [R]
    correct = (positive_logit > best_negative) & valid
    accuracy = jnp.sum(correct.astype(jnp.float32)) / _guarded(num_valid)
    return RetrievalLossTerms(loss, accuracy, num_valid)


def retrieval_loss(user, positive, temperature, positive_ids, log_q=None, valid=None) -> jax.Array:
    """Scalar in-batch sampled-softmax loss; see `retrieval_loss_terms`."""
    return retrieval_loss_terms(user, positive, temperature, positive_ids, log_q, valid).loss

"""Evaluation protocols beside the pipeline's, and the SASRec reference row.

    uv run run_train.py --data movielens-100k --protocol train+val --sasrec [--seeds 0,1,2]
    uv run run_train.py --data LOG.csv --protocol train+val
    pipeline.run(split, recipe, DIR, extra_rows=protocols.extra_rows(protocols.Protocols("train+val")))

Protocols (the row labels of the table)
  val-select    (the pipeline's, always run; rows "val" and "test") train on the training part,
                keep each stage's best checkpoint by validation NDCG@10, choose the re-ranking
                weight on validation, evaluate test once.
  train+val     (rows "test (train+val)") then retrain both stages from scratch on the training
                part plus every user's validation target (train_len + 1; common in the literature),
                for the number of steps validation chose in val-select (each stage stops at its best
                checkpoint's step of the same learning-rate schedule, same seeds), with val-select's
                re-ranking weight; no validation is looked at again. Test histories are the same
                (everything before the test target) in both protocols; only the weights differ.
Protocols.sasrec (--sasrec) adds the rows "val"/"test" "sasrec" (phoenix_sasrec.py: causal transformer
  over the item sequence, last position, full softmax over all items, the pipeline's evaluation);
  with protocol train+val, Protocols.sasrec_train_val (--sasrec-train-val) also its "test (train+val)"
  row, retrained the same way.

Shape glossary
  U  users (evaluated users)   N  catalog items   K  retrieved per user   S  history length
"""

import dataclasses
import os
import time
from typing import Optional

import phoenix_sasrec as sasrec
import phoenix_training as training
import phoenix_two_stage as two_stage
from phoenix_sasrec import SasrecRecipe
from phoenix_split import LogSplit

__all__ = ["Protocols", "extra_rows", "retrain_stages", "train_val_split", "PROTOCOLS", "TRAIN_VAL"]

PROTOCOLS = ("val-select", "train+val")
TRAIN_VAL = "test (train+val)"  # the split label of the train+val protocol's rows


@dataclasses.dataclass(frozen=True)
class Protocols:
    """What a run evaluates beside val-select (which always runs): the protocol, and the SASRec reference."""

    protocol: str = "val-select"  # PROTOCOLS: "train+val" also retrains on train + validation targets
    sasrec: Optional[SasrecRecipe] = None  # the SASRec reference rows with this recipe; None: none
    sasrec_train_val: bool = False  # with protocol train+val and sasrec, retrain the reference too

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {self.protocol!r}")
        if self.sasrec_train_val and (self.sasrec is None or self.protocol != "train+val"):
            raise ValueError(f"sasrec_train_val: needs protocol 'train+val' and a sasrec recipe, got protocol "
                             f"{self.protocol!r} and sasrec={self.sasrec!r}")


def train_val_split(split: LogSplit) -> LogSplit:
    """The split whose training part holds each evaluated user's validation target too. Only its
    training part may be used: its "val"/"test" targets are shifted and meaningless. With kept repeats
    (duplicates="keep") the training part reaches the test target: the repeats after the validation
    target join it as history (train_len + 1 without them)."""
    return dataclasses.replace(split, train_len=split.visible_len("test"))


def retrain_stages(split: LogSplit, recipe: two_stage.Recipe, seed: int, run_dir: str, selected: dict, stream=None,
                   data_parallel=False, shard_tables: bool = False) -> tuple[dict, dict]:
    """Protocol train+val for the pipeline's two stages. `selected`: the val-select run's best step
    of each stage (selected["retrieval_best"]["step"], selected["ranker_best"]["step"]; or their
    "steps", one per ensemble member, each member stopping at its own) and its "retrieval_weight",
    "popularity_weight" and "transition_weight"; the schedules are val-select's (two_stage.stage_steps of `split`).
    Returns ({(TRAIN_VAL, model): metrics}, info with the re-ranked test top-K columns [U, K] and seconds)."""
    start = time.perf_counter()
    ext = train_val_split(split)
    r_total, k_total = two_stage.stage_steps(split, recipe)
    r_stops, k_stops = (best.get("steps", [best["step"]]) for best in (selected["retrieval_best"],
                                                                        selected["ranker_best"]))
    added = int(ext.train_len.sum() - split.train_len.sum())
    print(f"\n== protocol train+val: retraining on train + validation targets ({added} more interactions); "
          f"retrieval {'/'.join(map(str, r_stops))} of {r_total} steps, ranker {'/'.join(map(str, k_stops))} of "
          f"{k_total} steps", file=stream)

    def retrain(begin, stops, stage, total):
        """Each member of `stage` (begin(member) -> (trainer, state, batches, _)) trained to its stop
        and saved under train+val/; returns (trainers, host params)."""
        trainers, params = [], []
        for member, stop in enumerate(stops):
            trainer, state, batches, _ = begin(member)
            state, _ = training.fit(trainer, state, batches, stop, log_every=max(1, min(50, stop // 10)),
                                    stream=stream)
            trainer.save(os.path.join(run_dir, "train+val", two_stage.member_stage(member, stage)), state,
                         extra={"protocol": "train+val", "seed": seed, "steps": stop, "schedule_steps": total})
            trainers.append(trainer)
            params.append(trainer.host_params(state.params))
        return trainers, params

    members, member_params = retrain(
        lambda m: two_stage.start_retrieval(ext, recipe, seed, data_parallel, steps=r_total, member=m,
                                            shard_tables=shard_tables),
        r_stops, "retrieval", r_total)
    retrieval, r_params = two_stage.ensemble(members, member_params)
    pool = (two_stage.hard_negative_pool(retrieval, r_params, ext, recipe.history_len, recipe.negative_pool)
            if recipe.hard_negatives else None)
    warm = member_params[0] if recipe.ranker_init_from_retrieval else None
    rankers, ranker_params = retrain(
        lambda m: two_stage.start_ranker(ext, pool, recipe, seed, warm, data_parallel, steps=k_total, member=m,
                                         shard_tables=shard_tables),
        k_stops, "ranker", k_total)
    ranker, k_params = two_stage.ensemble(rankers, ranker_params, two_stage.RankerEnsemble)

    one = two_stage.StageOne(retrieval, r_params, split, "test", recipe.history_len, recipe.retrieve_k)
    two, reranked = two_stage.TwoStage(one, ranker, k_params, split, "test", recipe).evaluate(
        selected["retrieval_weight"], recipe.temperature, selected["popularity_weight"],
        selected.get("transition_weight", 0.0))
    rows = {(TRAIN_VAL, "retrieval"): one.metrics(), (TRAIN_VAL, "two-stage"): two}
    return rows, {"reranked_test": reranked, "seconds": time.perf_counter() - start}


def extra_rows(protocols: Protocols):
    """The phoenix_pipeline.run(extra_rows=...) hook of `protocols`, or None when val-select is all."""
    protocol, recipe_s = protocols.protocol, protocols.sasrec
    with_sasrec = recipe_s is not None
    if protocol == "val-select" and not with_sasrec:
        return None

    def rows(run: dict) -> tuple[dict, dict]:
        split, stream, seed = run["split"], run["stream"], run["seed"]
        out, info = {}, {}
        if protocol == "train+val":
            more, info["train+val"] = retrain_stages(split, run["recipe"], seed, run["checkpoint_dir"], run, stream,
                                                     run.get("data_parallel", False), run.get("shard_tables", False))
            out.update(more)
        if with_sasrec:
            print("\n== sasrec reference (full softmax over all items)", file=stream)
            more, info["sasrec"] = sasrec.reference_rows(split, recipe_s, seed, two_stage.training_windows,
                                                         two_stage.eval_mask, stream)
            out.update(more)
            if protocol == "train+val" and protocols.sasrec_train_val:
                best = info["sasrec"]["best"]
                more, info["sasrec train+val"] = sasrec.reference_rows(
                    split, recipe_s, seed, two_stage.training_windows, two_stage.eval_mask, stream,
                    train_split=train_val_split(split), num_steps=best["step"], total_steps=best["total_steps"])
                out[(TRAIN_VAL, "sasrec")] = more[("test", "sasrec")]
        for part in info.values():
            part.pop("params", None)
        return out, info

    return rows


def ordered(table: dict) -> dict:
    """Rows grouped by split label: val, test, then the other protocols', each in insertion order."""
    labels = list(dict.fromkeys(["val", "test"] + [which for which, _ in table]))
    return {key: table[key] for label in labels for key in table if key[0] == label}

"""A recommendation server for a run directory: HTTP/JSON on Starlette + uvicorn, with dynamic
micro-batching of concurrent requests.

    uv run phoenix-serve --run runs/mine --port 8000           # run_serve.py: the command
    curl -s localhost:8000/recommend -d '{"user": "u17", "k": 10}'

Endpoints (JSON in and out; docs/serving.md has the schemas):
  POST /recommend  {"user": id, "k": 10}                 -> {"user", "items": [ids], "scores": [floats]}
                   phoenix_serving.recommend(run, user, k): the two-stage ranking as evaluated
  POST /rank       {"user": id, "candidates": [ids]}     -> {"user", "candidates", "actions": [A names],
                   "probabilities": [[A floats] per candidate]}: sigmoid of the ranker's logits on
                   the user's logged sequence (rank(): the evaluation's ranker_logits)
  GET  /health     {"status": "ok"}
  GET  /version    versions, the run, its recipe and counts

Bad input (unknown user or item, empty or too many candidates, k out of range, malformed JSON,
unknown fields) is answered 400 with {"error": "<field>: expected ..., got ..."}, the library's
messages; only a fault of the server itself is a 500.

Micro-batching: each endpoint has a queue on the event loop. While no batch of it is running, a
request starts one; the batch takes every request waiting, up to `max_batch` (when the previous batch
held more than one request, clients are concurrent, and it also waits up to `max_wait_ms` for as many
as that batch held, so a lone client never waits) and runs as one computation on the endpoint's
worker thread (the event loop keeps accepting and parsing requests meanwhile); its answers are
encoded on the worker from NumPy arrays (orjson: no Python float per number) and handed back to the
loop in one call. /recommend runs through phoenix_serving.top_items (padded EVAL_BATCH blocks: a
user's answer is the one recommend gives, bit for bit, whoever shares the batch), /rank through
ranker_logits with its rows padded to the next of RANK_BUCKETS (one compilation per bucket, all
compiled at startup).

Shape glossary
  U  users in a batch   K  items a user gets   C  candidates   Ct  the ranker's training candidates
  A  actions (19)
"""

import asyncio
import dataclasses
import importlib.util
import os
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import Callable, Optional

import jax
import numpy as np
import orjson

import phoenix_serving as serving
import phoenix_split
import phoenix_two_stage as two_stage
from phoenix_inputs import ACTIONS
from phoenix_serving import ServedRun

__all__ = ["ServerConfig", "MicroBatcher", "make_app", "serve", "rank", "rank_logits", "recommend_rows",
           "check_recommend", "check_rank", "RequestError", "RANK_BUCKETS", "bucket_of", "warm_up"]

# Rows of ranker input (a user's candidates in chunks of Ct) a /rank batch is padded to: few shapes,
# so a handful of compilations (at most 4x padding below 16 rows, 2x above).
RANK_BUCKETS = (1, 4, 16, 32, 64, 128, 256)
MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused (413)
DRAIN_BYTES = 16 << 20  # ... after reading this much of it at most
BACKLOG = 1024  # connections the listening socket queues before accepting them
JSON_DEPTH = 1024  # arrays and objects nested deeper are refused (orjson's limit)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How the server batches and what it accepts."""

    max_batch: int = 32  # requests one batch takes at most (one model call)
    max_wait_ms: float = 2.0  # the most a batch waits for more requests, only while clients are concurrent
    max_candidates: int = 1024  # candidates one /rank request may name
    max_rank_rows: int = 64  # ranker rows (a user's candidates in chunks of Ct) per model call: the
    # largest RANK_BUCKETS size compiled; a bigger batch runs as several calls of it
    warmup: bool = True  # compile every shape (recommend, each rank bucket) before accepting requests
    recommend: bool = True  # False: a ranker alone (no retrieval stage to recommend with); /recommend is 404


class RequestError(ValueError):
    """Bad input of a request: answered `status` (400, or 413 for an oversized body) with its message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------
# The computations (in-process; the server batches calls to them)
# ---------------------------------------------------------------------------------------------


def check_recommend(served: ServedRun, user, k) -> tuple[int, int]:
    """(user row, k) of a /recommend request, refused as phoenix_serving.recommend refuses it."""
    k = serving._check_k(k, served.recipe)
    row = served.user_row(user)
    if row is None:
        raise ValueError(f"user: expected a user of the run's log ({served.info.get('source')}), got {user!r}")
    split = served.split
    seen = serving.history_mask(split, np.array([row]), split.offsets[row + 1:row + 2])  # [1, N]
    available = len(split.item_ids) - int(seen.sum())
    if k > available:
        raise ValueError(f"k: expected at most {available} for user {user!r} (the {len(split.item_ids)} catalog items "
                         f"minus the {len(split.item_ids) - available} in their history), got {k}")
    return row, k


def recommend_rows(served: ServedRun, rows, ks) -> list[tuple[list, np.ndarray]]:
    """(original item ids [k], scores [k] float64) best first for each user row [U] and its k [U]: the
    items and scores phoenix_serving.recommend gives each, from one top_items call."""
    rows = np.asarray(rows, np.int64)
    columns, scores = serving.top_items(served, served.split, rows, served.split.offsets[rows + 1])  # [U, K]
    scores = scores.astype(np.float64)  # float32 where no float64 term enters: written as recommend's floats
    return [(served.item_tokens(columns[i, :k]), scores[i, :k]) for i, k in enumerate(ks)]


def check_rank(served: ServedRun, user, candidates, max_candidates: int) -> tuple[int, np.ndarray]:
    """(user row, catalog columns [C]) of a /rank request; ValueError naming the field."""
    row = served.user_row(user)
    if row is None:
        raise ValueError(f"user: expected a user of the run's log ({served.info.get('source')}), got {user!r}")
    if not isinstance(candidates, (list, tuple)):
        raise ValueError(f"candidates: expected a list of item ids, got {type(candidates).__name__}")
    if not 1 <= len(candidates) <= max_candidates:
        raise ValueError(f"candidates: expected 1 to {max_candidates} item ids, got {len(candidates)}")
    split = served.split
    raw = np.array([served.raw_id("item", item, f"candidates[{i}]") for i, item in enumerate(candidates)], np.int64)
    columns = np.clip(np.searchsorted(split.item_ids, raw), 0, len(split.item_ids) - 1)  # [C]
    known = split.item_ids[columns] == raw
    if "item" in served.names:
        known &= served.names["item"][columns] == np.array([str(c) for c in candidates], dtype=object)
    if not known.all():
        i = int(np.flatnonzero(~known)[0])
        raise ValueError(f"candidates[{i}]: expected an item of the run's catalog ({len(split.item_ids)} items), "
                         f"got {candidates[i]!r} ({int((~known).sum())} unknown in all)")
    return row, columns.astype(np.int64)


def rank_logits(served: ServedRun, rows, columns: list, batch_size: Optional[int] = None,
                max_rows: int = ServerConfig.max_rank_rows) -> list[np.ndarray]:
    """Ranker logits [C_i, A] of catalog columns `columns[i]` [C_i] for user rows [U] on their logged
    sequences: phoenix_two_stage.ranker_logits (chunks of the training Ct candidates, a candidate's
    logits independent of its chunk mates) over all users at once, `batch_size` rows per call
    (default: the next RANK_BUCKETS size up to `max_rows`, so a batch compiles once per bucket)."""
    rows = np.asarray(rows, np.int64)
    ct = served.recipe.num_candidates
    width = max(-(-len(c) // ct) for c in columns) * ct  # K': the longest list, in whole chunks
    padded = np.full((len(rows), width), -1, np.int64)  # [U, K'] -1: padding
    for i, c in enumerate(columns):
        padded[i, :len(c)] = c
    if batch_size is None:
        needed = len(rows) * (width // ct)
        batch_size = bucket_of(needed, max_rows)
    split = served.split
    examples = phoenix_split.histories(split, rows, split.offsets[rows + 1], served.recipe.ranker_history_len)
    logits = two_stage.ranker_logits(served.ranker, served.ranker_params, split, examples, padded, ct,
                                     batch_size)  # [U, K', A]
    return [logits[i, :len(c)] for i, c in enumerate(columns)]


def bucket_of(rows: int, max_rows: int) -> int:
    """The RANK_BUCKETS size a call of `rows` ranker rows is padded to (at most max_rows' bucket)."""
    top = max(b for b in RANK_BUCKETS if b <= max(1, max_rows))
    return next((b for b in RANK_BUCKETS if b >= rows and b <= top), top)


def rank(served: ServedRun, user, candidates, max_candidates: int = ServerConfig.max_candidates,
         batch_size: Optional[int] = None) -> np.ndarray:
    """Per-action probabilities [C, A] of original item ids `candidates` for a user of the run (on
    their logged sequence): what /rank answers."""
    row, columns = check_rank(served, user, candidates, max_candidates)
    return _sigmoid(rank_logits(served, [row], [columns], batch_size)[0])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


# ---------------------------------------------------------------------------------------------
# Micro-batching
# ---------------------------------------------------------------------------------------------


class MicroBatcher:
    """Batches of `run_batch(payloads) -> results` (one per payload, in order) on the requests waiting
    (module docstring), run one at a time on a worker thread. `submit` from the event loop returns an
    awaitable; the loop it is first called on is the one the batches are scheduled on."""

    def __init__(self, run_batch: Callable[[list], list], max_batch: int, max_wait_s: float, name: str):
        self.run_batch, self.max_batch, self.max_wait_s = run_batch, max_batch, max_wait_s
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"batcher-{name}")
        self.pending: list = []  # [(payload, future)] waiting for the next batch
        self.batch_sizes: list = []  # sizes of the batches run (for the bench)
        self.running = False  # a batch task is scheduled (it runs batches while requests wait)
        self.enough: Optional[asyncio.Event] = None  # set once `want` requests wait
        self.want = 0
        self.task: Optional[asyncio.Future] = None

    def submit(self, payload) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((payload, future))
        if not self.running:
            self.running = True
            self.task = asyncio.ensure_future(self._run())  # held: a task nobody references may be collected
        elif self.enough is not None and len(self.pending) >= self.want:
            self.enough.set()
        return future

    def stop(self) -> None:
        """Waits for the batch running (if any) and ends the worker thread."""
        self.executor.shutdown(wait=True)

    async def _take(self) -> list:
        """The next batch: every request waiting up to max_batch and, while clients are concurrent
        (the last batch held several), those that arrive within max_wait_s until the last batch's size."""
        expected = min(self.batch_sizes[-1], self.max_batch) if self.batch_sizes else 1
        if len(self.pending) < expected and self.max_wait_s > 0:
            self.enough, self.want = asyncio.Event(), expected
            try:
                await asyncio.wait_for(self.enough.wait(), self.max_wait_s)
            except asyncio.TimeoutError:
                pass
            self.enough = None
        batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                batch = await self._take()
                self.batch_sizes.append(len(batch))
                try:
                    results = await loop.run_in_executor(self.executor, self.run_batch, [p for p, _ in batch])
                    outcomes = [(r, None) for r in results]
                except Exception as e:  # a fault of the computation: every request of the batch gets it
                    outcomes = [(None, e)] * len(batch)
                for (_, future), (result, error) in zip(batch, outcomes):
                    if future.cancelled():  # its client went away
                        continue
                    if error is not None:
                        future.set_exception(error)
                    else:
                        future.set_result(result)
        finally:
            self.running = False


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def _version_info(served: ServedRun) -> dict:
    try:
        phoenix = metadata.version("phoenix-recsys")
    except metadata.PackageNotFoundError:
        phoenix = "unknown"
    split = served.split
    return {"phoenix": phoenix, "jax": jax.__version__, "numpy": np.__version__, "run": served.path,
            "source": served.info.get("source"), "recipe": dataclasses.asdict(served.recipe),
            "users": len(split.user_ids), "items": len(split.item_ids), "actions": list(ACTIONS),
            "retrieval_weight": served.retrieval_weight, "popularity_weight": served.popularity_weight}


def _fields(body, allowed: dict) -> dict:
    """The request's fields: a JSON object holding the required ones (allowed[name] True) and no others."""
    if not isinstance(body, dict):
        raise RequestError(f"body: expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RequestError(f"{unknown[0]}: unexpected field; expected only {sorted(allowed)}")
    for name, required in allowed.items():
        if required and name not in body:
            raise RequestError(f"{name}: missing; expected fields {sorted(allowed)}")
    return body


def _json(value) -> bytes:
    """`value` as JSON: NumPy arrays written by orjson from their buffers, floats in their shortest
    round-trip form (as json.dumps writes them)."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def make_app(served: ServedRun, config: ServerConfig = ServerConfig()):
    """The Starlette app serving `served` (module docstring), with its two batchers ready.
    app.state.batchers: {"recommend", "rank"}; stop them with app.state.stop()."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    actions = list(ACTIONS)

    def run_recommend(payloads):  # [(user, row, k)] -> response bodies
        users, rows, ks = zip(*payloads)
        return [_json({"user": user, "items": items, "scores": scores})
                for user, (items, scores) in zip(users, recommend_rows(served, rows, ks))]

    def run_rank(payloads):  # [(user, candidates, row, columns)] -> response bodies
        users, candidates, rows, columns = zip(*payloads)
        logits = rank_logits(served, rows, list(columns), max_rows=config.max_rank_rows)  # U x [C, A]
        return [_json({"user": user, "candidates": names, "actions": actions, "probabilities": _sigmoid(x)})
                for user, names, x in zip(users, candidates, logits)]

    batchers = {"recommend": MicroBatcher(run_recommend, config.max_batch, config.max_wait_ms / 1e3, "recommend"),
                "rank": MicroBatcher(run_rank, config.max_batch, config.max_wait_ms / 1e3, "rank")}
    version = _json(_version_info(served))

    def answer(body: bytes, status: int = 200) -> Response:
        return Response(body, status_code=status, media_type="application/json")

    async def read_json(request: Request):
        # An oversized body is read to its end (up to DRAIN_BYTES) before the 413, so that a client
        # still sending it gets the answer rather than a broken pipe.
        size, chunks = 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size <= MAX_BODY_BYTES:
                chunks.append(chunk)
            elif size > DRAIN_BYTES:
                break
        if size > MAX_BODY_BYTES:
            raise RequestError(f"body: expected at most {MAX_BODY_BYTES} bytes, got {size}"
                               f"{' or more' if size > DRAIN_BYTES else ''}", status=413)
        try:
            return orjson.loads(b"".join(chunks) if len(chunks) != 1 else chunks[0])
        except orjson.JSONDecodeError as e:
            if str(e).startswith("depth limit exceeded"):
                raise RequestError(f"body: expected JSON nested at most {JSON_DEPTH} levels deep, got deeper") from None
            raise RequestError(f"body: expected JSON, got {e}") from None

    def endpoint(handler):
        async def wrapped(request: Request) -> Response:
            try:
                return answer(await handler(request))
            except RequestError as e:  # bad input; anything else is a fault of the server (500)
                return answer(_json({"error": str(e)}), e.status)
        return wrapped

    def checked(check, *args):
        """check(*args), its ValueError (the library's message naming the field) a RequestError."""
        try:
            return check(*args)
        except (ValueError, TypeError, OverflowError) as e:  # e.g. an integer id beyond int64
            raise RequestError(str(e)) from None

    async def recommend(request: Request) -> bytes:
        body = _fields(await read_json(request), {"user": True, "k": False})
        user = body["user"]
        row, k = checked(check_recommend, served, user, body.get("k", two_stage.FINAL_K))
        return await batchers["recommend"].submit((user, row, k))

    async def rank_endpoint(request: Request) -> bytes:
        body = _fields(await read_json(request), {"user": True, "candidates": True})
        row, columns = checked(check_rank, served, body["user"], body["candidates"], config.max_candidates)
        return await batchers["rank"].submit((body["user"], body["candidates"], row, columns))

    async def health(request: Request) -> bytes:
        return b'{"status":"ok"}'

    async def version_endpoint(request: Request) -> bytes:
        return version

    routes = [Route("/recommend", endpoint(recommend), methods=["POST"])] if config.recommend else []
    app = Starlette(routes=routes + [Route("/rank", endpoint(rank_endpoint), methods=["POST"]),
                            Route("/health", endpoint(health), methods=["GET"]),
                            Route("/version", endpoint(version_endpoint), methods=["GET"])])
    app.state.batchers = batchers
    app.state.stop = lambda: [b.stop() for b in batchers.values()]
    return app


def warm_up(served: ServedRun, config: ServerConfig) -> None:
    """Compiles every shape the server runs: recommend (one EVAL_BATCH block) and each rank bucket."""
    row = int(np.argmax(np.diff(served.split.offsets) > 0))
    if config.recommend:
        recommend_rows(served, [row], [1])
    for bucket in sorted({bucket_of(rows, config.max_rank_rows) for rows in RANK_BUCKETS}):
        rank_logits(served, [row], [np.zeros(1, np.int64)], batch_size=bucket)


def serve(served: ServedRun, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig = ServerConfig(),
          log=print) -> int:
    """Serves until SIGTERM or SIGINT, then drains the batchers and returns 0."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # a clean stop: uvicorn's own handler re-raises the signal after
            self.should_exit = True

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # listening now: say where (the port the OS chose for --port 0)
                bound = self.servers[0].sockets[0].getsockname()[1] if self.servers else port
                log(f"serving {served.path or served.info.get('source')} on http://{host}:{bound} (pid {os.getpid()})")

    if config.warmup:
        start = time.perf_counter()
        warm_up(served, config)
        log(f"compiled in {time.perf_counter() - start:.1f} s")
    app = make_app(served, config)
    # One worker process (the model and its compilations are loaded once), httptools' C parser,
    # uvloop where it is installed, no access log and no per-response Date/Server headers.
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                   lifespan="off", http="httptools", loop=loop, workers=1, backlog=BACKLOG,
                                   server_header=False, date_header=False))
    try:
        server.run()
    finally:
        app.state.stop()
    log("stopped")
    return 0

"""Where a served request's time goes on the server side: each step of phoenix_server's path timed
alone, per request, at batches of 1 and 32 requests, for /rank (a user + 16 candidates) and
/recommend (k = 10) of a run.

    uv run python scripts/profile_serve.py --run DIR          # a run of run_train.py (the bench's fixture)

Steps (median of --repeats timings of each, in microseconds per request):
  http       uvicorn + httptools + Starlette routing and the response's send: the server CPU per
             request of GET /health (no body, no model), from /proc of a run_serve.py process
             loaded by --health-requests keep-alive requests (one client; its own CPU excluded)
  decode     the request body to Python (orjson.loads; json.loads, the standard library's, beside it)
  validate   phoenix_server.check_rank / check_recommend (ids to rows and columns, the library's checks)
  hand-off   MicroBatcher.submit to the awaited answer around a computation that returns at once
             (the event loop, the worker thread, the futures resolved)
  model      the batch's computation, per request: rank_logits + sigmoid / recommend_rows
  encode     the answer to JSON bytes (phoenix_server._json from NumPy; json.dumps of the lists
             beside it, the standard library's way)
Prints a markdown table. The bench's CPU columns (scripts/bench_serve.py) give the whole per-request
cost under load; this splits it.
"""

import argparse
import asyncio
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import phoenix_pipeline as pipeline  # noqa: E402
import phoenix_server  # noqa: E402
from bench_serve import (process_cpu, rank_requests, recommend_requests, start_server,  # noqa: E402
                         stop_server)


def seconds_of(fn) -> float:
    """Wall seconds of one fn() call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_call(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls."""
    return float(np.median([seconds_of(fn) for _ in range(repeats)]))


def handoff(batch: int, repeats: int) -> float:
    """Seconds per request of `batch` requests submitted together to a MicroBatcher whose computation
    returns at once, until every answer is back."""
    batcher = phoenix_server.MicroBatcher(lambda payloads: payloads, batch, 0.0, "profile")

    async def run():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            await asyncio.gather(*[batcher.submit(i) for i in range(batch)])
            times.append(time.perf_counter() - start)
        return float(np.median(times))
    try:
        return asyncio.run(run()) / batch
    finally:
        batcher.stop()


def http_cost(run: Path, requests: int) -> float:
    """Server CPU seconds per GET /health on a run_serve.py of `run`."""
    process, base, _ = start_server([sys.executable, str(ROOT / "run_serve.py"), "--run", str(run), "--port", "0",
                                     "--no-warmup"])  # /health runs no model
    try:
        host, port = base.split("//")[1].split(":")
        connection = http.client.HTTPConnection(host, int(port))
        for _ in range(50):  # warm
            connection.request("GET", "/health")
            connection.getresponse().read()
        before = process_cpu(process.pid)
        for _ in range(requests):
            connection.request("GET", "/health")
            connection.getresponse().read()
        return (process_cpu(process.pid) - before) / requests
    finally:
        stop_server(process)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory of run_train.py")
    parser.add_argument("--repeats", type=int, default=200, help="timings per step (default: %(default)s)")
    parser.add_argument("--health-requests", type=int, default=2000, help="GET /health requests (default: %(default)s)")
    args = parser.parse_args(argv)
    served = pipeline.load_run(args.run)
    config = phoenix_server.ServerConfig()
    phoenix_server.warm_up(served, config)
    load_before = os.getloadavg()
    rank_bodies, rank_payloads = rank_requests(served, 32, 16, seed=1)
    rec_bodies, rec_payloads = recommend_requests(served, 32, 10, seed=2)
    us = {}
    for endpoint, bodies in (("rank", rank_bodies), ("recommend", rec_bodies)):
        raw = [json.dumps(b).encode() for b in bodies]
        us[(endpoint, "decode (orjson)")] = per_call(lambda: [orjson.loads(r) for r in raw], args.repeats) / 32
        us[(endpoint, "decode (json)")] = per_call(lambda: [json.loads(r) for r in raw], args.repeats) / 32
    us[("rank", "validate")] = per_call(lambda: [phoenix_server.check_rank(served, b["user"], b["candidates"], 1024)
                                                 for b in rank_bodies], args.repeats) / 32
    us[("recommend", "validate")] = per_call(lambda: [phoenix_server.check_recommend(served, b["user"], b["k"])
                                                      for b in rec_bodies], args.repeats) / 32
    for batch in (1, 32):
        hand = handoff(batch, args.repeats)
        us[("rank", f"hand-off x{batch}")] = us[("recommend", f"hand-off x{batch}")] = hand
        rows, columns = zip(*rank_payloads[:batch])
        us[("rank", f"model x{batch}")] = per_call(
            lambda: [phoenix_server._sigmoid(x) for x in phoenix_server.rank_logits(served, rows, list(columns))],
            max(10, args.repeats // 10)) / batch
        rows, ks = zip(*rec_payloads[:batch])
        us[("recommend", f"model x{batch}")] = per_call(lambda: phoenix_server.recommend_rows(served, rows, ks),
                                                        max(10, args.repeats // 10)) / batch
    rows, columns = zip(*rank_payloads)
    probabilities = [phoenix_server._sigmoid(x) for x in phoenix_server.rank_logits(served, rows, list(columns))]
    answers = [{"user": b["user"], "candidates": b["candidates"], "actions": list(phoenix_server.ACTIONS),
                "probabilities": p} for b, p in zip(rank_bodies, probabilities)]
    us[("rank", "encode (orjson, NumPy)")] = per_call(lambda: [phoenix_server._json(a) for a in answers],
                                                      args.repeats) / 32
    us[("rank", "encode (json, lists)")] = per_call(
        lambda: [json.dumps({**a, "probabilities": a["probabilities"].tolist()}) for a in answers], args.repeats) / 32
    recs = phoenix_server.recommend_rows(served, *zip(*rec_payloads))
    us[("recommend", "encode (orjson, NumPy)")] = per_call(
        lambda: [phoenix_server._json({"user": b["user"], "items": i, "scores": s}) for b, (i, s) in
                 zip(rec_bodies, recs)], args.repeats) / 32
    us[("recommend", "encode (json, lists)")] = per_call(
        lambda: [json.dumps({"user": b["user"], "items": i, "scores": s.tolist()}) for b, (i, s) in
                 zip(rec_bodies, recs)], args.repeats) / 32
    http = http_cost(Path(args.run), args.health_requests)
    us[("rank", "http")] = us[("recommend", "http")] = http
    load_after = os.getloadavg()
    print("| endpoint | step | us per request |\n|---|---|---:|")
    for (endpoint, step), seconds in sorted(us.items()):
        print(f"| /{endpoint} | {step} | {seconds * 1e6:.1f} |")
    print(f"\nload average {load_before[0]:.2f} before, {load_after[0]:.2f} after")


if __name__ == "__main__":
    main()

"""Serving: the BentoML service vs a plain FastAPI app vs the model itself, for every model, in one run.

    python bench/serving.py [--requests 800] [--concurrency 8] [--repeats 3] [--models fraud delivery] [--json PATH]

For each model (the fraud classifier, the delivery regressor) it trains a small model with the model's own
`train.py`, registers it in a temporary MLflow SQLite store and measures one-row scoring:
  pandas   model.predict_proba / predict of a one-row DataFrame in-process (the path before issue 15)
  records  model.predict_proba_records / predict_records of the row in-process: what the scorer calls
  scorer   loopform.serving.scorer.Scorer.score_rows in-process (+ answer, request id, payload-log enqueue)
  bentoml  POST /predict to `bentoml serve bentos.<model>.service:<Model>Service` (1 worker)
  fastapi  POST /predict to uvicorn running `bench.serving:fastapi_app` (1 worker): the same Scorer in a
           plain FastAPI endpoint (`def predict(event: Request) -> Prediction`)
  guard    the caller check and body limit (`BearerAuth` + `BodyLimit`) around a do-nothing ASGI app in-process,
           against the bare app: what authentication and limits add to each request
Both servers authenticate callers alike (the same ASGI middlewares and tokens file; every request carries a bearer
token) and run at once with their payload logs and metrics on, and are measured in alternation (latency:
one sequential request to each in turn on a keep-alive connection; throughput: bursts of --concurrency client
threads to each in turn), so the machine's load weighs on both alike. Every measurement is repeated
--repeats times; the table shows medians. The client shares the cores with the servers: read the ratios.

The run fails (exit 1) only when answers differ: the records path from the pandas path on the training rows,
or BentoML's answers from the FastAPI peer's on the same requests. `--json PATH` writes the rows of `make bench`'s
table (bench/table.py): per model, BentoML's p50, p99 and time per request under load against FastAPI's.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.table import limit_row, ratio_row, write_json  # noqa: E402

OFFLINE = {"MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "true"}
ENV_BENCH_MODEL = "LOOPFORM_BENCH_MODEL"  # which model's contract the FastAPI peer serves
TRAINING = {"fraud": {"rows": 3000, "seed": 3}, "delivery": {"rows": 2000, "seed": 5}}
CHECKED_ROWS = 50  # requests both servers answer for the agreement check


def fastapi_app() -> Any:
    """The FastAPI peer (uvicorn --factory): the same Scorer, payload log and metrics as the BentoML service."""
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    from loopform.serving.auth import BearerAuth
    from loopform.serving.limits import BodyLimit
    from loopform.serving.release import payload_log_from_env, release_from_env
    from loopform.serving.schemas import schemas
    from loopform.serving.scorer import Scorer, torch_threads

    contract = importlib.import_module(f"models.{os.environ[ENV_BENCH_MODEL]}.contract").CONTRACT
    api = schemas(contract)
    request, prediction = api.request, api.response
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        torch_threads()
        release = release_from_env()
        payloads = payload_log_from_env(release.name)
        state["scorer"] = Scorer(release, contract, payloads=payloads)
        yield
        payloads.close()

    app = FastAPI(lifespan=lifespan)

    def predict(event: Any) -> Any:
        return prediction(**state["scorer"].score_rows([event.model_dump()], "predict")[0])

    # The models are built at run time: FastAPI reads them from the annotations, which this module keeps as strings.
    predict.__annotations__ = {"event": request, "return": prediction}
    app.post("/predict")(predict)
    # As the BentoML service does: each added middleware goes outside the last, so the caller check runs first.
    app.add_middleware(BodyLimit, json_paths=["/predict"])
    app.add_middleware(BearerAuth, protected=["/predict"])
    return app


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def time_calls(call: Callable[[], Any], n: int) -> list[float]:
    for _ in range(min(50, n)):  # warm-up
        call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def guard_calls(n: int, work: Path) -> dict[str, list[float]]:
    """Seconds per request through the caller check and body limit around a do-nothing app, and through the app
    (two callers in the tokens file: every request compares both tokens)."""
    import asyncio

    from loopform.serving.auth import BearerAuth, Callers
    from loopform.serving.limits import BodyLimit
    from tests.helpers_serving import write_tokens

    token = write_tokens(work / "guard-tokens.json", ("bench", "other"))["other"]
    callers = Callers(work / "guard-tokens.json")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message: dict[str, Any]) -> None:
        pass

    guarded = BearerAuth(
        BodyLimit(app, json_paths=["/predict"], limit=16 * 2**20), protected=["/predict"], callers=callers
    )
    scope = {
        "type": "http",
        "path": "/predict",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", b"250"),
            (b"authorization", f"Bearer {token}".encode()),
        ],
    }

    async def timed(target: Any) -> list[float]:
        samples = []
        for i in range(n + 50):
            start = time.perf_counter()
            await target(scope, None, send)
            if i >= 50:
                samples.append(time.perf_counter() - start)
        return samples

    return {"guard": asyncio.run(timed(guarded)), "bare": asyncio.run(timed(app))}


def paired_latency(
    urls: dict[str, str], body: dict[str, Any], n: int, headers: dict[str, str]
) -> dict[str, list[float]]:
    """Sequential requests, one to each server in turn (the order alternates), on one connection per server."""
    import httpx

    clients = {name: httpx.Client(timeout=60.0, headers=headers) for name in urls}
    samples: dict[str, list[float]] = {name: [] for name in urls}
    names = list(urls)
    try:
        for i in range(n + 50):
            for name in names if i % 2 else reversed(names):
                start = time.perf_counter()
                clients[name].post(urls[name], json=body).raise_for_status()
                if i >= 50:  # the first rounds warm up
                    samples[name].append(time.perf_counter() - start)
    finally:
        for client in clients.values():
            client.close()
    return samples


def paired_throughput(
    urls: dict[str, str], body: dict[str, Any], n: int, concurrency: int, headers: dict[str, str]
) -> dict[str, float]:
    """Requests per second with `concurrency` client threads, in bursts of n/4 requests to each server in turn."""
    import httpx

    bursts = 4
    per_thread = max(1, n // (bursts * concurrency))
    done = dict.fromkeys(urls, 0)
    spent = dict.fromkeys(urls, 0.0)
    with ThreadPoolExecutor(concurrency) as pool:
        clients = {name: [httpx.Client(timeout=60.0, headers=headers) for _ in range(concurrency)] for name in urls}
        try:
            for name, url in urls.items():  # warm every connection
                list(pool.map(lambda client, url=url: client.post(url, json=body), clients[name]))
            for burst in range(bursts):
                for name in urls if burst % 2 else reversed(list(urls)):

                    def worker(client: Any, url: str = urls[name]) -> None:
                        for _ in range(per_thread):
                            client.post(url, json=body).raise_for_status()

                    start = time.perf_counter()
                    list(pool.map(worker, clients[name]))
                    spent[name] += time.perf_counter() - start
                    done[name] += per_thread * concurrency
        finally:
            for group in clients.values():
                for client in group:
                    client.close()
    return {name: done[name] / spent[name] for name in urls}


def start_uvicorn(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    import httpx

    command = [
        sys.executable, "-m", "uvicorn", "bench.serving:fastapi_app", "--factory",
        "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"uvicorn exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/docs", timeout=2.0).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.terminate()
    raise TimeoutError("uvicorn did not start")


def plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def bench_model(name: str, args: argparse.Namespace, work: Path) -> tuple[dict[str, dict[str, float]], list[str]]:
    """(median results per path, disagreements) for model `name`."""
    import httpx
    import numpy as np
    import pandas as pd

    from loopform import registry
    from loopform.payloads import PayloadLog
    from loopform.serving.process import BentoServer
    from loopform.serving.release import load_release
    from loopform.serving.schemas import class_prefix
    from loopform.serving.scorer import Scorer, torch_threads
    from tests.helpers_serving import CALLER, free_port, token_env

    contract = importlib.import_module(f"models.{name}.contract").CONTRACT
    data = importlib.import_module(f"models.{name}.data")
    train = importlib.import_module(f"models.{name}.train").train
    settings = TRAINING[name]
    frame = data.generate(settings["rows"], settings["seed"], days=10)
    model = train(frame, settings["seed"], max_epochs=3)
    tracking_uri = f"sqlite:///{work}/{name}-mlflow.db"
    run = registry.log_training_run(tracking_uri, name, model, gate_results={}, training_data_fingerprint="bench")
    version = registry.register_version(tracking_uri, name, run.run_id).version
    registry.set_alias(tracking_uri, name, "production", version)
    features = list(contract.feature_names)
    rows = [{f: plain(row[f]) for f in features} for row in frame[features].to_dict("records")]
    body = rows[0]

    torch_threads()
    release = load_release(tracking_uri, f"models:/{name}@production")
    loaded = release.model
    problems = []
    by_frame = loaded.predict_proba if contract.classification else loaded.predict
    by_records = loaded.predict_proba_records if contract.classification else loaded.predict_records
    if not np.array_equal(by_frame(frame[features]), by_records(rows)):
        problems.append(f"{name}: the records path answers differently from the pandas path on the training rows")

    one = pd.DataFrame([body])
    runs: dict[str, list[dict[str, float]]] = {
        path: [] for path in ("pandas", "records", "scorer", "guard", "bare", "bentoml", "fastapi")
    }
    with PayloadLog(str(work / f"{name}-inproc-payloads"), name) as payloads:
        scorer = Scorer(release, contract, payloads=payloads, with_metrics=False)
        for _ in range(args.repeats):
            runs["pandas"].append(percentiles(time_calls(lambda: by_frame(one), args.requests)))
            runs["records"].append(percentiles(time_calls(lambda: by_records([body]), args.requests)))
            runs["scorer"].append(percentiles(time_calls(lambda: scorer.score_rows([body], "predict"), args.requests)))
            for path, samples in guard_calls(args.requests, work).items():
                runs[path].append(percentiles(samples))

    tokens, authorization = token_env(work / f"{name}-tokens.json")  # one caller, both servers
    headers = {"Authorization": authorization[CALLER]}
    env = {
        **os.environ,
        **tokens,
        "LOOPFORM_TRACKING_URI": tracking_uri,
        "LOOPFORM_MODEL_URI": f"models:/{name}@production",
        "BENTOML_HOME": str(work / "bentoml"),
        "MPLCONFIGDIR": str(work / "mpl"),
        ENV_BENCH_MODEL: name,
    }
    bento = BentoServer(
        f"bentos.{name}.service:{class_prefix(name)}Service",
        working_dir=REPO,
        port=free_port(),
        env={**env, "LOOPFORM_PAYLOAD_URI": str(work / f"{name}-bento-payloads")},
        log_path=work / f"{name}-bentoml.log",
    ).start()
    port = free_port()
    peer = start_uvicorn(
        {**env, "LOOPFORM_PAYLOAD_URI": str(work / f"{name}-fastapi-payloads")}, port, work / f"{name}-uvicorn.log"
    )
    urls = {"bentoml": f"{bento.url}/predict", "fastapi": f"http://127.0.0.1:{port}/predict"}
    try:
        for row in rows[:CHECKED_ROWS]:
            answers = {
                server: httpx.post(url, json=row, headers=headers, timeout=60.0).json() for server, url in urls.items()
            }
            keep = ("prediction", "score", "threshold", "version")
            left, right = ({k: a.get(k) for k in keep} for a in answers.values())
            if left != right:
                problems.append(f"{name}: BentoML answered {left}, FastAPI {right} for {row}")
        for _ in range(args.repeats):
            latency = paired_latency(urls, body, args.requests, headers)
            rps = paired_throughput(urls, body, args.requests, args.concurrency, headers)
            for server in urls:
                runs[server].append({**percentiles(latency[server]), "rps": rps[server]})
    finally:
        bento.stop()
        peer.terminate()
        peer.wait(60)
    medians = {
        path: {key: statistics.median(r[key] for r in results) for key in results[0]} for path, results in runs.items()
    }
    return medians, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=800, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads for throughput")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per path (the median is shown)")
    parser.add_argument("--models", nargs="+", default=list(TRAINING), choices=list(TRAINING))
    parser.add_argument("--json", default=None, help="also write the rows of `make bench`'s table there")
    args = parser.parse_args()
    os.environ.update(OFFLINE)
    work = Path(tempfile.mkdtemp(prefix="loopform-bench-serving-"))
    load = os.getloadavg()[0]
    problems: list[str] = []
    results = {}
    for name in args.models:
        results[name], found = bench_model(name, args, work)
        problems += found

    print(
        f"requests={args.requests} concurrency={args.concurrency} repeats={args.repeats} cpus={os.cpu_count()} "
        f"load1={load:.1f}->{os.getloadavg()[0]:.1f} workdir={work}"
    )
    print(f"{'model':<9} {'path':<8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    for name, paths in results.items():
        for path, r in paths.items():
            rps = f"{r['rps']:8.0f}" if "rps" in r else ""
            print(f"{name:<9} {path:<8} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {rps}")
    rows = []
    for name, paths in results.items():
        bento, fast = paths["bentoml"], paths["fastapi"]
        guard_us = 1000 * (paths["guard"]["p50_ms"] - paths["bare"]["p50_ms"])
        print(
            f"{name}: bentoml/fastapi p50 {bento['p50_ms'] / fast['p50_ms']:.2f}x, "
            f"p99 {bento['p99_ms'] / fast['p99_ms']:.2f}x, throughput {bento['rps'] / fast['rps']:.2f}x; "
            f"scorer p50 {paths['scorer']['p50_ms']:.3f} ms; pandas/records p50 "
            f"{paths['pandas']['p50_ms'] / paths['records']['p50_ms']:.1f}x; "
            f"caller check + body limit {guard_us:.1f} us per request"
        )
        rows += [
            ratio_row(
                f"{name} /predict p50, one request at a time", bento["p50_ms"], fast["p50_ms"], "FastAPI", "ms", 1.0
            ),
            ratio_row(
                f"{name} /predict p99, one request at a time", bento["p99_ms"], fast["p99_ms"], "FastAPI", "ms", 1.5
            ),
            ratio_row(
                f"{name} /predict time per request, {args.concurrency} clients",
                1000 / bento["rps"],
                1000 / fast["rps"],
                "FastAPI",
                "ms",
                1.0,
            ),
            limit_row(f"{name} in-process scorer p50, one row", paths["scorer"]["p50_ms"], "ms", 0.3),
        ]
    for problem in problems:
        print("DISAGREEMENT:", problem)
    write_json(args.json, rows, not problems)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()

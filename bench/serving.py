"""Serving overhead: BentoML service vs the raw forward pass vs a plain FastAPI app, same model, same machine.

    python bench/serving.py [--requests 400] [--concurrency 8] [--rows 3000]

Trains a small fraud model, registers it in a temporary MLflow SQLite store, then measures one-row scoring:
  raw      model.predict_proba(one-row DataFrame) in this process (the model's own cost, incl. encoding)
  scorer   loopform.serving.scorer.Scorer.score_rows in this process (+ response dicts, payload log enqueue, metrics)
  bentoml  POST /predict to `bentoml serve bentos.fraud.service:FraudService` (1 worker) over localhost HTTP
  fastapi  POST /predict to uvicorn running bench/serving_fastapi.py (1 worker), the same Scorer inside
Latency is sequential over one keep-alive connection; throughput uses --concurrency client threads. The client
runs on the same cores as the server, so HTTP numbers include client cost: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OFFLINE = {"MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "true"}


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "mean_ms": 1000 * statistics.fmean(ordered),
    }


def time_calls(call: Any, n: int) -> list[float]:
    for _ in range(min(20, n)):  # warm-up
        call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def http_latency(url: str, body: dict[str, Any], n: int) -> list[float]:
    import httpx

    with httpx.Client(timeout=60.0) as client:

        def call() -> None:
            response = client.post(url, json=body)
            response.raise_for_status()

        return time_calls(call, n)


def http_throughput(url: str, body: dict[str, Any], n: int, concurrency: int) -> float:
    import httpx

    clients = [httpx.Client(timeout=60.0) for _ in range(concurrency)]

    def worker(k: int) -> None:
        client = clients[k]
        for _ in range(n // concurrency):
            client.post(url, json=body).raise_for_status()

    try:
        worker_count = list(range(concurrency))
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda k: clients[k].post(url, json=body), worker_count))  # warm connections
            start = time.perf_counter()
            list(pool.map(worker, worker_count))
            elapsed = time.perf_counter() - start
    finally:
        for client in clients:
            client.close()
    return (n // concurrency) * concurrency / elapsed


def start_uvicorn(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    import httpx

    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.serving_fastapi:app",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"uvicorn exited: {log.read_text()[-2000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/docs", timeout=2.0)
            return process
        except httpx.HTTPError:
            time.sleep(0.25)
    process.terminate()
    raise TimeoutError("uvicorn did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads for throughput")
    parser.add_argument("--rows", type=int, default=3000, help="training rows of the small model")
    args = parser.parse_args()
    os.environ.update(OFFLINE)

    import pandas as pd

    from loopform import registry
    from loopform.payloads import PayloadLog
    from loopform.serving.process import BentoServer
    from loopform.serving.release import load_release
    from loopform.serving.scorer import Scorer, torch_threads
    from models.fraud import data
    from models.fraud.contract import CONTRACT
    from models.fraud.train import train
    from tests.helpers_serving import free_port

    work = Path(tempfile.mkdtemp(prefix="loopform-bench-serving-"))
    frame = data.generate(args.rows, 3, days=10)
    model = train(frame, 3, max_epochs=3)
    tracking_uri = f"sqlite:///{work}/mlflow.db"
    run = registry.log_training_run(tracking_uri, "fraud", model, gate_results={}, training_data_fingerprint="bench")
    version = registry.register_version(tracking_uri, "fraud", run.run_id).version
    registry.set_alias(tracking_uri, "fraud", "production", version)
    row = {name: frame[name].iloc[0] for name in data.FEATURE_NAMES}
    body = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}

    torch_threads()
    release = load_release(tracking_uri, "models:/fraud@production")
    one = pd.DataFrame([body])
    results: dict[str, dict[str, float]] = {}
    results["raw"] = percentiles(time_calls(lambda: release.model.predict_proba(one), args.requests))
    with PayloadLog(str(work / "inproc-payloads"), "fraud") as payloads:
        scorer = Scorer(release, CONTRACT, payloads=payloads, with_metrics=False)
        results["scorer"] = percentiles(time_calls(lambda: scorer.score_rows([body], "predict"), args.requests))

    env = {
        **os.environ,
        "LOOPFORM_TRACKING_URI": tracking_uri,
        "LOOPFORM_MODEL_URI": "models:/fraud@production",
        "BENTOML_HOME": str(work / "bentoml"),
        "MPLCONFIGDIR": str(work / "mpl"),
    }
    bento = BentoServer(
        "bentos.fraud.service:FraudService",
        working_dir=REPO,
        port=free_port(),
        env={**env, "LOOPFORM_PAYLOAD_URI": str(work / "bento-payloads")},
        log_path=work / "bentoml.log",
    ).start()
    try:
        url = f"{bento.url}/predict"
        results["bentoml"] = percentiles(http_latency(url, body, args.requests))
        results["bentoml"]["rps"] = http_throughput(url, body, args.requests, args.concurrency)
    finally:
        bento.stop()
    port = free_port()
    fastapi = start_uvicorn({**env, "LOOPFORM_PAYLOAD_URI": str(work / "fastapi-payloads")}, port, work / "uvicorn.log")
    try:
        url = f"http://127.0.0.1:{port}/predict"
        results["fastapi"] = percentiles(http_latency(url, body, args.requests))
        results["fastapi"]["rps"] = http_throughput(url, body, args.requests, args.concurrency)
    finally:
        fastapi.terminate()
        fastapi.wait(60)

    print(f"requests={args.requests} concurrency={args.concurrency} cpus={os.cpu_count()} workdir={work}")
    print(f"{'path':<8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'req/s':>8}")
    for name, r in results.items():
        rps = f"{r['rps']:8.0f}" if "rps" in r else f"{1000 / r['mean_ms']:8.0f}"
        print(f"{name:<8} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['mean_ms']:8.3f} {rps}")
    raw, bento_r, fast = results["raw"], results["bentoml"], results["fastapi"]
    print(f"bentoml / raw forward  p50 latency ratio: {bento_r['p50_ms'] / raw['p50_ms']:.1f}x")
    print(f"fastapi / raw forward  p50 latency ratio: {fast['p50_ms'] / raw['p50_ms']:.1f}x")
    print(f"bentoml / fastapi      p50 latency ratio: {bento_r['p50_ms'] / fast['p50_ms']:.2f}x")
    print(f"bentoml / fastapi      throughput ratio:  {bento_r['rps'] / fast['rps']:.2f}x")
    print(f"bentoml overhead over raw forward (p50): {bento_r['p50_ms'] - raw['p50_ms']:.2f} ms")


if __name__ == "__main__":
    main()

"""Load test of `dualhead serve` on 127.0.0.1: errors, p50/p99 latency and questions/s at a number of
concurrent clients, with server-side batching and without it (``--max-batch 1``), in one run.

    python -m benchmarks.serve [RUN] [--clients 16] [--requests 25] [--time-limit 120]

Each configuration gets a fresh server (a subprocess, ``dualhead serve``) and the same requests: one
image upload and `--questions` questions each, images and questions taken from the run's test split.
Without RUN the server holds the default architecture (`ModelConfig()`: EfficientNet-Lite0 at 224 px
and MiniLM-L6 with their offline weights, untrained fusion and heads) and the requests come from
easy-VQA's test split, so a forward pass costs what a real model's does. Every client sends its
requests one after another; a client stops early once `--time-limit` seconds have passed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

USAGE = "python -m benchmarks.serve [RUN] [--clients 16] [--requests 25]"

if not __package__:
    sys.exit(f"run it from the repository root as: {USAGE}")

import httpx  # noqa: E402

from benchmarks.common import header  # noqa: E402
from dualhead.core.config import load_config  # noqa: E402
from dualhead.vqa.config import DataConfig, ModelConfig  # noqa: E402
from dualhead.vqa.data import AnswerVocab, load_splits  # noqa: E402
from dualhead.vqa.evaluate import resolve_checkpoint  # noqa: E402
from dualhead.vqa.model import DualHeadVQA  # noqa: E402

HOST = "127.0.0.1"
START_TIMEOUT_S = 300


@dataclass
class Query:
    image: bytes
    name: str
    questions: list[str]


@dataclass
class LoadResult:
    latencies_ms: list[float]
    errors: list[str]
    questions: int
    wall_s: float
    batches: int  # forward passes the server ran for the timed requests


def queries_from(data: DataConfig, seed: int, count: int, per_request: int) -> list[Query]:
    """Up to `count` requests from the test split: an image and `per_request` of its questions."""
    by_image: dict[Path, list[str]] = {}
    for record in load_splits(data, seed=seed).test:
        by_image.setdefault(record.image, []).append(record.question)
    chosen = [(image, qs) for image, qs in by_image.items() if len(qs) >= per_request][:count]
    if not chosen:
        raise SystemExit(f"no test image of {data.format} has {per_request} questions: lower --questions")
    return [Query(image.read_bytes(), image.name, qs[:per_request]) for image, qs in chosen]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class Server:
    """`dualhead serve` in a subprocess on a free port of 127.0.0.1, its output in `log`."""

    def __init__(self, checkpoint: Path, log: Path, options: list[str]):
        port = free_port()
        self.url = f"http://{HOST}:{port}"
        command = [sys.executable, "-m", "dualhead.cli", "serve", str(checkpoint), "--host", HOST,
                   "--port", str(port), *options]
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                output = log.read_text()[-3000:]
                raise SystemExit(f"the server stopped (exit code {self.process.returncode}):\n{output}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"no answer from /healthz within {START_TIMEOUT_S} s; see {log}")
            time.sleep(0.5)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/healthz", timeout=10).json()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def load(url: str, queries: list[Query], clients: int, requests: int, time_limit_s: float):
    """`clients` concurrent clients, each sending up to `requests` requests one after another: the
    latencies (ms) of the answered requests, the errors, the questions answered and the wall time."""
    latencies, errors, answered = [], [], 0
    deadline = time.monotonic() + time_limit_s

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal answered
        for number in range(requests):
            if time.monotonic() > deadline:
                return
            query = queries[(index * requests + number) % len(queries)]
            started = time.perf_counter()
            try:
                response = await http.post("/v1/answer", files={"image": (query.name, query.image)},
                                           data={"question": query.questions})
            except httpx.HTTPError as error:
                errors.append(f"{type(error).__name__}: {error}")
                continue
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                continue
            latencies.append(1000 * (time.perf_counter() - started))
            answered += len(response.json()["answers"])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(index, http) for index in range(clients)))
        wall = time.perf_counter() - started
    return latencies, errors, answered, wall


def measure(checkpoint: Path, options: list[str], queries: list[Query], args, log: Path) -> LoadResult:
    server = Server(checkpoint, log, options)
    try:
        asyncio.run(load(server.url, queries, args.clients, 1, args.time_limit))  # warm-up: one request each
        before = server.health()["batches"]
        timed = load(server.url, queries, args.clients, args.requests, args.time_limit)
        latencies, errors, answered, wall = asyncio.run(timed)
        batches = server.health()["batches"] - before
    finally:
        server.stop()
    return LoadResult(latencies, errors, answered, wall, batches)


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", help="a run directory (its best checkpoint) or a checkpoint")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--questions", type=int, default=1, help="questions per request")
    parser.add_argument("--time-limit", type=float, default=120, help="most seconds per configuration")
    parser.add_argument("--max-batch", type=int, default=32, help="the batching server's --max-batch")
    parser.add_argument("--batch-wait-ms", type=float, default=5, help="the batching server's wait window")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--images", type=int, default=64, help="distinct test images the requests go through")
    args = parser.parse_args()
    for name in ("clients", "requests", "questions", "max_batch", "images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    with tempfile.TemporaryDirectory(prefix="dualhead-serve-bench-") as scratch:
        scratch = Path(scratch)
        if args.run:
            checkpoint = resolve_checkpoint(args.run)
            config_file = checkpoint.parent / "config.yaml"
            if not config_file.is_file():
                raise SystemExit(f"{checkpoint} is not in a run directory (no config.yaml): no test split")
            config = load_config(config_file)
            data, seed, model_name = config.data, config.train.seed, f"checkpoint {checkpoint}"
        else:
            data, seed = DataConfig(), 0
            vocab = AnswerVocab.from_records(load_splits(data).train)
            checkpoint = scratch / "untrained"
            DualHeadVQA(ModelConfig(), vocab).save_pretrained(checkpoint)
            model_name = ("ModelConfig() (EfficientNet-Lite0 at 224 px and MiniLM-L6, offline weights; "
                          "untrained fusion and heads)")
        queries = queries_from(data, seed, args.images, args.questions)
        common = ["--precision", args.precision]
        configurations = [
            (f"batching (max batch {args.max_batch}, wait {args.batch_wait_ms:g} ms)",
             ["--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms), *common]),
            ("no batching (max batch 1)", ["--max-batch", "1", *common]),
        ]
        rows = []
        for index, (name, options) in enumerate(configurations):
            result = measure(checkpoint, options, queries, args, scratch / f"server{index}.log")
            rows.append((name, result))
            print(f"{name}: {len(result.latencies_ms)} requests, {len(result.errors)} errors, "
                  f"{result.questions / result.wall_s:.1f} questions/s", flush=True)
            for error in result.errors[:5]:
                print(f"  {error}", flush=True)

    print()
    print(header(f"python -m benchmarks.serve {' '.join(sys.argv[1:])}"))
    print(f"Model: {model_name} ({args.precision}); requests from the {data.format} test split, "
          f"{len(queries)} distinct images, {args.questions} question(s) per request; "
          f"{args.clients} concurrent clients x {args.requests} requests; "
          f"client and server on the same {os.cpu_count()} cores.\n")
    print("| server | requests | errors | p50 latency (ms) | p99 latency (ms) | questions/s "
          "| questions per forward pass |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, result in rows:
        ok = result.latencies_ms
        p50 = f"{statistics.median(ok):.0f}" if ok else "-"
        p99 = f"{percentile(ok, 99):.0f}" if ok else "-"
        per_pass = f"{result.questions / result.batches:.1f}" if result.batches else "-"
        print(f"| {name} | {len(ok) + len(result.errors)} | {len(result.errors)} | {p50} | {p99} | "
              f"{result.questions / result.wall_s:.1f} | {per_pass} |")
    (_, batched), (_, single) = rows
    if single.questions and batched.wall_s:
        ratio = (batched.questions / batched.wall_s) / (single.questions / single.wall_s)
        print(f"\nThroughput with batching: {ratio:.2f}x that without.")


if __name__ == "__main__":
    main()

"""A trained VQA model served by PyTorch eager (fp32 and bf16), ONNX fp32 and ONNX int8: test accuracy,
single-question latency (batch 1) and throughput (batch 32), measured in one run.

    python -m benchmarks.deploy RUN [--latency-questions 30] [--out DIR]

Every backend answers the same test questions from the same preprocessed inputs (one image per
question, as a client sends them), so the accuracy columns differ only by the arithmetic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

USAGE = "python -m benchmarks.deploy RUN [--latency-questions 30]"

if not __package__:
    sys.exit(f"run it from the repository root as: {USAGE}")

import onnxruntime as ort  # noqa: E402

from benchmarks.common import header  # noqa: E402
from dualhead.core.config import load_config  # noqa: E402
from dualhead.deploy.export import ProbabilityPaths, export_onnx, graphs  # noqa: E402
from dualhead.vqa.data import ImageStore, load_splits  # noqa: E402
from dualhead.vqa.evaluate import resolve_checkpoint  # noqa: E402
from dualhead.vqa.metrics import HeadProbabilities, score  # noqa: E402
from dualhead.vqa.model import DualHeadVQA  # noqa: E402

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def backends(model: DualHeadVQA, onnx_dir: Path) -> dict[str, Callable[[Inputs], list[torch.Tensor]]]:
    """Name -> function from (pixels, input_ids, attention_mask) to the probabilities of `model.onnx`."""
    outputs = graphs(model)["model.onnx"]
    eager = ProbabilityPaths(model, outputs).eval()

    def pytorch(precision: str):
        def run(inputs: Inputs) -> list[torch.Tensor]:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                return list(eager(*inputs))
        return run

    def onnx(path: Path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(inputs: Inputs) -> list[torch.Tensor]:
            feed = dict(zip(("pixel_values", "input_ids", "attention_mask"), (t.numpy() for t in inputs), strict=True))
            return [torch.from_numpy(array) for array in session.run(None, feed)]
        return run

    return {"PyTorch eager fp32": pytorch("fp32"), "PyTorch eager bf16": pytorch("bf16"),
            "ONNX fp32": onnx(onnx_dir / "model.onnx"), "ONNX int8": onnx(onnx_dir / "model.int8.onnx")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run directory (its best checkpoint) or a checkpoint")
    parser.add_argument("--latency-questions", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    checkpoint = resolve_checkpoint(args.run)
    config = load_config(checkpoint.parent / "config.yaml")
    records = load_splits(config.data, seed=config.train.seed).test
    model = DualHeadVQA.from_pretrained(checkpoint).eval()
    store = ImageStore(model.preprocessor)

    def inputs(chunk) -> Inputs:
        pixels = model.preprocessor.normalize(torch.stack([store.get(r.image, r.source) for r in chunk]))
        tokens = model.text.tokenize([r.question for r in chunk])
        return pixels, tokens["input_ids"], tokens["attention_mask"]

    batches = [inputs(records[i : i + args.batch]) for i in range(0, len(records), args.batch)]
    singles = [inputs([r]) for r in records[: args.latency_questions + 3]]
    rows = []
    with tempfile.TemporaryDirectory() as onnx_dir:
        export_onnx(model, onnx_dir, quantize=True)
        sizes = {name: (Path(onnx_dir) / name).stat().st_size / 2**20 for name in ("model.onnx", "model.int8.onnx")}
        for name, run in backends(model, Path(onnx_dir)).items():
            started = time.perf_counter()
            parts = [run(batch) for batch in batches]
            throughput = len(records) / (time.perf_counter() - started)
            by_name = {head: torch.cat([p[i] for p in parts]).float() for i, head in enumerate(graphs(model)["model.onnx"])}
            probabilities = HeadProbabilities(binary=by_name.get("binary"), open=by_name["open"], router=by_name.get("router"))
            metrics, _ = score(probabilities, records, model.vocab)
            durations = []
            for index, single in enumerate(singles):
                started = time.perf_counter()
                run(single)
                if index >= 3:  # warm-up
                    durations.append(1000 * (time.perf_counter() - started))
            rows.append((name, metrics, statistics.median(durations), throughput))
            print(f"{name}: accuracy {metrics['accuracy']:.4f}", flush=True)
    print(header(f"python -m benchmarks.deploy {' '.join(sys.argv[1:])}"))
    print(f"{len(records)} test questions of {config.data.format}; model.onnx {sizes['model.onnx']:.1f} MiB, "
          f"model.int8.onnx {sizes['model.int8.onnx']:.1f} MiB.\n")
    base = rows[0][2]
    print("| backend | overall | yes/no | open-ended | latency, batch 1 (ms) | vs eager fp32 | questions/s, batch 32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, metrics, latency, throughput in rows:
        print(f"| {name} | {100 * metrics['accuracy']:.1f} | {100 * metrics['binary_accuracy']:.1f} | "
              f"{100 * metrics['open_accuracy']:.1f} | {latency:.1f} | {latency / base:.2f}x | {throughput:.1f} |")


if __name__ == "__main__":
    main()

"""A trained VQA model served by PyTorch eager (fp32 and bf16), ONNX fp32 and ONNX int8: test accuracy,
single-question latency (batch 1) and throughput (batch 32), measured in one run; with ``--student``
(repeatable) also distilled students (`dualhead distill`) in PyTorch eager fp32 and ONNX int8.

    python -m benchmarks.deploy RUN [--student STUDENT_RUN ...] [--latency-questions 30]

Every backend answers the same test questions (those of RUN's dataset), preprocessed once per model
at that model's own image size (one image per question, as a client sends them), so a model's
accuracy columns differ only by the arithmetic.
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

USAGE = "python -m benchmarks.deploy RUN [--student STUDENT_RUN ...] [--latency-questions 30]"

if not __package__:
    sys.exit(f"run it from the repository root as: {USAGE}")

import onnxruntime as ort  # noqa: E402

from benchmarks.common import header  # noqa: E402
from dualhead.core.config import load_config  # noqa: E402
from dualhead.deploy.export import ProbabilityPaths, export_onnx, graphs  # noqa: E402
from dualhead.vqa.data import ImageStore, VQARecord, load_splits  # noqa: E402
from dualhead.vqa.evaluate import resolve_checkpoint  # noqa: E402
from dualhead.vqa.metrics import HeadProbabilities, score  # noqa: E402
from dualhead.vqa.model import DualHeadVQA  # noqa: E402

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
STUDENT_BACKENDS = ("PyTorch eager fp32", "ONNX int8")


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


def measure(model: DualHeadVQA, records: list[VQARecord], args: argparse.Namespace, names: tuple[str, ...] | None = None,
            label: str = "") -> tuple[list[tuple], dict[str, float]]:
    """(row per backend: name, parameters, metrics, median latency ms, questions/s) and the ONNX files'
    sizes in MiB, for `model` on `records` preprocessed at its own image size."""
    store = ImageStore(model.preprocessor)

    def inputs(chunk) -> Inputs:
        pixels = model.preprocessor.normalize(torch.stack([store.get(r.image, r.source) for r in chunk]))
        tokens = model.text.tokenize([r.question for r in chunk])
        return pixels, tokens["input_ids"], tokens["attention_mask"]

    batches = [inputs(records[i : i + args.batch]) for i in range(0, len(records), args.batch)]
    singles = [inputs([r]) for r in records[: args.latency_questions + 3]]
    parameters = sum(p.numel() for p in model.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as onnx_dir:
        export_onnx(model, onnx_dir, quantize=True)
        sizes = {name: (Path(onnx_dir) / name).stat().st_size / 2**20 for name in ("model.onnx", "model.int8.onnx")}
        for name, run in backends(model, Path(onnx_dir)).items():
            if names is not None and name not in names:
                continue
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
            rows.append((label + name, parameters, metrics, statistics.median(durations), throughput))
            print(f"{label}{name}: accuracy {metrics['accuracy']:.4f}", flush=True)
    return rows, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run directory (its best checkpoint) or a checkpoint")
    parser.add_argument("--student", action="append", default=[],
                        help="a distilled student's run or checkpoint (repeatable): adds its eager fp32 and ONNX int8 rows")
    parser.add_argument("--latency-questions", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    checkpoint = resolve_checkpoint(args.run)
    config = load_config(checkpoint.parent / "config.yaml")
    records = load_splits(config.data, seed=config.train.seed).test
    model = DualHeadVQA.from_pretrained(checkpoint).eval()
    rows, sizes = measure(model, records, args)
    notes = [f"model.onnx {sizes['model.onnx']:.1f} MiB, model.int8.onnx {sizes['model.int8.onnx']:.1f} MiB"]
    for student_run in args.student:
        student_checkpoint = resolve_checkpoint(student_run)
        student = DualHeadVQA.from_pretrained(student_checkpoint).eval()
        if student.vocab.open_answers != model.vocab.open_answers:
            sys.exit(f"the student {student_run} has another answer vocabulary than {args.run}: not the same task")
        label = f"{student_checkpoint.parent.name}: "
        student_rows, student_sizes = measure(student, records, args, STUDENT_BACKENDS, label)
        rows += student_rows
        notes.append(f"{label}{student_sizes['model.onnx']:.1f} and {student_sizes['model.int8.onnx']:.1f} MiB "
                     f"at {student.preprocessor.image_size} px")
    print(header(f"python -m benchmarks.deploy {' '.join(sys.argv[1:])}"))
    print(f"{len(records)} test questions of {config.data.format}; {'; '.join(notes)}.\n")
    base = rows[0][3]
    print("| backend | parameters | overall | yes/no | open-ended | latency, batch 1 (ms) | vs eager fp32 | questions/s, batch 32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, parameters, metrics, latency, throughput in rows:
        print(f"| {name} | {parameters / 1e6:.1f}M | {100 * metrics['accuracy']:.1f} | {100 * metrics['binary_accuracy']:.1f} | "
              f"{100 * metrics['open_accuracy']:.1f} | {latency:.1f} | {latency / base:.2f}x | {throughput:.1f} |")


if __name__ == "__main__":
    main()

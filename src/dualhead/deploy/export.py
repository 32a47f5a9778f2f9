"""Export a trained Dual-Head VQA model to ONNX, with everything a consumer needs beside it.

``dualhead export RUN --format onnx OUT/`` writes:

- ``model.onnx``: (pixel_values [B,3,S,S] float, input_ids [B,L] int64, attention_mask [B,L] int64)
  -> the yes/no, open-ended and router probabilities, one image per question;
- ``binary_head.onnx`` / ``open_head.onnx``: each head's path on its own (the reference's heads
  "can deploy individually");
- ``tokenizer/`` (Hugging Face tokenizer files), ``answers.json`` (the answer vocabulary, in the
  order of the probabilities) and ``preprocessing.json`` (image size, mean, std, interpolation,
  maximum question length), so no training code is needed to run it;
- with ``quantize=True`` also ``model.int8.onnx``: onnxruntime's dynamic int8 quantisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from dualhead.vqa.model import ANSWERS_FILE, DualHeadVQA

INPUTS = ("pixel_values", "input_ids", "attention_mask")
OPSET = 17


class ProbabilityPaths(nn.Module):
    """The model as an exportable function of plain tensors: probabilities of the heads in `outputs`."""

    def __init__(self, model: DualHeadVQA, outputs: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        output = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        logits = {"binary": output.binary_logits, "open": output.open_logits, "router": output.router_logits}
        return tuple(logits[name].float().softmax(-1) for name in self.outputs)


def graphs(model: DualHeadVQA) -> dict[str, tuple[str, ...]]:
    """File name -> the probabilities it outputs, for the heads this model has."""
    heads = ["binary", "open"] if model.binary_head is not None else ["open"]
    whole = tuple(heads + (["router"] if model.router is not None else []))
    files = {"model.onnx": whole}
    if len(heads) > 1:
        files.update({f"{head}_head.onnx": (head,) for head in heads})
    return files


def export_onnx(model: DualHeadVQA, out_dir: str | Path, quantize: bool = False) -> list[Path]:
    """Write the ONNX graphs and their tokenizer, vocabulary and preprocessing to `out_dir` (the model
    is left in eval mode, in float32 on the CPU)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().float().cpu()
    size = model.preprocessor.image_size
    tokens = model.text.tokenize(["is there a finding in this image?", "what is shown?"])
    example = (torch.zeros(2, 3, size, size), tokens["input_ids"], tokens["attention_mask"])
    dynamic = {"pixel_values": {0: "batch"}, "input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}}
    written = []
    for name, outputs in graphs(model).items():
        path = out_dir / name
        torch.onnx.export(  # eval mode: the exporter restores the wrapper's mode, children included
            ProbabilityPaths(model, outputs).eval(), example, str(path), input_names=list(INPUTS), output_names=list(outputs),
            dynamic_axes={**dynamic, **{output: {0: "batch"} for output in outputs}}, opset_version=OPSET, dynamo=False,
        )
        written.append(path)
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = out_dir / "model.int8.onnx"
        # Matrix products only (the text encoder, projections, heads): int8 convolutions run slower than
        # fp32 ones in onnxruntime on CPUs without VNNI and cost accuracy (benchmarks/deploy.py).
        quantize_dynamic(str(out_dir / "model.onnx"), str(quantized), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"])
        written.append(quantized)
    model.text.tokenizer.save_pretrained(out_dir / "tokenizer")
    (out_dir / ANSWERS_FILE).write_text(json.dumps(model.vocab.to_json(), indent=2))
    preprocessing = {
        "image_size": size, "mean": list(model.preprocessor.mean), "std": list(model.preprocessor.std),
        "interpolation": model.preprocessor.interpolation.value, "max_length": model.text.max_length,
        "inputs": list(INPUTS), "outputs": {name: list(outputs) for name, outputs in graphs(model).items()},
    }
    (out_dir / "preprocessing.json").write_text(json.dumps(preprocessing, indent=2))
    return [*written, out_dir / "tokenizer", out_dir / ANSWERS_FILE, out_dir / "preprocessing.json"]

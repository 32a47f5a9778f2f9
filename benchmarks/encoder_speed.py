"""Training-step time of the default image encoder by memory layout and precision, as ratios.

    python -m benchmarks.encoder_speed [--batch 32] [--size 224] [--repeats 3]

One forward and backward pass of the `VisionEncoder` (EfficientNet-Lite0, offline weights) over a
batch of random images, median of `--repeats` after one warm-up, in float32 and under bf16 autocast,
with the timm model in NCHW and in channels-last layout (what `VisionEncoder` uses). Also the
throughput of one 1024 x 1024 matrix product per precision, which tells whether this CPU computes
bf16 natively (``train.precision=auto`` then picks it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

USAGE = "python -m benchmarks.encoder_speed [--batch 32] [--size 224] [--repeats 3]"

if not __package__:
    sys.exit(f"run it from the repository root as: {USAGE}")

import torch  # noqa: E402

from benchmarks.common import header  # noqa: E402
from dualhead.backbones.config import VisionConfig  # noqa: E402
from dualhead.backbones.vision import build_vision_encoder  # noqa: E402


def step_seconds(encoder, pixels: torch.Tensor, bf16: bool, repeats: int) -> float:
    times = []
    for index in range(repeats + 1):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = encoder(pixels)
        out.float().sum().backward()
        if index:  # the first pass warms up
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_gflops(dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    encoder = build_vision_encoder(VisionConfig(name="efficientnet_lite0", weights="offline", image_size=args.size)).train()
    pixels = torch.randn(args.batch, 3, args.size, args.size)
    rows = []
    for layout in ("channels_last", "NCHW"):
        memory = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        encoder.model.to(memory_format=memory)
        # VisionEncoder feeds channels-last; for NCHW call the timm model directly
        run = encoder if layout == "channels_last" else (lambda x: encoder.pool(encoder.model.forward_features(x)))
        for precision in ("fp32", "bf16"):
            rows.append((layout, precision, step_seconds(run, pixels, precision == "bf16", args.repeats)))
    reference = next(seconds for layout, precision, seconds in rows if layout == "NCHW" and precision == "fp32")
    print(header(f"python -m benchmarks.encoder_speed {' '.join(sys.argv[1:])}".strip()))
    print(f"EfficientNet-Lite0, {args.batch} images of {args.size} px, one forward + backward (median of {args.repeats})\n")
    print("| layout | precision | seconds per step | vs NCHW fp32 |")
    print("| --- | --- | ---: | ---: |")
    for layout, precision, seconds in rows:
        print(f"| {layout} | {precision} | {seconds:.2f} | {seconds / reference:.2f}x |")
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    print(f"\n1024 x 1024 matrix product: {fp32:.0f} GFLOP/s fp32, {bf16:.0f} GFLOP/s bf16 ({bf16 / fp32:.2f}x)")


if __name__ == "__main__":
    main()

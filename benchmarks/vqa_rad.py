"""Train on VQA-RAD with several seeds; report test accuracy (overall, CLOSED, OPEN, yes/no, open-ended).

    python -m benchmarks.vqa_rad [--seeds 0 1 2] [--root ../shared/data/vqa_rad] [key=value ...]

`--pretrained runs/bench/pretrain-vqa_rad-seed{seed}` starts each seed from the encoders that
`dualhead pretrain vqa_rad train.seed=SEED --out ...` kept, instead of pretraining in every run, so
that several levers measured on top of the pretrained recipe share one pretraining per seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USAGE = "python -m benchmarks.vqa_rad [--seeds 0 1 2] [--root ../shared/data/vqa_rad] [key=value ...]"

if not __package__:  # run as a file, this script's name would shadow the easy_vqa package
    sys.exit(f"run it from the repository root as: {USAGE}")

from benchmarks.common import header, mean_std, train_once  # noqa: E402

COLUMNS = (
    ("accuracy", "overall"),
    ("type/CLOSED/accuracy", "CLOSED"),
    ("type/OPEN/accuracy", "OPEN"),
    ("binary_accuracy", "yes/no"),
    ("open_accuracy", "open-ended"),
    ("router_accuracy", "router"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default="../shared/data/vqa_rad")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--pretrained", help="per-seed `dualhead pretrain` output, with {seed} in the path")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    rows, minutes = [], []
    for seed in args.seeds:
        overrides = [f"data.root={args.root}", f"train.seed={seed}"]
        if args.pretrained:
            best = Path(args.pretrained.format(seed=seed)) / "best"
            if not best.is_dir():
                sys.exit(f"--pretrained: {best} not found (run dualhead pretrain vqa_rad train.seed={seed} first)")
            overrides += [f"model.vision.weights={best / 'vision.safetensors'}", f"model.text.name={best / 'text'}",
                          "pretrain.epochs=0"]
        overrides += args.overrides
        results, seconds = train_once("vqa_rad", overrides, Path(args.out) / f"vqa_rad-seed{seed}")
        rows.append(results["test"])
        minutes.append(seconds / 60)
        print(json.dumps({"seed": seed, "minutes": round(seconds / 60, 1), **{k: results["test"][k] for k, _ in COLUMNS}}), flush=True)
    print(header(f"python -m benchmarks.{Path(__file__).stem} " + " ".join(sys.argv[1:])))
    print("| " + " | ".join(label for _, label in COLUMNS) + " | minutes per seed |")
    print("|" + " ---: |" * (len(COLUMNS) + 1))
    print("| " + " | ".join(mean_std([r[k] for r in rows]) for k, _ in COLUMNS) + f" | {sum(minutes) / len(minutes):.1f} |")
    print(f"\n{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}); mean ± std in percent; "
          f"{rows[0]['count']} test questions, {rows[0]['open_out_of_vocabulary']} open answers outside the training vocabulary.")


if __name__ == "__main__":
    main()

"""Train the default model on easy-VQA and report test accuracy and wall time, per seed.

    python -m benchmarks.easy_vqa [--seeds 0 1 2] [--out runs/bench] [key=value ...]

The newcomer's first command must reach 99.9% test within 5 minutes on every seed, so the table shows
each seed (two decimals) and the worst one, not only the mean.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE = "python -m benchmarks.easy_vqa [--seeds 0 1 2] [--out runs/bench] [key=value ...]"

if not __package__:  # run as a file, this script's name would shadow the easy_vqa package
    sys.exit(f"run it from the repository root as: {USAGE}")

from benchmarks.common import header, train_once  # noqa: E402

COLUMNS = (("accuracy", "overall"), ("binary_accuracy", "yes/no"), ("open_accuracy", "open-ended"),
           ("oracle_accuracy", "oracle routing"), ("router_accuracy", "router"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="runs/bench", help="where the run directories go")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        results, seconds = train_once("easy_vqa", [f"train.seed={seed}", *args.overrides],
                                      Path(args.out) / f"easy_vqa-seed{seed}")
        rows.append((seed, results["test"], seconds))
        print(f"seed {seed}: {100 * results['test']['accuracy']:.2f}% test in {seconds:.0f} s", flush=True)
    print(header(f"python -m benchmarks.{Path(__file__).stem} " + " ".join(sys.argv[1:])))
    print("| seed | " + " | ".join(label for _, label in COLUMNS) + " | train + evaluate |")
    print("| ---: |" + " ---: |" * (len(COLUMNS) + 1))
    for seed, test, seconds in rows:
        print(f"| {seed} | " + " | ".join(f"{100 * test[key]:.2f}%" for key, _ in COLUMNS) + f" | {seconds:.0f} s |")
    worst = min(rows, key=lambda row: row[1]["accuracy"])
    print(f"\nWorst seed: {worst[0]}, {100 * worst[1]['accuracy']:.2f}% overall; slowest run "
          f"{max(seconds for _, _, seconds in rows):.0f} s; {rows[0][1]['count']:,} test questions.")


if __name__ == "__main__":
    main()

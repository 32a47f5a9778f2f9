"""Train the default model on easy-VQA and report test accuracy and wall time.

    python -m benchmarks.easy_vqa [--out runs/bench] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE = "python -m benchmarks.easy_vqa [--out runs/bench] [key=value ...]"

if not __package__:  # run as a file, this script's name would shadow the easy_vqa package
    sys.exit(f"run it from the repository root as: {USAGE}")

from benchmarks.common import header, train_once  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench", help="where the run directory goes")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    results, seconds = train_once("easy_vqa", args.overrides, Path(args.out) / "easy_vqa")
    test = results["test"]
    print(header(f"python -m benchmarks.{Path(__file__).stem} " + " ".join(sys.argv[1:])))
    print("| metric | test |\n| --- | ---: |")
    for key, label in (("accuracy", "overall"), ("binary_accuracy", "yes/no"), ("open_accuracy", "open-ended"),
                       ("oracle_accuracy", "overall, oracle routing"), ("router_accuracy", "router")):
        print(f"| {label} | {100 * test[key]:.2f}% |")
    print(f"| questions | {test['count']:,} |")
    print(f"| wall time (train + evaluate) | {seconds / 60:.1f} min |")


if __name__ == "__main__":
    main()

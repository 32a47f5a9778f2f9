"""Dense multi-task architectures side by side on the procedural scenes: each registered architecture
(``model.architecture``) with the same backbone and budget, against single-task baselines; each task's
test metrics, Δm, Δm minus hard sharing's (paired per seed), parameters, training images/s and inference
ms/image, mean ± std over seeds.

    python -m benchmarks.architectures [--seeds 0 1 2] [--architectures mtan cross_stitch ...]
                                       [--out runs/bench/scenes] [--quick] [key=value ...]

Every model trains from the bundled ``scenes`` config plus the overrides. The runs live beside those
of `benchmarks.scenes` (same ``--out``): the single-task baselines and hard sharing (``hard_fpn``) are
the same runs, read back when they exist with the same overrides, and so is any finished run.
"""

from __future__ import annotations

import sys

USAGE = (
    "python -m benchmarks.architectures [--seeds 0 1 2] [--architectures NAME ...] [--out DIR] [--quick] "
    "[key=value ...]"
)

if not __package__:
    sys.exit(f"run it from the repository root as: {USAGE}")

from benchmarks.common import header  # noqa: E402
from benchmarks.scenes import MULTI, TASKS, arguments, table, train_all  # noqa: E402
from dualhead.dense.models import DENSE_ARCHITECTURES  # noqa: E402

HARD_SHARING = "hard_fpn"


def main() -> None:
    parser = arguments(__doc__, USAGE, "runs/bench/scenes")
    parser.add_argument(
        "--architectures", nargs="+", default=list(DENSE_ARCHITECTURES), choices=list(DENSE_ARCHITECTURES)
    )
    args = parser.parse_args()
    # hard_fpn on every task is benchmarks.scenes' multi-task run.
    variants = {MULTI if name == HARD_SHARING else name: name for name in args.architectures}
    results = train_all([*TASKS, *variants], args)
    print("\n" + header(f"python -m benchmarks.architectures {' '.join(sys.argv[1:])}".strip()))
    print(table(results, variants, reference=MULTI if HARD_SHARING in args.architectures else None))


if __name__ == "__main__":
    main()

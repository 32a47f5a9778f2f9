"""Applications plug into the core through the ``dualhead.applications`` entry-point group.

An application (``dualhead.vqa``, ``dualhead.dense``, or a user's own package) declares

    [project.entry-points."dualhead.applications"]
    vqa = "dualhead.vqa.application:APPLICATION"

where ``APPLICATION`` is an `Application`: its name, its `RunConfig` subclass and a function that
builds the `Experiment` the Trainer runs. The core never imports an application.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "dualhead.applications"
#: The application of a config that names none (every VQA config written before there were two).
DEFAULT_APPLICATION = "vqa"


@dataclass(frozen=True)
class Application:
    """An application of the core: its config tree and how to build its experiment."""

    name: str
    config_class: type  # a dualhead.core.config.RunConfig subclass
    build_experiment: Callable[..., Any]  # (config) -> Experiment
    description: str = ""
    # (run_dir, results of test_metrics.json) -> PNGs: plots of final results beyond the core's curves
    plot_results: Callable[..., list[Any]] | None = None


@cache
def applications() -> dict[str, Application]:
    """Every installed application, by name."""
    found = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        application = entry.load()
        if not isinstance(application, Application):
            raise TypeError(f"entry point {entry.value} is not a dualhead Application")
        found[entry.name] = application
    return found


def get_application(name: str) -> Application:
    known = applications()
    if name not in known:
        raise ValueError(f"unknown application {name!r}; installed: {', '.join(sorted(known)) or 'none'}")
    return known[name]

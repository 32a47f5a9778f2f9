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


def application_names() -> list[str]:
    """The names of the installed applications."""
    return sorted({entry.name for entry in entry_points(group=ENTRY_POINT_GROUP)})


@cache
def get_application(name: str) -> Application:
    """The installed application `name` (only its own entry point is imported)."""
    found = [entry for entry in entry_points(group=ENTRY_POINT_GROUP) if entry.name == name]
    if not found:
        raise ValueError(f"unknown application {name!r}; installed: {', '.join(application_names()) or 'none'}")
    application = found[0].load()
    if not isinstance(application, Application):
        raise TypeError(f"entry point {found[0].value} is not a dualhead Application")
    return application

"""The Dual-Head VQA application, as the core finds it (entry point ``dualhead.applications: vqa``)."""

from __future__ import annotations

from dualhead.core.applications import Application
from dualhead.vqa.config import VQARunConfig
from dualhead.vqa.experiment import VQAExperiment, plot_confusions

APPLICATION = Application(
    name="vqa",
    config_class=VQARunConfig,
    build_experiment=VQAExperiment,
    description="Dual-Head VQA: image + question encoders, attention fusion, a yes/no head and an open-ended head",
    plot_results=plot_confusions,
)

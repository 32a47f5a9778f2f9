"""The application-free core: registry, atomic files, application entry points, config selection."""

from __future__ import annotations

import os

import pytest

from dualhead.core.applications import application_names, get_application
from dualhead.core.config import ConfigError, load_config
from dualhead.core.io import atomic_write_text
from dualhead.core.registry import Registry


def test_registry_decorator_lookup_build_and_clear_errors():
    things = Registry("thing")

    @things.register("double")
    def double(x):
        return 2 * x

    things.register("triple", lambda x: 3 * x)
    assert things.build("double", 4) == 8 and things.lookup("triple")(2) == 6
    assert sorted(things) == ["double", "triple"] and len(things) == 2 and "double" in things
    with pytest.raises(ValueError, match="unknown thing 'quadruple'; choose one of double, triple"):
        things.lookup("quadruple")
    with pytest.raises(ValueError, match="already registered"):
        things.register("double", lambda x: x)


def test_atomic_write_leaves_no_partial_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(target, "new and longer")
    assert target.read_text() == "old"


def test_both_applications_are_installed_and_configs_pick_theirs(tmp_path):
    assert {"vqa", "scenes"} <= set(application_names())
    assert get_application("scenes").config_class.__name__ == "ScenesRunConfig"
    assert type(load_config("scenes")).__name__ == "ScenesRunConfig"
    assert type(load_config("easy_vqa")).__name__ == "VQARunConfig"
    legacy = tmp_path / "old_run.yaml"  # configs written before there were two applications
    legacy.write_text("model:\n  fusion: concat\n")
    assert load_config(legacy).model.fusion == "concat"
    with pytest.raises(ConfigError, match="unknown application 'speech'"):
        load_config(None, ["application=speech"])
    with pytest.raises(ConfigError, match="fpn_dim"):
        load_config("easy_vqa", ["model.fpn_dim=3"])  # a scenes key in a VQA config


def test_auto_precision_is_bf16_only_where_the_hardware_computes_it(monkeypatch):
    import torch

    from dualhead.core import runtime

    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert runtime.resolve_precision(cpu, "auto") == expected
        assert runtime.resolve_precision(cpu, "fp32") == "fp32" and runtime.resolve_precision(cpu, "bf16") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert isinstance(runtime.autocast_context(cpu, "auto"), type(runtime.autocast_context(cpu, "fp32")))
    assert isinstance(runtime.autocast_context(cpu, "bf16"), torch.autocast)
    with pytest.raises(ValueError, match="unknown train.precision 'fp8'"):
        runtime.resolve_precision(cpu, "fp8")

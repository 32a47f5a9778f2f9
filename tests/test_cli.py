"""The `dualhead` command line: config resolution, params, data summary, errors."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from dualhead.cli import main
from dualhead.core.config import ConfigError, bundled_configs, load_config
from dualhead.vqa.config import VQARunConfig


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_bundled_configs_load_by_name_and_by_path():
    assert {"easy_vqa", "vqa_rad"} <= set(bundled_configs())
    by_name = load_config("easy_vqa", ["train.epochs=1"])
    by_path = load_config("configs/easy_vqa.yaml", ["train.epochs=1"])
    assert by_name == by_path and by_name.data.format == "easy_vqa" and by_name.train.epochs == 1
    assert load_config("vqa_rad").data.format == "vqa_rad"


def test_config_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="config file not found.*bundled configs: .*easy_vqa"):
        load_config("no_such_config")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["train.epochs"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config(bad)
    assert load_config(None) == VQARunConfig()


def test_params_reports_the_reference_design_at_about_68m_with_over_95_percent_shared():
    result = _run("params", "--vision", "mobilenetv3_small_100", "--text", "distilbert", "--answers", "639")
    assert result.exit_code == 0, result.output
    total = int(re.search(r"\*\*Total\*\* \| ([\d,]+)", result.output).group(1).replace(",", ""))
    shared = float(re.search(r"Shared backbone \| [\d,]+ \| ([\d.]+)%", result.output).group(1))
    assert 66e6 < total < 70e6 and shared > 95
    for component in ("Vision encoder", "Text encoder", "Fusion", "Question-type router", "Binary head", "Open-ended head"):
        assert component in result.output


def test_params_marks_frozen_components():
    result = _run("params", "model.vision.freeze=true", "model.text.freeze=false", "--answers", "5")
    assert result.exit_code == 0, result.output
    assert re.search(r"Vision encoder \| [\d,]+ \| [\d.]+% \| frozen", result.output)
    assert re.search(r"Text encoder \| [\d,]+ \| [\d.]+% \| yes", result.output)


def test_params_counts_one_expert_per_training_question_type(vqa_rad_root):
    result = _run("params", "vqa_rad", f"data.root={vqa_rad_root}", "model.experts.route=question_type", "--answers", "5")
    assert result.exit_code == 0, result.output
    assert re.search(r"Experts and their gate \| [\d,]+ \|", result.output)


def test_data_summary_on_vqa_rad(vqa_rad_root):
    result = _run("data", "summary", "vqa_rad", "--root", str(vqa_rad_root))
    assert result.exit_code == 0, result.output
    assert "451" in result.output and "outside" in result.output.lower()


def test_data_summary_unknown_format_and_missing_root():
    result = _run("data", "summary", "coco")
    assert result.exit_code != 0 and "unknown data format 'coco'" in result.output
    result = _run("data", "summary", "vqa_rad")
    assert result.exit_code != 0 and "--root" in result.output


def test_predict_needs_a_question(tmp_path):
    result = _run("predict", str(tmp_path))
    assert result.exit_code != 0 and "--image and --question" in result.output

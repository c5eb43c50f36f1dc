"""configs/: every recipe validates against params.yaml and runs as a DVC experiment."""

from __future__ import annotations

import json

import pytest
import timm
import yaml
from safetensors.torch import save_file

from noisy_student.augment.artifacts import augment
from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings, apply_overrides
from noisy_student.data.prepare import prepare
from noisy_student.recipes import dvc_command, load_recipe
from noisy_student.training.train import train
from tests.helpers.entry import run_main
from tests.helpers.project import ROOT

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_is_a_recipe_per_technique_family():
    names = {path.stem for path in RECIPES}
    assert {
        "distillation",
        "soft_pseudo_labels",
        "no_class_balance",
        "ensemble_teacher",
        "mixing",
        "transfer_finetune",
        "transfer_linear_probe",
        "no_noise",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates_and_changes_something(path):
    changes = load_recipe(path, ROOT / "params.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    before = Settings.model_validate(params).model_dump()
    after = Settings.model_validate(apply_overrides(params, changes)).model_dump()
    assert after != before


def test_dvc_command_sets_each_key():
    command = dvc_command(ROOT / "configs/x.yaml", {"teacher.ensemble": ["a", "b"], "s.t": None})
    assert command == [
        "dvc", "exp", "run", "-n", "x",
        "-S", 'teacher.ensemble=["a", "b"]',
        "-S", "s.t=null",
    ]  # fmt: skip


def test_a_recipe_for_every_student_sets_each_round_of_the_project(tmp_path, monkeypatch, capsys):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["students"] = params["students"][:2]  # a project with two rounds
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    assert (
        run_main("noisy_student.recipes", [str(ROOT / "configs/ema_weights.yaml"), "--print"]) == 0
    )
    command = capsys.readouterr().out.split()
    assert [a for a in command if a.startswith("students.")] == [
        "students.0.ema_decay=0.999", "students.1.ema_decay=0.999"
    ]  # fmt: skip


def test_a_bad_recipe_names_the_file_and_key(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "typo.yaml"
    bad.write_text("distill.enabeld: true\n")
    with pytest.raises(PipelineError, match=r"typo.yaml: .*no key 'enabeld'"):
        load_recipe(bad, ROOT / "params.yaml")
    bad.write_text("distill.alpha: 3\n")
    with pytest.raises(PipelineError, match=r"typo.yaml on .*params.yaml: distill.alpha:"):
        load_recipe(bad, ROOT / "params.yaml")
    capsys.readouterr()
    monkeypatch.chdir(ROOT)
    assert run_main("noisy_student.recipes", [str(bad), "--print"]) == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert stderr.startswith("error: ") and "distill.alpha" in stderr


def test_json_output_is_the_flows_overrides(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert run_main("noisy_student.recipes", ["configs/distillation.yaml", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["distill.enabled"] is True


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["transfer_finetune", "transfer_linear_probe"])
def test_transfer_recipes_train_from_local_weights(tmp_path, tiny_params, monkeypatch, recipe):
    """The transfer recipes ask timm's hub for weights; offline: the same with a local file."""
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "pretrained.safetensors"
    source = timm.create_model("test_resnet", num_classes=1000)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, weights)
    changes = load_recipe(ROOT / "configs" / f"{recipe}.yaml", ROOT / "params.yaml")
    params = apply_overrides(tiny_params, {**changes, "teacher.pretrained": str(weights)})
    params["teacher"]["epochs"] = 2
    params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    settings = Settings.model_validate(params)
    layout = Layout.at(tmp_path)
    prepare(settings, layout)
    augment(settings, layout)
    history = train(settings, "teacher", layout)
    assert len(history) == 2
    if recipe == "transfer_linear_probe":
        import math

        assert all(math.isnan(r.lr_backbone) for r in history)  # nothing of the backbone trains
    else:
        assert history[0].lr_backbone < history[0].lr / 50  # 1/100, and decayed by layer

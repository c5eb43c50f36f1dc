"""The MLflow model registry, against a real sqlite store: one version per trained model, no
duplicates when evaluate and register run again, `champion` on the loop's best on validation, and
the champion loads and predicts."""

from __future__ import annotations

import contextlib
import json

import mlflow
import numpy as np
import pytest
import torch

from noisy_student.core.layout import Layout
from noisy_student.core.settings import load_settings
from noisy_student.evaluation.evaluate import evaluate
from noisy_student.models import promotion
from noisy_student.models.classifier import load_checkpoint
from noisy_student.tracking.registry import (
    CHAMPION,
    point_champion,
    register,
    register_models,
)


@contextlib.contextmanager
def project_store(project):
    """The project's settings, run in its folder (relative sqlite URI), and an MLflow client."""
    with contextlib.chdir(project):
        settings = load_settings()
        mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
        yield settings, mlflow.MlflowClient()


def versions_of(client, name: str) -> list:
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


@pytest.mark.slow
def test_every_model_is_a_version_and_the_best_is_champion(trained_project):
    with project_store(trained_project) as (settings, client):
        name = settings.mlflow.registered_model
        recorded = json.loads((trained_project / "reports/registry.json").read_text())
        metrics = json.loads((trained_project / "metrics.json").read_text())
        versions = versions_of(client, name)
        assert [v.tags["model_name"] for v in versions] == ["teacher", "student_1"]
        for version, entry in zip(versions, recorded["models"], strict=True):
            card = json.loads((trained_project / f"models/{entry['model']}/card.json").read_text())
            assert version.run_id == card["mlflow_run_id"] == entry["run_id"]
            assert version.version == entry["version"]
            assert float(version.tags["test_accuracy"]) == pytest.approx(
                metrics[entry["model"]]["test_accuracy"], abs=1e-6
            )
            logged = mlflow.search_logged_models(
                experiment_ids=[client.get_run(version.run_id).info.experiment_id],
                filter_string=f"source_run_id = '{version.run_id}'",
                output_format="list",
            )  # the MLflow 3 logged model of the training run
            assert [f"models:/{m.model_id}" for m in logged] == [version.source]
            assert float(version.tags["val_accuracy"]) == pytest.approx(
                metrics[entry["model"]]["val_accuracy"], abs=1e-6
            )
        # chosen on validation: the final standing's best, whatever the test accuracies say
        best = promotion.champion(settings, Layout.at(trained_project))
        assert recorded["champion"] == best
        champion = client.get_model_version_by_alias(name, CHAMPION)
        assert champion.tags["model_name"] == best


@pytest.mark.slow
def test_evaluating_and_registering_again_adds_no_version(trained_project, tmp_path):
    # the stages' files go under tmp_path: the shared project stays as the fixture left it
    layout = Layout.at(trained_project).replace(
        metrics=tmp_path / "metrics.json",
        comparison=tmp_path / "comparison.md",
        test_predictions=tmp_path / "test_predictions",
        registry=tmp_path / "registry.json",
    )
    with project_store(trained_project) as (settings, client):
        name = settings.mlflow.registered_model
        before = [(v.version, v.run_id) for v in versions_of(client, name)]
        evaluate(settings, layout)
        registered = register_models(settings, layout)
        assert [(v.version, v.run_id) for v in versions_of(client, name)] == before
    recorded = json.loads((trained_project / "reports/registry.json").read_text())
    assert registered == recorded == json.loads(layout.registry.read_text())


@pytest.mark.slow
def test_the_alias_follows_the_champion_and_can_be_put_back(trained_project):
    with project_store(trained_project) as (settings, client):
        cfg = settings.mlflow
        recorded = json.loads((trained_project / "reports/registry.json").read_text())
        run_ids = {m["model"]: m["run_id"] for m in recorded["models"]}
        architectures = dict.fromkeys(run_ids, "test_resnet")
        val = dict.fromkeys(run_ids, 0.5)
        accuracies = {"teacher": 0.5, "student_1": 0.7}
        try:
            for best in ("student_1", "teacher"):  # not the test accuracies' choice
                result = register(cfg, accuracies, run_ids, architectures, best, val)
                alias = client.get_model_version_by_alias(cfg.registered_model, CHAMPION)
                assert result["champion"] == best and alias.tags["model_name"] == best
                assert len(versions_of(client, cfg.registered_model)) == 2
        finally:  # what the fixture's register stage found, for the other tests
            register(cfg, {m["model"]: m["test_accuracy"] for m in recorded["models"]}, run_ids,
                     architectures, recorded["champion"], val)  # fmt: skip
        point_champion(cfg, {**recorded, "champion": "teacher"})
        alias = client.get_model_version_by_alias(cfg.registered_model, CHAMPION)
        assert alias.tags["model_name"] == "teacher"
        point_champion(cfg, recorded)
        alias = client.get_model_version_by_alias(cfg.registered_model, CHAMPION)
        assert alias.tags["model_name"] == recorded["champion"]


@pytest.mark.slow
def test_a_model_without_a_run_is_left_out_not_fatal(trained_project):
    with project_store(trained_project) as (settings, client):
        result = register(
            settings.mlflow.model_copy(update={"registered_model": "no-runs"}),
            {"teacher": 0.5, "student_1": 0.6},
            {"teacher": None, "student_1": None},
            {"teacher": "test_resnet", "student_1": "test_resnet"},
            "student_1",
            {"teacher": 0.5, "student_1": 0.6},
        )
        assert result["champion"] == "student_1"
        assert [m["version"] for m in result["models"]] == [None, None]
        assert versions_of(client, "no-runs") == []


@pytest.mark.slow
def test_the_champion_loads_from_the_registry_and_predicts_like_its_checkpoint(trained_project):
    with project_store(trained_project) as (settings, _):
        recorded = json.loads((trained_project / "reports/registry.json").read_text())
        uri = f"models:/{settings.mlflow.registered_model}@{CHAMPION}"
        loaded = mlflow.pytorch.load_model(uri)
        classifier, card = load_checkpoint(trained_project / "models" / recorded["champion"])
    images = np.load(trained_project / "data/prepared/test/images.npy")[:5]
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32))
    with torch.inference_mode():
        np.testing.assert_allclose(loaded(pixels), classifier(pixels), atol=1e-4)
    assert card.name == recorded["champion"]

"""MLflow helpers that need no training."""

from __future__ import annotations

import os

import mlflow

from noisy_student.core.settings import MlflowSettings
from noisy_student.tracking.runs import (
    artifact_location,
    experiment_id,
    experiment_url,
    flatten,
    process_tags,
    tracking_uri,
    use_tracking_uri,
)


def mlflow_settings(uri: str) -> MlflowSettings:
    return MlflowSettings(
        experiment="e", tracking_uri=uri, ui_url="http://127.0.0.1:5000", registered_model="m"
    )


def test_relative_sqlite_uri_is_pinned_to_the_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(mlflow_settings("sqlite:///mlflow.db")) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking_uri(mlflow_settings("sqlite:////srv/m.db")) == "sqlite:////srv/m.db"
    assert tracking_uri(mlflow_settings("http://127.0.0.1:5000")) == "http://127.0.0.1:5000"


def test_flatten_names_nested_keys_and_list_items():
    tree = {"a": {"b": 1}, "students": [{"model": "x"}, {"model": "y"}]}
    assert flatten(tree) == {"a.b": 1, "students.0.model": "x", "students.1.model": "y"}


def test_pointing_mlflow_at_a_store_leaves_the_environment_alone(tmp_path, monkeypatch):
    """MLflow 3's set_tracking_uri exports the URI; ours must not, or one project's store would
    become the next run's 'user-chosen' server (MLFLOW_TRACKING_URI wins over params.yaml)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    use_tracking_uri(f"sqlite:///{tmp_path}/a.db")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/a.db"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    use_tracking_uri(f"sqlite:///{tmp_path}/b.db")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"


def test_a_sqlite_store_keeps_its_artifacts_beside_it():
    assert artifact_location("sqlite:////srv/p/mlflow.db") == "/srv/p/mlruns"
    assert artifact_location("http://mlflow.internal:5000") is None


def test_the_experiment_opens_on_its_training_runs_in_the_mlflow_ui(tmp_path):
    cfg = mlflow_settings(f"sqlite:///{tmp_path}/m.db")
    experiment = mlflow.MlflowClient(cfg.tracking_uri).get_experiment(experiment_id(cfg))
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    older = mlflow.MlflowClient(cfg.tracking_uri).create_experiment("older")  # no kind
    cfg = cfg.model_copy(update={"experiment": "older"})
    assert experiment_id(cfg) == older
    kind = mlflow.MlflowClient(cfg.tracking_uri).get_experiment(older).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"
    # the tag alone did not do it in a real browser: MLflow 3.17 takes its mode from the link
    assert experiment_url(cfg) == (
        f"http://127.0.0.1:5000/#/experiments/{older}/runs?workflowType=machine_learning"
    )


def test_a_dvc_experiment_in_a_copy_logs_to_the_projects_store(tmp_path, monkeypatch):
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12"  # where `dvc exp run --temp` runs
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # DVC sets it to the project's root
    monkeypatch.setenv("DVC_EXP_NAME", "wide-lr")
    assert tracking_uri(mlflow_settings("sqlite:///mlflow.db")) == f"sqlite:///{tmp_path}/mlflow.db"
    assert process_tags()["dvc_experiment"] == "wide-lr"

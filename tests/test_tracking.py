"""MLflow helpers that need no training."""

from __future__ import annotations

from tasks.settings import MlflowSettings
from tasks.tracking import flatten, tracking_uri


def mlflow_settings(uri: str) -> MlflowSettings:
    return MlflowSettings(experiment="e", tracking_uri=uri, ui_url="http://127.0.0.1:5000")


def test_relative_sqlite_uri_is_pinned_to_the_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(mlflow_settings("sqlite:///mlflow.db")) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking_uri(mlflow_settings("sqlite:////srv/m.db")) == "sqlite:////srv/m.db"
    assert tracking_uri(mlflow_settings("http://127.0.0.1:5000")) == "http://127.0.0.1:5000"


def test_flatten_names_nested_keys_and_list_items():
    tree = {"a": {"b": 1}, "students": [{"model": "x"}, {"model": "y"}]}
    assert flatten(tree) == {"a.b": 1, "students.0.model": "x", "students.1.model": "y"}

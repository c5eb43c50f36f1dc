"""MLflow: one run per training, in the experiment named in params.yaml."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from noisy_student.core.settings import MlflowSettings

log = logging.getLogger(__name__)


def tracking_uri(cfg: MlflowSettings) -> str:
    """Where runs go: ``MLFLOW_TRACKING_URI`` from the environment when set (MLflow's own
    convention: a shared tracking server without editing params.yaml), else
    ``mlflow.tracking_uri``. ``sqlite:///mlflow.db`` is made absolute against the current
    (project) directory: MLflow caches one store per URI, so a relative one would keep pointing
    at the first project."""
    prefix = "sqlite:///"
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        # a DVC experiment run in a copy of the project (`dvc exp run --temp`, the queue) logs
        # to the project's store, not to one inside the copy: DVC names the project in DVC_ROOT
        project = Path(os.environ.get("DVC_ROOT") or ".")
        return prefix + str((project / uri.removeprefix(prefix)).resolve())
    return uri


def use_tracking_uri(uri: str) -> None:
    """``mlflow.set_tracking_uri`` without its side effect: MLflow 3 also exports the URI as
    ``MLFLOW_TRACKING_URI``, which :func:`tracking_uri` reads as the user's choice of server, so
    one project's store would outlive its run (the next flow run in a served process, every
    subprocess it starts). The environment is left as the user set it."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def ui_url(cfg: MlflowSettings) -> str:
    """The MLflow UI: the tracking server itself when runs go to one, else ``mlflow.ui_url``."""
    uri = tracking_uri(cfg)
    return uri if uri.startswith(("http://", "https://")) else cfg.ui_url


def artifact_location(uri: str) -> str | None:
    """A SQLite store's artifacts go beside it (``<folder>/mlruns``): MLflow's default is
    ``./mlruns`` under whatever directory the first run happened to start in. A server: its own."""
    prefix = "sqlite:///"
    return str(Path(uri.removeprefix(prefix)).parent / "mlruns") if uri.startswith(prefix) else None


# MLflow 3's UI opens an experiment on its GenAI overview (traces) unless the experiment says it
# is model training: then it opens on the runs, where a loop's trainings are compared
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(cfg: MlflowSettings) -> str:
    uri = tracking_uri(cfg)
    use_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        try:
            return mlflow.create_experiment(
                cfg.experiment, artifact_location=artifact_location(uri), tags=EXPERIMENT_KIND
            )
        except MlflowException:  # another process created it first
            experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment.tags.get("mlflow.experimentKind") is None:  # made by an older version
        for key, value in EXPERIMENT_KIND.items():
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are indexed (students.0.model)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


@dataclass(frozen=True)
class ParentRun:
    """An orchestrator's run (one Prefect flow run): training runs nest under it, with its tags."""

    run_id: str
    tags: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def training_run(
    cfg: MlflowSettings,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, Any],
    parent: ParentRun | None = None,
    run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that ends FAILED if the body raises (mlflow.start_run does that).

    ``run_id``: an interrupted attempt's run, carried on (if it still exists) rather than begun
    anew, so a resumed training keeps one run and one curve."""
    experiment = experiment_id(cfg)
    if run_id is not None and not _resumable(run_id, experiment):
        run_id = None
    all_tags = {**(parent.tags if parent else {}), **tags, **process_tags()}
    if run_id is not None and parent is not None:
        all_tags["mlflow.parentRunId"] = parent.run_id  # now under the run that finishes it
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=experiment,
        run_name=run_name,
        tags=all_tags,
        parent_run_id=parent.run_id if parent and run_id is None else None,
        nested=True,  # an ensemble member's run opens inside its model's run
    ) as run:
        mlflow.log_params(flatten(params))
        yield run


def process_tags() -> dict[str, str]:
    """Which process a run belongs to, so a run left RUNNING by a killed one can be found; and,
    under `dvc exp run`, which DVC experiment and baseline commit (what `dvc exp show` lists)."""
    tags = {"host": socket.gethostname(), "pid": str(os.getpid())}
    for key, variable in (("dvc_experiment", "DVC_EXP_NAME"),
                          ("dvc_baseline_rev", "DVC_EXP_BASELINE_REV")):  # fmt: skip
        if os.environ.get(variable):
            tags[key] = os.environ[variable]
    return tags


def _resumable(run_id: str, experiment: str) -> bool:
    try:
        info = mlflow.MlflowClient().get_run(run_id).info
    except MlflowException:
        return False
    return info.experiment_id == experiment and info.lifecycle_stage == "active"


def fail_orphaned_runs(cfg: MlflowSettings, keep: set[str] = frozenset()) -> list[str]:
    """Mark FAILED the runs still RUNNING whose process on this host is gone (killed: a SIGKILL
    cannot be caught), except ``keep`` (runs about to be carried on). Returns their ids."""
    client = mlflow.MlflowClient(tracking_uri(cfg))
    host = socket.gethostname()
    orphans = []
    for run in client.search_runs(
        [experiment_id(cfg)],
        filter_string=f"attributes.status = 'RUNNING' and tags.host = '{host}'",
    ):
        pid = run.data.tags.get("pid", "")
        if run.info.run_id in keep or not pid.isdigit() or _alive(int(pid)):
            continue
        client.set_terminated(run.info.run_id, "FAILED")
        orphans.append(run.info.run_id)
    if orphans:
        log.warning("marked %d MLflow run(s) of killed processes FAILED", len(orphans))
    return orphans


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def start_parent_run(
    cfg: MlflowSettings, run_name: str, tags: dict[str, str], params: dict[str, Any]
) -> ParentRun:
    """Open a run without making it the active one: stages open their own runs beneath it."""
    client = mlflow.MlflowClient(tracking_uri(cfg))
    run = client.create_run(experiment_id(cfg), run_name=run_name, tags={**tags, **process_tags()})
    flat = flatten(params)
    keys = sorted(flat)
    for start in range(0, len(keys), 100):  # MLflow takes at most 100 params per batch
        batch = [mlflow.entities.Param(k, str(flat[k])) for k in keys[start : start + 100]]
        client.log_batch(run.info.run_id, params=batch)
    return ParentRun(run.info.run_id, tags)


LOOP_RUN = "loop"  # name and stage tag of the run grouping a loop's trainings under `dvc repro`


def loop_run(cfg: MlflowSettings, run_id: str | None, params: dict[str, Any]) -> ParentRun:
    """Under `dvc repro`, where no orchestrator opens a run: the loop's own, so that MLflow's UI
    groups a loop's trainings as it groups a flow run's. ``run_id``: the loop's run as the
    teacher's card (or an interrupted teacher's checkpoint) has it; opened anew when None or
    gone. It ends at once: each stage is a process of its own and no stage is the loop's last,
    and a run left RUNNING would be marked FAILED as a killed process's."""
    use_tracking_uri(tracking_uri(cfg))
    if run_id is not None and _resumable(run_id, experiment_id(cfg)):
        return ParentRun(run_id)
    parent = start_parent_run(cfg, LOOP_RUN, {"stage": LOOP_RUN}, params)
    mlflow.MlflowClient(tracking_uri(cfg)).set_terminated(parent.run_id, "FINISHED")
    return parent


def end_parent_run(
    cfg: MlflowSettings,
    parent: ParentRun,
    metrics: dict[str, float],
    failed: bool,
    tags: dict[str, str] | None = None,
) -> None:
    """``tags``: what the loop decided (its champion, why it stopped), for the runs list."""
    client = mlflow.MlflowClient(tracking_uri(cfg))
    for key, value in (tags or {}).items():
        client.set_tag(parent.run_id, key, value)
    if metrics:
        batch = [mlflow.entities.Metric(k, v, _now_ms(), 0) for k, v in metrics.items()]
        client.log_batch(parent.run_id, metrics=batch)
    client.set_terminated(parent.run_id, "FAILED" if failed else "FINISHED")


# MLflow 3.17's UI takes its mode from the link, else from the browser's memory, else GenAI: a
# first visit opened the GenAI overview whatever the experiment's kind tag said (seen in headless
# Chromium, docs/mlflow_screenshots.py), so every link the pipeline prints names the mode
UI_MODE = "workflowType=machine_learning"


def run_url(cfg: MlflowSettings, run_id: str) -> str:
    """The run's page in the MLflow UI at ``mlflow.ui_url``, in its model-training mode."""
    client = mlflow.MlflowClient(tracking_uri(cfg))
    experiment = client.get_run(run_id).info.experiment_id
    return _ui_page(cfg, f"experiments/{experiment}/runs/{run_id}")


def experiment_url(cfg: MlflowSettings) -> str:
    """The experiment's runs in the MLflow UI at ``mlflow.ui_url``, in its model-training mode."""
    return _ui_page(cfg, f"experiments/{experiment_id(cfg)}/runs")


def _ui_page(cfg: MlflowSettings, route: str) -> str:
    return f"{ui_url(cfg).rstrip('/')}/#/{route}?{UI_MODE}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def metric_key(name: str) -> str:
    """A name MLflow accepts as a metric key (a class name may hold any character)."""
    return re.sub(r"[^\w\-. /]", "_", name)


def log_test_metrics(cfg: MlflowSettings, run_id: str | None, metrics: dict) -> None:
    """A model's test scores on its training run: numbers as they are, per-class dicts as
    ``<name>/<class>`` (MLflow's UI groups metrics by the part before the slash)."""
    if run_id is None:
        return
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat |= {metric_key(f"{key}/{c}"): float(v) for c, v in value.items()}
        elif isinstance(value, int | float) and value is not None:
            flat[metric_key(key)] = float(value)
    use_tracking_uri(tracking_uri(cfg))
    batch = [mlflow.entities.Metric(k, v, _now_ms(), 0) for k, v in flat.items()]
    try:
        for start in range(0, len(batch), 1000):  # log_batch takes at most 1000 metrics
            mlflow.MlflowClient().log_batch(run_id, metrics=batch[start : start + 1000])
    except MlflowException as exc:
        log.warning("could not log test metrics to MLflow run %s: %s", run_id, exc)


def main() -> None:
    """Print the experiment's link (`make demo` shows it)."""
    from noisy_student.core.settings import load_settings

    print(experiment_url(load_settings().mlflow))


if __name__ == "__main__":
    main()

"""Prefect flow `self-training`: the Noisy Student loop of dvc.yaml, one Prefect task per stage.

    prepare -> augment -> train teacher -> (pseudo-label -> train student) per round -> evaluate
    -> register, export, report

The steps are dvc.yaml's stages (flows/stages.py); each task calls the tasks/ module that the
stage's command runs and is skipped,
restored from DVC's run-cache, or run and recorded in dvc.lock exactly as `dvc repro` would
(flows/dvc_project.py). A completed run is saved as a DVC experiment named after the flow run.

Run it once, in this process:   python -m flows.self_training [--overrides '{"seed": 1}']
Serve it for `prefect deployment run`:   make serve   (flows/serve.py)
Then pick the pool images a person should label next (params.yaml's `to_label`), published as a
Prefect artifact with their contact sheet:   --label-next   (deployment parameter `label_next`)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment, flow_run

from flows.dvc_project import DvcProject, Outcome, params_for_run
from flows.stages import Step, plan
from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import PARAMS_FILE, Settings, load_settings
from noisy_student.evaluation.rounds import rounds_table
from noisy_student.models import promotion
from noisy_student.models.card import load_card
from noisy_student.report import publish, render
from noisy_student.tracking import registry
from noisy_student.tracking import runs as tracking

FLOW_NAME = "self-training"
LOCK_FILE = Path(".dvc/tmp/self-training.lock")
# the stages' progress lines (epochs, images labeled) go to the Prefect run's logs
for _name in ("tasks", "noisy_student"):
    logging.getLogger(_name).setLevel(logging.INFO)


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry crashes of the machine or the libraries; bad input or params fail at once."""
    return not isinstance(state.result(raise_on_failure=False), PipelineError)


@task(cache_policy=NO_CACHE, retry_condition_fn=_retry_unless_bad_input)
def run_step(project: DvcProject, step: Step, settings: Settings, layout: Layout, parent) -> str:
    """One dvc.yaml stage: skipped if up to date, else restored from the run-cache, else run."""
    outcome = project.run(step.stage, lambda: step.call(settings, layout, parent))
    get_run_logger().info("%s: %s", step.stage, outcome.value)
    return outcome.value


@contextlib.contextmanager
def one_run_at_a_time(root: Path):
    """Stages write to fixed paths in the workspace, so concurrent runs of one project queue."""
    (root / LOCK_FILE).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        get_run_logger().info("another self-training run holds %s; waiting for it", LOCK_FILE)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@task(cache_policy=NO_CACHE)
def pick_images_to_label(settings: Settings, layout: Layout) -> dict[str, Any]:
    """The pool images a person should label next, by the champion (params.yaml's to_label),
    written under to_label.out and published with their contact sheet."""
    # here, not at the top: it imports torch and timm (about 3 s), which a flow run whose
    # stages are all up to date, and the serving process, otherwise never load
    from noisy_student.pseudo_labels.to_label import to_label

    out = Path(settings.to_label.out)
    picked = to_label(settings, layout, out=out)
    create_table_artifact(
        picked.drop(columns="source").round(4).to_dict("records"),
        key="images-to-label",
        description=f"The {len(picked)} pool images to label next ({settings.to_label.strategy})",
    )
    create_markdown_artifact(
        to_label_markdown(settings, picked, out),
        key="images-to-label-sheet",
        description="The picked images with the model's two top guesses, and what to do next",
    )
    return {"picked": len(picked), "folder": str(out.resolve())}


def to_label_markdown(settings: Settings, picked, out: Path) -> str:
    labeled = settings.data.labeled_dir or "data.labeled_dir"
    return "\n".join(
        [
            f"# {len(picked)} pool images to label next ({settings.to_label.strategy})",
            "",
            f"In `{out.resolve()}`: `picked.csv`, and the images in `unsorted/`. Move each into "
            f"its class folder there, then into `{labeled}/<class>/` and out of the pool, and "
            "run the loop again: what depends on the labeled set reruns.",
            "",
            f"![images to label]({render.data_uri(out / 'contact_sheet.png')})",
            "",
        ]
    )


@flow(name=FLOW_NAME, log_prints=True)
def self_training(
    overrides: dict[str, Any] | None = None, project_dir: str = ".", label_next: bool = False
) -> dict[str, Any]:
    """Run the Noisy Student loop of the DVC project at ``project_dir``.

    ``overrides``: params.yaml values for this run only, as dotted keys
    (``{"pseudo_label.threshold": 0.9, "students.1.epochs": 30}``), validated like params.yaml.
    ``label_next``: then pick the pool images a person should label next (params.yaml's
    ``to_label``; README, "Label the images that matter next").
    """
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    overrides = overrides or {}
    project = DvcProject(root)
    run_name = flow_run.name or FLOW_NAME
    run_tags = {
        "prefect.flow_run_id": str(flow_run.id or ""),
        "prefect.flow_run_name": run_name,
        "prefect.deployment": deployment.name or "",
    }
    if overrides:
        logger.info("overrides for this run: %s", json.dumps(overrides))

    with one_run_at_a_time(root):
        # read under the lock: a run with overrides holds them in params.yaml until it ends;
        # in the project folder, where its relative paths (a weights file) point
        with contextlib.chdir(root):
            settings = load_settings(PARAMS_FILE, overrides)  # bad values fail before any work
        summary = run_steps(project, root, settings, overrides, run_name, run_tags, label_next)
    return summary


def run_steps(
    project: DvcProject,
    root: Path,
    settings: Settings,
    overrides: dict[str, Any],
    run_name: str,
    run_tags: dict[str, str],
    pick: bool = False,
) -> dict[str, Any]:
    with (
        contextlib.chdir(root),  # the stage functions use the project's relative paths
        params_for_run(root / PARAMS_FILE, overrides),
    ):
        steps = plan(settings, *project.dag())  # as DVC reads dvc.yaml with these params
        layout = Layout.at()
        tracking.fail_orphaned_runs(settings.mlflow)  # left RUNNING by a killed flow run
        parent = tracking.start_parent_run(
            settings.mlflow,
            run_name,
            {**run_tags, "stage": "flow", "overrides": json.dumps(overrides)},
            settings.model_dump(),
        )
        progress = create_progress_artifact(0.0, description="stages finished")
        outcomes: dict[str, str] = {}
        metrics: dict[str, float] = {}
        decided: dict[str, str] = {}
        finished = False
        try:
            for done, step in enumerate(steps, start=1):
                outcomes[step.stage] = run_step.with_options(
                    task_run_name=step.label,
                    retries=settings.flow.retries,
                    retry_delay_seconds=settings.flow.retry_delay_seconds,
                )(project, step, settings, layout, parent)
                update_progress_artifact(progress, 100.0 * done / len(steps))
            follow_up_skipped_steps(settings, layout, outcomes, parent)
            rows = round_table(settings, layout)
            final = promotion.final_standing(settings, layout)
            metrics = parent_metrics(rows, final.best)
            decided = {"champion": final.best, "loop_end": final.reason}
            finished = True
        finally:
            tracking.end_parent_run(
                settings.mlflow, parent, metrics, failed=not finished, tags=decided
            )
        experiment = project.save_experiment(run_name, f"self-training flow run {run_name}")
        create_table_artifact(
            rows,
            key="self-training-rounds",
            description="Per round: the teacher it learned from, validation accuracy, promoted "
            "or not, test accuracy and pseudo-labels kept",
        )
        create_markdown_artifact(
            runs_markdown(
                settings, layout, parent, steps, outcomes, overrides, experiment, decided
            ),
            key="self-training-runs",
            description="MLflow runs, stage outcomes, DVC experiment, effective params",
        )
        create_markdown_artifact(
            render.prefect_markdown(layout),
            key="self-training-report",
            description="The report (reports/report.html): rounds, champion, every picture",
        )
        summary = {"outcomes": outcomes, "rounds": rows, "mlflow_run_id": parent.run_id}
        if pick:
            pick_task = pick_images_to_label.with_options(task_run_name="pick images to label")
            summary["to_label"] = pick_task(settings, layout)
    return summary


def follow_up_skipped_steps(
    settings: Settings, layout: Layout, outcomes: dict[str, str], parent: tracking.ParentRun
) -> None:
    """What a stage does outside DVC's outputs, done for this run where DVC skipped or restored
    it: the registry's champion is the workspace's, and the parent run holds the report."""
    if outcomes.get("register") != Outcome.RAN.value:
        registry.point_champion(settings.mlflow, json.loads(layout.registry.read_text()))
    if outcomes.get("report") != Outcome.RAN.value:
        publish.attach_to_run(settings, parent.run_id, layout)


def round_table(settings: Settings, layout: Layout) -> list[dict[str, Any]]:
    """Per trained model: what taught it, its validation accuracy (every choice) and whether it
    was promoted, its test accuracy (metrics.json) and the pseudo-labels it was trained on."""
    rounds = rounds_table(settings, layout, json.loads(layout.metrics.read_text()))
    rows = []
    for r in rounds.to_dict("records"):
        row: dict[str, Any] = {
            "round": r["round"],
            "model": r["model"],
            "architecture": r["architecture"],
            "taught_by": r["taught_by"],
            "val_accuracy": round(r["val_accuracy"], 4),
            "promoted": bool(r["promoted"]),
            "test_accuracy": round(r["test_accuracy"], 4),
            "pseudo_labels_kept": None if r["kept_per_class"] is None else int(r["kept"]),
        }
        row.update({f"kept {c}": n for c, n in (r["kept_per_class"] or {}).items()})
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [{key: row.get(key) for key in columns} for row in rows]  # the same columns in each


def parent_metrics(rows: list[dict[str, Any]], champion: str) -> dict[str, float]:
    """Per model and for the champion (chosen on validation): what the runs list compares."""
    metrics: dict[str, float] = {}
    for row in rows:
        metrics[f"test_accuracy/{row['model']}"] = row["test_accuracy"]
        metrics[f"val_accuracy/{row['model']}"] = row["val_accuracy"]
        if row["pseudo_labels_kept"] is not None:
            metrics[f"pseudo_labels_kept/{row['model']}"] = float(row["pseudo_labels_kept"])
    best = next(row for row in rows if row["model"] == champion)
    metrics["test_accuracy"] = best["test_accuracy"]
    metrics["val_accuracy"] = best["val_accuracy"]
    metrics["gain_over_teacher"] = best["test_accuracy"] - rows[0]["test_accuracy"]
    return metrics


def runs_markdown(
    settings: Settings,
    layout: Layout,
    parent: tracking.ParentRun,
    steps: list[Step],
    outcomes: dict[str, str],
    overrides: dict[str, Any],
    experiment: str | None,
    decided: dict[str, str],
) -> str:
    cfg = settings.mlflow
    lines = [
        f"# Self-training run `{parent.tags.get('prefect.flow_run_name', '')}`",
        "",
        f"MLflow parent run: [{parent.run_id}]({tracking.run_url(cfg, parent.run_id)}) "
        f"(experiment `{cfg.experiment}`; `make ui` serves {cfg.ui_url})",
        "",
        f"Champion (best on validation): **{decided['champion']}**. {decided['loop_end']}.",
        "",
        "| stage | outcome | MLflow run of the model it wrote |",
        "|---|---|---|",
    ]
    for step in steps:
        link = ""
        if step.model is not None and (layout.model(step.model) / "card.json").exists():
            run_id = load_card(layout.model(step.model)).mlflow_run_id
            if run_id:
                link = f"[{step.model}]({tracking.run_url(cfg, run_id)})"
                if outcomes[step.stage] != Outcome.RAN.value:
                    link += " (from an earlier run)"
        lines.append(f"| {step.stage} | {outcomes[step.stage]} | {link} |")
    run_name = parent.tags.get("prefect.flow_run_name", "")
    if experiment:
        lines += [
            "",
            f"DVC experiment `{run_name}` ({experiment[:7]}): `dvc exp show`, "
            f"`dvc exp diff <other-run> {run_name}`, `dvc diff <other-run> {run_name}`, "
            f"`dvc exp apply {run_name}`",
        ]
    else:
        lines += ["", "Not saved as a DVC experiment (see the run's logs for why)."]
    lines += ["", f"Overrides of params.yaml for this run: `{json.dumps(overrides)}`"]
    effective = yaml.safe_dump(settings.model_dump(), sort_keys=False)
    lines += ["", "Effective params:", "", "```yaml", effective.rstrip(), "```", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description="Run the self-training flow once, in this process.")
    p.add_argument("--overrides", default="{}", help="JSON: dotted params.yaml keys to values")
    p.add_argument("--project-dir", default=".")
    p.add_argument(
        "--label-next",
        action="store_true",
        help="then pick the pool images to label next (params.yaml's to_label section)",
    )
    args = p.parse_args()
    logging.basicConfig(format="%(message)s")  # the stages' lines on this terminal too
    try:
        overrides = json.loads(args.overrides)
    except json.JSONDecodeError as exc:
        sys.exit(f"error: --overrides is not valid JSON ({exc})")
    if not isinstance(overrides, dict):
        sys.exit('error: --overrides must be a JSON object, e.g. {"pseudo_label.threshold": 0.9}')
    state = self_training(overrides, args.project_dir, args.label_next, return_state=True)
    if not state.is_completed():
        exc = state.result(raise_on_failure=False)
        sys.exit(f"error: {exc}" if isinstance(exc, PipelineError) else f"flow run {state.name}")


if __name__ == "__main__":
    main()

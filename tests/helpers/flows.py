"""The Prefect flow `self-training` run from the tests, in this process."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.project import load_params, make_project, quick


def flow_project(path: Path, rounds: int = 2, **changes) -> Path:
    """A fresh project of the end-to-end params (``quick``) with ``rounds`` students."""
    return make_project(path, quick(load_params(), rounds=rounds, **changes))


def flow_run(project: Path, overrides: dict | None = None, **options):
    from flows.self_training import self_training

    return self_training(overrides, str(project), return_state=True, **options)


def outcomes(state) -> dict[str, str]:
    return state.result()["outcomes"]


def flow_run_name(state) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).name


def flow_artifacts(state) -> list:
    """The Prefect artifacts a flow run published."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    return artifacts


def table_rows(artifact) -> list[dict]:
    """A table artifact's rows (the API returns them as JSON text or as a list)."""
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data

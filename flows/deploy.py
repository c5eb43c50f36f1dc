"""Deploy the `self-training` flow to a Prefect process work pool, for `prefect worker start`.

    python -m flows.deploy [--pool self-training] [--name worker]
    prefect worker start --pool self-training          # on every machine that should run it

Unlike `make serve` (one process that serves and runs), a work pool separates the two: the
deployment lives on the Prefect server, and any number of workers, on any machines that hold
the project at the same path, poll the pool and run each flow run in a subprocess there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

from flows.self_training import self_training

POOL = "self-training"
ENTRYPOINT = "flows/self_training.py:self_training"


async def ensure_pool(name: str) -> None:
    """A process work pool named ``name``, created if the server has none."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    async with get_client() as client:
        with contextlib.suppress(ObjectAlreadyExists):
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def deploy(project: Path, pool: str = POOL, name: str = "worker"):
    """Register deployment ``self-training/<name>`` on ``pool``, running the flow from
    ``project`` (its code and its DVC workspace). Returns the deployment's id."""
    project = project.resolve()
    asyncio.run(ensure_pool(pool))
    source = self_training.from_source(source=str(project), entrypoint=ENTRYPOINT)
    return source.deploy(
        name=name,
        work_pool_name=pool,
        parameters={"project_dir": str(project)},
        description="the pipeline in params.yaml as it is, run by a worker of the pool",
        tags=["self-training"],
        print_next_steps=False,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", default=POOL, help="the process work pool (created if missing)")
    p.add_argument("--name", default="worker", help="the deployment's name")
    p.add_argument("--project", default=".", help="the project folder (default: here)")
    args = p.parse_args()
    deployment_id = deploy(Path(args.project), args.pool, args.name)
    print(
        f"deployed self-training/{args.name} ({deployment_id}) to work pool '{args.pool}'\n"
        f"start a worker:  prefect worker start --pool {args.pool}\n"
        f"run it:          prefect deployment run 'self-training/{args.name}' --watch"
    )


if __name__ == "__main__":
    main()

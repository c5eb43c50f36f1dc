"""Sharded pseudo-labeling on Dask: the pool's shards labeled in parallel, then merged.

The same functions as `python -m tasks.pseudo_label` (label_shard, merge_shards, in that
module), run as Prefect tasks by prefect-dask's DaskTaskRunner: on a local cluster of
``flow.dask_workers`` processes, or on the running scheduler at ``flow.dask_address``. Shards are
whole batches, so the merged table is the one a single process writes, byte for byte.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from tasks import pseudo_label
from tasks.data import PREPARED_DIR, load_split
from tasks.models import MODELS_DIR
from tasks.pseudo_label import PSEUDO_DIR
from tasks.settings import Settings

label_shard = task(
    pseudo_label.label_shard,
    cache_policy=NO_CACHE,
    task_run_name="label {student} rows {start}-{end}",
)


@flow(name="sharded-pseudo-label")
def label_pool(settings: Settings, student: str, root: Path) -> dict:
    """Label the pool for ``student`` in ``pseudo_label.shards`` shards on the Dask workers."""
    data_dir, models_dir, out_dir = root / PREPARED_DIR, root / MODELS_DIR, root / PSEUDO_DIR
    cfg = settings.pseudo_label
    pool_size = len(load_split("unlabeled", data_dir))
    bounds = pseudo_label.shard_bounds(pool_size, cfg.batch_size, cfg.shards)
    threads = max(1, (os.cpu_count() or 1) // settings.flow.dask_workers)
    with pseudo_label.shard_folder(out_dir, student) as folder:
        futures = [
            label_shard.submit(
                settings, student, start, end, folder / f"{k}.csv", data_dir, models_dir, threads
            )
            for k, (start, end) in enumerate(bounds)
        ]
        files = [future.result() for future in futures]
        return pseudo_label.merge_shards(
            settings, student, files, data_dir=data_dir, out_dir=out_dir
        )


def task_runner(settings: Settings, root: Path) -> DaskTaskRunner:
    if settings.flow.dask_address:
        return DaskTaskRunner(address=settings.flow.dask_address)
    # the workers import tasks/ from the project, wherever the flow process was started
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p
    )
    workers = settings.flow.dask_workers
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True}
    )


def run(settings: Settings, student: str, root: Path) -> dict:
    return label_pool.with_options(task_runner=task_runner(settings, root))(settings, student, root)

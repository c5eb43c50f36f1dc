"""Sharded pseudo-labeling on Dask: the pool's shards labeled in parallel, then merged.

The same functions as the pseudo_label stage (label_shard, merge_shards, in
noisy_student/pseudo_labels/labeling.py), run as Prefect tasks by prefect-dask's DaskTaskRunner: on
a local cluster of ``flow.dask_workers`` processes, or on the running scheduler at
``flow.dask_address``. Shards are whole batches, so the merged table is the one a single process
writes, byte for byte."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.data.splits import load_split
from noisy_student.pseudo_labels import labeling

label_shard = task(
    labeling.label_shard,
    cache_policy=NO_CACHE,
    task_run_name="label {student} rows {start}-{end}",
)


@flow(name="sharded-pseudo-label")
def label_pool(settings: Settings, student: str, root: Path) -> dict:
    """Label the pool for ``student`` in ``pseudo_label.shards`` shards on the Dask workers."""
    layout = Layout.at(root)
    if (stopped := labeling.skip_if_stopped(settings, student, layout)) is not None:
        return stopped
    cfg = settings.pseudo_label
    pool_size = len(load_split("unlabeled", layout.prepared))
    bounds = labeling.shard_bounds(pool_size, cfg.batch_size, cfg.shards)
    threads = max(1, (os.cpu_count() or 1) // settings.flow.dask_workers)
    with labeling.shard_folder(layout, student) as folder:
        futures = [
            label_shard.submit(
                settings, student, start, end, folder / f"{k}.parquet", layout, threads
            )
            for k, (start, end) in enumerate(bounds)
        ]
        files = [future.result() for future in futures]
        return labeling.merge_shards(settings, student, files, layout)


def task_runner(settings: Settings, root: Path) -> DaskTaskRunner:
    if settings.flow.dask_address:
        return DaskTaskRunner(address=settings.flow.dask_address)
    # the workers import the library from the project, wherever the flow process was started
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p
    )
    workers = settings.flow.dask_workers
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True}
    )


def run(settings: Settings, student: str, root: Path) -> dict:
    return label_pool.with_options(task_runner=task_runner(settings, root))(settings, student, root)

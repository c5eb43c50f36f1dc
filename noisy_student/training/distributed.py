"""Data-parallel training with PyTorch DDP, launched by ``torchrun``.

``runtime.devices`` processes per machine on ``runtime.nodes`` machines: a training stage started
the usual way (``python -m tasks.train_student ...``, ``dvc repro``, the Prefect flow) starts itself
again under torchrun when that is more than one. torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT) then tells each process its place; rank 0 alone writes artifacts and
logs to MLflow. Backend: NCCL on GPUs, gloo on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.utils.distributed import world_info_from_env

from noisy_student.core.errors import PipelineError
from noisy_student.core.settings import RuntimeSettings

PARENT_ENV = "NOISY_STUDENT_PARENT_RUN"  # the orchestrator's MLflow run, for the processes


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place, as torchrun (or SLURM, MPI) set it; one process: rank 0 of 1."""
    local_rank, rank, size = world_info_from_env()
    return World(rank, size, local_rank)


def wanted(runtime: RuntimeSettings) -> bool:
    """More than one training process asked for, and this is not one of them yet."""
    return runtime.devices * runtime.nodes > 1 and "LOCAL_RANK" not in os.environ


def torchrun_command(runtime: RuntimeSettings, module: str, args: list[str]) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run"]
    command += ["--nproc_per_node", str(runtime.devices), "--nnodes", str(runtime.nodes)]
    if runtime.nodes == 1:
        command.append("--standalone")  # a free port on this machine, no rendezvous server
    else:
        command += ["--rdzv_backend", "c10d", "--rdzv_endpoint", str(runtime.rdzv_endpoint)]
        command += ["--rdzv_id", "noisy-student"]
    return [*command, "-m", module, *args]


def launch(
    runtime: RuntimeSettings, module: str, args: list[str], env: dict[str, str] | None = None
) -> None:
    """Run ``python -m module args`` under torchrun; a failing process fails the whole.

    Interrupted (Ctrl-C, SIGTERM), torchrun is asked to stop, so that it stops its processes:
    they run in sessions of their own, which a SIGKILL to torchrun would leave running."""
    command = torchrun_command(runtime, module, args)
    process = subprocess.Popen(command, env={**os.environ, **(env or {})})
    try:
        returncode = process.wait()
    except BaseException:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    if returncode != 0:
        raise PipelineError(
            f"{module} {' '.join(args)}: the distributed run (runtime.devices="
            f"{runtime.devices}, runtime.nodes={runtime.nodes}) failed with exit code "
            f"{returncode}; its processes' errors are printed above"
        )


def setup(device_type: str) -> World:
    """Join the process group (once) when torchrun started several processes."""
    here = world()
    if here.size > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(here.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return here


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parent_env(run_id: str, tags: dict[str, str]) -> dict[str, str]:
    return {PARENT_ENV: json.dumps({"run_id": run_id, "tags": tags})}


def parent_from_env() -> tuple[str, dict[str, str]] | None:
    raw = os.environ.get(PARENT_ENV)
    if not raw:
        return None
    value = json.loads(raw)
    return value["run_id"], value["tags"]


def least(value: int) -> int:
    """The smallest ``value`` over all processes (the value itself for one process)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor(value)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor)

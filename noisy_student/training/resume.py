"""Resume a killed training from its last checkpoint, exactly.

Every ``runtime.checkpoint_epochs`` epochs the trainer writes what the next epoch depends on to
``checkpoints/<model>/``: the network, the optimizer's state, the epoch and update counters, the
history so far and every random stream (torch's, NumPy's, Python's, the augmentation policy's and
the data order's). A re-run with the same inputs (the same fingerprint) starts after the last
checkpointed epoch and ends with the weights an uninterrupted run would have had, bit for bit on
the CPU. Tensors go to safetensors, the rest to JSON: resuming never unpickles anything.

DVC deletes a stage's outputs before it runs the stage, so checkpoints live beside them, not in
them; a model's folder is removed once the model is saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from noisy_student.augment.streams import OwnedRandom, jsonable, tupled
from noisy_student.core.atomic import atomic_path

log = logging.getLogger(__name__)


def fingerprint(payload: Any, files: list[Path]) -> str:
    """What a checkpoint may be resumed under: the training's settings and its inputs' bytes."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class Checkpoints:
    """The checkpoints of one model (all its ensemble members) under ``folder``."""

    def __init__(self, folder: Path, fingerprint: str, every: int) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.every = every
        meta = self.folder / "run.json"
        if meta.exists() and json.loads(meta.read_text()).get("fingerprint") != fingerprint:
            log.info("%s: made for other inputs or settings; starting afresh", self.folder)
            shutil.rmtree(self.folder, ignore_errors=True)  # every DDP process may get here

    def run_ids(self) -> dict[str, str]:
        """MLflow runs of the interrupted training (label -> run id), to carry on logging into."""
        meta = self.folder / "run.json"
        return json.loads(meta.read_text())["runs"] if meta.exists() else {}

    def remember_run(self, label: str, run_id: str) -> None:
        runs = {**self.run_ids(), label: run_id}
        text = json.dumps({"fingerprint": self.fingerprint, "runs": runs}, indent=2)
        with atomic_path(self.folder / "run.json") as tmp:
            tmp.write_text(text)

    def member(self, label: str) -> MemberCheckpoint:
        return MemberCheckpoint(self.folder, label, self.every)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class MemberCheckpoint:
    """``<label>.epoch<E>.safetensors`` (weights, optimizer tensors, RNG states) beside
    ``<label>.epoch<E>.json``, written in that order: an epoch counts once its JSON exists, so a
    kill at any moment leaves complete checkpoints only. The last two are kept: the processes of
    a distributed run may be one checkpoint apart when killed, and resume from the one they all
    have."""

    KEEP = 2

    def __init__(self, folder: Path, label: str, every: int) -> None:
        self.folder = folder
        self.label = label
        self.every = every

    def due(self, epoch: int, epochs: int) -> bool:
        return epoch % self.every == 0 or epoch == epochs

    def _files(self, epoch: int) -> tuple[Path, Path]:
        stem = self.folder / f"{self.label}.epoch{epoch}"
        return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")

    def epochs(self) -> list[int]:
        """Epochs with a complete checkpoint, oldest first."""
        found = []
        for meta in self.folder.glob(f"{self.label}.epoch*.json"):
            epoch = meta.name.removeprefix(f"{self.label}.epoch").removesuffix(".json")
            if epoch.isdigit() and self._files(int(epoch))[0].exists():
                found.append(int(epoch))
        return sorted(found)

    def save(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        streams: RandomStreams,
        counters: dict[str, Any],
        kept: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """``kept``: more weights saved beside the current ones, by part: ``best`` (the best
        validation epoch's so far), ``ema`` (the moving average's)."""
        tensors = {
            f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()
        }
        for part, weights in (kept or {}).items():
            tensors |= {f"{part}.{k}": v.detach().cpu().contiguous() for k, v in weights.items()}
        optim_tensors, optim_meta = _split_optimizer(optimizer.state_dict())
        rng_tensors, rng_meta = streams.state()
        tensor_file, meta_file = self._files(counters["epoch"])
        with atomic_path(tensor_file) as tmp:
            save_file({**tensors, **optim_tensors, **rng_tensors}, tmp)
        meta = {"counters": counters, "optimizer": optim_meta, "rng": rng_meta}
        with atomic_path(meta_file) as tmp:
            tmp.write_text(json.dumps(meta))
        for old in self.epochs()[: -self.KEEP]:
            for path in reversed(self._files(old)):  # the JSON first: never a JSON without data
                path.unlink(missing_ok=True)

    def load(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        streams: RandomStreams,
        epoch: int,
    ) -> dict[str, Any]:
        """Restore the state saved after ``epoch`` and return its counters."""
        tensor_file, meta_file = self._files(epoch)
        meta = json.loads(meta_file.read_text())
        tensors = load_file(tensor_file)
        prefix = "model."
        weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        model.load_state_dict(weights)
        optimizer.load_state_dict(_join_optimizer(tensors, meta["optimizer"]))
        _match_layouts(optimizer)
        streams.restore(tensors, meta["rng"])
        return meta["counters"]

    def load_weights(self, epoch: int, part: str) -> dict[str, torch.Tensor]:
        """The weights of ``part`` (``best``, ``ema``) saved with the checkpoint after ``epoch``."""
        prefix = f"{part}."
        tensors = load_file(self._files(epoch)[0])
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as tensors (per parameter) and JSON (param groups, scalars)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter's state tensors (saved contiguous) the parameter's own strides back:
    fused AdamW walks a parameter and its moments in memory order, so a channels_last parameter
    with contiguous moments would be updated with another element's moments (measured: a resumed
    step 0.16 away from an uninterrupted one; the foreach path is immune)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for name, value in state.items():
                moment = isinstance(value, torch.Tensor) and value.shape == param.shape
                if moment and value.stride() != param.stride():
                    laid_out = torch.empty_like(param, dtype=value.dtype, requires_grad=False)
                    state[name] = laid_out.copy_(value)


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


class RandomStreams:
    """Every random stream a training draws from, captured and restored together."""

    def __init__(
        self,
        policy: Any | None,
        owned: OwnedRandom,
        generator: torch.Generator,
        batched: Any | None = None,
    ) -> None:
        self.policy = policy  # an albumentations Compose (its own NumPy and Python generators)
        self.owned = owned  # timm's RandAugment and Mixup draw from these
        self.generator = generator  # the DataLoader's: shuffling, and the workers' seeds
        self.batched = batched  # augment.backend batched: augment.batched.BatchAugment

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        tensors = {
            "rng.torch": torch.get_rng_state(),
            "rng.loader": self.generator.get_state(),
            "rng.numpy": torch.from_numpy(keys.astype(np.int64)),
        }
        if torch.cuda.is_available():
            for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = cuda_state
        meta: dict[str, Any] = {
            "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": jsonable(random.getstate()),
            "owned": self.owned.state(),
        }
        if self.batched is not None:
            meta["batched"] = self.batched.state()
        if self.policy is not None:
            meta["policy_numpy"] = self.policy.random_generator.bit_generator.state
            meta["policy_python"] = jsonable(self.policy.py_random.getstate())
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        torch.set_rng_state(tensors["rng.torch"])
        self.generator.set_state(tensors["rng.loader"])
        kind, pos, has_gauss, gauss = meta["numpy"]
        keys = tensors["rng.numpy"].numpy().astype(np.uint32)
        np.random.set_state((kind, keys, pos, has_gauss, gauss))
        random.setstate(tupled(meta["python"]))
        self.owned.restore(meta["owned"])
        cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
        if self.batched is not None:
            self.batched.restore(meta["batched"])
        if self.policy is not None:
            self.policy.random_generator.bit_generator.state = meta["policy_numpy"]
            self.policy.py_random.setstate(tupled(meta["policy_python"]))

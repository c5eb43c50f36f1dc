"""timm models and their checkpoints (safetensors weights + a JSON card, never pickles).

A trained model is a folder: ``card.json`` plus one weights file per member. Most models have one
member; an ensemble teacher has several, whose averaged probabilities are its prediction.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from safetensors.torch import load_file, save_file

from noisy_student.core.atomic import atomic_path
from noisy_student.core.errors import PipelineError
from noisy_student.core.settings import ModelTraining, RuntimeSettings
from noisy_student.models.card import ModelCard, load_card


def create_model(spec: ModelTraining, num_classes: int, architecture: str | None = None):
    """A timm model for ``spec`` (``architecture`` overrides ``spec.model``: ensemble members).

    Pretrained weights always go through timm's loader, which drops a classifier of another size:
    from the hub (``pretrained: true``) or from a local file (``pretrained: <path>``)."""
    name = architecture or spec.model
    kwargs: dict = {"num_classes": num_classes, "drop_rate": spec.drop_rate}
    if spec.drop_path_rate > 0:  # not every timm architecture accepts the argument
        kwargs["drop_path_rate"] = spec.drop_path_rate
    if isinstance(spec.pretrained, str):
        kwargs["pretrained_cfg_overlay"] = {"file": str(Path(spec.pretrained).resolve())}
    try:
        return timm.create_model(name, pretrained=bool(spec.pretrained), **kwargs)
    except TypeError as exc:
        raise PipelineError(f"timm model '{name}' rejected its settings ({exc})") from None
    except Exception as exc:  # no network, shapes that do not fit, a pickle in a .pth file
        if name.startswith(("hf-hub:", "hf_hub:")):
            detail = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise PipelineError(
                f"timm model '{name}': could not be read from the Hugging Face Hub ({detail}); "
                "without a network, fetch it once where there is one (the hub cache is reused), "
                "or save it with timm and name it local-dir:<folder>"
            ) from None
        if spec.pretrained is False:
            raise
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = " ".join(lines[:2])[:300] or type(exc).__name__
        if spec.pretrained is True:
            raise PipelineError(
                f"pretrained: true: timm could not fetch the weights of '{name}' ({detail}); "
                "without a network, set pretrained to a local weights file"
            ) from None
        what = "do not fit" if "size mismatch" in str(exc) else "cannot be loaded as weights for"
        raise PipelineError(f"pretrained: {spec.pretrained}: {what} '{name}' ({detail})") from None


def normalization(model: torch.nn.Module) -> tuple[list[float], list[float]]:
    cfg = timm.data.resolve_model_data_config(model)
    return [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]]


def weights_name(index: int) -> str:
    return "model.safetensors" if index == 0 else f"member_{index}.safetensors"


def save_checkpoint(
    members: list[torch.nn.Module],
    card: ModelCard,
    folder: Path,
    extra_files: dict[str, str] | None = None,
    finish: Callable[[Path], None] | None = None,
) -> None:
    """Weights, card and any ``extra_files`` (name -> text) land together or not at all.
    ``finish`` gets the staged folder once they are in it, to add what depends on them."""
    with atomic_path(folder) as staged:
        staged.mkdir()
        for filename, text in (extra_files or {}).items():
            (staged / filename).write_text(text)
        for net, member in zip(members, card.members, strict=True):
            state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
            save_file(state, staged / member.weights)
        (staged / "card.json").write_text(json.dumps(asdict(card), indent=2))
        if finish is not None:
            finish(staged)


def load_checkpoint(
    folder: Path, device: torch.device | str = "cpu"
) -> tuple[Classifier, ModelCard]:
    """The model in ``folder`` as one ``Classifier`` (all its members), in eval mode."""
    card = load_card(folder)
    nets = []
    for member in card.members:
        net = timm.create_model(member.model, pretrained=False, num_classes=len(card.classes))
        path = folder / member.weights
        try:
            net.load_state_dict(load_file(path, device=str(device)))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise PipelineError(f"{path}: does not fit '{member.model}' ({first})") from None
        nets.append(net)
    classifier = Classifier(nets, [m.mean for m in card.members], [m.std for m in card.members])
    return classifier.to(device).eval(), card


def resolve_device(runtime: RuntimeSettings) -> torch.device:
    """The device of this process: under torchrun, GPU ``LOCAL_RANK`` of the machine (offset by
    the index of ``cuda:N``); else ``runtime.device`` as PyTorch names it."""
    kind = runtime.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(kind)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PipelineError(f"runtime.device is '{kind}' but MPS is not available here")
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rank = os.environ.get("LOCAL_RANK")  # set by torchrun: one GPU per process
    if device.index is not None:
        index = device.index + int(rank or 0)
    else:
        index = int(rank) if rank is not None else torch.cuda.current_device() if count else 0
    if index >= count:
        where = f" (torchrun process LOCAL_RANK {rank})" if rank is not None else ""
        raise PipelineError(
            f"runtime.device is '{runtime.device}' but this machine has {count} CUDA device(s)"
            f"{where}"
        )
    return torch.device("cuda", index)


class Normalize(torch.nn.Module):
    """Pixels 0..255 (uint8 or float) NCHW -> normalized float, on the device."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class Outputs(NamedTuple):
    """A batch's ``Classifier.outputs``: float32, one row per image."""

    probs: torch.Tensor
    energy: torch.Tensor
    features: list[torch.Tensor] | None  # one L2-normalized matrix per member


class Classifier(torch.nn.Module):
    """Pixels 0..255, N x 3 x H x W -> logits: one timm network, or an ensemble of them.

    An ensemble's logits are the log of its members' averaged probabilities (Hinton et al.), so
    softmax of the output is that average and argmax is the ensemble's vote."""

    def __init__(
        self, nets: list[torch.nn.Module], means: list[list[float]], stds: list[list[float]]
    ) -> None:
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)
        self.norms = torch.nn.ModuleList(Normalize(m, s) for m, s in zip(means, stds, strict=True))

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [net(norm(x)) for net, norm in zip(self.nets, self.norms, strict=True)]

    def probs(self, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """The averaged softmax(logits / T) of the members, in float32."""
        members = [torch.softmax(z.float() / temperature, dim=1) for z in self.member_logits(x)]
        return torch.stack(members).mean(0)

    def probs_and_energy(
        self, x: torch.Tensor, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``probs`` and each image's free energy (``outputs``)."""
        out = self.outputs(x, temperature)
        return out.probs, out.energy

    def outputs(self, x: torch.Tensor, temperature: float = 1.0, features: bool = False) -> Outputs:
        """``probs``; each image's free energy, -logsumexp(logits), the members' mean (Liu et
        al. 2020, "Energy-based out-of-distribution detection"): low on images like the training
        classes, high on foreign ones (energy rather than the top probability: softmax discards
        the logits' scale, the very thing that tells an image of none of the classes apart); and
        with ``features``, each member's pre-logit features (timm's ``forward_head(...,
        pre_logits=True)``), L2-normalized, from the same forward pass."""
        logits, feats = [], []
        for net, norm in zip(self.nets, self.norms, strict=True):
            if features:
                hidden = net.forward_features(norm(x))
                logits.append(net.forward_head(hidden).float())
                pre = net.forward_head(hidden, pre_logits=True).float().flatten(1)
                feats.append(torch.nn.functional.normalize(pre, dim=1))
            else:
                logits.append(net(norm(x)).float())
        probs = torch.stack([torch.softmax(z / temperature, dim=1) for z in logits]).mean(0)
        energy = torch.stack([-torch.logsumexp(z, dim=1) for z in logits]).mean(0)
        return Outputs(probs, energy, feats if features else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.nets) == 1:
            return self.nets[0](self.norms[0](x))
        return torch.log(self.probs(x).clamp_min(1e-12))

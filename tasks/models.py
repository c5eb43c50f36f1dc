"""timm models and their checkpoints (safetensors weights + a JSON card, never pickles)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

from tasks.atomic import atomic_path
from tasks.errors import PipelineError
from tasks.settings import ModelTraining, RuntimeSettings

MODELS_DIR = Path("models")


@dataclass(frozen=True)
class ModelCard:
    """What is needed to rebuild and feed a trained model, stored beside its weights."""

    name: str  # teacher, student_1, ...
    model: str  # timm architecture
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    mlflow_run_id: str | None


def create_model(spec: ModelTraining, num_classes: int) -> torch.nn.Module:
    kwargs = {"num_classes": num_classes, "drop_rate": spec.drop_rate}
    if spec.drop_path_rate > 0:  # not every timm architecture accepts the argument
        kwargs["drop_path_rate"] = spec.drop_path_rate
    try:
        return timm.create_model(spec.model, pretrained=spec.pretrained, **kwargs)
    except TypeError as exc:
        raise PipelineError(f"timm model '{spec.model}' rejected its settings ({exc})") from None


def normalization(model: torch.nn.Module) -> tuple[list[float], list[float]]:
    cfg = timm.data.resolve_model_data_config(model)
    return [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]]


def save_checkpoint(
    model: torch.nn.Module, card: ModelCard, folder: Path, extra_files: dict[str, str] | None = None
) -> None:
    """Weights, card and any ``extra_files`` (name -> text) land together or not at all."""
    with atomic_path(folder) as staged:
        staged.mkdir()
        for filename, text in (extra_files or {}).items():
            (staged / filename).write_text(text)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, staged / "model.safetensors")
        (staged / "card.json").write_text(json.dumps(asdict(card), indent=2))


def load_card(folder: Path) -> ModelCard:
    path = folder / "card.json"
    if not path.exists():
        raise PipelineError(f"{path}: not found; train that model first")
    return ModelCard(**json.loads(path.read_text()))


def load_checkpoint(
    folder: Path, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, ModelCard]:
    card = load_card(folder)
    model = timm.create_model(card.model, pretrained=False, num_classes=len(card.classes))
    try:
        model.load_state_dict(load_file(folder / "model.safetensors", device=str(device)))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise PipelineError(
            f"{folder}/model.safetensors: does not fit '{card.model}' ({first})"
        ) from None
    return model.to(device).eval(), card


def load_for_inference(
    folder: Path, device: torch.device
) -> tuple[torch.nn.Module, Normalize, ModelCard]:
    model, card = load_checkpoint(folder, device)
    return model, Normalize(card.mean, card.std).to(device), card


def resolve_device(runtime: RuntimeSettings) -> torch.device:
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("runtime.device is 'cuda' but no CUDA device is available")
    if runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(runtime.device)


class Normalize(torch.nn.Module):
    """uint8 NCHW batch -> normalized float, on the device (the loader moves uint8)."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std

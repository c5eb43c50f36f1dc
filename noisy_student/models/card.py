"""A trained model's card: what rebuilds and feeds it, stored as ``card.json`` beside its weights.

Plain JSON, apart from torch and timm: the stages that only read cards (register, report) need
not import them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from noisy_student.core.errors import PipelineError


@dataclass(frozen=True)
class Member:
    """One trained network of a model."""

    model: str  # timm architecture
    weights: str  # file name inside the model's folder
    mean: list[float]
    std: list[float]
    mlflow_run_id: str | None


@dataclass(frozen=True)
class ModelCard:
    """What is needed to rebuild and feed a trained model, stored beside its weights."""

    name: str  # teacher, student_1, ...
    classes: list[str]
    image_size: int
    mlflow_run_id: str | None  # the model's run (an ensemble's members have runs of their own)
    members: list[Member] = field(default_factory=list)
    # the run its loop's trainings nest under: the flow's, or under `dvc repro` the loop's own,
    # opened by the teacher and handed down card to card (None: a card from before it)
    loop_run_id: str | None = None
    # how it sees an image (data.images.square_view): the centre crop at this crop_pct, aspect
    # kept (the encoded storage), or None, the whole image squeezed into the square (arrays)
    eval_crop_pct: float | None = None

    @property
    def model(self) -> str:
        """The architecture, or ``a+b`` for an ensemble."""
        return "+".join(m.model for m in self.members)

    @staticmethod
    def from_json(text: str) -> ModelCard:
        raw = json.loads(text)
        raw["members"] = [Member(**m) for m in raw["members"]]
        return ModelCard(**raw)


def load_card(folder: Path) -> ModelCard:
    path = folder / "card.json"
    if not path.exists():
        raise PipelineError(f"{path}: not found; train that model first")
    return ModelCard.from_json(path.read_text())

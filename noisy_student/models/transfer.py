"""Transfer learning: which parameters train, and at which learning rate.

- ``linear_probe`` (the notes' approach 1, feature extraction): the backbone is frozen (weights
  and BatchNorm statistics, timm's ``freeze``), only the classifier head trains.
- ``finetune`` (approach 2): everything trains; the backbone at ``lr * backbone_lr_scale`` (the
  notes' recipe: about 100x lower than the head), optionally decayed further layer by layer towards
  the input (``layer_decay`` < 1, timm's BEiT-style layer decay).

The learning rates are optimizer parameter groups with an ``lr_scale``, which timm's schedulers
multiply into every group's learning rate at each step.
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from timm.utils.model import freeze, unfreeze

from noisy_student.core.settings import ModelTraining


def head_path(model: torch.nn.Module) -> list[str]:
    """The classifier's module path (``['fc']``, ``['head', 'fc']``), as timm names it."""
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier and name:
            return name.split(".")
    raise ValueError(f"{type(model).__name__}: cannot find its classifier module")


def backbone_modules(model: torch.nn.Module) -> list[str]:
    """Every module beside the classifier's path: the siblings of each module on that path."""
    names: list[str] = []
    parent: torch.nn.Module = model
    prefix = ""
    for part in head_path(model):
        names += [prefix + n for n, _ in parent.named_children() if n != part]
        parent = getattr(parent, part)
        prefix += part + "."
    return names


def freeze_backbone(model: torch.nn.Module) -> list[str]:
    frozen = backbone_modules(model)
    freeze(model, frozen)  # also turns BatchNorm into FrozenBatchNorm2d: statistics stay put
    return frozen


def unfreeze_backbone(model: torch.nn.Module, frozen: list[str]) -> None:
    """Back to plain modules (BatchNorm2d again), so the checkpoint loads into a fresh model."""
    unfreeze(model, frozen)


def parameter_groups(model: torch.nn.Module, spec: ModelTraining) -> list[dict]:
    """timm's layer-decay groups (weight decay off for biases and norms), the backbone's
    ``lr_scale`` multiplied by ``backbone_lr_scale``; frozen parameters are left out."""
    head = {id(p) for p in model.get_classifier().parameters()}
    groups = []
    for group in param_groups_layer_decay(
        model,
        weight_decay=spec.weight_decay,
        no_weight_decay_list=getattr(model, "no_weight_decay", lambda: ())(),
        layer_decay=spec.layer_decay,
    ):
        for in_head in (True, False):
            params = [p for p in group["params"] if (id(p) in head) == in_head]
            if not params:
                continue
            scale = group["lr_scale"] * (1.0 if in_head else spec.backbone_lr_scale)
            groups.append(
                {
                    "params": params,
                    "weight_decay": group["weight_decay"],
                    "lr_scale": scale,
                    "head": in_head,
                }
            )
    return groups


def create_optimizer(model: torch.nn.Module, spec: ModelTraining) -> torch.optim.Optimizer:
    """AdamW over ``parameter_groups``. Each group's lr becomes ``schedule value * lr_scale`` at
    every step of a timm scheduler: step it once (``step_update(0)``) before the first batch.

    PyTorch's fused AdamW (CPU and CUDA): on the CPU its default is a Python loop over the
    tensors, which took a fifth of a resnet18 training step here (bench/README.md)."""
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return create_optimizer_v2(
        parameter_groups(model, spec), opt="adamw", lr=spec.lr, fused=fused or None
    )

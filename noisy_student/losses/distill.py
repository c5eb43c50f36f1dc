"""The student's loss: cross-entropy on (soft) targets plus knowledge distillation (Hinton et al.).

Per item i, with student logits s, the teacher's averaged probabilities at temperature T, q_T,
the item's target row y (scaled by its cross-entropy weight) and distillation weight k:

    loss_i = CE(y, s) + k * T^2 * KL(q_T || softmax(s / T))

- labeled item, distillation on:  y = (1 - alpha) * label,  k = alpha   (Hinton's weighted sum)
- pool item, distillation on:     y = 0,                    k = 1       (the KL term alone)
- distillation off:               y = label or pseudo-label, k = 0      (plain Noisy Student)

T^2 keeps the soft term's gradients the size of the hard term's as T grows (the softened gradients
shrink as 1 / T^2). Both terms are linear in (y, k), so MixUp/CutMix mix them as they mix the images
(noisy_student/losses/mixing.py). The teacher is frozen and runs without autograd: gradients reach
the student only. It sees either the clean images (computed once, Noisy Student's un-noised teacher)
or the student's own augmented view (Beyer et al. 2022): ``distill.teacher_input``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from noisy_student.core.settings import RuntimeSettings
from noisy_student.data.sparse import SparseRows
from noisy_student.models.inference import eval_loader, iter_probabilities


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-item -sum_c y_c log softmax(s)_c; rows of ``targets`` need not sum to one."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1)


def kd_term(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-item T^2 * KL(teacher_T || student_T); ``teacher_probs`` already at temperature T."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_student, teacher_probs, reduction="none").sum(dim=1)
    return temperature**2 * kl


def student_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    kd_weights: torch.Tensor,
    teacher_probs: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """Mean over the batch of ``loss_i`` above (no teacher: the cross-entropy term alone)."""
    loss = soft_cross_entropy(student_logits, targets)
    if teacher_probs is not None:
        loss = loss + kd_weights * kd_term(student_logits, teacher_probs, temperature)
    return loss.mean()


class FrozenTeacher:
    """A trained model (models.classifier.Classifier) used only for its soft targets."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        self.classifier = classifier.eval()
        for p in self.classifier.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, temperature: float) -> torch.Tensor:
        """Averaged member probabilities at ``temperature``, for pixels 0..255 like the student."""
        return self.classifier.probs(images, temperature)


@dataclass(frozen=True)
class Distillation:
    """Where a student's distillation targets come from.

    ``online`` given: the teacher runs on every training batch, on the student's own augmented and
    mixed view. None: the items carry the teacher's outputs on their clean images, computed once
    (``precompute``), and mix like the labels."""

    temperature: float
    online: FrozenTeacher | None = None

    def targets(self, images: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
        return self.online(images, self.temperature) if self.online is not None else carried


def precompute(
    teacher: FrozenTeacher,
    images: np.ndarray,
    rows: np.ndarray,
    temperature: float,
    runtime: RuntimeSettings,
    device: torch.device,
    batch_size: int,
    top_k: int | None = None,
) -> np.ndarray | SparseRows:
    """The teacher's probabilities at ``temperature`` on the clean ``images[rows]``; with
    ``top_k`` (``pseudo_label.top_k``) only each image's k largest, renormalized to sum to 1, as
    SparseRows: k numbers an image in memory instead of one per class (the KL term then
    distills the teacher's k most likely classes, as top-k distillation does)."""
    loader = eval_loader(images, batch_size, runtime, device, indices=rows)
    teacher.classifier.to(device)
    probs = iter_probabilities(teacher.classifier, loader, device, runtime, temperature)
    if top_k is None:
        return torch.cat(list(probs)).numpy()
    columns, values, width = [], [], 0
    for batch in probs:  # each batch cut to k before the next: never N x K at once
        width = batch.shape[1]
        top = batch.topk(min(top_k, width), dim=1)
        columns.append(top.indices)
        values.append(top.values / top.values.sum(dim=1, keepdim=True))
    if not columns:
        return SparseRows(np.zeros((0, top_k), np.int64), np.zeros((0, top_k), np.float32), 0)
    return SparseRows(torch.cat(columns).numpy(), torch.cat(values).numpy(), width)

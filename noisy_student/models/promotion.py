"""Which model the loop stands on after each round, decided on the validation split.

A student becomes the next round's teacher only if its validation accuracy is at least the best
model's so far plus ``selection.margin`` (a tie promotes at margin 0: the student is no worse on
validation and has learned from the pool, so it carries the loop on) and, with ``selection.alpha``
set, McNemar's exact test on the validation images the two models disagree on finds the student
better at that level (a small validation set cannot tell close models apart); otherwise the next
round learns from the best model so far, and after ``selection.patience`` rounds in a row that
did not pay, the loop stops: the later rounds finish at once, untrained. The champion (what
export, predict, the registry's alias and the report's headline take) is the best model after the
last round.

Every model folder holds ``standing.json``, written with its weights by the training stage. It
carries the best model's name and the digest of its weights: the next round depends on the
previous round's folder only (dvc.yaml), and through this digest that folder changes whenever the
model it points at does, so ``dvc repro`` never keeps pseudo-labels made by a stale model.

JSON, hashing and McNemar's test (NumPy, SciPy): the stages that read standings need not import
torch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import SelectionSettings, Settings

STANDING_FILE = "standing.json"


@dataclass(frozen=True)
class Standing:
    """Where the loop stands once model ``model`` has had its turn."""

    model: str
    trained: bool  # false: the loop had stopped before this round; nothing was trained
    val_accuracy: float | None  # this model's (None: not trained)
    promoted: bool  # this model is now the best: the next round learns from it
    best: str  # the best model so far, by validation accuracy
    best_val_accuracy: float
    best_weights: str  # sha256 of the best model's weights files
    rounds_without_gain: int  # rounds in a row, up to this one, that did not beat the best
    stopped: bool  # no round after this one trains
    reason: str  # why it was (not) promoted, why the loop stopped: for people
    # the validation images this model classified right ("1") and wrong ("0"), in split order, and
    # the best model's: what the paired test compares
    val_correct: str
    best_val_correct: str
    # one-sided exact McNemar p-value that this model beats the best before it (None: the first
    # model, or not trained)
    p_value: float | None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def weights_digest(folder: Path) -> str:
    """sha256 over a model folder's weights files, in name order."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def correctness(right: Iterable[bool]) -> str:
    """Which validation images a model classified right, as a standing keeps it."""
    return "".join("1" if r else "0" for r in right)


def accuracy_of(correct: str) -> float:
    return correct.count("1") / len(correct) if correct else 0.0


def mcnemar(
    previous_right: np.ndarray, right: np.ndarray, alternative: str = "two-sided"
) -> tuple[int, int, float]:
    """Images this model got right and the previous one wrong (gained), the reverse (lost), and
    McNemar's exact p-value (the binomial test at one half over the images that changed): how
    likely so uneven a split is if neither model is better; ``alternative="greater"``: one-sided,
    that this model is better."""
    gained = int((right & ~previous_right).sum())
    lost = int((previous_right & ~right).sum())
    if gained + lost == 0:
        return 0, 0, 1.0  # no image tells them apart
    return gained, lost, binomial_half_p_value(gained, gained + lost, alternative)


def binomial_half_p_value(k: int, n: int, alternative: str) -> float:
    """SciPy's ``binomtest(k, n, 0.5, alternative).pvalue``, summed exactly in integers. Written
    here because importing scipy.stats costs most stages about 0.7 s, more than all they
    compute with it; tests/library/models/test_promotion.py checks it against SciPy."""

    def tail(low: int) -> float:  # P(X >= low), X ~ Binomial(n, 1/2)
        return sum(math.comb(n, i) for i in range(max(low, 0), n + 1)) / 2**n

    if alternative == "greater":
        return tail(k)
    if alternative == "less":
        return tail(n - k)
    if alternative == "two-sided":  # symmetric at one half: twice the smaller tail, at most 1
        return min(1.0, 2 * tail(max(k, n - k)))
    raise ValueError(f"alternative: expected two-sided, greater or less, not {alternative!r}")


def beats_p_value(challenger: str, holder: str) -> float | None:
    """The one-sided McNemar p-value that ``challenger`` beats ``holder`` on the paired
    validation results (``correctness``). None: ``holder`` has no record to pair with."""
    if not holder:
        return None
    if len(challenger) != len(holder):
        raise PipelineError(
            f"validation results of {len(challenger)} and {len(holder)} images cannot be paired: "
            "the validation split changed under the loop; run dvc repro again"
        )
    right = [np.frombuffer(c.encode(), np.uint8) == ord("1") for c in (holder, challenger)]
    return mcnemar(*right, alternative="greater")[2]


def first(name: str, correct: str, digest: str) -> Standing:
    """The teacher: the best so far by definition. ``correct``: see ``correctness``."""
    val_accuracy = accuracy_of(correct)
    return Standing(
        name, True, val_accuracy, True, name, val_accuracy, digest, 0, False,
        f"{name}: validation accuracy {val_accuracy:.4f}, the first model of the loop",
        val_correct=correct, best_val_correct=correct, p_value=None,
    )  # fmt: skip


def after_round(
    previous: Standing, name: str, correct: str, digest: str, rule: SelectionSettings
) -> Standing:
    """The standing once student ``name`` classified the validation images as ``correct`` says,
    given the one before it."""
    val_accuracy = accuracy_of(correct)
    gain = val_accuracy - previous.best_val_accuracy
    p = beats_p_value(correct, previous.best_val_correct)
    tested = "" if p is None else f", McNemar p = {p:.3g}"
    # accuracies are multiples of 1/N: the epsilon keeps float noise from deciding. A tie
    # promotes: on the accuracy benchmark a tied student_1 left out cost 9.9 points on one seed
    # (its successor, taught by the teacher again, underfit); taught by the tied student it gained
    gains = rule.margin is not None and gain >= rule.margin - 1e-9
    significant = rule.alpha is None or p is None or p <= rule.alpha
    against = (
        f"validation accuracy {val_accuracy:.4f} against {previous.best}'s "
        f"{previous.best_val_accuracy:.4f}, {gain:+.4f}{tested}"
    )
    if rule.margin is None or (gains and significant):
        reason = (
            f"{name} promoted: promotion off (selection.margin null), every student teaches the "
            f"next round ({against})"
            if rule.margin is None
            else f"{name} promoted: {against}, at least the margin {rule.margin}"
            + ("" if rule.alpha is None else f" and significant at selection.alpha {rule.alpha}")
        )
        return Standing(
            name, True, val_accuracy, True, name, val_accuracy, digest, 0, False, reason,
            val_correct=correct, best_val_correct=correct, p_value=p,
        )  # fmt: skip
    misses = previous.rounds_without_gain + 1
    stopped = rule.patience is not None and misses >= rule.patience
    short = (
        f"short of the margin {rule.margin}"
        if not gains
        else f"not significant at selection.alpha {rule.alpha}"
    )
    reason = f"{name} not promoted: {against}, {short}; the next round learns from {previous.best}"
    if stopped:
        reason = (
            f"{name} not promoted ({against}, {short}): {misses} round(s) in a row without gain "
            f"(selection.patience {rule.patience}), so the loop stops; {previous.best} is the "
            "champion"
        )
    return replace(
        previous,
        model=name,
        trained=True,
        val_accuracy=val_accuracy,
        promoted=False,
        rounds_without_gain=misses,
        stopped=stopped,
        reason=reason,
        val_correct=correct,
        p_value=p,
    )


def skipped(previous: Standing, name: str) -> Standing:
    """A round after the loop stopped: nothing trained, the standing carried over."""
    return replace(
        previous,
        model=name,
        trained=False,
        val_accuracy=None,
        promoted=False,
        val_correct="",
        p_value=None,
        reason=f"{name} not trained: the loop stopped before this round ({previous.reason})",
    )


def load_standing(folder: Path) -> Standing:
    path = folder / STANDING_FILE
    if not path.exists():
        raise PipelineError(f"{path}: not found; train that model first (dvc repro)")
    try:
        return Standing(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise PipelineError(f"{path}: not a standing written by this version ({exc})") from None


def teacher_standing(settings: Settings, layout: Layout, student: str) -> Standing:
    """Where the loop stood before round ``student``: its declared teacher's standing."""
    return load_standing(layout.model(settings.student(student).teacher))


def round_teacher(settings: Settings, layout: Layout, student: str) -> str:
    """The model that teaches round ``student``: the best model so far (its declared teacher if
    that one was promoted)."""
    return teacher_standing(settings, layout, student).best


def trained_models(settings: Settings, layout: Layout) -> list[str]:
    """The models of the loop that were trained, in loop order (rounds after a stop were not)."""
    return [n for n in settings.model_names() if load_standing(layout.model(n)).trained]


def final_standing(settings: Settings, layout: Layout) -> Standing:
    """The standing after the last round: its ``best`` is the champion."""
    return load_standing(layout.model(settings.model_names()[-1]))


def champion(settings: Settings, layout: Layout) -> str:
    """The best model of the loop on validation: what users take away."""
    return final_standing(settings, layout).best

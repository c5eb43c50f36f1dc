"""The promotion rule: a student becomes the next teacher only if its validation accuracy is at
least the best model's so far plus the margin (a tie promotes at margin 0) and, with
``selection.alpha``, McNemar's exact test on the paired validation results finds it better;
rounds that do not pay count towards the stop."""

from __future__ import annotations

import pytest

from noisy_student.core.errors import PipelineError
from noisy_student.core.settings import SelectionSettings
from noisy_student.models import promotion


def rule(
    margin: float | None = 0.0, patience: int | None = 2, alpha: float | None = None
) -> SelectionSettings:
    return SelectionSettings(epoch="best", margin=margin, patience=patience, alpha=alpha)


def scored(accuracy: float, images: int = 200) -> str:
    """Validation results at ``accuracy``: the first images right, the rest wrong (so a better
    model's right images include a worse one's)."""
    right = round(accuracy * images)
    return "1" * right + "0" * (images - right)


def test_a_student_that_beats_the_best_by_more_than_the_margin_is_promoted():
    teacher = promotion.first("teacher", scored(0.80), "t")
    student = promotion.after_round(teacher, "student_1", scored(0.83), "s1", rule(margin=0.02))
    assert student.promoted and student.best == "student_1" and student.best_weights == "s1"
    assert student.best_val_accuracy == 0.83 and student.rounds_without_gain == 0


@pytest.mark.parametrize("val_accuracy", [0.70, 0.80, 0.805])
def test_a_student_that_does_not_pay_leaves_the_best_in_place(val_accuracy):
    teacher = promotion.first("teacher", scored(0.80), "t")
    student = promotion.after_round(
        teacher, "student_1", scored(val_accuracy), "s1", rule(margin=0.01)
    )
    assert not student.promoted and not student.stopped
    assert (student.best, student.best_val_accuracy, student.best_weights) == ("teacher", 0.8, "t")
    assert student.rounds_without_gain == 1 and "learns from teacher" in student.reason


@pytest.mark.parametrize("margin", [0.0, 0.01])
def test_a_student_that_gains_exactly_the_margin_is_promoted_so_a_tie_promotes_at_zero(margin):
    teacher = promotion.first("teacher", scored(0.80), "t")
    val_accuracy = 0.80 + margin  # at 0: a tie
    student = promotion.after_round(teacher, "student_1", scored(val_accuracy), "s1", rule(margin))
    assert student.promoted and student.best == "student_1" and student.rounds_without_gain == 0


def test_the_loop_stops_after_patience_rounds_in_a_row_without_gain():
    standing = promotion.first("teacher", scored(0.80), "t")
    standing = promotion.after_round(standing, "student_1", scored(0.79), "s1", rule(patience=2))
    assert not standing.stopped
    standing = promotion.after_round(standing, "student_2", scored(0.78), "s2", rule(patience=2))
    assert standing.stopped and standing.best == "teacher" and "loop stops" in standing.reason
    skipped = promotion.skipped(standing, "student_3")
    assert not skipped.trained and skipped.val_accuracy is None and skipped.best == "teacher"
    assert skipped.stopped  # every later round finishes at once too


def test_a_gain_resets_the_count_and_null_patience_never_stops():
    standing = promotion.first("teacher", scored(0.80), "t")
    standing = promotion.after_round(standing, "student_1", scored(0.70), "s1", rule(patience=2))
    standing = promotion.after_round(standing, "student_2", scored(0.90), "s2", rule(patience=2))
    assert standing.rounds_without_gain == 0 and standing.best == "student_2"
    for k in range(3, 8):
        standing = promotion.after_round(
            standing, f"student_{k}", scored(0.5), "x", rule(patience=None)
        )
    assert not standing.stopped and standing.rounds_without_gain == 5


def test_standings_round_trip_and_a_missing_one_names_the_file(tmp_path):
    standing = promotion.after_round(
        promotion.first("teacher", scored(0.8), "t"), "student_1", scored(0.9), "s1", rule()
    )
    (tmp_path / promotion.STANDING_FILE).write_text(standing.to_json())
    assert promotion.load_standing(tmp_path) == standing
    with pytest.raises(PipelineError, match=r"other/standing.json: not found"):
        promotion.load_standing(tmp_path / "other")


def test_the_weights_digest_changes_with_the_weights(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"a")
    (tmp_path / "card.json").write_text("{}")
    before = promotion.weights_digest(tmp_path)
    (tmp_path / "card.json").write_text('{"x": 1}')
    assert promotion.weights_digest(tmp_path) == before  # the weights only
    (tmp_path / "model.safetensors").write_bytes(b"b")
    assert promotion.weights_digest(tmp_path) != before


def test_with_promotion_off_every_student_teaches_the_next_round_whatever_it_scored():
    standing = promotion.first("teacher", scored(0.80), "t")
    for name, val_accuracy in (("student_1", 0.70), ("student_2", 0.60)):
        standing = promotion.after_round(
            standing, name, scored(val_accuracy), name, rule(margin=None)
        )
        assert standing.promoted and standing.best == name and not standing.stopped
    assert standing.best_val_accuracy == 0.60 and "promotion off" in standing.reason


def paired(wins: int, losses: int, both: int = 20) -> tuple[str, str]:
    """A holder's and a challenger's validation results: ``both`` images right for both, then
    ``wins`` only the challenger gets right, then ``losses`` only the holder does."""
    holder = "1" * both + "0" * wins + "1" * losses
    challenger = "1" * both + "1" * wins + "0" * losses
    return holder, challenger


def test_the_p_value_is_the_exact_one_sided_mcnemar_test_by_hand():
    holder, challenger = paired(wins=8, losses=2)
    # P(X >= 8), X ~ Binomial(10, 1/2) = (C(10,8) + C(10,9) + C(10,10)) / 2^10
    assert promotion.beats_p_value(challenger, holder) == pytest.approx(56 / 1024)
    assert promotion.beats_p_value(holder, challenger) == pytest.approx(1013 / 1024)
    assert promotion.beats_p_value(holder, holder) == 1.0  # no image tells them apart
    assert promotion.beats_p_value(challenger, "") is None  # nothing to pair with
    with pytest.raises(PipelineError, match="validation split changed"):
        promotion.beats_p_value(challenger, holder[:-1])


@pytest.mark.parametrize(("wins", "promoted"), [(8, False), (9, True)])
def test_with_alpha_a_student_must_also_win_the_paired_test(wins, promoted):
    holder, challenger = paired(wins=wins, losses=10 - wins)  # p = 0.055 and 0.011
    teacher = promotion.first("teacher", holder, "t")
    student = promotion.after_round(teacher, "student_1", challenger, "s1", rule(alpha=0.05))
    assert student.promoted is promoted and student.val_accuracy > teacher.val_accuracy
    assert student.p_value == pytest.approx((56 if wins == 8 else 11) / 1024)
    assert ("not significant at selection.alpha 0.05" in student.reason) is not promoted
    assert "McNemar p = " in student.reason
    # the best model's results stay the ones the next student is paired with
    assert student.best_val_correct == (challenger if promoted else holder)


def test_with_alpha_a_tie_is_not_promoted_and_without_it_the_p_value_is_still_recorded():
    holder, challenger = paired(wins=3, losses=3)
    teacher = promotion.first("teacher", holder, "t")
    tie = promotion.after_round(teacher, "student_1", challenger, "s1", rule(alpha=0.5))
    assert not tie.promoted and tie.p_value > 0.5
    same = promotion.after_round(teacher, "student_1", holder, "s1", rule(alpha=0.5))
    assert not same.promoted and same.p_value == 1.0
    assert promotion.after_round(teacher, "student_1", challenger, "s1", rule()).promoted


def test_the_exact_binomial_p_values_are_scipys():
    from scipy.stats import binomtest

    for n in [1, 2, 5, 10, 37, 180]:
        for k in sorted({0, 1, n // 3, n // 2, (n + 1) // 2, n - 1, n}):
            for alternative in ("two-sided", "greater", "less"):
                expected = binomtest(k, n, 0.5, alternative).pvalue
                got = promotion.binomial_half_p_value(k, n, alternative)
                assert got == pytest.approx(expected, rel=1e-9, abs=1e-300), (k, n, alternative)

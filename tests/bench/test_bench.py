"""The benchmarks' code paths on tiny configurations (so they cannot rot), and their arithmetic."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, load_params, shrink, write_params

from bench import accuracy, compare, scale, speed
from noisy_student.data.splits import UNKNOWN, Split


def tiny_params(tmp_path, **teacher):
    params = shrink(load_params())
    params["teacher"].update(epochs=4, **teacher)
    for student in params["students"]:
        student["epochs"] = 2
    params["pseudo_label"]["threshold"] = 0.1  # a 4-epoch teacher is rarely confident
    return write_params(tmp_path / "params.yaml", params)


def record(variant: str, seed: int, acc: dict, lpc: int = 3) -> dict:
    return {
        "key": ["digits", lpc, seed, variant],
        "dataset": "digits",
        "labels_per_class": lpc,
        "seed": seed,
        "variant": variant,
        "test_accuracy": acc,
        "pseudo_labels": {},
    }


def test_gap_closed_and_the_not_below_check():
    records = []
    for seed, (t, s1, s2, up) in enumerate([(0.80, 0.86, 0.90, 1.0), (0.84, 0.88, 0.92, 1.0)]):
        records.append(record("baseline", seed, {"teacher": t, "student_1": s1, "student_2": s2}))
        records.append(record(accuracy.UPPER, seed, {"teacher": t, "final": up}))
    v = accuracy.verdict(records, "student_2")
    assert v["gap_closed"] == pytest.approx((0.91 - 0.82) / (1.0 - 0.82))  # 50%: missed
    assert v["gap_closed_range"] == pytest.approx((0.5, 0.5))
    assert not v["gap_met"] and v["not_below"]
    table = accuracy.render(records)
    assert "| labeled only (the teacher) | 82.0 ± 2.8 (n=2) |" in table
    assert "50%, seeds 50 to 50%: **missed**" in table
    assert "| ablation: no student noise (configs/no_noise.yaml), round 1 | not run |" in table


def test_a_student_below_its_teacher_by_more_than_the_spread_is_flagged():
    teachers = [0.8, 0.81, 0.79]  # spread 1 pt; the student 5 pts below
    records = [
        record("baseline", s, {"teacher": t, "student_1": t - 0.05}) for s, t in enumerate(teachers)
    ]
    assert not accuracy.verdict(records, "student_1")["not_below"]


def test_pool_truth_from_hidden_labels_or_class_folders():
    def pool(ids, truth):
        n = len(ids)
        return Split(np.zeros((n, 2, 2, 3), np.uint8), ids, np.full(n, UNKNOWN), np.array(truth))

    classes = ["cat", "dog"]
    assert accuracy.pool_truth(pool(["a", "b"], [1, 0]), classes).tolist() == [1, 0]
    folders = pool(["dog/x.png", "cat/sub/y.png"], [UNKNOWN] * 2)
    assert accuracy.pool_truth(folders, classes).tolist() == [1, 0]
    assert accuracy.pool_truth(pool(["dog/x.png", "z.png"], [UNKNOWN] * 2), classes) is None


@pytest.mark.slow
def test_accuracy_benchmark_runs_shares_the_teacher_and_resumes(tmp_path):
    params = tiny_params(tmp_path)
    kwargs = dict(
        params_file=params,
        labels_per_class=[3],
        seeds=[0],
        variants=["baseline", "threshold_off"],
        work=tmp_path / "work",
        out_dir=tmp_path / "out",
    )
    text = accuracy.run(**kwargs)
    rows = accuracy.read_records(tmp_path / "out" / "accuracy.jsonl")
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {"baseline", accuracy.UPPER, "threshold_off"}
    base, upper = by_variant["baseline"], by_variant[accuracy.UPPER]
    assert list(base["test_accuracy"]) == ["teacher", "student_1", "student_2"]
    # one teacher for the cell: every run scores the same one
    teachers = {r["test_accuracy"]["teacher"] for r in rows}
    assert len(teachers) == 1
    # the upper bound learned from the truth: every pool row kept, all of them right
    assert upper["pseudo_labels"]["final"]["kept_accuracy"] == 1.0
    assert upper["pseudo_labels"]["final"]["kept"] == upper["pseudo_labels"]["final"]["pool_images"]
    threshold_off = by_variant["threshold_off"]["pseudo_labels"]["student_1"]
    assert threshold_off["kept"] == threshold_off["pool_images"]
    assert "digits, 3 labels/class" in text and "threshold off" in text
    csv = pd.read_csv(tmp_path / "out" / "accuracy.csv")
    assert set(csv["variant"]) == {"baseline", accuracy.UPPER, "threshold_off"}
    accuracy.run(**kwargs)  # everything recorded: nothing runs again
    assert len(accuracy.read_records(tmp_path / "out" / "accuracy.jsonl")) == len(rows)


@pytest.mark.slow
def test_speed_benchmark_times_fit_and_pseudo_label_against_the_bare_model(tmp_path):
    result = speed.run(
        params_file=tiny_params(tmp_path),
        device="cpu",
        sizes=(16,),
        model="test_resnet",
        seconds=0.2,
        epochs=3,
        out_dir=tmp_path,
    )
    (size,) = result["sizes"]
    # the warm-up epoch left out; the bare model timed before and after each timed epoch
    assert len(size["fit_ips"]) == 2 and len(size["bare_train_ips"]) == 3
    assert len(size["pseudo_label_ips"]) == 5 and len(size["bare_infer_ips"]) == 6
    assert size["train_ratio"] > 0 and size["pseudo_label_ratio"] > 0
    assert "**training ratio**" in (tmp_path / "speed_cpu.md").read_text()
    assert json.loads((tmp_path / "speed_cpu.json").read_text())["device_type"] == "cpu"


@pytest.mark.slow
def test_scale_benchmark_measures_a_fresh_process_per_pool(tmp_path):
    result = scale.run(
        pools=(300, 600),
        size=16,
        model="test_resnet",
        batch=64,
        params_file=tiny_params(tmp_path),
        out_dir=tmp_path,
    )
    small, large = result["pools"]
    assert large["pool_file_mb"] == pytest.approx(2 * small["pool_file_mb"], rel=0.01)
    assert small["rss_anon_growth_mb"] > 0 and large["seconds"] > 0
    # off a terminal the stage logs at most a line per 5 s, and a step quicker than that stays
    # silent (noisy_student/core/progress.py): pools this small may log nothing; what is logged is progress
    lines = large["progress_lines"]
    assert all(scale.PROGRESS.search(line) for line in lines)
    assert not lines or lines[-1].startswith("pseudo-label (teacher): 600/600 images (100%)")
    assert "| 600 |" in (tmp_path / "scale.md").read_text()


@pytest.mark.slow
def test_compare_runs_both_revisions_and_checks_their_tables(tmp_path):
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    result = compare.run(
        before=head,
        params_file=tiny_params(tmp_path),
        device="cpu",
        size=16,
        model="test_resnet",
        train_images=64,
        epochs=2,
        pool=512,
        repeats=1,
        out_dir=tmp_path,
    )
    assert result["tables_match"]
    assert len(result["measured"]["before"]["fit"]) == 1
    assert "speed-up" in (tmp_path / "compare_cpu.md").read_text()

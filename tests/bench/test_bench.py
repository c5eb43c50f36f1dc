"""The benchmarks' code paths on tiny configurations (so they cannot rot), and their arithmetic."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import accuracy, active, channels_last, compare, decode, foreign, scale, speed, storage
from noisy_student.core.errors import PipelineError
from noisy_student.core.settings import load_settings
from noisy_student.data.splits import UNKNOWN, Split
from tests.helpers.project import ROOT, write_params


@pytest.fixture
def bench_params(tiny_params, tmp_path) -> Path:
    """params.yaml shrunk further: 8 x 8 digits (the speed, scale and compare benchmarks set
    their own size), a 4-epoch teacher, one-epoch students."""
    params = tiny_params
    params["data"]["image_size"] = 8
    params["teacher"]["epochs"] = 4
    for student in params["students"]:
        student["epochs"] = 1
    params["pseudo_label"]["threshold"] = 0.1  # a 4-epoch teacher is rarely confident
    return write_params(tmp_path / "params.yaml", params)


def record(variant: str, seed: int, acc: dict, lpc: int = 3, champion: str | None = None) -> dict:
    return {
        "key": ["digits", lpc, seed, variant],
        "dataset": "digits",
        "labels_per_class": lpc,
        "seed": seed,
        "variant": variant,
        "test_accuracy": acc,
        "champion": champion or list(acc)[-1],
        "pseudo_labels": {},
    }


def test_gap_closed_by_the_model_shipped_and_the_every_seed_checks():
    records = []
    for seed, (t, s1, s2, up) in enumerate([(0.80, 0.86, 0.90, 1.0), (0.84, 0.88, 0.92, 1.0)]):
        records.append(record("baseline", seed, {"teacher": t, "student_1": s1, "student_2": s2}))
        records.append(record(accuracy.UPPER, seed, {"teacher": t, "final": up}))
    v = accuracy.verdict(records)
    assert v["gap_closed"] == pytest.approx((0.91 - 0.82) / (1.0 - 0.82))  # 50%: missed
    assert v["gap_closed_range"] == pytest.approx((0.5, 0.5))
    assert not v["gap_met"] and v["not_below"]
    table = accuracy.render(records)
    assert "| labeled only (the teacher) | 82.0 ± 2.8 (n=2) |" in table
    assert "50%, seeds 50 to 50%: **missed**" in table
    assert "no student noise" not in table  # a variant not run has no rows
    assert "| digits, 3 labels/class | 1 | baseline | 84.0 |" in table  # the per-seed table


def test_a_variant_with_more_rounds_than_params_yaml_shows_each_of_them():
    two = {"teacher": 0.8, "student_1": 0.86, "student_2": 0.9}
    three = {**two, "student_3": 0.94}
    pseudo = {name: {"pool_images": 10, "kept": 5, "kept_accuracy": 1.0} for name in three}
    records = [record("baseline", 0, two), record("three_rounds", 0, three)]
    records[1]["pseudo_labels"] = pseudo
    table = accuracy.render(records)
    again = "the last round's recipe again"
    assert f"{again}, round 2 | 90.0 ± 0.0 (n=1), +0.0 vs params.yaml |" in table
    assert f"{again}, round 3 | 94.0 ± 0.0 (n=1) |" in table  # the baseline has no round 3
    assert "| three_rounds, for round 3 | 50.0 / 100.0 |" in table


def test_a_loop_that_stopped_before_its_last_round_still_renders():
    # the stopped round's pseudo-label summary is all None (it labeled nothing)
    acc = {"teacher": 0.85, "student_1": 0.86, "student_2": 0.72}
    run = record("baseline", 0, acc, champion="teacher")
    done = {"pool_images": 10, "kept": 5, "kept_accuracy": 1.0}
    empty = dict.fromkeys(("pool_images", "above_threshold", "kept", "kept_accuracy"))
    run["pseudo_labels"] = {"student_1": done, "student_2": done, "student_3": empty}
    full = record("baseline", 1, {**acc, "student_3": 0.9})  # another seed ran round 3
    full["pseudo_labels"] = {"student_1": done, "student_2": done, "student_3": done}
    table = accuracy.render([run, full])
    assert "| baseline, for round 3 | 50.0 / 100.0 |" in table  # the seed that ran it alone


def test_a_model_shipped_below_its_teacher_on_one_seed_is_flagged():
    teachers = [0.8, 0.81, 0.79]
    worse = [
        record("baseline", s, {"teacher": t, "student_1": t - 0.05}) for s, t in enumerate(teachers)
    ]
    assert not accuracy.verdict(worse)["not_below"]  # promotion off: the student shipped
    kept = [
        record("baseline", s, {"teacher": t, "student_1": t - 0.05}, champion="teacher")
        for s, t in enumerate(teachers)
    ]
    verdict = accuracy.verdict(kept)  # promotion on: the teacher stayed the champion
    assert verdict["not_below"] and verdict["worst_gain"] == 0.0


def test_pool_truth_from_hidden_labels_or_class_folders():
    def pool(ids, truth):
        n = len(ids)
        return Split(np.zeros((n, 2, 2, 3), np.uint8), ids, np.full(n, UNKNOWN), np.array(truth))

    classes = ["cat", "dog"]
    assert accuracy.pool_truth(pool(["a", "b"], [1, 0]), classes).tolist() == [1, 0]
    folders = pool(["dog/x.png", "cat/sub/y.png"], [UNKNOWN] * 2)
    assert accuracy.pool_truth(folders, classes).tolist() == [1, 0]
    assert accuracy.pool_truth(pool(["dog/x.png", "z.png"], [UNKNOWN] * 2), classes) is None


def test_accuracy_benchmark_takes_its_steps_from_dvc_yaml(tiny_params, tmp_path):
    """The cell's steps (the teacher and what it needs) and a run's (the rest up to register)
    come from dvc.yaml as DVC reads it with the run's own rounds."""
    settings = load_settings(write_params(tmp_path / "params.yaml", tiny_params))
    cell, run = accuracy.loop_steps(settings)
    assert [s.stage for s in cell] == ["scan", "prepare", "augment", "train_teacher"]
    assert [s.stage for s in run] == [
        "augment",
        "pseudo_label@0",
        "train_student@0",
        "pseudo_label@1",
        "train_student@1",
        "evaluate",
        "register",
    ]
    assert [s.model for s in run if s.model] == ["student_1", "student_2"]
    one_round = load_settings(
        tmp_path / "params.yaml", {"students": [settings.students[0].model_dump(mode="json")]}
    )
    run = accuracy.loop_steps(one_round)[1]
    assert [s.stage for s in run if "@" in s.stage] == ["pseudo_label@0", "train_student@0"]


def test_variants_that_are_functions_of_params_yaml_add_a_round_or_weaken_the_last():
    params = ROOT / "params.yaml"
    rounds = load_settings(params, accuracy.variant_overrides("three_rounds", params)).students
    last = load_settings(params).students[-1]
    assert [(s.name, s.teacher) for s in rounds[-2:]] == [
        (last.name, last.teacher),
        (f"student_{len(rounds)}", last.name),
    ]
    assert rounds[-1].model_dump(exclude={"name", "teacher"}) == last.model_dump(
        exclude={"name", "teacher"}
    )
    weak = load_settings(params, accuracy.variant_overrides("weak_last_round", params))
    assert (weak.students[-1].epochs, weak.students[-1].warmup_epochs) == (4, 0)
    assert weak.students[:-1] == load_settings(params).students[:-1]


def test_compare_refuses_a_revision_without_the_package():
    with pytest.raises(PipelineError, match="noisy_student package"):
        compare.module_at("a726fc9", "noisy_student/pseudo_labels/labeling.py")


@pytest.mark.slow
def test_accuracy_benchmark_runs_shares_the_teacher_and_resumes(
    bench_params, tmp_path, monkeypatch
):
    # a variant whose changes params.yaml already has (say, once adopted as the default)
    seed = load_settings(bench_params).seed
    monkeypatch.setitem(accuracy.VARIANTS, "adopted", ("params.yaml's own seed", {"seed": seed}))
    kwargs = dict(
        params_file=bench_params,
        labels_per_class=[3],
        seeds=[0],
        variants=["baseline", "threshold_off", "no_promotion", "adopted"],
        work=tmp_path / "work",
        out_dir=tmp_path / "out",
    )
    text = accuracy.run(**kwargs)
    rows = accuracy.read_records(tmp_path / "out" / "accuracy.jsonl")
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {
        "baseline",
        accuracy.UPPER,
        "threshold_off",
        "no_promotion",
        "adopted",
    }
    base, upper = by_variant["baseline"], by_variant[accuracy.UPPER]
    # the model shipped is chosen on validation; with promotion off it is the last student, and
    # a run whose baseline promoted every round is the baseline's (nothing trained twice)
    assert base["champion"] in base["test_accuracy"] and set(base["promoted"]) == {
        "student_1",
        "student_2",
    }
    off = by_variant["no_promotion"]
    assert off["champion"] == "student_2" and all(off["promoted"].values())
    assert (off.get("same_as") == "baseline") == all(base["promoted"].values())
    # ...and a variant that changes nothing params.yaml has is the baseline's run, not trained
    adopted = by_variant["adopted"]
    assert adopted["same_as"] == "baseline"
    assert adopted["same_because"] == "params.yaml has these settings"
    assert adopted["test_accuracy"] == base["test_accuracy"]
    assert "(= baseline: params.yaml has these settings)" in text
    assert list(base["test_accuracy"]) == ["teacher", "student_1", "student_2"]
    # the steps dvc.yaml wires after the teacher, each timed
    assert list(base["seconds"]) == [
        "pseudo_label_student_1",
        "train_student_1",
        "pseudo_label_student_2",
        "train_student_2",
        "total",
    ]
    # one teacher for the cell: every run scores the same one
    teachers = {r["test_accuracy"]["teacher"] for r in rows}
    assert len(teachers) == 1
    # the upper bound learned from the truth: every pool row kept, all of them right
    assert upper["pseudo_labels"]["final"]["kept_accuracy"] == 1.0
    assert upper["pseudo_labels"]["final"]["kept"] == upper["pseudo_labels"]["final"]["pool_images"]
    # each run evaluated and registered in its own folder, on the cell's one dataset
    (cell,) = (tmp_path / "work").glob("digits-lpc3-seed0-*")
    for variant in (v for v, r in by_variant.items() if not r.get("same_as")):
        assert (cell / "runs" / variant / "registry.json").exists()
        assert (cell / "runs" / variant / "test_predictions" / "teacher.csv").exists()
    assert not list(cell.glob("runs/*/prepared"))
    threshold_off = by_variant["threshold_off"]["pseudo_labels"]["student_1"]
    assert threshold_off["above_threshold"] == threshold_off["pool_images"]
    assert "digits, 3 labels/class" in text and "threshold off" in text
    csv = pd.read_csv(tmp_path / "out" / "accuracy.csv")
    assert set(csv["variant"]) == set(by_variant)
    assert "the champion: best on validation" in text and "| seed |" in text
    accuracy.run(**kwargs)  # everything recorded: nothing runs again
    assert len(accuracy.read_records(tmp_path / "out" / "accuracy.jsonl")) == len(rows)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["per_image", "batched"])
def test_speed_benchmark_times_fit_and_pseudo_label_against_the_bare_model(
    bench_params, tmp_path, backend
):
    result = speed.run(
        params_file=bench_params,
        device="cpu",
        sizes=(16,),
        model="test_resnet",
        backend=backend,
        seconds=0.2,
        epochs=3,
        out_dir=tmp_path,
    )
    (size,) = result["sizes"]
    # the warm-up epoch left out; the bare model timed before and after each timed epoch
    assert len(size["fit_ips"]) == 2 and len(size["bare_train_ips"]) == 3
    assert len(size["pseudo_label_ips"]) == 5 and len(size["bare_infer_ips"]) == 6
    assert size["train_ratio"] > 0 and size["pseudo_label_ratio"] > 0
    # the steps alone leave out the validation pass and the checkpoints: never slower
    assert size["train_steps_ratio"] >= size["train_ratio"]
    stem = "speed_cpu" if backend == "per_image" else "speed_cpu_batched"
    assert "**training ratio**" in (tmp_path / f"{stem}.md").read_text()
    written = json.loads((tmp_path / f"{stem}.json").read_text())
    assert written["device_type"] == "cpu" and written["augment_backend"] == backend


@pytest.mark.slow
def test_channels_last_benchmark_alternates_both_formats_at_each_size(bench_params, tmp_path):
    result = channels_last.run(
        params_file=bench_params,
        sizes=(16,),
        model="test_resnet",
        seconds=0.1,
        repeats=2,
        out_dir=tmp_path,
    )
    (size,) = result["sizes"]
    for layout in channels_last.LAYOUTS:
        runs = size["runs"][layout]
        assert all(len(v) == 2 and min(v) > 0 for v in runs.values()), layout
        assert size["best"][layout]["fit_ips"] == max(runs["fit_ips"])
    gain = size["channels_last_over_contiguous"]["bare_train_ips"]
    best = size["best"]
    assert gain == best["channels_last"]["bare_train_ips"] / best["contiguous"]["bare_train_ips"]
    assert "**channels_last / contiguous**" in (tmp_path / "channels_last_cpu.md").read_text()
    settings = channels_last.in_layout(load_settings(bench_params), "channels_last")
    assert settings.runtime.cpu_channels_last_from == 1


@pytest.mark.slow
def test_scale_benchmark_measures_a_fresh_process_per_pool(bench_params, tmp_path):
    result = scale.run(
        pools=(300, 600),
        size=16,
        model="test_resnet",
        batch=64,
        params_file=bench_params,
        out_dir=tmp_path,
    )
    small, large = result["pools"]
    assert large["pool_file_mb"] == pytest.approx(2 * small["pool_file_mb"], rel=0.01)
    assert small["rss_anon_growth_mb"] > 0 and large["seconds"] > 0
    # off a terminal the stage logs at most a line per 5 s, and a step quicker than that stays
    # silent (noisy_student/core/progress.py): pools this small may log nothing; what is logged
    # is progress
    lines = large["progress_lines"]
    assert all(scale.PROGRESS.search(line) for line in lines)
    assert not lines or lines[-1].startswith("pseudo-label (teacher): 600/600 images (100%)")
    assert "| 600 |" in (tmp_path / "scale.md").read_text()


@pytest.mark.slow
def test_storage_benchmark_weighs_each_storage_with_its_dvc_cache(bench_params, tmp_path):
    result = storage.run(
        pools=(6,), size=64, sides=(100, 160), workers=(1,), params_file=bench_params,
        out_dir=tmp_path,
    )  # fmt: skip
    (pool,) = result["pools"]
    runs = {(r["storage"], r["cache_links"]): r for r in pool["runs"]}
    assert pool["photos"] == 6 + 2 * 3 * 20
    # hard links: the cache adds next to nothing; copies: a second copy of the prepared data
    for kind in ("arrays", "encoded"):
        linked, copied = runs[kind, "hardlink,copy"], runs[kind, "reflink,copy"]
        assert linked["prepared_and_cache_bytes"] < 1.1 * linked["prepared_bytes"]
        assert copied["prepared_and_cache_bytes"] > 1.9 * copied["prepared_bytes"]
    encoded = runs["encoded", "hardlink,copy"]
    assert (
        0.9 * pool["source_bytes"] < encoded["prepared_bytes"] < 1.1 * pool["source_bytes"] + 65536
    )
    assert encoded["read_images_per_s"] > 0
    assert encoded["label_images_per_s_w0"] > 0 and encoded["label_images_per_s_w2"] > 0
    assert "label_images_per_s_w0" not in runs["encoded", "reflink,copy"]
    assert "| encoded | hardlink,copy |" in (tmp_path / "storage.md").read_text()


@pytest.mark.slow
def test_compare_runs_both_revisions_and_checks_their_tables(bench_params, tmp_path):
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    result = compare.run(
        before=head,
        params_file=bench_params,
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


def test_foreign_images_are_no_two_alike_and_make_the_share_of_the_pool_asked(tmp_path):
    images = foreign.foreign_images(300, seed=0)
    assert len({i.tobytes() for i in images}) == 300 and images[0].shape == (8, 8)
    settings = load_settings(overrides={"seed": 1})
    root = foreign.write_dataset(tmp_path / "data", settings, fraction=0.2)
    pool = root / "unlabeled"
    digits = [p for p in pool.rglob("*.png") if p.parent.name != foreign.FOREIGN]
    photos = list((pool / foreign.FOREIGN).glob("*.png"))
    assert len(photos) / (len(photos) + len(digits)) == pytest.approx(0.2, abs=0.001)
    assert {p.name for p in (root / "labeled").iterdir()} == {str(c) for c in range(10)}
    assert len(list((root / "labeled").rglob("*.png"))) == 10 * settings.data.labels_per_class


@pytest.mark.slow
def test_foreign_benchmark_counts_what_each_round_did_with_the_foreign_images(
    bench_params, tmp_path
):
    out = tmp_path / "out"
    text = foreign.run(params_file=bench_params, fractions=[0.5], seeds=[0],
                       work=tmp_path / "work", out_dir=out)  # fmt: skip
    counts = {r["variant"]: r for r in accuracy.read_records(out / "foreign_pseudo.jsonl")}
    assert set(counts) == {"baseline", "ood_filter", "ood_knn"}
    for variant, row in counts.items():
        for n in row["rounds"].values():
            assert n["foreign_images"] == n["pool_images"] - n["foreign_images"]  # half of it
            assert n["kept_right"] <= n["kept"] - n["foreign_trained"]
            if variant == "baseline":
                assert n["foreign_flagged"] == n["digits_flagged"] == 0
            else:
                assert n["foreign_trained"] <= n["foreign_images"] - n["foreign_flagged"]
    for label in ("off", "energy (0.95)", "kNN (0.95)"):
        assert f"| 50% | 0 | {label} | student_1 |" in text
    foreign.run(params_file=bench_params, fractions=[0.5], seeds=[0],
                work=tmp_path / "work", out_dir=out)  # fmt: skip  # all recorded: nothing runs
    assert len(accuracy.read_records(out / "foreign_pseudo.jsonl")) == 3


@pytest.mark.slow
def test_active_benchmark_moves_the_picks_into_the_labeled_folders_and_retrains(
    bench_params, tmp_path
):
    out, work = tmp_path / "out", tmp_path / "work"
    text = active.run(params_file=bench_params, counts=[4], seeds=[0], work=work, out_dir=out)
    rows = {r["strategy"]: r for r in accuracy.read_records(out / "active.jsonl")}
    assert set(rows) == {"none", "random", "least_confident", "margin"}
    for strategy in ("random", "least_confident", "margin"):
        root = work / "data" / f"digits-seed0-{strategy}-4"
        labeled = {p.relative_to(root / "labeled").as_posix() for p in root.glob("labeled/*/*")}
        assert set(rows[strategy]["picked"]) <= labeled and len(labeled) == 30 + 4
        assert not any((root / "unlabeled" / i).exists() for i in rows[strategy]["picked"])
    runs = next((work / "runs").iterdir())
    picked = pd.read_csv(runs / "picks-least_confident-4" / "picked.csv", dtype={"id": str})
    assert picked["id"].tolist() == rows["least_confident"]["picked"]  # to_label's own picks
    assert "| 4 | least_confident |" in text and "| 0 | - |" in text
    active.run(params_file=bench_params, counts=[4], seeds=[0], work=work, out_dir=out)
    assert len(accuracy.read_records(out / "active.jsonl")) == 4  # all recorded: nothing reruns


@pytest.mark.slow
def test_active_benchmark_with_the_loop_records_the_model_each_loop_ships(bench_params, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    text = active.run(params_file=bench_params, counts=[4], seeds=[0], work=work, out_dir=out,
                      loop=True, strategies=("least_confident",))  # fmt: skip
    rows = {r["strategy"]: r for r in accuracy.read_records(out / "active_loop.jsonl")}
    assert set(rows) == {"none", "least_confident"}
    runs = next((work / "runs").iterdir())
    for strategy, folder in (("none", "none"), ("least_confident", "least_confident-4")):
        row = rows[strategy]
        metrics = json.loads((runs / folder / "metrics.json").read_text())  # evaluate's
        assert list(row["models"]) == ["teacher", "student_1", "student_2"]
        assert row["shipped"] == metrics[row["champion"]]["test_accuracy"]
        assert row["test_accuracy"] == metrics["teacher"]["test_accuracy"]
    assert "shipped model's test accuracy" in text and "| 0 | 4 | least_confident |" in text
    assert not (out / "active.jsonl").exists()  # the teachers-only table is another file


def test_decode_benchmark_compares_whole_and_scaled_decodes_of_the_same_photos(tmp_path):
    text = decode.run(ranges=[(100, 140), (700, 900)], photos=3, size=64, repeats=1,
                      out_dir=tmp_path)  # fmt: skip
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    small, large = rows
    assert small["gap_mean"] == 0.0  # under twice the view's side: decoded whole either way
    assert 0 < large["gap_mean"] <= large["gap_worst"] < 10
    assert large["speedup"] == large["scaled_ips"] / large["whole_ips"]  # measured, not timed
    assert "| 700-900 | 3 |" in text and text == (tmp_path / "decode.md").read_text()

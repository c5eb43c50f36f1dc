"""params.yaml validation: every bad key or value stops the run with one line naming it."""

from __future__ import annotations

import pytest

from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings, apply_overrides, expand_overrides, load_settings
from tests.helpers.entry import run_main
from tests.helpers.project import ROOT, write_params


def test_shipped_params_validate():
    settings = load_settings(ROOT / "params.yaml")
    assert settings.model_names()[0] == "teacher"
    assert len(settings.students) >= 2
    assert settings.data.source == "digits"


def error_for(tmp_path, params) -> str:
    with pytest.raises(PipelineError) as info:
        load_settings(write_params(tmp_path / "params.yaml", params))
    return str(info.value)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda p: p["teacher"].update(epochs=-3),
            "teacher.epochs: Input should be greater than 0",
        ),
        (lambda p: p["pseudo_label"].update(threshold=1.5), "pseudo_label.threshold:"),
        (lambda p: p["pseudo_label"].update(threshold=-0.1), "pseudo_label.threshold:"),
        (
            lambda p: p["selection"].update(alpha=1.0),
            "selection.alpha: Input should be less than 1",
        ),
        (lambda p: p["teacher"].update(lr="fast"), "teacher.lr: Input should be a valid number"),
        (lambda p: p["data"].update(labels_per_class=2.5), "data.labels_per_class:"),
        (lambda p: p.update(seeed=1), "seeed: unknown key (a typo?)"),
        (lambda p: p["teacher"].update(modle="resnet18"), "teacher.modle: unknown key"),
        (lambda p: p["data"].pop("image_size"), "data.image_size: missing key"),
        (lambda p: p["data"].update(source="csv"), "data.source:"),
        (lambda p: p["teacher"].update(model="resnet_does_not_exist"), "unknown timm model"),
        (lambda p: p["teacher"].update(model="timm/resnet18"), "Use 'hf-hub:timm/resnet18'"),
        (lambda p: p["teacher"].update(model="local-dir:/nowhere"), "/nowhere has no config"),
        (lambda p: p["runtime"].update(device="gpu"), "runtime.device: String should match"),
        (lambda p: p["students"][1].update(teacher="teacher"), "students[1].teacher must be"),
        (lambda p: p["students"][0].update(name="big"), "students[0].name must be 'student_1'"),
        (lambda p: p.update(students=[]), "students:"),
        (lambda p: p["data"].update(source="folders"), "data.labeled_dir must name a folder"),
        (lambda p: p["teacher"].update(warmup_epochs=500), "warmup_epochs must be smaller"),
        (lambda p: p["students"][1].update(ema_decay=1.0), "students.1.ema_decay:"),
        (lambda p: p["augment"]["student"].update(rotate_p=2), "augment.student.rotate_p:"),
        (
            lambda p: p["students"][0].update(mixup_p=0.6, cutmix_p=0.5),
            "students.0: mixup_p + cutmix_p must not exceed 1",
        ),
        (lambda p: p["teacher"].update(cutmix_p=0.5, cutmix_alpha=0), "cutmix_p > 0 needs"),
        (lambda p: p["teacher"].update(transfer="freeze"), "teacher.transfer: Input should be"),
        (lambda p: p["teacher"].update(pretrained="w/no.safetensors"), "'w/no.safetensors' not"),
        (lambda p: p["teacher"].update(ensemble=["resnet_nope"]), "teacher.ensemble.0: unknown"),
        (lambda p: p["teacher"].update(backbone_lr_scale=0), "teacher.backbone_lr_scale:"),
        (lambda p: p["students"][1].update(randaugment_m=30), "students.1.randaugment_m:"),
        (lambda p: p["pseudo_label"].update(labels="medium"), "pseudo_label.labels: Input should"),
        (lambda p: p["pseudo_label"].update(per_class=0), "pseudo_label.per_class:"),
        (lambda p: p["distill"].update(alpha=1.5), "distill.alpha:"),
        (lambda p: p["distill"].pop("temperature"), "distill.temperature: missing key"),
        (lambda p: p["runtime"].update(num_workers="many"), "runtime.num_workers:"),
        (lambda p: p["pseudo_label"].update(ood_score="mahalanobis"), "pseudo_label.ood_score:"),
        (lambda p: p["pseudo_label"].update(ood_neighbours=0), "pseudo_label.ood_neighbours:"),
        (lambda p: p["students"][0].update(epoch_patience=0), "students.0.epoch_patience:"),
        (lambda p: p["to_label"].update(count=0), "to_label.count: Input should be greater"),
        (lambda p: p["to_label"].update(strategy="entropy"), "to_label.strategy: Input should"),
        (lambda p: p.pop("to_label"), "to_label: missing key"),
    ],
)
def test_bad_values_name_the_key(tmp_path, params, edit, expected):
    edit(params)
    message = error_for(tmp_path, params)
    assert expected in message
    assert message.startswith(str(tmp_path / "params.yaml"))


def test_not_a_mapping_and_missing_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(PipelineError, match="expected a mapping"):
        load_settings(path)
    with pytest.raises(PipelineError, match="file not found"):
        load_settings(tmp_path / "nope.yaml")


def test_overrides_are_validated_like_params(params):
    raw = apply_overrides(params, {"pseudo_label.threshold": 0.9, "students.1.model": "resnet18"})
    settings = Settings.model_validate(raw)
    assert settings.pseudo_label.threshold == 0.9
    assert settings.students[1].model == "resnet18"
    with pytest.raises(PipelineError, match="no key 'treshold'"):
        apply_overrides(params, {"pseudo_label.treshold": 0.9})


def test_a_star_stands_for_every_round(params):
    params["students"].append({**params["students"][-1], "name": "student_9"})
    raw = apply_overrides(params, {"students.*.drop_rate": 0.0, "students.1.drop_rate": 0.2})
    assert [s["drop_rate"] for s in raw["students"]] == [0.0, 0.2] + [0.0] * (
        len(raw["students"]) - 2
    )
    assert expand_overrides(params, {"students.*.epochs": 3}) == {
        f"students.{i}.epochs": 3 for i in range(len(params["students"]))
    }
    with pytest.raises(PipelineError, match=r"'teacher.\*.lr': .* teacher is not a list"):
        apply_overrides(params, {"teacher.*.lr": 0.1})
    with pytest.raises(PipelineError, match="no key 'lrr'"):
        apply_overrides(params, {"students.*.lrr": 0.1})


def test_overrides_leave_the_original_untouched(params):
    before = params["pseudo_label"]["threshold"]
    apply_overrides(params, {"pseudo_label.threshold": before / 2})
    assert params["pseudo_label"]["threshold"] == before


def test_cli_prints_one_line_and_exits_non_zero(tmp_path, params, monkeypatch, capsys):
    params["pseudo_label"]["threshold"] = 2
    bad = write_params(tmp_path / "bad.yaml", params)
    monkeypatch.chdir(tmp_path)  # an empty project folder: what the stage writes lands here
    assert run_main("tasks.prepare", ["--params", str(bad)]) == 2
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert lines == [
        f"error: {bad}: pseudo_label.threshold: Input should be less than or equal to 1, got 2"
    ]
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # stopped before any work
    assert not Layout.at(tmp_path).prepared.exists()


def test_model_and_device_names_as_timm_and_pytorch_write_them(params):
    raw = apply_overrides(
        params,
        {
            "teacher.model": "resnet18.a1_in1k",
            "students.0.model": "hf-hub:timm/resnet18.a1_in1k",
            "runtime.device": "cuda:1",
        },
    )
    settings = Settings.model_validate(raw)
    assert settings.students[0].model == "hf-hub:timm/resnet18.a1_in1k"
    assert settings.runtime.device == "cuda:1"


def test_loader_workers_auto_leaves_the_cpu_to_the_model_and_feeds_a_gpu(monkeypatch):
    import torch

    from noisy_student.data.loaders import loader_workers

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert loader_workers(3, torch.device("cpu")) == 3  # a number is taken as it is
    assert loader_workers("auto", torch.device("cpu")) == 0
    assert loader_workers("auto", torch.device("cuda", 0)) == 8  # 15 cores free: at most 8
    assert loader_workers("auto", torch.device("cuda", 0), processes=4) == 3  # 4 cores each
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert loader_workers("auto", torch.device("cuda", 0), processes=4) == 1


def test_a_model_name_timm_confirmed_once_is_checked_without_importing_timm(tmp_path, monkeypatch):
    """The confirmed-names cache spares scan and prepare the 3-4 s of importing timm; an unknown
    name is never cached, so it still reaches timm and its error."""
    import subprocess
    import sys

    from noisy_student.core.settings import confirmed_names_file, known_timm_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert known_timm_model("resnet18") == "resnet18"
    with pytest.raises(ValueError, match="unknown timm model 'resnet_9000'"):
        known_timm_model("resnet_9000")
    assert confirmed_names_file().read_text() == "resnet18\n"
    check = (
        "import sys; from noisy_student.core.settings import known_timm_model as k; "
        "k('resnet18'); print(sorted(m for m in ('timm', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr

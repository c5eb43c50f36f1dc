"""Training stage: a real (tiny) teacher and student, tracked in a real MLflow store."""

from __future__ import annotations

import mlflow
import pytest

from noisy_student.augment.artifacts import augment
from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.data.prepare import prepare
from noisy_student.evaluation.evaluate import evaluate
from noisy_student.models.classifier import load_checkpoint
from noisy_student.pseudo_labels.labeling import pseudo_label
from noisy_student.training.train import check_round_flags, train


def test_round_flags_must_match_params(params):
    settings = Settings.model_validate(params)
    s1 = params["students"][0]
    flags = ["--name", "student_1", "--model", s1["model"], "--lr", str(s1["lr"])]
    check_round_flags(settings, "student_1", flags[2:])
    check_round_flags(settings, "student_1", ["--transfer", "finetune", "--cutmix_p", "0.0"])
    with pytest.raises(PipelineError, match="--lr 9.0 differs from params.yaml"):
        check_round_flags(settings, "student_1", ["--lr", "9"])
    check_round_flags(settings, "student_1", ["--ema_decay", "None"])  # how DVC writes a null
    with pytest.raises(PipelineError, match="--ema_decay 0.999 differs from params.yaml"):
        check_round_flags(settings, "student_1", ["--ema_decay", "0.999"])
    ema = params | {"students": [s1 | {"ema_decay": 0.999}, *params["students"][1:]]}
    check_round_flags(Settings.model_validate(ema), "student_1", ["--ema_decay", "0.999"])
    with pytest.raises(PipelineError, match="--ema_decay None differs from params.yaml"):
        check_round_flags(Settings.model_validate(ema), "student_1", ["--ema_decay", "None"])
    with pytest.raises(PipelineError, match="unknown option --colour"):
        check_round_flags(settings, "student_1", ["--colour", "red"])


@pytest.mark.slow
def test_teacher_student_loop_tracks_every_run(tmp_path, tiny_params, monkeypatch):
    """Every technique at once: an ensemble teacher, soft, top-k and balanced pseudo-labels, a
    student under RandAugment, MixUp/CutMix and label smoothing, distilled from its teacher."""
    monkeypatch.chdir(tmp_path)  # MLflow's artifact root defaults to ./mlruns
    tiny_params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    tiny_params["students"] = tiny_params["students"][:1]
    tiny_params["teacher"].update(ensemble=["test_resnet"], epochs=12)  # enough to beat chance
    tiny_params["students"][0]["epochs"] = 2
    # top 3 of 10 classes: the soft labels and the clean teacher's outputs held sparse
    tiny_params["pseudo_label"].update(labels="soft", temperature=0.5, balance=True, top_k=3)
    tiny_params["distill"]["enabled"] = True
    tiny_params["students"][0].update(
        mixup_p=0.3, cutmix_p=0.5, label_smoothing=0.1, randaugment_n=2, randaugment_m=9
    )
    settings = Settings.model_validate(tiny_params)
    layout = Layout.at(tmp_path)
    prepare(settings, layout)
    augment(settings, layout)

    history = train(settings, "teacher", layout)
    epochs = settings.teacher.epochs
    assert len(history) == 2 * epochs  # two members
    for member in (history[:epochs], history[epochs:]):
        assert member[-1].train_loss < member[0].train_loss
        assert member[-1].val_accuracy > 0.3  # ten classes: chance is 0.1

    summary = pseudo_label(settings, "student_1", layout)
    assert summary["kept"] > 0
    assert len(set(summary["trained_per_class"].values()) - {0}) == 1  # balanced
    train(settings, "student_1", layout)
    metrics = evaluate(settings, layout)
    assert set(metrics) == {"teacher", "student_1"}
    assert metrics["teacher"]["model"] == "test_resnet+test_resnet"
    assert {"member_0_test_accuracy", "member_1_test_accuracy"} <= set(metrics["teacher"])

    mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[settings.mlflow.experiment], output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"loop", "teacher", "teacher.member_0", "teacher.member_1", "student_1"}
    teacher, student = by_name["teacher"], by_name["student_1"]
    for r in (teacher, student):  # no orchestrator's run: the loop's own groups them
        assert r.data.tags["mlflow.parentRunId"] == by_name["loop"].info.run_id
    for k in (0, 1):
        member = by_name[f"teacher.member_{k}"]
        assert member.data.tags["mlflow.parentRunId"] == teacher.info.run_id
        assert member.data.params["seed"] == str(settings.seed + 1000 * k)
        assert member.data.metrics["test_accuracy"] == pytest.approx(
            metrics["teacher"][f"member_{k}_test_accuracy"]
        )
    assert teacher.data.tags["stage"] == "teacher" and teacher.data.tags["round"] == "0"
    assert student.data.tags["stage"] == "student" and student.data.tags["round"] == "1"
    assert student.data.params["model.drop_rate"] == str(settings.students[0].drop_rate)
    assert student.data.params["distill.enabled"] == "True"
    assert student.data.params["model.cutmix_p"] == "0.5"
    client = mlflow.MlflowClient()
    losses = client.get_metric_history(by_name["teacher.member_1"].info.run_id, "train_loss")
    assert [m.step for m in losses] == list(range(1, epochs + 1))
    assert teacher.data.metrics["test_accuracy"] == pytest.approx(
        metrics["teacher"]["test_accuracy"]
    )
    assert all(r.info.status == "FINISHED" for r in runs)
    artifacts = [a.path for a in client.list_artifacts(student.info.run_id)]
    assert "train_batch.png" in artifacts
    logged = mlflow.search_logged_models(
        experiment_ids=[teacher.info.experiment_id], output_format="list"
    )
    assert len(logged) == 2

    model, card = load_checkpoint(layout.model("student_1"))
    assert card.mlflow_run_id == student.info.run_id and card.classes == [str(i) for i in range(10)]
    ensemble, card = load_checkpoint(layout.model("teacher"))
    assert len(ensemble.nets) == 2 and card.members[1].weights == "member_1.safetensors"


def test_failed_training_ends_its_mlflow_run_failed(tmp_path, tiny_params, monkeypatch):
    import noisy_student.training.train

    def broken_fit(*args, **kwargs):
        raise RuntimeError("out of memory, say")

    monkeypatch.chdir(tmp_path)
    tiny_params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    settings = Settings.model_validate(tiny_params)
    layout = Layout.at(tmp_path)
    prepare(settings, layout)
    augment(settings, layout)
    monkeypatch.setattr(noisy_student.training.train, "fit", broken_fit)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(settings, "teacher", layout)
    mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["noisy-student"], output_format="list")
    (failed,) = [r for r in runs if r.info.run_name == "teacher"]
    assert failed.info.status == "FAILED"
    assert not layout.model("teacher").exists()
    with pytest.raises(PipelineError, match="run the pseudo_label stage first"):
        train(settings, "student_1", layout.replace(pseudo_labels=tmp_path / "nowhere"))
    with pytest.raises(PipelineError, match="unknown model 'student_9'"):
        train(settings, "student_9", layout)

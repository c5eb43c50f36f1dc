"""Transfer learning: the frozen backbone, the learning rate of every parameter group, and
pretrained weights through timm's own loader from a local file."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.scheduler import CosineLRScheduler

from noisy_student.core.errors import PipelineError
from noisy_student.core.settings import ModelTraining, RuntimeSettings
from noisy_student.data.loaders import TrainingImages
from noisy_student.data.splits import UNKNOWN, Split
from noisy_student.losses.mixing import one_hot
from noisy_student.models.classifier import Classifier, create_model, normalization
from noisy_student.models.inference import device_memory_format, eval_loader, iter_probabilities
from noisy_student.models.transfer import (
    backbone_modules,
    create_optimizer,
    freeze_backbone,
    parameter_groups,
)
from noisy_student.training.loop import FitConfig, fit
from tests.helpers.project import load_params

CPU = RuntimeSettings.model_validate(
    {**load_params()["runtime"], "device": "cpu", "num_workers": 0}
)


def spec(**changes) -> ModelTraining:
    teacher = {k: v for k, v in load_params()["teacher"].items() if k != "ensemble"}
    teacher.update(model="resnet10t", epochs=1, warmup_epochs=0, batch_size=8, lr=0.01)
    return ModelTraining.model_validate({**teacher, **changes})


def tiny_data(n: int = 16, size: int = 16) -> tuple[TrainingImages, Split]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % 3
    train = TrainingImages(images, np.arange(n), one_hot(labels, 3), np.zeros(n))
    val = Split(images[:4], [str(i) for i in range(4)], labels[:4], np.full(4, UNKNOWN))
    return train, val


def test_linear_probe_trains_the_head_only():
    recipe = spec(transfer="linear_probe")
    torch.manual_seed(0)
    model = create_model(recipe, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = tiny_data()
    fit(model, train, val, FitConfig(recipe, CPU, torch.device("cpu"), 0, "probe", 16))
    after = model.state_dict()
    assert set(after) == set(before)  # plain BatchNorm again: loads into a fresh timm model
    head = {k for k in before if k.startswith("fc.")}
    assert head == {"fc.weight", "fc.bias"}
    for key in before:
        if key in head:
            assert not torch.equal(before[key], after[key]), key
        else:  # weights and BatchNorm statistics, bit for bit
            assert torch.equal(before[key], after[key]), key


def test_finetune_trains_the_backbone_too():
    recipe = spec()
    torch.manual_seed(0)
    model = create_model(recipe, 3)
    before = model.conv1[0].weight.clone()
    train, val = tiny_data()
    fit(model, train, val, FitConfig(recipe, CPU, torch.device("cpu"), 0, "finetune", 16))
    assert not torch.equal(before, model.conv1[0].weight)


def test_backbone_is_everything_beside_the_classifier():
    model = timm.create_model("resnet10t", num_classes=3)
    assert "fc" not in backbone_modules(model) and "layer4" in backbone_modules(model)
    convnext = timm.create_model("convnext_atto", num_classes=3)  # classifier at head.fc
    names = backbone_modules(convnext)
    assert "stages" in names and "head.norm" in names and "head" not in names


def lrs_after_warmup(model, recipe) -> list[tuple[bool, float, float]]:
    optimizer = create_optimizer(model, recipe)
    scheduler = CosineLRScheduler(optimizer, t_initial=100, warmup_t=0, t_in_epochs=False)
    scheduler.step_update(0)  # the schedule's first value: the base lr
    return [(g["head"], g["lr_scale"], g["lr"]) for g in optimizer.param_groups]


def test_each_parameter_group_carries_its_configured_learning_rate():
    recipe = spec(lr=0.1, backbone_lr_scale=0.01, layer_decay=1.0)
    model = timm.create_model("resnet10t", num_classes=3)
    groups = lrs_after_warmup(model, recipe)
    assert {head for head, _, _ in groups} == {True, False}
    for head, _, lr in groups:
        # the notes' recipe: the backbone 100x lower than the head
        assert lr == pytest.approx(0.1 if head else 0.001)
    # every parameter in exactly one group; biases and norms without weight decay
    optimizer = create_optimizer(model, recipe)
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})
    for group in optimizer.param_groups:
        assert group["weight_decay"] in (0.0, recipe.weight_decay)
        if group["weight_decay"] == 0.0:
            assert all(p.ndim <= 1 for p in group["params"])


def test_layer_decay_scales_each_earlier_layer_once_more():
    recipe = spec(lr=0.1, backbone_lr_scale=0.5, layer_decay=0.5)
    model = timm.create_model("resnet10t", num_classes=3)
    groups = parameter_groups(model, recipe)
    head = [g for g in groups if g["head"]]
    assert [g["lr_scale"] for g in head] == [1.0, 1.0]  # weights and bias of the classifier
    depth = {  # layer id of each backbone group, from timm's grouping (stem 0 ... layer4 4)
        round(np.log(g["lr_scale"] / 0.5) / np.log(0.5)) for g in groups if not g["head"]
    }
    assert depth == {1, 2, 3, 4, 5}
    for _, scale, lr in lrs_after_warmup(model, recipe):
        assert lr == pytest.approx(0.1 * scale)


def test_linear_probe_optimizes_the_head_only():
    recipe = spec(transfer="linear_probe")
    model = create_model(recipe, 3)
    freeze_backbone(model)
    groups = parameter_groups(model, recipe)
    assert all(g["head"] for g in groups)
    assert sum(p.numel() for g in groups for p in g["params"]) == 3 * 512 + 3


def test_adamw_is_fused_on_the_cpu():
    # its default on the CPU, a Python loop over tensors, took a fifth of a training step
    optimizer = create_optimizer(create_model(spec(), 3), spec())
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]


def test_pretrained_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet10t", num_classes=10)  # say, a model trained elsewhere
    weights = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, weights)
    model = create_model(spec(pretrained=str(weights)), 3)
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
    assert torch.equal(model.layer4[0].bn1.running_var, source.layer4[0].bn1.running_var)
    assert model.fc.weight.shape == (3, 512)  # a new head for this task's classes


def test_weights_that_do_not_fit_or_carry_pickles_are_refused(tmp_path):
    other = tmp_path / "resnet18.safetensors"
    state = timm.create_model("resnet18", num_classes=10).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, other)
    with pytest.raises(PipelineError, match=r"resnet18.safetensors: do not fit 'resnet10t'"):
        create_model(spec(pretrained=str(other)), 3)

    class Payload:  # what an untrusted pickle could run on load
        def __reduce__(self):
            return (print, ("this ran",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"conv1.0.weight": Payload()}, protocol=2))
    with pytest.raises(PipelineError, match="evil.pth: cannot be loaded as weights"):
        create_model(spec(pretrained=str(evil)), 3)


def test_hub_weights_go_through_timms_loader_and_fail_clearly_offline(monkeypatch):
    import huggingface_hub.constants

    # this machine has no network: make the hub say so at once instead of retrying
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError, match="pretrained: true: timm could not fetch the weights"):
        create_model(spec(pretrained=True), 3)


def test_a_model_saved_by_timm_in_a_local_folder_is_a_model_name(tmp_path):
    from timm.models._hub import save_for_hf

    torch.manual_seed(2)
    source = timm.create_model("resnet10t", num_classes=10)
    save_for_hf(source, str(tmp_path / "mine"), safe_serialization=True)
    name = f"local-dir:{tmp_path / 'mine'}"
    model = create_model(spec(model=name, pretrained=True), 3)  # as timm.create_model names it
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
    assert model.fc.weight.shape == (3, 512)
    assert create_model(spec(model=name), 3).fc.weight.shape == (3, 512)  # random init, same net


def test_a_hub_model_name_is_accepted_and_fails_clearly_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    recipe = spec(model="hf-hub:timm/resnet10t.c3_in1k")  # the settings check accepts it
    with pytest.raises(PipelineError, match="could not be read from the Hugging Face Hub"):
        create_model(recipe, 3)


def fit_remembering(recipe: ModelTraining, keep: str, train, val):
    """A model fitted from seed 0 keeping ``keep``, its history, and every epoch's raw weights
    as they stood when the epoch was validated."""
    torch.manual_seed(0)
    model = create_model(recipe, 3)
    states = {}

    def remember(result):
        states[result.epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    config = FitConfig(recipe, CPU, torch.device("cpu"), 0, keep, 16, on_epoch=remember, keep=keep)
    history = fit(model, train, val, config)
    return model, history, states


def test_keep_best_ends_with_the_best_validation_epoch_and_last_with_the_last():
    recipe = spec(epochs=4, lr=0.05)
    train, val = tiny_data()
    kept = {}
    for keep in ("best", "last"):
        model, history, states = fit_remembering(recipe, keep, train, val)
        kept[keep] = (model.state_dict(), history, states)
    state, history, states = kept["best"]
    best = max(h.val_accuracy for h in history)
    chosen = max(h.epoch for h in history if h.val_accuracy == best)  # a tie: the later epoch
    for key, value in state.items():
        assert torch.equal(value, states[chosen][key]), key
    state, history, states = kept["last"]
    for key, value in state.items():
        assert torch.equal(value, states[len(history)][key]), key
    assert all(0 < h.val_seconds < h.seconds for h in history)  # the validation pass's share


def stop_of(history, patience: int) -> tuple[int, int]:
    """Where a training with this patience stops, read off a full run's history: the first epoch
    done that many epochs after the best so far (a tie moves the best), and that best epoch."""
    best, best_epoch = -1.0, 0
    for h in history:
        if h.epoch - 1 - best_epoch >= patience and best_epoch:
            return h.epoch - 1, best_epoch
        if h.val_accuracy >= best:
            best, best_epoch = h.val_accuracy, h.epoch
    return history[-1].epoch, best_epoch


def test_patience_stops_at_a_plateau_with_the_model_a_full_run_had_then(tmp_path):
    from noisy_student.training.resume import MemberCheckpoint

    recipe = spec(epochs=12, lr=0.05, epoch_patience=1)
    train, val = tiny_data()
    _, full, states = fit_remembering(
        recipe.model_copy(update={"epoch_patience": None}), "best", train, val
    )
    stop, best_epoch = stop_of(full, patience=1)
    assert stop < recipe.epochs  # this run has a plateau: the test would prove nothing otherwise

    def run(folder, keep):
        torch.manual_seed(0)
        model = create_model(recipe, 3)
        config = FitConfig(
            recipe, CPU, torch.device("cpu"), 0, "p", 16, keep=keep,
            checkpoint=MemberCheckpoint(folder, "m", every=1),
        )  # fmt: skip
        history = fit(model, train, val, config)
        return model.state_dict(), history

    for keep, epoch in (("best", best_epoch), ("last", stop)):
        folder = tmp_path / keep
        kept, history = run(folder, keep)
        assert [h.val_accuracy for h in history] == [h.val_accuracy for h in full[:stop]]
        for key, value in kept.items():
            assert torch.equal(value, states[epoch][key]), (keep, key)
        # killed after the stop, before the model was written: the rerun resumes, stops at once
        resumed, history = run(folder, keep)
        assert len(history) == stop
        for key, value in kept.items():
            assert torch.equal(value, resumed[key]), (keep, key)


def test_a_device_this_machine_lacks_is_refused_by_name():
    from noisy_student.models.classifier import resolve_device

    assert resolve_device(CPU) == torch.device("cpu")
    if torch.cuda.device_count() < 2:
        with pytest.raises(PipelineError, match=r"'cuda:1' but this machine has \d CUDA device"):
            resolve_device(CPU.model_copy(update={"device": "cuda:1"}))


def test_a_moving_average_of_the_weights_is_what_is_validated_and_kept():
    from noisy_student.models.classifier import Classifier, normalization
    from noisy_student.models.inference import EVAL_BATCH_SIZE, accuracy, eval_loader

    recipe = spec(epochs=4, lr=0.05, ema_decay=0.9)
    train, val = tiny_data()
    for keep in ("best", "last"):
        model, history, raw = fit_remembering(recipe, keep, train, val)
        kept = model.state_dict()
        assert not any(
            all(torch.equal(kept[k], state[k]) for k in kept) for state in raw.values()
        ), "the kept weights are one epoch's raw weights, not their average"
        mean, std = normalization(model)
        loader = eval_loader(val.images, EVAL_BATCH_SIZE, CPU, torch.device("cpu"))
        score = accuracy(
            Classifier([model], [mean], [std]), loader, val.labels, torch.device("cpu"), CPU
        )
        # what was validated is what is kept: the average's best (or last) epoch
        chosen = (
            max(h.val_accuracy for h in history) if keep == "best" else history[-1].val_accuracy
        )
        assert score == pytest.approx(chosen)


def whole_and_resumed(recipe, train, val, folder, size=16, on_epoch=None):
    """Train from seed 0 whole, then again as if killed during the last epoch (its checkpoint
    removed, resumed from the one before); both must end with the same weights, returned."""
    from noisy_student.training.resume import MemberCheckpoint

    def run():
        torch.manual_seed(0)
        model = create_model(recipe, 3)
        checkpoint = MemberCheckpoint(folder, "m", every=1)
        config = FitConfig(
            recipe, CPU, torch.device("cpu"), 0, "resume", size, checkpoint=checkpoint,
            keep="last", on_epoch=on_epoch and (lambda result: on_epoch(model)),
        )  # fmt: skip
        fit(model, train, val, config)
        return model.state_dict(), checkpoint

    whole, checkpoint = run()
    for path in checkpoint._files(recipe.epochs):
        path.unlink()
    resumed, _ = run()
    for key, value in whole.items():
        assert torch.equal(value, resumed[key]), key
    return whole


def test_a_resumed_training_ends_with_the_moving_average_of_an_uninterrupted_one(tmp_path):
    recipe = spec(epochs=3, lr=0.05, ema_decay=0.9)
    train, val = tiny_data()
    whole_and_resumed(recipe, train, val, tmp_path)


def test_the_cpu_uses_channels_last_from_its_image_size_and_cuda_always():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    start = CPU.cpu_channels_last_from
    assert start is not None
    assert device_memory_format(cpu, CPU, start - 1) == torch.contiguous_format
    assert device_memory_format(cpu, CPU, start) == torch.channels_last
    assert device_memory_format(cuda, CPU, 16) == torch.channels_last
    never = CPU.model_copy(update={"cpu_channels_last_from": None})
    assert device_memory_format(cpu, never, 1024) == torch.contiguous_format
    off = CPU.model_copy(update={"channels_last": False})
    assert device_memory_format(cuda, off, 224) == torch.contiguous_format
    assert device_memory_format(cpu, off, 224) == torch.contiguous_format


def test_a_photo_sized_training_on_the_cpu_runs_channels_last_and_resumes_as_if_never_killed(
    tmp_path,
):
    size = CPU.cpu_channels_last_from
    recipe = spec(epochs=2, lr=0.05)
    train, val = tiny_data(n=8, size=size)
    formats = []

    def on_epoch(model):
        formats.append(model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last))

    # bit for bit only if the optimizer's moments take the parameters' strides back on resume
    whole = whole_and_resumed(recipe, train, val, tmp_path, size, on_epoch)
    assert formats == [True] * 3  # two epochs, then the resumed one
    fresh = create_model(recipe, 3)  # NHWC weights load into a plain timm model
    fresh.load_state_dict(whole)
    # evaluated either way, the same probabilities up to the sums' order
    loader = eval_loader(val.images, 4, CPU, torch.device("cpu"))
    probs = []
    for runtime in (CPU, CPU.model_copy(update={"channels_last": False})):
        mean, std = normalization(fresh)
        classifier = Classifier([fresh], [mean], [std])
        batches = iter_probabilities(classifier, loader, torch.device("cpu"), runtime)
        probs.append(torch.cat(list(batches)))
        weight = fresh.conv1[0].weight
        assert weight.is_contiguous(memory_format=torch.channels_last) == runtime.channels_last
    torch.testing.assert_close(probs[0], probs[1], rtol=1e-4, atol=1e-5)

"""Typed settings: params.yaml validated on load.

Every field is required, so params.yaml is the one place a knob's value can come from: a key
missing there is an error, not a silent default in code.
"""

from __future__ import annotations

import contextlib
import os
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    model_validator,
)

from noisy_student.core.atomic import write_text
from noisy_student.core.errors import PipelineError

PARAMS_FILE = Path("params.yaml")

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]


def confirmed_names_file() -> Path:
    """Where the registry names this timm version has confirmed are kept, one per line.

    Importing timm (and with it torch and torchvision) to look a name up costs 3-4 s, in every
    stage process, scan and prepare included, which need neither; a name timm confirmed once is
    known to the same version for good. Only confirmations are kept: an unknown name always asks
    timm, so the cache can make a check faster, never different."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "noisy_student" / f"timm-{version('timm')}-models.txt"


def confirmed_names() -> set[str]:
    try:
        return set(confirmed_names_file().read_text().split())
    except OSError:
        return set()


def confirm_name(name: str) -> None:
    names = confirmed_names() | {name}
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
        write_text(confirmed_names_file(), "".join(f"{n}\n" for n in sorted(names)))


def known_timm_model(name: str) -> str:
    """A name as ``timm.create_model`` takes it: a registry name (``resnet18``,
    ``resnet18.a1_in1k``), a Hugging Face Hub model (``hf-hub:timm/resnet18.a1_in1k``: checked
    when created, it needs the hub or its cache) or a local folder (``local-dir:path``)."""
    if name in confirmed_names():  # registry names only (see confirmed_names_file)
        return name
    import timm  # imported here: timm pulls in torch, which only model users need
    from timm.models._factory import parse_model_name  # timm's own reading of the prefixes

    source, model_id = parse_model_name(name)  # its ValueError names the problem
    if source == "local-dir":
        if not (Path(model_id) / "config.json").is_file():
            raise ValueError(
                f"'{name}': {model_id} has no config.json (timm's local-dir layout: config.json "
                "and model.safetensors, as timm's push_to_hub_prep writes them)"
            )
        return name
    if source is not None:
        return name
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:4]}*")[:5]
        hint = f" (close names: {', '.join(close)})" if close else ""
        raise ValueError(f"unknown timm model '{name}'{hint}")
    confirm_name(name)
    return name


TimmName = Annotated[str, AfterValidator(known_timm_model)]


def worker_count(value: Any) -> int | str:
    if value == "auto" or (type(value) is int and value >= 0):
        return value
    raise ValueError(f"expected a number of processes (0, 1, 2, ...) or 'auto', got {value!r}")


Workers = Annotated[int | Literal["auto"], PlainValidator(worker_count)]


class Strict(BaseModel):
    """Unknown keys are errors (they are usually typos), and values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class HfSplits(Strict):
    """Which split of a Hugging Face dataset is which of ours."""

    labeled: Annotated[str, Field(min_length=1)]
    unlabeled: Annotated[str, Field(min_length=1)]
    test: Annotated[str, Field(min_length=1)]
    val: str | None  # None: data.val_fraction of the test split is held out


class DataSettings(Strict):
    source: Literal["digits", "folders", "manifest", "hf_dataset"]
    image_size: Annotated[int, Field(ge=8, le=1024)]
    labels_per_class: PositiveInt
    test_fraction: Fraction
    val_fraction: Fraction
    labeled_dir: str | None
    unlabeled_dir: str | None
    test_dir: str | None
    val_dir: str | None
    manifest: str | None  # a CSV or Parquet table: path, split, label (data/manifest.py)
    hf_dataset: str | None  # a DatasetDict saved with save_to_disk, or an imagefolder (data/hf.py)
    hf_splits: HfSplits
    decode_workers: PositiveInt | None  # threads decoding the user's images; None: every core
    storage: Literal["arrays", "encoded"]  # decoded pixels (images.npy) or encoded shards
    shard_images: PositiveInt  # encoded: images per shard file
    max_side: Annotated[int, Field(ge=8)] | None  # encoded: re-encode above this side; None: never
    eval_crop_pct: Annotated[float, Field(gt=0.0, le=1.0)]  # encoded: timm's eval centre crop

    @model_validator(mode="after")
    def _folders_need_dirs(self) -> DataSettings:
        if self.source == "manifest" and not self.manifest:
            raise ValueError("data.source is 'manifest', so data.manifest must name a file")
        if self.source == "hf_dataset" and not self.hf_dataset:
            raise ValueError("data.source is 'hf_dataset', so data.hf_dataset must name a folder")
        if self.source == "folders":
            for key in ("labeled_dir", "unlabeled_dir", "test_dir"):
                if not getattr(self, key):
                    raise ValueError(f"data.source is 'folders', so data.{key} must name a folder")
        if self.source == "digits" and self.test_fraction + self.val_fraction >= 0.9:
            raise ValueError("data.test_fraction + data.val_fraction must leave images to train on")
        return self


class PolicySettings(Strict):
    """One albumentations policy; each probability is per image."""

    rotate_limit: Annotated[float, Field(ge=0.0, le=180.0)]
    rotate_p: Probability
    hflip_p: Probability
    crop_scale_min: Fraction
    crop_p: Probability
    brightness: Annotated[float, Field(ge=0.0, lt=1.0)]
    contrast: Annotated[float, Field(ge=0.0, lt=1.0)]
    brightness_contrast_p: Probability
    affine_shear: Annotated[float, Field(ge=0.0, le=45.0)]
    affine_translate: Annotated[float, Field(ge=0.0, le=0.5)]
    affine_p: Probability
    erase_p: Probability


class AugmentSettings(Strict):
    teacher: PolicySettings
    student: PolicySettings
    backend: Literal["per_image", "batched"]
    preview_images: Annotated[int, Field(ge=1, le=64)]
    preview_samples: Annotated[int, Field(ge=1, le=16)]


class RuntimeSettings(Strict):
    # auto (CUDA if present) or a device as PyTorch names it: cpu, cuda, cuda:1, mps
    device: Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")]
    # DataLoader worker processes; auto: none on the CPU, on a GPU the cores less one, up to 8
    num_workers: Workers
    # torch's CPU threads per training process; None: the cores shared among this machine's
    # training processes. Set, not inherited (OMP_NUM_THREADS), because CPU results depend on it
    cpu_threads: PositiveInt | None
    amp: bool
    channels_last: bool  # NHWC memory format: on CUDA, and on the CPU from cpu_channels_last_from
    # the image_size from which the CPU uses channels_last too (oneDNN's NHWC convolutions);
    # None: never on the CPU
    cpu_channels_last_from: PositiveInt | None
    checkpoint_epochs: PositiveInt
    devices: PositiveInt  # training processes per machine (torchrun --nproc_per_node)
    nodes: PositiveInt  # machines (torchrun --nnodes)
    rdzv_endpoint: Annotated[str, Field(pattern=r"^[^:\s]+:\d+$")] | None  # node 0's host:port

    @model_validator(mode="after")
    def _nodes_meet(self) -> RuntimeSettings:
        if self.nodes > 1 and self.rdzv_endpoint is None:
            raise ValueError("runtime.nodes > 1 needs runtime.rdzv_endpoint (host:port of node 0)")
        return self


class ModelTraining(Strict):
    """One model's full recipe (the teacher's, or a round's student's): which timm network, how it
    starts (transfer learning), its noise, and how it is optimised."""

    model: TimmName
    # false: random init; true: timm's pretrained weights (downloaded); a path: a local weights
    # file (.safetensors, or a torch file of tensors only) read by timm's own loader
    pretrained: bool | Annotated[str, Field(min_length=1)]
    transfer: Literal["finetune", "linear_probe"]
    backbone_lr_scale: Annotated[float, Field(gt=0.0, le=1.0)]
    layer_decay: Annotated[float, Field(gt=0.0, le=1.0)]
    drop_rate: Annotated[float, Field(ge=0.0, lt=1.0)]
    drop_path_rate: Annotated[float, Field(ge=0.0, lt=1.0)]
    randaugment_n: Annotated[int, Field(ge=0, le=15)]
    randaugment_m: Annotated[int, Field(ge=0, le=10)]
    mixup_alpha: NonNegativeFloat
    mixup_p: Probability
    cutmix_alpha: NonNegativeFloat
    cutmix_p: Probability
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)]
    epochs: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    weight_decay: NonNegativeFloat
    warmup_epochs: NonNegativeInt
    # a moving average of the weights (timm's ModelEmaV3) is what is validated and kept
    ema_decay: Annotated[float, Field(gt=0.0, lt=1.0)] | None
    # epochs in a row without matching the best validation accuracy after which training stops
    # (early stopping; selection.epoch still picks the weights kept); None: every epoch runs
    epoch_patience: PositiveInt | None

    @model_validator(mode="after")
    def _consistent(self) -> ModelTraining:
        if self.warmup_epochs >= self.epochs:
            raise ValueError("warmup_epochs must be smaller than epochs")
        if isinstance(self.pretrained, str) and not Path(self.pretrained).is_file():
            raise ValueError(f"pretrained: weights file '{self.pretrained}' not found")
        for kind in ("mixup", "cutmix"):
            if getattr(self, f"{kind}_p") > 0 and getattr(self, f"{kind}_alpha") <= 0:
                raise ValueError(f"{kind}_p > 0 needs {kind}_alpha > 0 (the Beta distribution's)")
        if self.mixup_p + self.cutmix_p > 1:
            raise ValueError("mixup_p + cutmix_p must not exceed 1 (one mix per batch at most)")
        return self


class TeacherSettings(ModelTraining):
    # more members of an ensemble teacher (timm names); member k trains with seed + 1000 * k
    ensemble: list[TimmName]

    @model_validator(mode="after")
    def _one_file_one_architecture(self) -> TeacherSettings:
        if isinstance(self.pretrained, str) and any(m != self.model for m in self.ensemble):
            raise ValueError(
                "ensemble: a pretrained weights file fits one architecture; "
                f"every member must be '{self.model}'"
            )
        return self


class StudentSettings(ModelTraining):
    name: str
    teacher: str


class PseudoLabelSettings(Strict):
    threshold: Probability
    labels: Literal["hard", "soft"]
    temperature: PositiveFloat  # soft labels: p ** (1 / T), renormalised; < 1 sharpens
    balance: bool
    per_class: PositiveInt | None  # balance target; None: the mean kept count per class
    batch_size: PositiveInt
    shards: PositiveInt  # pieces of the pool, labeled in parallel by the flow's Dask workers
    # the out-of-class filter: pool images whose out-of-class score is above that of this share
    # of the validation images are held out as foreign (0.95: 95% of validation images would
    # pass); None: off
    ood_filter: Annotated[float, Field(gt=0.0, le=1.0)] | None
    # the score: the teacher's free energy, or the distance of its features to the k-th nearest
    # labeled image's (k = ood_neighbours)
    ood_score: Literal["energy", "knn"]
    ood_neighbours: PositiveInt
    probs: Literal["float32", "float16"]  # the table's probabilities
    top_k: PositiveInt | None  # keep the teacher's k largest probabilities; None: all of them


class DistillSettings(Strict):
    """Knowledge distillation of every student from its (frozen) teacher."""

    enabled: bool
    temperature: PositiveFloat
    alpha: Probability
    # clean: the teacher's outputs on un-noised images (Noisy Student: the teacher is not noised);
    # augmented: on the student's own augmented view, computed batch by batch (Beyer et al.)
    teacher_input: Literal["clean", "augmented"]


class SelectionSettings(Strict):
    """Every choice of the loop, made on the validation split (the test set only reports)."""

    epoch: Literal["best", "last"]  # which epoch's weights a training keeps
    # validation accuracy a student must gain; None: promotion off, every student teaches the
    # next round (the original Noisy Student loop, kept to measure what the rule buys)
    margin: Annotated[float, Field(ge=0.0, lt=1.0)] | None
    patience: PositiveInt | None  # rounds in a row without gain before the loop stops; None: never
    # a student must also beat the best model at this level by McNemar's exact test on the
    # validation images; None: the margin alone
    alpha: Annotated[float, Field(gt=0.0, lt=1.0)] | None


class MlflowSettings(Strict):
    experiment: Annotated[str, Field(min_length=1)]
    tracking_uri: Annotated[str, Field(min_length=1)]
    ui_url: Annotated[str, Field(pattern=r"^https?://")]
    # the MLflow model registry's name for every model of the loop (one version per training)
    registered_model: Annotated[str, Field(min_length=1)]


class ReportSettings(Strict):
    # test accuracy of a model trained without the pool (e.g. measured by a benchmark), drawn as
    # a reference line in the report; None: not known
    supervised_accuracy: Probability | None


class ToLabelSettings(Strict):
    """The pool images a person should label next (pseudo_labels/to_label.py): read by its
    command and by the flow's ``label_next`` step; no DVC stage reads these."""

    count: PositiveInt
    strategy: Literal["least_confident", "margin", "disagreement"]
    model: Annotated[str, Field(min_length=1)] | None  # None: the champion
    out: Annotated[str, Field(min_length=1)]


class FlowSettings(Strict):
    """Prefect orchestration only: no DVC stage reads these."""

    retries: NonNegativeInt
    retry_delay_seconds: NonNegativeFloat
    dask_workers: PositiveInt  # local Dask cluster for sharded pseudo-labeling
    dask_address: Annotated[str, Field(pattern=r"^(tcp|tls)://")] | None  # or a running one


class Settings(Strict):
    seed: NonNegativeInt
    data: DataSettings
    augment: AugmentSettings
    runtime: RuntimeSettings
    teacher: TeacherSettings
    pseudo_label: PseudoLabelSettings
    distill: DistillSettings
    students: Annotated[list[StudentSettings], Field(min_length=1)]
    selection: SelectionSettings
    report: ReportSettings
    mlflow: MlflowSettings
    to_label: ToLabelSettings
    flow: FlowSettings

    @model_validator(mode="after")
    def _rounds_chain(self) -> Settings:
        # DVC's foreach cannot refer to the previous item, so each round names its teacher;
        # here we insist the names form the chain teacher -> student_1 -> student_2 -> ...
        previous = "teacher"
        for index, student in enumerate(self.students, start=1):
            expected = f"student_{index}"
            if student.name != expected:
                raise ValueError(f"students[{index - 1}].name must be '{expected}'")
            if student.teacher != previous:
                raise ValueError(f"students[{index - 1}].teacher must be '{previous}'")
            previous = expected
        return self

    def student(self, name: str) -> StudentSettings:
        for student in self.students:
            if student.name == name:
                return student
        known = ", ".join(s.name for s in self.students)
        raise PipelineError(f"no student round named '{name}' in params.yaml (known: {known})")

    def model_names(self) -> list[str]:
        """Every trained model in loop order: the teacher, then each round's student."""
        return ["teacher", *(s.name for s in self.students)]


def expand_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The dotted keys with each ``*`` standing for a list's positions replaced by every one of
    them in ``raw``: ``students.*.drop_rate`` is one key per round, so a recipe that changes
    every student still does when a user adds a round. Other keys are left as they are."""
    expanded: dict[str, Any] = {}
    for dotted, value in overrides.items():
        expanded |= dict.fromkeys(_expand(raw, dotted, dotted.split("."), []), value)
    return expanded


def _expand(node: Any, dotted: str, parts: list[str], done: list[str]) -> list[str]:
    if not parts:
        return [".".join(done)]
    part, rest = parts[0], parts[1:]
    if part == "*":
        if not isinstance(node, list):
            where = ".".join(done) or "the top level"
            raise PipelineError(f"override '{dotted}': '*' stands for every item of a list, "
                                f"and params.yaml's {where} is not a list")  # fmt: skip
        return [
            k for i, item in enumerate(node) for k in _expand(item, dotted, rest, [*done, str(i)])
        ]
    if isinstance(node, dict) and part in node:
        return _expand(node[part], dotted, rest, [*done, part])
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return _expand(node[int(part)], dotted, rest, [*done, part])
    return [".".join([*done, *parts])]  # not there: apply_overrides names the key


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``pseudo_label.threshold``; ``students.*.epochs``: every round's) in a
    copy of the raw params."""
    import copy

    result = copy.deepcopy(raw)
    for dotted, value in expand_overrides(raw, overrides).items():
        node: Any = result
        parts = dotted.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                key: Any = int(part)
            elif isinstance(node, dict) and part in node:
                key = part
            else:
                raise PipelineError(f"override '{dotted}': params.yaml has no key '{part}' there")
            if last:
                node[key] = value
            else:
                node = node[key]
    return result


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (a typo?)"
        elif item["type"] == "missing":
            message = "missing key"
        elif "input" in item and item["type"] not in ("value_error",):
            message = f"{message}, got {item['input']!r}"
        lines.append(f"{source}: {key}: {message}")
    return "\n".join(lines)


def load_settings(
    path: Path | str = PARAMS_FILE, overrides: dict[str, Any] | None = None
) -> Settings:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping of sections at the top level")
    if overrides:
        raw = apply_overrides(raw, overrides)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise PipelineError(format_validation_error(exc, str(path))) from None

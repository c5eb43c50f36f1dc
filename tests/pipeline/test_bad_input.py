"""Bad input: each case stops the stage's command with one line naming the file or key, a
non-zero exit, no traceback and nothing half-written; the messy inputs we accept are read right.

Each case runs a stage's real entry point (`python -m tasks.<stage>`'s ``main``) in-process."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import yaml
from PIL import Image
from safetensors.torch import save_file

from noisy_student.core.layout import Layout
from noisy_student.core.settings import load_settings
from noisy_student.data.splits import load_split
from tests.helpers.images import folder_params, write_image_folders, write_manifest
from tests.helpers.project import load_params, shrink, write_params


def invoke(module: str, args: list[str], cwd: Path, capsys, monkeypatch) -> tuple[int, list[str]]:
    """Run ``python -m <module> <args>`` in-process in ``cwd``; its exit code and stderr lines."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [module, *args])
    capsys.readouterr()
    code = 0
    try:
        importlib.import_module(module).main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line_error(code: int, lines: list[str], *expected: str) -> None:
    assert code == 2, lines
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and not any("Traceback" in line for line in lines), lines
    for text in expected:
        assert text in errors[0], errors[0]


def assert_nothing_written(path: Path) -> None:
    assert not path.exists(), path
    leftovers = list(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.exists() else []
    assert not leftovers, leftovers


@pytest.fixture
def folders(tmp_path):
    """The user's folders (PNG, JPEG, RGBA, a nested pool with spaces and non-ASCII), params."""
    root = write_image_folders(tmp_path / "images", images_per_class=4, pool=10)
    params = folder_params(shrink(load_params()), root)
    write_params(tmp_path / "params.yaml", params)
    return tmp_path, root, params


def prepare_fails(tmp_path, capsys, monkeypatch, *expected: str) -> None:
    code, lines = invoke("tasks.prepare", [], tmp_path, capsys, monkeypatch)
    assert_one_line_error(code, lines, *expected)
    assert_nothing_written(Layout.at(tmp_path).prepared)


# --- the user's folders ------------------------------------------------------------------------


def test_truncated_image(folders, capsys, monkeypatch):
    tmp_path, root, _ = folders
    path = root / "labeled" / "class_1" / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    prepare_fails(tmp_path, capsys, monkeypatch, "big.png: cannot read as an image")


def test_manifest_naming_a_missing_image(folders, capsys, monkeypatch):
    tmp_path, root, params = folders
    manifest = write_manifest(root, root / "manifest.csv")
    (root / "pool" / "batch one" / "ünïcode" / "pool_3.png").unlink()
    params["data"].update(source="manifest", manifest=str(manifest))
    write_params(tmp_path / "params.yaml", params)
    prepare_fails(tmp_path, capsys, monkeypatch, "manifest.csv: row(s) [", "no such file")


def test_empty_class_folder(folders, capsys, monkeypatch):
    tmp_path, root, _ = folders
    (root / "labeled" / "class_7").mkdir()
    prepare_fails(tmp_path, capsys, monkeypatch, "data.labeled_dir", "class_7' holds no images")


def test_test_set_class_the_labeled_set_lacks(folders, capsys, monkeypatch):
    tmp_path, root, _ = folders
    (root / "test" / "class_9").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "test" / "class_9" / "x.png")
    prepare_fails(tmp_path, capsys, monkeypatch, "data.test_dir", "['class_9'] do not exist")


def test_empty_unlabeled_pool(folders, capsys, monkeypatch):
    tmp_path, root, _ = folders
    shutil.rmtree(root / "pool")
    (root / "pool" / "sub").mkdir(parents=True)
    (root / "pool" / "sub" / "readme.md").write_text("no images here")
    prepare_fails(tmp_path, capsys, monkeypatch, "data.unlabeled_dir", "holds no images")


def test_missing_unlabeled_pool(folders, capsys, monkeypatch):
    tmp_path, root, _ = folders
    shutil.rmtree(root / "pool")
    prepare_fails(tmp_path, capsys, monkeypatch, "data.unlabeled_dir", "is not a folder")


def test_labeled_dir_is_a_file(folders, capsys, monkeypatch):
    tmp_path, root, params = folders
    (root / "notes.txt").write_text("x")
    params["data"]["labeled_dir"] = str(root / "notes.txt")
    write_params(tmp_path / "params.yaml", params)
    prepare_fails(tmp_path, capsys, monkeypatch, "data.labeled_dir", "notes.txt' is not a folder")


@contextlib.contextmanager
def read_only(folder: Path):
    """A folder nobody may write into: chmod for a user; for root (whom chmod does not stop),
    the immutable attribute."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
        pytest.skip("running as root on a file system without chattr +i: cannot make it read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_output_folder(folders, capsys, monkeypatch):
    tmp_path, _, _ = folders
    with read_only(tmp_path / "data"):
        code, lines = invoke("tasks.prepare", [], tmp_path, capsys, monkeypatch)
    assert_one_line_error(code, lines, "data: cannot write prepared there", "make the folder wri")
    assert_nothing_written(Layout.at(tmp_path).prepared)


# --- params.yaml -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda p: p["teacher"].update(model="resnet_9000"), "teacher.model: unknown timm model"),
        (lambda p: p["teacher"].update(lr="0.01"), "teacher.lr: Input should be a valid number"),
        (lambda p: p["pseudo_label"].update(treshold=0.5), "pseudo_label.treshold: unknown key"),
    ],
    ids=["unknown timm model", "wrong type", "unknown key"],
)
def test_bad_params(tmp_path, capsys, monkeypatch, edit, expected):
    params = shrink(load_params())
    edit(params)
    write_params(tmp_path / "params.yaml", params)
    prepare_fails(tmp_path, capsys, monkeypatch, "params.yaml: " + expected)


def test_params_file_missing_or_not_yaml(tmp_path, capsys, monkeypatch):
    prepare_fails(tmp_path, capsys, monkeypatch, "params.yaml: file not found")
    (tmp_path / "params.yaml").write_text("seed: [0\n")
    prepare_fails(tmp_path, capsys, monkeypatch, "params.yaml: not valid YAML")


# --- later stages ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Prepared digits, the augmentation policies and a (barely) trained teacher."""
    import tasks.augment
    import tasks.prepare
    import tasks.train_teacher

    root = tmp_path_factory.mktemp("project")
    params = shrink(load_params())
    params["teacher"].update(epochs=2)
    params["mlflow"]["tracking_uri"] = f"sqlite:///{root}/mlflow.db"
    write_params(root / "params.yaml", params)
    with contextlib.chdir(root):  # the stages as their commands run them, in this process
        settings = load_settings()
        for stage in (tasks.prepare, tasks.augment, tasks.train_teacher):
            stage.run(settings, Layout.at())
    return root


def with_params(project: Path, tmp_path: Path, edit) -> Path:
    """A copy of the project with ``edit`` applied to its params."""
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns("mlruns", "mlflow.db"))
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["mlflow"]["tracking_uri"] = f"sqlite:///{copy}/mlflow.db"
    edit(params)
    write_params(copy / "params.yaml", params)
    return copy


def test_weights_file_that_does_not_fit_the_model(project, tmp_path, capsys, monkeypatch):
    weights = tmp_path / "resnet18.safetensors"
    state = timm.create_model("resnet18", num_classes=10).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, weights)
    copy = with_params(project, tmp_path, lambda p: p["teacher"].update(pretrained=str(weights)))
    shutil.rmtree(copy / "models")
    code, lines = invoke("tasks.train_teacher", [], copy, capsys, monkeypatch)
    assert_one_line_error(code, lines, "resnet18.safetensors: do not fit 'test_resnet'")
    assert_nothing_written(copy / "models" / "teacher")


def test_pickle_bearing_weights_are_refused(project, tmp_path, capsys, monkeypatch):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > pwned.txt",))

    weights = tmp_path / "weights.pth"
    weights.write_bytes(pickle.dumps({"conv1.weight": Payload()}, protocol=2))
    copy = with_params(project, tmp_path, lambda p: p["teacher"].update(pretrained=str(weights)))
    shutil.rmtree(copy / "models")
    code, lines = invoke("tasks.train_teacher", [], copy, capsys, monkeypatch)
    assert_one_line_error(code, lines, "weights.pth: cannot be loaded as weights")
    assert not (copy / "pwned.txt").exists()  # the pickle never ran
    assert_nothing_written(copy / "models" / "teacher")


def test_training_before_prepare(tmp_path, capsys, monkeypatch):
    write_params(tmp_path / "params.yaml", shrink(load_params()))
    code, lines = invoke("tasks.train_teacher", [], tmp_path, capsys, monkeypatch)
    assert_one_line_error(code, lines, "classes.json: not found; run the prepare stage first")


def test_threshold_that_keeps_no_pseudo_label(project, tmp_path, capsys, monkeypatch):
    copy = with_params(project, tmp_path, lambda p: p["pseudo_label"].update(threshold=1.0))
    code, lines = invoke("tasks.pseudo_label", ["student_1"], copy, capsys, monkeypatch)
    assert_one_line_error(code, lines, "pseudo_label.threshold=1.0 keeps none of 1049")
    assert_nothing_written(copy / "pseudo_labels" / "student_1.parquet")


def test_pseudo_labels_of_another_pool(project, tmp_path, capsys, monkeypatch):
    copy = with_params(project, tmp_path, lambda p: p["pseudo_label"].update(threshold=0.0))
    code, _ = invoke("tasks.pseudo_label", ["student_1"], copy, capsys, monkeypatch)
    assert code == 0
    table = copy / "pseudo_labels" / "student_1.parquet"
    rows = pd.read_parquet(table)
    rows.iloc[[*range(1, len(rows)), 0]].to_parquet(table, index=False)  # rows out of order
    args = ["--name", "student_1"]
    code, lines = invoke("tasks.train_student", args, copy, capsys, monkeypatch)
    assert_one_line_error(
        code, lines, "student_1.parquet: rows do not match the prepared unlabeled"
    )
    assert_nothing_written(copy / "models" / "student_1")


# --- messy input that is accepted, as documented ------------------------------------------------


def test_non_image_files_are_skipped_and_counted(folders, capsys, monkeypatch, caplog):
    tmp_path, root, _ = folders
    (root / "labeled" / "class_0" / "Thumbs.db").write_bytes(b"\x00\x01")
    with caplog.at_level(logging.WARNING):
        code, _ = invoke("tasks.prepare", [], tmp_path, capsys, monkeypatch)
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("class_0: skipped 1 non-image file(s), e.g." in w for w in warnings), warnings
    assert any("skipped 1 non-image file(s)" in w and "notes.txt" in w for w in warnings)


def test_sizes_modes_and_bit_depths_are_converted(folders, capsys, monkeypatch):
    tmp_path, root, _ = folders
    pool = root / "pool"
    Image.fromarray(np.full((40, 25, 3), 200, np.uint8)).save(pool / "wide rgb.png")
    Image.fromarray(np.full((9, 9), 90, np.uint8)).save(pool / "gray.png")
    Image.fromarray(np.full((12, 12, 4), 60, np.uint8)).save(pool / "rgba.png")
    Image.fromarray(np.full((16, 16), 65535 // 2, np.uint16)).save(pool / "gray16.png")
    Image.fromarray(np.zeros((3, 300, 3), np.uint8)).convert("P").save(pool / "palette.gif")
    code, _ = invoke("tasks.prepare", [], tmp_path, capsys, monkeypatch)
    assert code == 0
    split = load_split("unlabeled", Layout.at(tmp_path).prepared)
    pixel = {i: split.images[split.ids.index(i)] for i in split.ids}
    assert split.images.shape[1:] == (16, 16, 3)  # every size resized to data.image_size
    assert (pixel["wide rgb.png"] == 200).all() and (pixel["gray.png"] == 90).all()
    assert (pixel["rgba.png"] == 60).all()
    assert (pixel["gray16.png"] == 127).all()  # scaled down, not clipped to white
    assert (pixel["palette.gif"] == 0).all()


def test_duplicate_names_in_different_folders_stay_apart(folders, capsys, monkeypatch):
    tmp_path, root, _ = folders
    for sub in ("a", "b"):
        (root / "pool" / sub).mkdir()
        value = 10 if sub == "a" else 250
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(root / "pool" / sub / "same.png")
    for cls in ("class_0", "class_1"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "labeled" / cls / "same.png")
    code, _ = invoke("tasks.prepare", [], tmp_path, capsys, monkeypatch)
    assert code == 0
    pool = load_split("unlabeled", Layout.at(tmp_path).prepared)
    assert {"a/same.png", "b/same.png"} <= set(pool.ids)
    assert pool.images[pool.ids.index("a/same.png")].max() == 10
    assert pool.images[pool.ids.index("b/same.png")].min() == 250
    labeled = load_split("labeled", Layout.at(tmp_path).prepared)
    assert {"class_0/same.png", "class_1/same.png"} <= set(labeled.ids)


def test_paths_with_spaces_and_non_ascii(tmp_path, capsys, monkeypatch):
    root = write_image_folders(tmp_path / "mes images été" / "jeu de données", 4, pool=6)
    params = folder_params(shrink(load_params()), root)
    write_params(tmp_path / "params.yaml", params)
    code, _ = invoke("tasks.prepare", [], tmp_path, capsys, monkeypatch)
    assert code == 0
    assert len(load_split("labeled", Layout.at(tmp_path).prepared)) == 12

"""`python -m noisy_student.predict`: a real folder of PNG/JPEG images classified by a trained
model."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import load_settings
from noisy_student.data.images import list_images, read_image
from noisy_student.models import promotion
from noisy_student.models.classifier import load_checkpoint
from noisy_student.predict import predict
from tests.helpers.entry import run_main
from tests.helpers.images import write_image_folders

pytestmark = pytest.mark.slow  # every test reads the session's trained project (minutes)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Digits saved as PNG and JPEG files, nested, a name with a space and Unicode, a text file."""
    return write_image_folders(tmp_path_factory.mktemp("photos"), images_per_class=3, pool=5)


def test_predict_writes_a_row_per_image_with_the_models_probabilities(
    trained_project, folder, tmp_path
):
    out = tmp_path / "predictions.csv"
    with contextlib.chdir(trained_project):
        counts = predict(load_settings(), folder, out=out, batch_size=4)  # several batches
        champion = promotion.champion(load_settings(), Layout.at())  # the default model
        classifier, card = load_checkpoint(trained_project / "models" / champion)
    table = pd.read_csv(out, dtype={"id": str, "class": str})
    paths = list_images(folder)
    assert table["id"].tolist() == [p.relative_to(folder).as_posix() for p in paths]
    assert any(" " in i and "ü" in i for i in table["id"])  # nested, spaces, Unicode
    probs = table[[f"p_{c}" for c in card.classes]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(probs.max(axis=1), table["confidence"], atol=1e-5)
    assert table["class"].tolist() == [card.classes[i] for i in probs.argmax(axis=1)]
    assert sum(counts.values()) == len(table) == len(paths)
    # the same numbers as the model on the same pixels, read the way prepare reads them
    pixels = np.stack([read_image(p, card.image_size) for p in paths]).transpose(0, 3, 1, 2)
    with torch.inference_mode():
        expected = classifier.probs(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_any_rounds_model_can_predict(trained_project, folder, tmp_path):
    with contextlib.chdir(trained_project):
        settings = load_settings()
        predict(settings, folder, model="teacher", out=tmp_path / "teacher.csv")
        predict(settings, folder, model="models/teacher", out=tmp_path / "by_path.csv")
    # from anywhere, with the project's layout
    layout = Layout.at(trained_project)
    predict(settings, folder, model="teacher", out=tmp_path / "by_layout.csv", layout=layout)
    assert (tmp_path / "teacher.csv").read_bytes() == (tmp_path / "by_path.csv").read_bytes()
    assert (tmp_path / "teacher.csv").read_bytes() == (tmp_path / "by_layout.csv").read_bytes()


def test_bad_input_is_one_line_and_leaves_no_file(trained_project, folder, tmp_path):
    out = tmp_path / "out.csv"
    with contextlib.chdir(trained_project):
        settings = load_settings()
        with pytest.raises(PipelineError, match="not a folder of images"):
            predict(settings, tmp_path / "missing", out=out)
        (tmp_path / "empty").mkdir()
        with pytest.raises(PipelineError, match="holds no images"):
            predict(settings, tmp_path / "empty", out=out)
        with pytest.raises(PipelineError, match=r"models/student_7: no trained model there"):
            predict(settings, folder, model="student_7", out=out)
        broken = tmp_path / "broken"
        broken.mkdir()
        good = next((folder / "labeled/class_0").glob("*.png"))
        (broken / "a.png").write_bytes(good.read_bytes())
        (broken / "b.png").write_bytes(b"not an image")
        with pytest.raises(PipelineError, match=r"b.png: cannot read as an image"):
            predict(settings, broken, out=out)
    assert not out.exists() and list(tmp_path.glob(".out.csv*")) == []


def test_command_line(trained_project, folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(trained_project)
    out = tmp_path / "p.csv"
    assert run_main("noisy_student.predict", [str(folder), "--out", str(out)]) == 0
    stderr = capsys.readouterr().err
    champion = json.loads((trained_project / "reports/registry.json").read_text())["champion"]
    assert f"{champion} classified" in stderr and len(pd.read_csv(out)) > 0
    assert run_main("noisy_student.predict", [str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'}: not a folder of images"

"""The ONNX export: ONNX Runtime gives PyTorch's logits on real images, at any batch size."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from noisy_student.core.errors import PipelineError
from noisy_student.core.layout import Layout
from noisy_student.core.settings import load_settings
from noisy_student.data.splits import load_split
from noisy_student.models import promotion
from noisy_student.models.classifier import load_checkpoint
from noisy_student.models.onnx_export import ATOL, INPUT, OUTPUT, RTOL, check_against_torch, export

pytestmark = pytest.mark.slow  # every test reads the session's trained project (minutes)


@pytest.fixture(scope="module")
def exported(trained_project, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "final.onnx"
    final = Layout.at(trained_project).final_export
    there = final.exists() and final.stat().st_mtime_ns
    with contextlib.chdir(trained_project):
        written = export(load_settings(), Layout.at(trained_project), out=out)
    assert written == out
    assert (final.exists() and final.stat().st_mtime_ns) == there  # the project's own untouched
    return trained_project, out


def test_onnx_runtime_matches_pytorch_on_test_images_at_any_batch_size(exported):
    project, path = exported
    champion = json.loads((project / "reports/registry.json").read_text())["champion"]
    classifier, card = load_checkpoint(project / "models" / champion)  # chosen on validation
    images = load_split("test", Layout.at(project).prepared).images
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (given,) = session.get_inputs()
    assert given.name == INPUT and given.shape[1:] == [3, card.image_size, card.image_size]
    assert isinstance(given.shape[0], str)  # a symbolic, dynamic batch dimension
    for batch in (1, 7, 64):
        pixels = np.asarray(images[:batch]).transpose(0, 3, 1, 2).astype(np.float32)
        (logits,) = session.run([OUTPUT], {INPUT: pixels})
        with torch.inference_mode():
            expected = classifier(torch.from_numpy(pixels)).numpy()
        assert logits.shape == (batch, len(card.classes))
        np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=RTOL)
        assert (logits.argmax(1) == expected.argmax(1)).all()


def test_the_onnx_file_names_its_classes_and_input_size(exported):
    project, path = exported
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    champion = promotion.champion(load_settings(project / "params.yaml"), Layout.at(project))
    card = json.loads((project / f"models/{champion}/card.json").read_text())
    assert json.loads(metadata["classes"]) == card["classes"]
    assert metadata["image_size"] == str(card["image_size"]) and metadata["model"] == champion
    assert not list(path.parent.glob(".final.onnx*"))  # written atomically, nothing left over


def test_the_check_fails_on_a_model_that_differs(exported):
    """The export's own check is not a formality: another model's ONNX file fails it."""
    project, path = exported
    champion = json.loads((project / "reports/registry.json").read_text())["champion"]
    other = "student_1" if champion == "teacher" else "teacher"
    teacher, _ = load_checkpoint(project / "models" / other)
    images = np.asarray(load_split("val", Layout.at(project).prepared).images[:4])
    with pytest.raises(PipelineError, match="ONNX Runtime's logits differ from PyTorch's"):
        check_against_torch(teacher, path, images)

"""The scan stage: every image the user's folders or manifest name, with the digest of its bytes."""

from __future__ import annotations

import json

from PIL import Image

from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.data.sources import scan
from tests.helpers.images import (
    folder_params,
    write_hf_dataset,
    write_image_folders,
    write_manifest,
)


def test_a_changed_image_changes_its_entry_alone_whichever_source_names_it(tmp_path, tiny_params):
    root = write_image_folders(tmp_path / "images")
    manifest = write_manifest(root, root / "manifest.parquet")
    folders = folder_params(dict(tiny_params), root)
    by_manifest = json.loads(json.dumps(folders))
    by_manifest["data"].update(source="manifest", manifest=str(manifest))
    layout = Layout.at(tmp_path / "project")
    before = {}
    for name, params in (("folders", folders), ("manifest", by_manifest)):
        scanned = scan(Settings.model_validate(params), layout)
        before[name] = json.loads(layout.sources.read_text())
        assert scanned == before[name]
    labeled = before["folders"]["labeled_dir"]["files"]
    assert (
        before["manifest"]["manifest"]["files"]["labeled/class_1/labeled_1_1.png"]
        == labeled["class_1/labeled_1_1.png"]
    )
    assert len(before["manifest"]["manifest"]["files"]) == 12 + 12 + 10

    image = root / "labeled" / "class_1" / "labeled_1_1.png"
    Image.new("L", (8, 8), 255).save(image)
    after = scan(Settings.model_validate(by_manifest), layout)
    old = before["manifest"]["manifest"]
    changed = {k for k, v in after["manifest"]["files"].items() if old["files"][k] != v}
    assert changed == {"labeled/class_1/labeled_1_1.png"}
    assert after["manifest"]["digest"] == old["digest"]  # the table itself unchanged


def test_a_hugging_face_dataset_is_scanned_file_by_file(tmp_path, tiny_params):
    root = write_image_folders(tmp_path / "images")
    saved = write_hf_dataset(root, tmp_path / "hf")
    params = folder_params(dict(tiny_params), root)
    params["data"].update(source="hf_dataset", hf_dataset=str(saved))
    files = scan(Settings.model_validate(params), Layout.at(tmp_path / "p"))["hf_dataset"]["files"]
    assert {"dataset_dict.json", "train/dataset_info.json"} <= set(files)
    assert sum(name.endswith(".arrow") for name in files) == 3  # one per split

"""Where everything lives in a project: the one place for paths.

Stages, the flow, the benchmarks and the tests build a ``Layout`` from the project root and pass
it down; nothing else names a path. dvc.yaml's ``outs`` name the same places.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    params: Path
    sources: Path  # every user image prepare reads, with its digest (the scan stage)
    scan_cache: Path  # the scan's digests by size and mtime (not a DVC output)
    prepared: Path  # data/prepared/<split>/ and classes.json
    augment: Path  # the albumentations policies and their preview
    models: Path  # models/<name>/: weights, card.json, history.csv
    pseudo_labels: Path  # pseudo_labels/<student>.parquet (the table) and .json
    checkpoints: Path  # what a killed training resumes from (not a DVC output)
    metrics: Path  # test accuracy per model (DVC metrics)
    comparison: Path
    test_predictions: Path  # per model and test image: actual, predicted, confidence
    registry: Path  # the MLflow registry's versions and the champion
    report: Path
    plots: Path  # the report's pictures and the data behind the DVC plots
    exports: Path

    @classmethod
    def at(cls, root: Path | str = ".") -> Layout:
        root = Path(root)
        return cls(
            params=root / "params.yaml",
            sources=root / "data" / "sources.json",
            scan_cache=root / ".dvc" / "tmp" / "scan-digests.json",
            prepared=root / "data" / "prepared",
            augment=root / "artifacts" / "augment",
            models=root / "models",
            pseudo_labels=root / "pseudo_labels",
            checkpoints=root / "checkpoints",
            metrics=root / "metrics.json",
            comparison=root / "reports" / "comparison.md",
            test_predictions=root / "reports" / "test_predictions",
            registry=root / "reports" / "registry.json",
            report=root / "reports" / "report.html",
            plots=root / "reports" / "plots",
            exports=root / "exports",
        )

    def replace(self, **paths: Path) -> Layout:
        """The same layout with some places moved (a benchmark shares one prepared dataset
        between runs that write their models apart)."""
        return dataclasses.replace(self, **{k: Path(v) for k, v in paths.items()})

    def model(self, name: str) -> Path:
        return self.models / name

    def pseudo_table(self, student: str) -> Path:
        return self.pseudo_labels / f"{student}.parquet"

    def pseudo_summary(self, student: str) -> Path:
        return self.pseudo_labels / f"{student}.json"

    @property
    def final_export(self) -> Path:
        return self.exports / "final.onnx"

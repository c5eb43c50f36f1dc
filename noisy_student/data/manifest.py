"""A manifest of the user's images: a CSV or Parquet table with one row per image.

Columns ``path`` (absolute, or relative to the manifest's folder), ``split`` (labeled, unlabeled,
val, test) and ``label`` (the class name; empty for unlabeled rows). Many labeling tools and data
catalogues export exactly this; it spares users from copying images into class folders.
Without val rows, ``data.val_fraction`` of the test rows is held out, as for folders.

Splits come out in the order the folder source gives (labeled, val and test by class, then path;
the pool by path), so the same images reach the same prepared data and pseudo-labels whichever
source names them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from noisy_student.core.errors import PipelineError

COLUMNS = ("path", "split", "label")
MANIFEST_SPLITS = ("labeled", "unlabeled", "val", "test")


@dataclass(frozen=True)
class Manifest:
    source: Path  # the manifest file
    rows: pd.DataFrame  # path (as written), file (resolved), split, label; sorted

    def split(self, name: str) -> pd.DataFrame:
        return self.rows[self.rows["split"] == name]

    def classes(self) -> list[str]:
        return sorted(self.split("labeled")["label"].unique())


def read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise PipelineError(f"data.manifest: '{path}' is not a file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            table = pd.read_parquet(path)
        elif suffix == ".csv":
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            raise PipelineError(f"data.manifest: '{path}': expected a .csv or .parquet file")
    except (ValueError, OSError) as exc:  # pandas' and pyarrow's parse errors
        detail = " ".join(str(exc).split())[:200]
        raise PipelineError(
            f"data.manifest: '{path}' cannot be read as a table ({detail})"
        ) from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise PipelineError(
            f"{path}: no column(s) {missing}; a manifest has columns path, split, label "
            f"(it has {list(table.columns)})"
        )
    table = table[list(COLUMNS)].copy()
    table["label"] = table["label"].where(table["label"].notna(), "").astype(str).str.strip()
    table["path"] = table["path"].astype(str)
    table["split"] = table["split"].astype(str).str.strip().str.lower()
    return table


def rows_where(table: pd.DataFrame, mask: pd.Series) -> str:
    """The first few offending rows, as a person finds them (CSV line numbers: header is 1)."""
    lines = (table.index[mask][:5] + 2).tolist()
    return f"row(s) {lines}" + (" ..." if mask.sum() > 5 else "")


def read_manifest(path: Path) -> Manifest:
    """The manifest at ``path``, checked: every error names the file, the rows and the fix."""
    table = read_table(path)
    bad_split = ~table["split"].isin(MANIFEST_SPLITS)
    if bad_split.any():
        raise PipelineError(
            f"{path}: {rows_where(table, bad_split)}: split must be one of "
            f"{', '.join(MANIFEST_SPLITS)} (got {sorted(set(table['split'][bad_split]))[:5]})"
        )
    unlabeled = table["split"] == "unlabeled"
    no_label = ~unlabeled & (table["label"] == "")
    if no_label.any():
        raise PipelineError(
            f"{path}: {rows_where(table, no_label)}: a labeled, val or test row needs a label"
        )
    dup = table["path"].duplicated(keep=False)
    if dup.any():
        raise PipelineError(f"{path}: {rows_where(table, dup)}: the same path listed twice")
    table["file"] = [p if p.is_absolute() else path.parent / p for p in map(Path, table["path"])]
    absent = ~table["file"].map(Path.is_file)
    if absent.any():
        first = table["file"][absent].iloc[0]
        raise PipelineError(f"{path}: {rows_where(table, absent)}: no such file, e.g. '{first}'")
    classes = sorted(table.loc[table["split"] == "labeled", "label"].unique())
    if len(classes) < 2:
        raise PipelineError(f"{path}: the labeled rows need at least 2 classes (got {classes})")
    stray = ~unlabeled & ~table["label"].isin(classes)
    if stray.any():
        raise PipelineError(
            f"{path}: {rows_where(table, stray)}: label(s) "
            f"{sorted(set(table['label'][stray]))[:5]} that no labeled row has"
        )
    if not unlabeled.any():
        raise PipelineError(f"{path}: no unlabeled rows: the pool to pseudo-label is empty")
    if not (table["split"] == "test").any():
        raise PipelineError(f"{path}: no test rows: evaluation needs a labeled test split")
    order = {c: i for i, c in enumerate(classes)}
    # as the folder source orders them: by class, then path part by part (how pathlib sorts)
    keys = [
        (split, order.get(label, -1), Path(p).parts)
        for split, label, p in zip(table["split"], table["label"], table["path"], strict=True)
    ]
    ranked = sorted(range(len(table)), key=keys.__getitem__)
    return Manifest(path, table.iloc[ranked].reset_index(drop=True))

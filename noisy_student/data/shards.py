"""Encoded image storage: each image's own bytes (JPEG, PNG, ...) in Arrow IPC shard files of a
fixed number of images, decoded when read.

A split stored this way costs what its images cost (raw pixels at 224 px take 150 KB each, a
photo about 45 KB as JPEG), and DVC versions it shard by shard: a changed image re-versions one
shard, not the split. Arrow IPC files, not Parquet or tar: training reads images in a shuffled
order across the whole pool, and a memory-mapped uncompressed IPC file hands out one image's
bytes without reading its neighbours (a Parquet column chunk is decoded whole; a tar needs an
index of offsets kept beside it).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from noisy_student.data.images import read_image, read_rgb, to_rgb8

SHARD_GLOB = "images-*.arrow"
SCHEMA = pa.schema([("id", pa.string()), ("image", pa.large_binary())])


def encode_png(pixels: np.ndarray) -> bytes:
    """Pixels as a lossless PNG (images the source holds as arrays, e.g. the demo's digits)."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def shrink_encoded(data: bytes, max_side: int | None, name: str) -> bytes:
    """The image's own bytes, or a JPEG (quality 95) at ``max_side`` when its longer side is
    larger. Decoded once either way, so a file that is not an image stops prepare here."""
    read_rgb(data, name=name)  # the same check, and error, as the arrays' storage
    if max_side is None:
        return data
    with Image.open(io.BytesIO(data)) as img:
        if max(img.size) <= max_side:
            return data
        img.load()
        rgb = Image.fromarray(to_rgb8(img))
    rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=95)
    return out.getvalue()


def write_shards(folder: Path, ids: list[str], blobs: Iterable[bytes], per_shard: int) -> None:
    """``images-00000.arrow``, ... of ``per_shard`` images each, in order."""
    shard, batch_ids, batch = 0, [], []

    def flush() -> None:
        nonlocal shard
        path = folder / f"images-{shard:05d}.arrow"
        table = pa.table({"id": batch_ids, "image": batch}, schema=SCHEMA)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            writer.write_table(table)
        shard += 1
        batch_ids.clear()
        batch.clear()

    for image_id, blob in zip(ids, blobs, strict=True):
        batch_ids.append(image_id)
        batch.append(blob)
        if len(batch) == per_shard:
            flush()
    if batch or shard == 0:
        flush()


class EncodedImages:
    """A split's shards, read like the arrays' ``images.npy``: ``images[i]``, ``images[rows]``,
    ``images[a:b]`` give uint8 pixels at ``size`` x ``size`` x 3, the evaluation view
    (images.square_view at ``crop_pct``: aspect ratio kept, as timm evaluates). ``source(i)`` is
    the image at its stored size, which training crops from (augment/policy.py TrainTransform).

    Files are memory-mapped on first use in each process (a DataLoader worker opens its own)."""

    def __init__(self, files: list[Path], size: int, crop_pct: float | None) -> None:
        self.files = files
        self.size = size
        self.crop_pct = crop_pct
        # the shards opened to count their rows stay open (a worker process opens its own)
        self._readers = {k: self._reader(k) for k in range(len(files))}
        self._rows = [  # rows of each record batch of each shard
            [reader.get_batch(b).num_rows for b in range(reader.num_record_batches)]
            for reader in self._readers.values()
        ]
        self._starts = np.cumsum([0] + [sum(r) for r in self._rows])

    def _reader(self, k: int) -> pa.ipc.RecordBatchFileReader:
        return pa.ipc.open_file(pa.memory_map(str(self.files[k]), "r"))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": {}}  # memory maps do not cross processes

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.size, self.size, 3)

    def encoded(self, i: int) -> bytes:
        """Image ``i``'s stored bytes."""
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} of {len(self)}")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        if k not in self._readers:
            self._readers[k] = self._reader(k)
        row = i - int(self._starts[k])
        for b, rows in enumerate(self._rows[k]):
            if row < rows:
                return self._readers[k].get_batch(b).column(1)[row].as_py()
            row -= rows
        raise IndexError(i)

    def source(self, i: int) -> np.ndarray:
        """Image ``i`` decoded at its stored size (uint8 H x W x 3)."""
        return read_rgb(self.encoded(i), name=f"image {i}")

    def decode(self, i: int) -> np.ndarray:
        """Image ``i`` as a model sees it (``read_image``)."""
        return read_image(self.encoded(i), self.size, f"image {i}", self.crop_pct)

    def __getitem__(self, key: int | slice | np.ndarray | list[int]) -> np.ndarray:
        if isinstance(key, int | np.integer):
            return self.decode(int(key) + (len(self) if key < 0 else 0))
        rows = range(len(self))[key] if isinstance(key, slice) else np.asarray(key).tolist()
        if not len(rows):
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        return np.stack([self.decode(int(r)) for r in rows])

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.decode(i) for i in range(len(self)))


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(SHARD_GLOB))

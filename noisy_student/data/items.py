"""The user's images as items to prepare: an id, where the bytes are, a label; decoded in
parallel and in order."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from noisy_student.data.images import read_image
from noisy_student.data.shards import shrink_encoded

T = TypeVar("T")


@dataclass(frozen=True)
class Item:
    """One image of the user's: its id in the tables, where its bytes are, its class index."""

    id: str
    file: Path | Callable[[], Path | bytes]  # a file, or a reader (a dataset row), called once
    label: int
    truth: int | None = None  # the pool's true class where the source knows it (else: label)
    origin: str | None = None  # where it came from, for index.csv (else: the file)

    def decode(self, size: int) -> np.ndarray:
        source = self.file if isinstance(self.file, Path) else self.file()
        return read_image(source, size, name=self.origin)

    def encoded(self, max_side: int | None) -> bytes:
        """The image's own bytes (checked to decode), re-encoded only above ``max_side``."""
        source = self.file if isinstance(self.file, Path) else self.file()
        data = source.read_bytes() if isinstance(source, Path) else source
        return shrink_encoded(data, max_side, self.origin or str(source))


def decoded(items: Sequence[Item], size: int, workers: int) -> Iterator[np.ndarray]:
    """Every item's image, in order, on ``workers`` threads (Pillow and OpenCV release the GIL
    while they decode and resize); a bounded window keeps memory flat for any pool."""
    return in_order(items, lambda item: item.decode(size), workers)


def encoded(items: Sequence[Item], max_side: int | None, workers: int) -> Iterator[bytes]:
    """Every item's encoded bytes, checked (decoded once) on ``workers`` threads, in order."""
    return in_order(items, lambda item: item.encoded(max_side), workers)


def in_order(items: Sequence[Item], work: Callable[[Item], T], workers: int) -> Iterator[T]:
    if workers <= 1:
        yield from (work(i) for i in items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        window: deque[Future] = deque()
        for item in items:
            window.append(pool.submit(work, item))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

"""Stage `scan`: the user's images, file by file, as ``data/sources.json`` (prepare's dep).

DVC runs it every time (``always_changed``); it reads only images that changed since the last
scan, and prepare reruns only if the list or a digest changed.
"""

from __future__ import annotations

from noisy_student.core import cli
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.data.sources import scan


def run(settings: Settings, layout: Layout) -> dict:
    return scan(settings, layout)


def main() -> None:
    args = cli.parser(__doc__).parse_args()
    cli.run(lambda args, settings: run(settings, Layout.at()), args)


if __name__ == "__main__":
    cli.main_process(main)

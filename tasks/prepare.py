"""Stage `prepare`: the demo digits or the user's folders -> resized RGB splits on disk."""

from __future__ import annotations

from noisy_student.core import cli
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.data.prepare import prepare


def run(settings: Settings, layout: Layout) -> dict[str, int]:
    return prepare(settings, layout)


def main() -> None:
    args = cli.parser(__doc__).parse_args()
    cli.run(lambda args, settings: run(settings, Layout.at()), args)


if __name__ == "__main__":
    cli.main_process(main)

"""Stage `export`: the champion as an ONNX model, checked against PyTorch before it is kept.

python -m tasks.export                     # models/<champion> -> exports/final.onnx
python -m tasks.export --model student_1   # -> exports/student_1.onnx
"""

from __future__ import annotations

from pathlib import Path

from noisy_student.core import cli
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.models.onnx_export import export


def run(
    settings: Settings, layout: Layout, model: str | None = None, out: Path | None = None
) -> Path:
    return export(settings, layout, model=model, out=out)


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--model", default=None, help="teacher, student_1, ... (default: the champion)")
    p.add_argument(
        "--out", default=None, help="default: exports/final.onnx, or exports/<model>.onnx"
    )
    args = p.parse_args()
    out = Path(args.out) if args.out else None
    cli.run(lambda args, settings: run(settings, Layout.at(), args.model, out), args)


if __name__ == "__main__":
    cli.main_process(main)

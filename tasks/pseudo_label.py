"""Stage `pseudo_label`: the round's teacher labels the whole unlabeled pool.

python -m tasks.pseudo_label student_1     # labels for student_1, made by its teacher
"""

from __future__ import annotations

from noisy_student.core import cli
from noisy_student.core.layout import Layout
from noisy_student.core.settings import Settings
from noisy_student.pseudo_labels.labeling import pseudo_label


def run(settings: Settings, layout: Layout, student: str) -> dict:
    return pseudo_label(settings, student, layout)


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("student", help="the round's student: student_1, student_2, ...")
    cli.run(lambda args, settings: run(settings, Layout.at(), args.student), p.parse_args())


if __name__ == "__main__":
    cli.main_process(main)

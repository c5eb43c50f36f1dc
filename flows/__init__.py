"""Prefect orchestration of dvc.yaml's stages, through the same tasks/ modules its commands run."""

import os

# the stages log through `noisy_student.*` loggers: send those to the Prefect run's logs as well
# (read when prefect is first imported, so it is set here, before any flow module imports it)
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "noisy_student,tasks,flows")

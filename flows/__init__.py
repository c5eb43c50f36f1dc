"""Prefect orchestration of the pipeline in tasks/ (the same stage functions dvc.yaml calls)."""

import os

# the stages log through `tasks.*` loggers: send those to the Prefect run's logs as well
# (read when prefect is first imported, so it is set here, before any flow module imports it)
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,flows")

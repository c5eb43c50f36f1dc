"""One thin module per dvc.yaml stage: read settings, call the library, write outputs.

Each is what dvc.yaml's command runs (``python -m tasks.<stage>``) and what the Prefect flow calls
(``run``); the work itself is in the ``noisy_student`` library.
"""

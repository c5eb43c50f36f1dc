"""Stages of the Noisy Student pipeline: each a plain function with a thin CLI that dvc.yaml calls
(and, once flows/ exists, a thin Prefect task over the same function)."""

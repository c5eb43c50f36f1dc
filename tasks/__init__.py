"""Stages of the Noisy Student pipeline: each a plain function, with a thin CLI (DVC) and a thin
Prefect task over it."""

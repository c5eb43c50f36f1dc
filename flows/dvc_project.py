"""The DVC side of a flow run: the flow decides, runs and records each stage as `dvc repro` would.

`dvc repro` runs a stage's command in a subprocess; the flow runs the same stage function in its
own process (one import of torch for the whole loop, tasks visible in Prefect) and asks DVC,
through its Python API, the three questions `dvc repro` asks itself: is the stage up to date
(skip), is its result in the run-cache (restore), and, after running it, record it (hash deps,
params and outputs into dvc.lock and the cache). A flow run and `dvc repro` therefore leave the
same dvc.lock, and either one skips what the other finished.

Stage-level calls (`Stage.changed`, `save`, `commit`, `dump`, `stage_cache`) are the ones DVC's own
`repro` makes (dvc/stage/__init__.py: Stage.reproduce and Stage.run); DVC has no public per-stage
API that runs a callable instead of the command.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

from dvc.exceptions import DvcException
from dvc.repo import Repo
from dvc.stage.cache import RunCacheNotFoundError
from dvc.utils.serialize import dumps_yaml, parse_yaml_for_update

from noisy_student.core.atomic import write_text
from noisy_student.core.errors import PipelineError
from noisy_student.core.settings import apply_overrides

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    SKIPPED = "skipped"  # up to date in dvc.lock
    RESTORED = "restored"  # outputs checked out from DVC's run-cache
    RAN = "ran"


class DvcProject:
    """The DVC repository at ``root`` (the folder holding dvc.yaml)."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        if not (self.root / "dvc.yaml").exists():
            raise PipelineError(f"{self.root}: no dvc.yaml here; run the flow from the project")
        if not (self.root / ".dvc").is_dir():
            raise PipelineError(f"{self.root}: not a DVC repository (run `dvc init` there)")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Repo]:
        # a fresh Repo each time: the previous stage changed files its index may have cached
        repo = Repo(str(self.root))
        try:
            with repo.lock:
                yield repo
        finally:
            repo.close()

    def _stage(self, repo: Repo, name: str):
        # the full address: a bare name would be looked up in the current directory's dvc.yaml
        stages = repo.stage.collect(f"{self.root / 'dvc.yaml'}:{name}")
        if len(stages) != 1:
            raise PipelineError(f"dvc.yaml: expected one stage named '{name}', found {len(stages)}")
        return stages[0]

    def dag(self) -> tuple[list[str], list[tuple[str, str]]]:
        """Stage names, and (upstream, downstream) pairs, as DVC reads them from dvc.yaml."""
        with self._locked() as repo:
            graph = repo.index.graph
            names = [stage.name for stage in graph.nodes]
            # DVC's edges point from a stage to the stage it depends on
            edges = [(up.name, down.name) for down, up in graph.edges]
        return names, edges

    def is_current(self, name: str) -> bool:
        with self._locked() as repo:
            return not self._stage(repo, name).changed()

    def run(self, name: str, compute: Callable[[], Any]) -> Outcome:
        """Skip, restore or run stage ``name`` (``compute`` does its work), then record it."""
        with self._locked() as repo:
            stage = self._stage(repo, name)
            if not stage.changed():
                return Outcome.SKIPPED
            try:
                repo.stage_cache.restore(stage)
            except RunCacheNotFoundError:
                pass
            else:
                self._record(stage, run_cache=False)
                return Outcome.RESTORED
        compute()  # unlocked, as `dvc repro` runs commands: other DVC commands may read meanwhile
        with self._locked() as repo:
            stage = self._stage(repo, name)
            # as Stage.run: uncached outputs (not metrics or plots) cannot be restored later
            uncached = any(
                not out.use_cache for out in stage.outs if not (out.is_metric or out.is_plot)
            )
            self._record(stage, run_cache=not uncached)
        return Outcome.RAN

    def _git_files(self, repo: Repo) -> list[str]:
        """What `dvc repro` leaves for git: uncached outputs (metrics, reports) and the
        .gitignore files that keep cached outputs out of git."""
        files = set()
        for stage in repo.index.stages:
            for out in stage.outs:
                path = Path(out.fs_path)
                candidate = path if not out.use_cache else path.parent / ".gitignore"
                if candidate.is_file():
                    files.add(str(candidate.relative_to(self.root)))
        return sorted(files)

    @staticmethod
    def _record(stage, run_cache: bool) -> None:
        stage.save(run_cache=run_cache)  # hashes deps, params, outs
        stage.commit()  # outs into .dvc/cache
        stage.dump(update_pipeline=False)  # dvc.lock

    def save_experiment(self, name: str, message: str) -> str | None:
        """Snapshot the workspace as DVC experiment ``name``; None (and a warning) if impossible."""
        repo = Repo(str(self.root))
        try:
            if repo.scm.no_commits:
                log.warning("not saved as a DVC experiment: the git repository has no commit yet")
                return None
            rev = repo.experiments.save(
                name=name, force=True, message=message, include_untracked=self._git_files(repo)
            )
        except DvcException as exc:
            log.warning("not saved as a DVC experiment: %s", exc)
            return None
        finally:
            repo.close()
        return rev


@contextlib.contextmanager
def params_for_run(params_file: Path, overrides: dict[str, Any]) -> Iterator[None]:
    """params.yaml holds ``overrides`` during the run (so dvc.lock records the values the stages
    used, as `dvc exp run -S` does), and its original text afterwards, comments and all."""
    if not overrides:
        yield
        return
    original = params_file.read_text()
    data = parse_yaml_for_update(original, str(params_file))
    write_text(params_file, dumps_yaml(apply_overrides(data, overrides)))
    try:
        yield
    finally:
        write_text(params_file, original)

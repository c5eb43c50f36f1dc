"""Screenshots of MLflow's UI as a user sees it after `make demo`, taken in a real headless
browser (Debian's Chromium), for the README.

    python -m docs.mlflow_screenshots                  # the project here: ./mlflow.db
    python -m docs.mlflow_screenshots --project path --out docs/images

Starts `mlflow ui` on the project's store (as `make ui` does, on a free port), then opens, in
headless Chromium: the experiment (it must open on the training runs, not on MLflow 3's GenAI
overview: the `mlflow.experimentKind` tag), and the compare view of the loop's teacher and its
students (the latest loop's run of each model). Writes ``experiment.png`` and ``compare.png``.
Needs `chromium` on the PATH (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow

from noisy_student.tracking.runs import UI_MODE

EXPERIMENT = "noisy-student"
BROWSER = ("chromium", "chromium-browser", "google-chrome")
MODE = UI_MODE  # without it a first visit opens MLflow 3.17's GenAI overview


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"error: {url} did not answer within {seconds:.0f} s")


def screenshot(browser: str, url: str, out: Path, window: str = "1600,1000") -> None:
    """One page as Chromium renders it once its scripts have had 20 s of virtual time."""
    command = [
        browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        f"--window-size={window}", "--virtual-time-budget=20000", f"--screenshot={out}", url,
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=180)
    print(f"{out}: {url}")


def loop_runs(client: mlflow.MlflowClient, experiment_id: str) -> list[str]:
    """The latest training run of each model of the loop, teacher first."""
    latest: dict[str, mlflow.entities.Run] = {}
    for run in client.search_runs([experiment_id], order_by=["attributes.start_time DESC"]):
        stage = run.data.tags.get("stage")
        if stage in ("teacher", "student") and "member" not in run.data.tags:
            latest.setdefault(run.info.run_name, run)
    names = sorted(latest, key=lambda n: (n != "teacher", n))
    return [latest[n].info.run_id for n in names]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--project", type=Path, default=Path("."))
    p.add_argument("--out", type=Path, default=Path("docs/images"))
    args = p.parse_args()
    store = (args.project / "mlflow.db").resolve()
    if not store.exists():
        sys.exit(f"error: {store}: not found; run the pipeline first (make demo)")
    browser = next((b for b in BROWSER if shutil.which(b)), None)
    if browser is None:
        sys.exit("error: no chromium on the PATH (Debian: apt-get install chromium)")
    uri = f"sqlite:///{store}"
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        sys.exit(f"error: {store}: no experiment {EXPERIMENT!r}")
    runs = loop_runs(client, experiment.experiment_id)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=args.project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(base)
        # the trainings, not their grouping run (it opens collapsed): as a user would filter
        runs_query = urllib.parse.urlencode({"searchFilter": "tags.stage != 'loop'"})
        screenshot(browser, f"{base}/#/experiments/{experiment.experiment_id}/runs?{runs_query}"
                   f"&{MODE}", args.out / "mlflow_experiment.png")  # fmt: skip
        query = urllib.parse.urlencode(
            {"runs": json.dumps(runs), "experiments": json.dumps([experiment.experiment_id])}
        )
        compare = f"{base}/#/compare-runs?{query}&{MODE}"
        # tall: the metrics table (test accuracy of each run) too
        screenshot(browser, compare, args.out / "mlflow_compare.png", window="1600,2400")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()

"""Serve the `self-training` deployments, so that `prefect deployment run 'self-training/demo'`
runs the flow (in a subprocess of this process, in the project folder it was started from).

    python -m flows.serve               serve to the Prefect server at PREFECT_API_URL
    python -m flows.serve --server      start a local server first (`make serve` does this):
                                        UI and API on http://127.0.0.1:4200, SQLite under .prefect/
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

DEPLOYMENTS = {
    "demo": "the pipeline with params.yaml as it is (pass overrides to change values for a run)",
}
SERVER_START_TIMEOUT_S = 180  # the first start migrates a fresh SQLite database


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def local_server(host: str, port: int, home: Path) -> Iterator[str]:
    """A Prefect server on host:port while the block runs; reused if one is already there."""
    api_url = f"http://{host}:{port}/api"
    if healthy(api_url):
        print(f"using the Prefect server already running at {api_url}", flush=True)
        yield api_url
        return
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    server = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not healthy(api_url):
            if server.poll() is not None:
                sys.exit(f"error: `{' '.join(cmd[2:])}` exited with code {server.returncode}")
            if time.monotonic() > deadline:
                sys.exit(f"error: no Prefect server at {api_url} after {SERVER_START_TIMEOUT_S} s")
            time.sleep(1)
        print(f"Prefect server ready: UI http://{host}:{port}, API {api_url}", flush=True)
        yield api_url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def serve_deployments() -> None:
    # imported here: Prefect reads PREFECT_API_URL when it is first imported
    from prefect import serve

    from flows.self_training import self_training

    serve(
        *(
            self_training.to_deployment(name=name, description=text, tags=["self-training"])
            for name, text in DEPLOYMENTS.items()
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", action="store_true", help="start a local Prefect server first")
    p.add_argument("--host", default="127.0.0.1", help="server address (default: local only)")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--home", default=".prefect", help="PREFECT_HOME of the server (its database)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the server too
    try:
        if not args.server:
            serve_deployments()
            return
        home = Path(args.home).resolve()
        with local_server(args.host, args.port, home) as api_url:
            os.environ["PREFECT_API_URL"] = api_url
            os.environ["PREFECT_HOME"] = str(home)
            print(
                "in another terminal:\n"
                f"  export PREFECT_API_URL={api_url}\n"
                "  prefect deployment run 'self-training/demo' --watch",
                flush=True,
            )
            serve_deployments()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

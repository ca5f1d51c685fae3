"""A real `prefect server start` on 127.0.0.1, on a free port, with its own PREFECT_HOME.

Used by the slow tests that need what the ephemeral server does not give: a UI to open in a
browser, workers, deployments and automations.

    with live_prefect_server(tmp_path) as server:
        subprocess.run([...], env=server.env)   # env points PREFECT_API_URL at it
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT (the UI)
    api_url: str  # http://127.0.0.1:PORT/api
    env: dict[str, str]  # an environment whose Prefect client talks to this server
    home: Path
    log: Path

    def prefect(self, *args: str, timeout: float = 120, check: bool = True):
        """Run the `prefect` CLI against this server."""
        out = subprocess.run(
            [PREFECT, *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)}: {out.stdout}\n{out.stderr}")
        return out


def _wait_healthy(api_url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited ({proc.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout} s:\n{log.read_text()}")


@contextlib.contextmanager
def live_prefect_server(tmp: Path, timeout: float = 120) -> Iterator[LiveServer]:
    port = free_port()
    home = tmp / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"{url}/api",
        # The bundled UI must be told where its API is when the port is not 4200.
        "PREFECT_UI_API_URL": f"{url}/api",
        "OMP_NUM_THREADS": "1",
    }
    log = tmp / "prefect-server.log"
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_healthy(f"{url}/api", proc, log, timeout)
        yield LiveServer(url=url, api_url=f"{url}/api", env=env, home=home, log=log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

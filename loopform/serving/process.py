"""`bentoml serve` of a model's service as a subprocess: how `loopform up`, the tests and the benchmark run one."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class BentoServer:
    """`bentoml serve` of a service as a subprocess on localhost: start, wait until ready, stop gracefully.

    Stopping sends SIGTERM (BentoML then runs the service's shutdown hooks, which drain the payload log) and
    waits for the process.
    """

    def __init__(
        self,
        service: str,
        *,
        working_dir: str | os.PathLike[str],
        port: int,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.service = service
        self.working_dir = str(working_dir)
        self.env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "true", **(env or {})}
        self.port = port
        self.host = host
        self.log_path = log_path
        self.process: Any = None
        self._log_file: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, ready_timeout: float = 180.0) -> BentoServer:
        """Start the server and return once /readyz answers 200 (or raise with the server's log tail).

        A service without callers' tokens (and not explicitly anonymous) is refused here, at once: its workers
        would fail their start-up again and again and the server would never be ready.
        """
        import subprocess
        import sys

        import httpx

        from loopform.serving.auth import describe

        describe(self.env)
        command = [
            sys.executable, "-m", "bentoml", "serve", self.service,
            "--host", self.host, "--port", str(self.port), "--working-dir", self.working_dir,
        ]  # fmt: skip
        self._log_file = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            command, cwd=self.working_dir, env=self.env, stdout=self._log_file, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"bentoml serve was not ready in {ready_timeout} s: {self.log_tail()}")

    def stop(self, sig: int | None = None, timeout: float = 60.0) -> int | None:
        """Graceful stop (SIGTERM by default); kill only if it does not exit within `timeout`."""
        import signal
        import subprocess

        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig or signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_file not in (None, subprocess.DEVNULL):
            self._log_file.close()
        return self.process.returncode

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path:
            return "(no log file)"
        path = Path(self.log_path)
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log yet)"

    def __enter__(self) -> BentoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

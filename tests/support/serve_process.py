"""`credit-gateway serve` in a subprocess, for tests of what a user sees: its output is
read by a thread (all of it, until it exits), and start() waits for uvicorn's start line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without CREDIT_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDIT_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


class ServeProcess:
    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_started(self, timeout: float = 60) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if "Application startup complete" in self.output:
                return self.output
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"serve did not start:\n{self.output}")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        return self.output


def serve(env: dict[str, str], cwd: Path, *args: str) -> tuple[ServeProcess, int]:
    """A started `serve` on a free port, and the port."""
    port = free_port()
    p = ServeProcess(["serve", "--port", str(port), *args], env, cwd)
    p.wait_started()
    # uvicorn logs "startup complete" before it binds the port: wait until it accepts.
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or p.proc.poll() is not None:
                p.stop()
                raise AssertionError(f"serve never accepted connections:\n{p.output}") from None
            time.sleep(0.05)
    return p, port

"""The README's quick start, run as written: its bash blocks, in order, in one bash, in a
scratch directory holding the repository's examples/ and this venv as .venv. The ports are
the README's (8000 and 9100). Each `# => fragment` line must appear in what the blocks
print, so the walk-through fails here when the README and the gateway drift apart."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import unavailable

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Quick start"


def quickstart_blocks(readme: str) -> list[str]:
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start : end if end != -1 else None]
    return re.findall(r"^```bash\n(.*?)^```", section, re.M | re.S)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind (TIME_WAIT is no user)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_readme_quick_start_runs_as_written(tmp_path):
    blocks = quickstart_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 4, "the quick start lost its blocks"
    script = "\n".join(blocks)
    for needed in (
        "credit-gateway mock-upstream",
        "credit-gateway serve",
        "/admin/accounts/alice/grants",
        "/v1/chat/completions",
        "/credits/balance",
        "/ledger",
    ):
        assert needed in script, needed
    expected = [line.split("# =>", 1)[1].strip() for line in script.splitlines() if line.startswith("# =>")]
    assert expected
    if not shutil.which("curl"):
        unavailable("curl is not installed")
    for port in (8000, 9100):
        if not _port_free(port):
            unavailable(f"port {port}, which the README's quick start uses, is taken")

    shutil.copytree(REPO / "examples", tmp_path / "examples")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDIT_") and k != "VIRTUAL_ENV"}
    env["PYTHONPATH"] = str(REPO)  # the venv may hold the package as an editable install of another checkout
    # -e: a failing command fails the walk; the trap stops what it started in the background
    # even when a step fails.
    prelude = "set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
    proc = subprocess.Popen(
        ["bash", "-c", prelude + script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        logs = "".join(f"\n--- {p.name}\n{p.read_text()}" for p in tmp_path.glob("*.log"))
        pytest.fail(f"the quick start did not finish:\n{out}{logs}")
    logs = "".join(f"\n--- {p.name}\n{p.read_text()}" for p in tmp_path.glob("*.log"))
    assert proc.returncode == 0, f"{out}{logs}"
    seen = out.replace("\r", "").lower()
    for fragment in expected:
        assert fragment.lower() in seen, f"README expects {fragment!r}; the walk printed:\n{out}{logs}"
    assert (tmp_path / "quickstart.sqlite3.keys").exists()
    for port in (8000, 9100):  # its last block stopped both
        assert _wait_free(port), f"port {port} still in use after the quick start's kill"


def _wait_free(port: int, timeout: float = 15) -> bool:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if _port_free(port):
            return True
        time.sleep(0.1)
    return False

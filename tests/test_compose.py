"""docker-compose.yml: validated by `docker-compose config` when it is installed (no engine
needed), else parsed as YAML; either way its essentials are checked: the gateway mounts a
proxy config where CREDIT_GATEWAY_CONFIG points, the example config names the upstream the
compose file redirects to the mock service, and the gateway's healthcheck (python, the
image has no curl) passes on a ready gateway and fails on a 503."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import yaml

from gateway.proxy.config import load_config

REPO = Path(__file__).resolve().parents[1]
KEY = "compose-admin-" + "k" * 30


def compose_config() -> dict:
    env = {**os.environ, "CREDIT_ADMIN_KEYS": KEY}
    env.pop("CREDIT_GATEWAY_CONFIG_FILE", None)
    exe = shutil.which("docker-compose")
    if exe:
        r = subprocess.run(
            [exe, "-f", str(REPO / "docker-compose.yml"), "config"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        return yaml.safe_load(r.stdout)
    # Without docker-compose: the file as written, with the ${VAR:-default} forms it uses resolved.
    text = (REPO / "docker-compose.yml").read_text()
    text = text.replace("${CREDIT_ADMIN_KEYS:?set CREDIT_ADMIN_KEYS}", KEY).replace(
        "${CREDIT_CLIENT_KEYS:-}", ""
    )
    text = text.replace("${CREDIT_GATEWAY_CONFIG_FILE:-./examples/gateway.toml}", "./examples/gateway.toml")
    assert "${" not in text, "a variable the test does not resolve"
    return yaml.safe_load(text)


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path (short syntax, as written or as docker-compose prints it)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = v["source"]
        else:
            host, container = v.split(":")[:2]
            out[container] = host
    return out


def test_compose_file_mounts_the_proxy_config_and_checks_readiness():
    cfg = compose_config()
    services = cfg["services"]
    assert {"redis", "mongo", "gateway", "worker", "mock-upstream"} <= set(services)
    gw = services["gateway"]
    env = gw["environment"]
    assert env["CREDIT_ADMIN_KEYS"] == KEY
    config_path = env["CREDIT_GATEWAY_CONFIG"]
    host_file = _mounts(gw)[config_path]
    host_path = Path(host_file) if Path(host_file).is_absolute() else REPO / host_file
    assert host_path.resolve() == (REPO / "examples" / "gateway.toml").resolve()
    # The example config, as the gateway in compose reads it: its upstream is the mock service.
    proxy = load_config(str(host_path), env={k: str(v) for k, v in env.items()})
    assert [u.base_url for u in proxy.upstreams] == ["http://mock-upstream:9100"]
    mock_cmd = services["mock-upstream"]["command"]
    assert (
        mock_cmd[:2] == ["credit-gateway", "mock-upstream"] and "0.0.0.0" in mock_cmd and "9100" in mock_cmd
    )
    test = gw["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"] and "/readyz" in test[3]
    assert gw["depends_on"]["redis"]["condition"] == "service_healthy"


class _Readyz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_the_gateway_healthcheck_command_passes_when_ready_and_fails_on_503():
    code = compose_config()["services"]["gateway"]["healthcheck"]["test"][3]
    assert "http://127.0.0.1:8000/readyz" in code
    server = http.server.HTTPServer(("127.0.0.1", 0), _Readyz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        local = code.replace("127.0.0.1:8000", f"127.0.0.1:{server.server_port}")
        _Readyz.status = 200
        assert subprocess.run([sys.executable, "-c", local], capture_output=True, timeout=30).returncode == 0
        _Readyz.status = 503
        assert subprocess.run([sys.executable, "-c", local], capture_output=True, timeout=30).returncode != 0
    finally:
        server.shutdown()
        server.server_close()

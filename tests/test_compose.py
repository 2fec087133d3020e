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


def _merge(base: dict, over: dict) -> dict:
    """Compose's merge of a second file: mappings merged key by key, anything else replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def compose_config(files: tuple[str, ...] = ("docker-compose.yml",), profiles: tuple[str, ...] = ()) -> dict:
    env = {**os.environ, "CREDIT_ADMIN_KEYS": KEY}
    for unset in ("CREDIT_GATEWAY_CONFIG_FILE", "CREDIT_POSTGRES_PASSWORD"):
        env.pop(unset, None)
    exe = shutil.which("docker-compose")
    if exe:
        args = [a for f in files for a in ("-f", str(REPO / f))]
        args += [a for p in profiles for a in ("--profile", p)]
        r = subprocess.run([exe, *args, "config"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return yaml.safe_load(r.stdout)
    # Without docker-compose: the files as written, with the ${VAR:-default} forms they use
    # resolved, merged in order.
    cfg: dict = {}
    for f in files:
        text = (REPO / f).read_text()
        text = text.replace("${CREDIT_ADMIN_KEYS:?set CREDIT_ADMIN_KEYS}", KEY).replace(
            "${CREDIT_CLIENT_KEYS:-}", ""
        )
        text = text.replace(
            "${CREDIT_GATEWAY_CONFIG_FILE:-./examples/gateway.toml}", "./examples/gateway.toml"
        )
        text = text.replace("${CREDIT_POSTGRES_PASSWORD:-credit}", "credit")
        assert "${" not in text, "a variable the test does not resolve"
        cfg = _merge(cfg, yaml.safe_load(text))
    return cfg


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


def test_the_postgres_profile_runs_the_gateway_and_worker_on_postgresql():
    plain = compose_config()["services"]
    assert plain["postgres"]["profiles"] == ["postgres"]  # started only with its profile
    assert "CREDIT_DATABASE_URL" not in plain["gateway"]["environment"]
    assert "postgres" not in plain["gateway"]["depends_on"]
    cfg = compose_config(("docker-compose.yml", "docker-compose.postgres.yml"), profiles=("postgres",))
    pg = cfg["services"]["postgres"]
    assert pg["image"] == "postgres:15" and pg["profiles"] == ["postgres"]
    assert "/var/lib/postgresql/data" in _mounts(pg) and _mounts(pg)["/var/lib/postgresql/data"]
    assert pg["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    e = pg["environment"]
    url = f"postgresql://{e['POSTGRES_USER']}:{e['POSTGRES_PASSWORD']}@postgres:5432/{e['POSTGRES_DB']}"
    for name in ("gateway", "worker"):
        svc = cfg["services"][name]
        assert svc["environment"]["CREDIT_DATABASE_URL"] == url, name
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert svc["environment"]["CREDIT_REDIS_URL"] == "redis://redis:6379/0", name  # the rest kept
    # The image has the driver: the store's extra is installed.
    assert "pip install --no-cache-dir '.[postgres]'" in (REPO / "Dockerfile").read_text()


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

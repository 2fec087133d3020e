"""docker-compose.yml, validated by `docker-compose config` (Debian's docker-compose parses and
validates a compose file without a container engine; CI installs it) with every profile:
the services each profile adds, a healthcheck on every service, Redis with AOF, MongoDB as
a replica set, two workers, Prometheus scraping what the stack serves, every variable the
file sets for the gateway and the workers one they read; the gateway mounts a proxy config
where CREDIT_GATEWAY_CONFIG points, and its healthcheck (python, the image has no curl)
passes on a ready gateway and fails on a 503."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from gateway.core.settings import Settings
from gateway.proxy.config import load_config
from tests.conftest import unavailable

REPO = Path(__file__).resolve().parents[1]
KEY = "compose-admin-" + "k" * 30
PROFILES = {"demo": {"mock-upstream"}, "monitoring": {"prometheus"}, "postgres": {"postgres"}}
ALWAYS = {"redis", "mongo", "gateway", "worker", "worker-2"}
POSTGRES_FILE = "docker-compose.postgres.yml"


def compose_config(*profiles: str, files: tuple[str, ...] = ("docker-compose.yml",)) -> dict:
    exe = shutil.which("docker-compose")
    if not exe:
        unavailable("docker-compose is not installed (apt-get install docker-compose)")
    env = {**os.environ, "CREDIT_ADMIN_KEYS": KEY}
    env.pop("CREDIT_GATEWAY_CONFIG_FILE", None)
    args = [exe, *(a for f in files for a in ("-f", str(REPO / f)))]
    args += [a for p in profiles for a in ("--profile", p)]
    r = subprocess.run([*args, "config"], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


@pytest.mark.parametrize(
    ("profiles", "files"),
    [
        ((), ("docker-compose.yml",)),
        (("demo",), ("docker-compose.yml",)),
        (("monitoring",), ("docker-compose.yml",)),
        (("postgres",), ("docker-compose.yml", POSTGRES_FILE)),
        (("demo", "monitoring", "postgres"), ("docker-compose.yml", POSTGRES_FILE)),
    ],
    ids=["default", "demo", "monitoring", "postgres", "all"],
)
def test_every_profile_is_valid_and_adds_its_services(profiles, files):
    services = compose_config(*profiles, files=files)["services"]
    by_profile: dict[str, set[str]] = {}
    for name, svc in services.items():
        for p in svc.get("profiles", []) or ["-"]:
            by_profile.setdefault(p, set()).add(name)
    assert by_profile["-"] == ALWAYS
    for p, names in PROFILES.items():
        assert by_profile[p] == names
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    if "postgres" in profiles:
        for name in ("gateway", "worker", "worker-2"):
            url = services[name]["environment"]["CREDIT_DATABASE_URL"]
            assert url.startswith("postgresql://") and "@postgres:5432/" in url, name


def test_the_stack_s_shape_redis_aof_a_replica_set_two_workers_and_prometheus_targets():
    services = compose_config("monitoring")["services"]
    redis_cmd = services["redis"]["command"]
    assert "--appendonly" in redis_cmd and redis_cmd[redis_cmd.index("--appendfsync") + 1] == "everysec"
    assert "--replSet" in services["mongo"]["command"]
    assert "replicaSet=rs0" in services["gateway"]["environment"]["CREDIT_MONGO_URI"]
    names = {services[w]["environment"]["CREDIT_WORKER_NAME"] for w in ("worker", "worker-2")}
    assert len(names) == 2  # two consumers, each resuming its own pending entries
    audits = {services[w]["environment"].get("CREDIT_AUDIT_PATH", "") for w in ("worker", "worker-2")}
    assert len(audits) == 2  # no audit file written by two processes
    assert "--workers" in services["gateway"]["command"]
    prom = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"gateway:8000", "worker:9101", "worker-2:9101"}
    assert all(t.split(":")[0] in services for t in targets)
    for w in ("worker", "worker-2"):
        assert services[w]["environment"]["CREDIT_WORKER_METRICS_HOST"] == "0.0.0.0"
        assert Settings().worker_metrics_port == 9101  # the port Prometheus scrapes
    gateway_job = next(j for j in prom["scrape_configs"] if j["job_name"] == "credit-gateway")
    mounted = _mounts(services["prometheus"])
    assert gateway_job["authorization"]["credentials_file"] in mounted


def _settings_variables() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        names.add(f"CREDIT_{name.upper()}")
        alias = field.validation_alias
        names.update(getattr(alias, "choices", []) or ([alias] if isinstance(alias, str) else []))
    return names


def test_every_variable_the_compose_file_sets_is_one_the_gateway_reads():
    services = compose_config("demo", "monitoring", "postgres", files=("docker-compose.yml", POSTGRES_FILE))[
        "services"
    ]
    known = _settings_variables()
    gw = services["gateway"]
    host_file = _mounts(gw)[gw["environment"]["CREDIT_GATEWAY_CONFIG"]]
    proxy_file = Path(host_file) if Path(host_file).is_absolute() else REPO / host_file
    for name in ("gateway", "worker", "worker-2"):
        env = {k: str(v) for k, v in services[name]["environment"].items()}
        overrides = {k for k in env if k.startswith("CREDIT_UPSTREAM_")}
        unknown = set(env) - known - overrides
        assert not unknown, f"{name} sets variables the gateway never reads: {sorted(unknown)}"
        if overrides:  # an upstream override must name an upstream of the mounted config, and apply
            proxy = load_config(str(proxy_file), env=env)
            for k in overrides:
                assert env[k] in [u.base_url for u in proxy.upstreams], k


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
    cfg = compose_config("demo")
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
    code = compose_config("demo")["services"]["gateway"]["healthcheck"]["test"][3]
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

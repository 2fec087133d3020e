"""Settings, read from CREDIT_* environment variables (pydantic-settings).

Plain data: nothing here opens a connection. `create_app(settings)` and the worker's
runner build their clients from it.
"""

from __future__ import annotations

import hashlib
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_KEY_LENGTH = 32


def parse_keys(raw: str) -> list[bytes]:
    """Comma-separated keys -> SHA-256 digests. `sha256:<hex>` entries are digests already."""
    digests = []
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        if entry.startswith("sha256:"):
            hexd = entry[7:]
            try:
                d = bytes.fromhex(hexd)
            except ValueError as exc:
                raise ValueError("a sha256: key entry must be 64 hex digits") from exc
            if len(d) != 32:
                raise ValueError("a sha256: key entry must be 64 hex digits")
            digests.append(d)
        else:
            if len(entry) < MIN_KEY_LENGTH:
                raise ValueError(f"API keys must be at least {MIN_KEY_LENGTH} characters (got one of {len(entry)})")
            digests.append(hashlib.sha256(entry.encode()).digest())
    return digests


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CREDIT_", extra="ignore")

    # Redis: unset = embedded mode (in-process fakeredis + SQLite, worker in the same process).
    redis_url: str | None = None
    redis_cluster: bool = False
    redis_max_connections: int = Field(256, ge=1)
    # The script calls of the hot path go over a few shared, multiplexed connections
    # (gateway/core/multiplex.py): several times less client CPU per call than redis-py.
    redis_multiplex: bool = True
    redis_multiplex_connections: int = Field(2, ge=1, le=64)
    redis_timeout_seconds: float = Field(5.0, gt=0, description="a script call without an answer by then fails")
    key_prefix: str = "cg"
    partitions: int = Field(64, ge=1, le=16384, description="fixed for the life of a deployment")

    # Durable store: MongoDB when a URI is set, else SQLite.
    mongo_uri: str | None = None
    mongo_db: str = "credit_management"
    sqlite_path: str = "credit-gateway.sqlite3"

    # Authentication (comma-separated keys or sha256:<hex> digests).
    admin_keys: str = ""
    client_keys: str = ""

    # Operations.
    retention_seconds: int = Field(7 * 86400, ge=3600, description="op-id and resolved-hold memory in Redis")
    max_hold_ttl_seconds: int = Field(86400, ge=1)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    api_key_cache_seconds: float = Field(
        10.0, ge=0, description="how long a process trusts a cached per-user key lookup (revocations also arrive by pub/sub)"
    )

    # Worker.
    audit_path: str | None = "credit-audit.jsonl"
    worker_batch: int = Field(1000, ge=1)
    worker_idle_seconds: float = Field(0.05, gt=0)
    claim_idle_ms: int = Field(30_000, ge=0)
    max_deliveries: int = Field(5, ge=1)
    sweep_interval_seconds: float = Field(1.0, gt=0)
    worker_name: str | None = None

    # Metering proxy: the TOML/YAML file of upstreams, pricing and limits (gateway/proxy/config.py).
    gateway_config: str | None = None

    # HTTP server.
    host: str = "127.0.0.1"
    port: int = 8000
    # Connection limits of `serve` (gateway/server.py, docs/serving.md).
    http_header_timeout_seconds: float = Field(
        10.0, gt=0, description="a connection whose request head is not complete by then is closed"
    )
    http_keepalive_seconds: float = Field(5.0, gt=0, description="an idle keep-alive connection is closed after this")
    http_max_connections: int = Field(
        0, ge=0, description="open connections beyond it are answered 503; 0 = from the open-file limit"
    )

    @field_validator("admin_keys", "client_keys")
    @classmethod
    def _keys_are_valid(cls, v: str) -> str:
        parse_keys(v)
        return v

    @property
    def embedded(self) -> bool:
        return not self.redis_url

    @property
    def admin_key_digests(self) -> list[bytes]:
        return parse_keys(self.admin_keys)

    @property
    def client_key_digests(self) -> list[bytes]:
        return parse_keys(self.client_keys)

"""Settings, read from CREDIT_* environment variables (pydantic-settings).

Plain data: nothing here opens a connection. `create_app(settings)` and the worker's
runner build their clients from it.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_KEY_LENGTH = 32


def parse_keys(raw: str) -> list[bytes]:
    """Comma-separated keys -> SHA-256 digests. `sha256:<hex>` entries are digests already.

    Error messages name an entry by its position and length only: they end up in logs and
    on terminals, and must never carry key material."""
    digests = []
    entries = [e.strip() for e in raw.split(",")]
    for n, entry in enumerate(entries, 1):
        if not entry:
            continue  # an empty entry (a trailing comma): nothing to add
        where = f"entry {n}" if len(entries) > 1 else "the key"
        if entry.startswith("sha256:"):
            hexd = entry[7:]
            if len(hexd) != 64 or any(c not in "0123456789abcdefABCDEF" for c in hexd):
                raise ValueError(f"{where}: a sha256: entry must be followed by 64 hex digits")
            digests.append(bytes.fromhex(hexd))
        else:
            # A key travels in an Authorization header: printable ASCII, no spaces, or it
            # could never be presented (and "a" + spaces + "b" is no 32-character secret).
            if any(not ("!" <= c <= "~") for c in entry):
                raise ValueError(
                    f"{where}: keys may contain only printable ASCII characters, "
                    "no spaces or control characters"
                )
            if len(entry) < MIN_KEY_LENGTH:
                raise ValueError(
                    f"{where}: API keys must be at least {MIN_KEY_LENGTH} characters "
                    f"(this one has {len(entry)})"
                )
            digests.append(hashlib.sha256(entry.encode()).digest())
    if raw and not digests:
        raise ValueError("the list is set but holds no key (only spaces and commas); unset it for none")
    return digests


class Settings(BaseSettings):
    # populate_by_name: Settings(razorpay_key_id=...) in code, RAZORPAY_KEY_ID in the environment.
    model_config = SettingsConfigDict(env_prefix="CREDIT_", extra="ignore", populate_by_name=True)

    # Redis: unset = embedded mode (in-process fakeredis + SQLite, worker in the same process).
    redis_url: str | None = None
    redis_cluster: bool = False
    redis_max_connections: int = Field(256, ge=1)
    # The script calls of the hot path go over a few shared, multiplexed connections
    # (gateway/core/multiplex.py): several times less client CPU per call than redis-py.
    redis_multiplex: bool = True
    redis_multiplex_connections: int = Field(2, ge=1, le=64)
    redis_timeout_seconds: float = Field(
        5.0, gt=0, description="a script call without an answer by then fails"
    )
    key_prefix: str = "cg"
    partitions: int = Field(64, ge=1, le=16384, description="fixed for the life of a deployment")

    # Durable store: PostgreSQL when a database URL is set, else MongoDB when a URI is set,
    # else SQLite.
    database_url: str | None = None  # postgresql://user@host:5432/dbname
    mongo_uri: str | None = None
    mongo_db: str = "credit_management"
    sqlite_path: str = "credit-gateway.sqlite3"

    # Authentication (comma-separated keys or sha256:<hex> digests).
    admin_keys: str = ""
    client_keys: str = ""
    # Bearer tokens that may read GET /metrics and nothing else (Prometheus'
    # `authorization` credentials); the admin keys may read it too.
    metrics_keys: str = ""

    # Operations.
    retention_seconds: int = Field(86400, ge=3600, description="op-id and resolved-hold memory in Redis")
    max_backlog: int = Field(
        10_000,
        ge=0,
        description="stream entries per partition before new holds are refused (backlog_full, 503); 0 = none",
    )
    max_hold_ttl_seconds: int = Field(86400, ge=1)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    api_key_cache_seconds: float = Field(
        10.0,
        ge=0,
        description="how long a process trusts a cached per-user key lookup "
        "(revocations also arrive by pub/sub)",
    )

    # Worker.
    audit_path: str | None = "credit-audit.jsonl"
    worker_batch: int = Field(1000, ge=1)
    worker_idle_seconds: float = Field(0.05, gt=0)
    worker_linger_seconds: float = Field(
        0.02,
        ge=0,
        le=1,
        description="after a wake-up, how long the worker lets entries gather before it writes "
        "them (fewer, larger batches; the store lags Redis by up to this much more)",
    )
    claim_idle_ms: int = Field(30_000, ge=0)
    max_deliveries: int = Field(5, ge=1)
    sweep_interval_seconds: float = Field(1.0, gt=0)
    worker_name: str | None = None
    # The worker's own /metrics (Prometheus); on 127.0.0.1 unless told (a container: 0.0.0.0).
    worker_metrics_port: int = Field(9101, ge=0, le=65535, description="0: no metrics server")
    worker_metrics_host: str = "127.0.0.1"

    # Metering proxy: the TOML/YAML file of upstreams, pricing and limits (gateway/proxy/config.py).
    gateway_config: str | None = None

    # HTTP server.
    host: str = "127.0.0.1"
    port: int = 8000
    # Connection limits of `serve` (gateway/server.py, docs/serving.md).
    http_header_timeout_seconds: float = Field(
        10.0, gt=0, description="a connection whose request head is not complete by then is closed"
    )
    http_keepalive_seconds: float = Field(
        5.0, gt=0, description="an idle keep-alive connection is closed after this"
    )
    http_max_connections: int = Field(
        0, ge=0, description="open connections beyond it are answered 503; 0 = from the open-file limit"
    )

    # Logging (gateway/logs.py): "json" writes one JSON object per line, with the request id.
    log_format: Literal["text", "json"] = "text"

    # Selling credits (gateway/payments/). The providers' own variable names, as teams
    # moving from credit-management have them set; a provider without its keys is off.
    razorpay_key_id: str | None = Field(None, validation_alias=AliasChoices("RAZORPAY_KEY_ID"))
    razorpay_key_secret: SecretStr | None = Field(None, validation_alias=AliasChoices("RAZORPAY_KEY_SECRET"))
    razorpay_webhook_secret: SecretStr | None = Field(
        None, validation_alias=AliasChoices("RAZORPAY_WEBHOOK_SECRET")
    )
    stripe_api_key: SecretStr | None = Field(None, validation_alias=AliasChoices("STRIPE_API_KEY"))
    stripe_webhook_secret: SecretStr | None = Field(
        None, validation_alias=AliasChoices("STRIPE_WEBHOOK_SECRET")
    )
    app_base_url: str | None = Field(
        None,
        validation_alias=AliasChoices("APP_BASE_URL"),
        description="where the providers send the buyer back (callback, success and cancel URLs)",
    )
    razorpay_base_url: str | None = Field(None, description="another Razorpay API server (tests, sandboxes)")
    stripe_api_base: str | None = Field(None, description="another Stripe API server (tests, sandboxes)")
    payment_rates: str | None = Field(None, description='credits per unit of currency: "INR=1,USD=90"')
    payment_provider_timeout_seconds: float = Field(10.0, gt=0, le=60)
    plan_renewal_interval_seconds: float = Field(
        5.0, gt=0, description="how often the worker renews subscriptions whose period has ended"
    )
    payment_reconcile_interval_seconds: float = Field(
        300.0, ge=0, description="how often the worker reconciles payments with the providers (0 = never)"
    )
    payment_reconcile_after_seconds: float = Field(
        900.0, ge=0, description="payments younger than this are left to their webhooks"
    )
    stripe_webhook_tolerance_seconds: int = Field(300, ge=1)

    # Notifications (gateway/notifications/, docs/notifications.md). Recorded in the store's
    # outbox always; delivered only when a sink is configured (the webhook: a URL and its secret).
    low_balance_threshold: str = Field(
        "1", description="credits (a decimal string); available below it: low_balance; 0 = never"
    )
    notify_expiring_days: int = Field(3, ge=1, le=365, description="credit_expiring: grants expiring within")
    notify_expiring_interval_seconds: float = Field(
        3600.0, gt=0, le=7 * 86400, allow_inf_nan=False, description="how often grants are scanned"
    )
    notify_url: str | None = Field(None, description="the webhook receiver (https://...); unset = no webhook")
    notify_secret: SecretStr | None = Field(None, description="signs the webhook (required with the URL)")
    notify_sink: str | None = Field(None, description="module:attr, a factory(settings) of another sink")
    notify_timeout_seconds: float = Field(10.0, gt=0, le=120)
    notify_retry_seconds: float = Field(
        86400.0,
        gt=0,
        le=30 * 86400,
        allow_inf_nan=False,
        description="retried until this long after creation",
    )
    notify_retry_base_seconds: float = Field(10.0, gt=0, le=86400, allow_inf_nan=False)
    notify_retry_cap_seconds: float = Field(3600.0, gt=0, le=7 * 86400, allow_inf_nan=False)
    notify_lease_seconds: float = Field(
        60.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="a claimed notification is claimed again after this (its worker died)",
    )
    notify_poll_seconds: float = Field(1.0, gt=0, le=60, allow_inf_nan=False)
    notify_batch: int = Field(50, ge=1, le=1000)
    notify_keep_days: int = Field(
        30, ge=1, le=3650, description="delivered and failed notifications are removed after this"
    )

    @field_validator("admin_keys", "client_keys", "metrics_keys")
    @classmethod
    def _keys_are_valid(cls, v: str) -> str:
        parse_keys(v)
        return v

    @field_validator("low_balance_threshold")
    @classmethod
    def _threshold_is_an_amount(cls, v: str) -> str:
        from .money import AmountError, to_units

        try:
            to_units(v, allow_zero=True)
        except AmountError as exc:
            raise ValueError(f'credits as a decimal string, e.g. "5" or "0.5": {exc}') from None
        return v

    @field_validator("notify_url")
    @classmethod
    def _url_is_http(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v is None:
            return None
        try:
            parts = urlsplit(v)
            port_ok = parts.port is None or parts.port > 0  # .port raises past 65535
        except ValueError:
            port_ok = False
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or not port_ok
            or any(c.isspace() or ord(c) < 32 for c in v)
        ):
            raise ValueError("an http:// or https:// URL with a host (and a port up to 65535)")
        return v

    @field_validator("notify_sink")
    @classmethod
    def _sink_is_named(cls, v: str | None) -> str | None:
        if v and (v.count(":") != 1 or not all(v.split(":"))):
            raise ValueError("module:attr, e.g. myapp.notify:make_sink")
        return v or None

    @model_validator(mode="after")
    def _notify_url_needs_its_secret(self) -> Settings:
        if self.notify_url:
            secret = self.notify_secret.get_secret_value() if self.notify_secret else ""
            if len(secret.strip()) < 16:
                raise ValueError(
                    "CREDIT_NOTIFY_URL is set: CREDIT_NOTIFY_SECRET must be set too, at least 16 "
                    "characters (the receiver checks the webhook's signature with it)"
                )
        if self.notify_lease_seconds <= self.notify_timeout_seconds:
            raise ValueError("CREDIT_NOTIFY_LEASE_SECONDS must be longer than CREDIT_NOTIFY_TIMEOUT_SECONDS")
        if self.notify_keep_days <= self.notify_expiring_days:
            # A pruned credit_expiring note must be for a grant that has expired by then,
            # or the scan would notify it again.
            raise ValueError("CREDIT_NOTIFY_KEEP_DAYS must be more than CREDIT_NOTIFY_EXPIRING_DAYS")
        if self.notify_retry_base_seconds > self.notify_retry_cap_seconds:
            raise ValueError(
                "CREDIT_NOTIFY_RETRY_BASE_SECONDS must not be above CREDIT_NOTIFY_RETRY_CAP_SECONDS"
            )
        return self

    @property
    def low_balance_threshold_units(self) -> int:
        from .money import to_units

        return to_units(self.low_balance_threshold, allow_zero=True)

    @property
    def embedded(self) -> bool:
        return not self.redis_url

    @property
    def admin_key_digests(self) -> list[bytes]:
        return parse_keys(self.admin_keys)

    @property
    def client_key_digests(self) -> list[bytes]:
        return parse_keys(self.client_keys)

    @property
    def metrics_key_digests(self) -> list[bytes]:
        return parse_keys(self.metrics_keys)


class SettingsError(ValueError):
    """The CREDIT_* environment is wrong; the message names each bad variable, never its
    value (pydantic's own text quotes each bad input, which for CREDIT_ADMIN_KEYS is a key)."""


def settings_from_env() -> Settings:
    """Settings from the environment; a bad value raises SettingsError."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = ["invalid configuration:"]
        for e in exc.errors(include_url=False, include_input=False, include_context=False):
            msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
            loc = e.get("loc", ())
            # A check across settings (no loc) names its variables in its message.
            lines.append(f"  CREDIT_{'_'.join(str(p) for p in loc).upper()}: {msg}" if loc else f"  {msg}")
        raise SettingsError("\n".join(lines)) from None


def load_settings() -> Settings:
    """Settings from the environment, for a command: a bad value exits saying what is wrong."""
    try:
        return settings_from_env()
    except SettingsError as exc:
        raise SystemExit(str(exc)) from None
    except Exception as exc:
        raise SystemExit(f"invalid configuration: {type(exc).__name__}: {exc}") from None

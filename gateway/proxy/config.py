"""The proxy's configuration: upstreams, extra routes, pricing, limits.

Read from the TOML (or YAML) file named by CREDIT_GATEWAY_CONFIG. Secrets stay out of the
file: an upstream names the environment variable holding its credential (`api_key_env`),
and CREDIT_UPSTREAM_<NAME>_BASE_URL / _API_KEY / _TIMEOUT override per upstream.

    [gateway]
    unknown_model = "refuse"        # or "default": price it with [pricing.default]
    min_output_tokens = 16          # clamp max tokens down to what the user can afford, not below this
    chars_per_token = 4             # prompt size estimate, and output counted from streamed text
    hard_cap = true                 # stop a stream before it would put the user into debt
    hold_margin_seconds = 30        # hold timeout = upstream timeout + this
    max_body_bytes = 4194304

    [[upstreams]]
    name = "openai"
    kind = "openai"                 # a registered kind (gateway/proxy/kinds/): "openai", "anthropic"
    base_url = "https://api.openai.com"
    api_key_env = "OPENAI_API_KEY"
    timeout_seconds = 120
    models = ["gpt-4o", "gpt-4o-mini"]   # which models it serves ("*" = any)
    chat_cap_field = "max_completion_tokens"  # or "max_tokens": the output cap the upstream obeys on
                                    # chat requests that name none (OpenAI: max_completion_tokens)
    forward_headers = []            # client headers passed on beyond the kind's own (OpenAI:
                                    # accept, openai-beta); "x-foo-*" matches a prefix
    headers = {}                    # headers the gateway sends (they win over the client's)
    allow_features = []             # request features billed beyond tokens that are let through
                                    # (service_tier, web_search, code_execution, background...:
                                    # gateway/proxy/features.py); the others get 400

    [[routes]]                      # other paths: a flat price per request, or refused
    path = "/v1/models"
    upstream = "openai"
    methods = ["GET"]
    price = "0"                     # omit to refuse

    [pricing.models."gpt-4o"]
    input = "2.5"                   # credits per million tokens
    cached_input = "1.25"
    output = "10"
    request = "0"                   # per-request fee
    max_output_tokens = 16384       # the cap when the request names none

    [rate_limits]
    requests_per_minute = 600       # 0 = unlimited
    tokens_per_minute = 0
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..core.money import AmountError, to_units
from ..core.pricing import PricingTable
from ..core.ratelimits import check_limit
from ..core.redact import public_url
from ..payments.catalog import CatalogError, build_catalog
from .features import FEATURES
from .kinds import ADAPTERS, FALLBACK, Adapter, adapter, metered_routes


class ConfigError(ValueError):
    """The gateway configuration file is wrong; the message says where."""


@dataclass(frozen=True)
class Upstream:
    name: str
    kind: str
    base_url: str
    api_key: str | None
    timeout_seconds: float
    models: tuple[str, ...]
    headers: dict[str, str] = field(default_factory=dict)
    chat_cap_field: str = "max_completion_tokens"
    forward_headers: tuple[str, ...] = ()  # lower-case names; "x-foo-*" matches a prefix
    allow_features: frozenset[str] = frozenset()  # billed beyond tokens, yet allowed (features.py)

    @property
    def adapter(self) -> Adapter:
        return adapter(self.kind)

    def serves(self, model: str | None) -> bool:
        return "*" in self.models or (model is not None and model in self.models)


@dataclass(frozen=True)
class ExtraRoute:
    path: str
    upstream: str
    methods: tuple[str, ...]
    price_units: int | None  # None: refused


@dataclass(frozen=True)
class RateLimits:
    requests_per_minute: int = 0
    tokens_per_minute: int = 0


@dataclass(frozen=True)
class ProxyConfig:
    upstreams: tuple[Upstream, ...] = ()
    routes: tuple[ExtraRoute, ...] = ()
    pricing: PricingTable = field(default_factory=lambda: PricingTable({}))
    unknown_model: str = "refuse"
    min_output_tokens: int = 16
    chars_per_token: int = 4
    hard_cap: bool = True
    hold_margin_seconds: float = 30.0
    max_body_bytes: int = 4 * 1024 * 1024
    rate_limits: RateLimits = field(default_factory=RateLimits)
    payments: dict[str, Any] = field(
        default_factory=dict
    )  # the [payments] section (gateway/payments/catalog.py)

    def upstream_for(self, path: str, model: str | None) -> Upstream | None:
        """The first upstream whose kind meters `path` and that serves `model`."""
        for u in self.upstreams:
            if path in u.adapter.routes and u.serves(model):
                return u
        return None

    def upstream(self, name: str) -> Upstream | None:
        return next((u for u in self.upstreams if u.name == name), None)

    def route_for(self, path: str) -> ExtraRoute | None:
        return next((r for r in self.routes if r.path == path), None)


def _rate_limits(rl: Any) -> RateLimits:
    if not isinstance(rl, dict) or set(rl) - {"requests_per_minute", "tokens_per_minute"}:
        raise ConfigError("rate_limits takes requests_per_minute and tokens_per_minute")
    try:
        return RateLimits(
            # null (YAML) is the default: no limit
            check_limit("requests_per_minute", rl.get("requests_per_minute")) or 0,
            check_limit("tokens_per_minute", rl.get("tokens_per_minute")) or 0,
        )
    except ValueError as exc:
        raise ConfigError(f"rate_limits: {exc}") from exc


def _read(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError("a YAML config needs PyYAML installed (or use TOML)") from exc
        data = yaml.safe_load(text) or {}
    else:
        try:
            data = tomllib.loads(text.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table")
    return data


def _env_name(upstream: str) -> str:
    return "CREDIT_UPSTREAM_" + "".join(c if c.isalnum() else "_" for c in upstream.upper())


def _upstream(raw: dict[str, Any], env: dict[str, str]) -> Upstream:
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError("every [[upstreams]] needs a name")
    prefix = _env_name(name)
    kind = raw.get("kind", FALLBACK.name)
    if kind not in ADAPTERS:
        raise ConfigError(f"upstream {name}: kind must be one of {tuple(ADAPTERS)}")
    kind_adapter = ADAPTERS[kind]
    base_url = env.get(f"{prefix}_BASE_URL") or raw.get("base_url")
    if not isinstance(base_url, str):
        raise ConfigError(f"upstream {name}: base_url is required")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(
            f"upstream {name}: base_url must be an http(s) URL without query: {public_url(base_url)}"
        )
    key = env.get(f"{prefix}_API_KEY")
    if key is None and raw.get("api_key_env"):
        key = env.get(str(raw["api_key_env"]))
    if key is None:
        key = raw.get("api_key")
    try:
        timeout = float(env.get(f"{prefix}_TIMEOUT") or raw.get("timeout_seconds", 120))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"upstream {name}: timeout_seconds must be a number of seconds") from exc
    if not 0 < timeout <= 3600:
        raise ConfigError(f"upstream {name}: timeout_seconds must be in (0, 3600]")
    models = raw.get("models", ["*"])
    if isinstance(models, str):
        models = [models]
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict):
        raise ConfigError(f"upstream {name}: headers must be a table of name = value")
    headers = {**kind_adapter.default_headers, **headers}
    choices = kind_adapter.chat_cap_fields
    cap_field = raw.get("chat_cap_field", choices[0] if choices else "")
    if "chat_cap_field" in raw and cap_field not in choices:
        raise ConfigError(
            f"upstream {name}: chat_cap_field must be one of {choices}"
            if choices
            else f"upstream {name}: kind {kind} takes no chat_cap_field"
        )
    fwd = raw.get("forward_headers") or []
    if not isinstance(fwd, list) or not all(isinstance(h, str) and h.strip() for h in fwd):
        raise ConfigError(f"upstream {name}: forward_headers must be a list of header names")
    allow = raw.get("allow_features") or []
    if not isinstance(allow, list) or not set(allow) <= FEATURES:
        raise ConfigError(f"upstream {name}: allow_features must be a list of {sorted(FEATURES)}")
    return Upstream(
        name,
        kind,
        base_url.rstrip("/"),
        key,
        timeout,
        tuple(str(m) for m in models),
        {str(k): str(v) for k, v in headers.items()},
        cap_field,
        tuple(h.strip().lower() for h in fwd),
        frozenset(allow),
    )


def _flag(section: dict[str, Any], name: str, default: bool) -> bool:
    v = section.get(name, default)
    if not isinstance(v, bool):
        raise ConfigError(f"gateway.{name} must be true or false")
    return v


def load_config(path: str | None, env: dict[str, str] | None = None) -> ProxyConfig:
    """The configuration in `path` (None: no upstreams, the proxy refuses every LLM route)."""
    env = dict(os.environ if env is None else env)
    if not path:
        return ProxyConfig()
    data = _read(path)
    unknown = set(data) - {"gateway", "upstreams", "routes", "pricing", "rate_limits", "payments"}
    if unknown:
        raise ConfigError(f"{path}: unknown sections {sorted(unknown)}")
    gw = data.get("gateway") or {}
    upstreams = tuple(_upstream(u, env) for u in data.get("upstreams") or [])
    names = [u.name for u in upstreams]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: upstream names must be unique")
    routes = []
    for r in data.get("routes") or []:
        rp, up = r.get("path"), r.get("upstream")
        if not isinstance(rp, str) or not rp.startswith("/"):
            raise ConfigError(f"route {rp!r}: path must start with /")
        if rp in metered_routes():
            raise ConfigError(f"route {rp}: metered LLM routes are built in")
        if up not in names:
            raise ConfigError(f"route {rp}: unknown upstream {up!r}")
        try:
            price = to_units(str(r["price"]), allow_zero=True) if r.get("price") is not None else None
        except AmountError as exc:
            raise ConfigError(f"route {rp}: price: {exc}") from exc
        methods = tuple(m.upper() for m in r.get("methods", ["GET", "POST"]))
        routes.append(ExtraRoute(rp, up, methods, price))
    try:
        pricing = PricingTable.from_json(data.get("pricing") or {})
    except ValueError as exc:
        raise ConfigError(f"{path}: pricing: {exc}") from exc
    unknown_model = gw.get("unknown_model", "refuse")
    if unknown_model not in ("refuse", "default"):
        raise ConfigError("gateway.unknown_model must be 'refuse' or 'default'")
    if unknown_model == "default" and pricing.default is None:
        raise ConfigError("gateway.unknown_model = 'default' needs [pricing.default]")
    rl = data.get("rate_limits") or {}
    payments = data.get("payments") or {}
    try:
        build_catalog(payments, env.get("CREDIT_PAYMENT_RATES"))  # a bad section fails at start
    except CatalogError as exc:
        raise ConfigError(f"{path}: payments: {exc}") from exc
    return ProxyConfig(
        upstreams=upstreams,
        routes=tuple(routes),
        pricing=pricing,
        unknown_model=unknown_model,
        min_output_tokens=int(gw.get("min_output_tokens", 16)),
        chars_per_token=max(1, int(gw.get("chars_per_token", 4))),
        hard_cap=_flag(gw, "hard_cap", True),
        hold_margin_seconds=float(gw.get("hold_margin_seconds", 30)),
        max_body_bytes=int(gw.get("max_body_bytes", 4 * 1024 * 1024)),
        rate_limits=_rate_limits(rl),
        payments=payments,
    )

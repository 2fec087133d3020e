"""What the proxy serves, as start-up log lines: upstreams (name, kind, base URL, models)
and routes. Never a credential: no API key, no configured header (it may carry one), and
no user:password part of a URL."""

from __future__ import annotations

from ..core.money import from_units
from ..core.redact import public_url
from .config import ProxyConfig
from .kinds import metered_routes


def summary_lines(config: ProxyConfig) -> list[str]:
    lines: list[str] = []
    for u in config.upstreams:
        models = ", ".join(u.models) if u.models else "-"
        lines.append(
            f"proxy upstream {u.name}: kind {u.kind}, {public_url(u.base_url)}, "
            f"timeout {u.timeout_seconds:g} s, models: {models}"
        )
    metered = metered_routes({u.kind for u in config.upstreams})
    lines.append("proxy metered routes (POST): " + (", ".join(metered) if metered else "none (no upstream)"))
    for r in config.routes:
        if r.price_units is None:
            price = "refused"
        else:
            price = f"{from_units(r.price_units)} credits per request" if r.price_units else "free"
        lines.append(f"proxy extra route {'/'.join(r.methods)} {r.path} -> {r.upstream}: {price}")
    unknown = "priced by [pricing.default]" if config.unknown_model == "default" else "refused"
    lines.append(
        "proxy priced models (the file's table; PUT /admin/pricing replaces it): "
        + (", ".join(sorted(config.pricing.models)) or "none")
        + f"; other models: {unknown}"
    )
    return lines

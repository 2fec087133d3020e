"""One metered call's state on its way through the proxy: what it asked, what it holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.pricing import ModelPrice
from .config import Upstream
from .kinds import Adapter
from .worst_case import OutputPlan


@dataclass
class Call:
    """One metered call on its way through."""

    request_id: str
    user: str
    kind: Adapter  # its upstream kind: what the lifecycle asks about routes, usage, errors
    path: str
    model: str
    price: ModelPrice
    upstream: Upstream
    body: dict[str, Any]
    est_input: int
    plan: OutputPlan
    max_output: int  # the output cap per choice that the hold pays for (and the upstream gets)
    hold_units: int = 0
    hold_expires_ms: int = 0
    budget_units: int = 0  # all the call holds: its hold and its extensions (a stream's hard cap)
    extensions: list[tuple[str, int, int]] = field(default_factory=list)  # (hold id, units, expires ms)
    stream: bool = False
    strip_usage_chunk: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

"""Model prices and the cost of a call, in integer micro-credits.

Prices are credits per million tokens (input, cached input, output) plus an optional
per-request fee, held as micro-credits per million tokens so a cost is one integer
multiply-and-divide, rounded up to the unit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .money import AmountError, from_units, to_units


def ceil_div(a: int, b: int) -> int:
    """a / b rounded up, in integers (token estimates from sizes)."""
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one call. `cached_input` is the part of `input` served from a prompt cache."""

    input: int = 0
    output: int = 0
    cached_input: int = 0
    cache_write: int = 0


@dataclass(frozen=True, slots=True)
class ModelPrice:
    input: int  # micro-credits per million tokens
    output: int
    cached_input: int
    request: int  # micro-credits per request
    max_output_tokens: int | None = None

    def cost(self, u: Usage) -> int:
        """Micro-credits for this usage, rounded up to a whole unit."""
        uncached = max(u.input - u.cached_input, 0) + u.cache_write
        per_million = uncached * self.input + u.cached_input * self.cached_input + u.output * self.output
        return self.request + -(-per_million // 1_000_000)

    def output_tokens_affordable(self, budget: int, input_tokens: int) -> int:
        """How many output tokens `budget` micro-credits pay for after the input and fee."""
        left = budget - self.cost(Usage(input=input_tokens))
        if left < 0:
            return 0
        if self.output == 0:
            return 1 << 31
        return (left * 1_000_000) // self.output

    def output_tokens_within(self, budget: int, u: Usage) -> int:
        """The most output tokens that cost, beside `u`'s input (its output ignored), at most
        `budget` micro-credits in all; -1 when the input alone costs more. Exact:
        cost(u with k output tokens) <= budget exactly when k <= this."""
        uncached = max(u.input - u.cached_input, 0) + u.cache_write
        room = (budget - self.request) * 1_000_000 - (
            uncached * self.input + u.cached_input * self.cached_input
        )
        if room < 0:
            return -1
        return room // self.output if self.output else 1 << 62

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "input": str(from_units(self.input)),
            "cached_input": str(from_units(self.cached_input)),
            "output": str(from_units(self.output)),
            "request": str(from_units(self.request)),
        }
        if self.max_output_tokens is not None:
            out["max_output_tokens"] = self.max_output_tokens
        return out


def _units(v: Any, what: str) -> int:
    if v is None:
        return 0
    try:
        return to_units(v, allow_zero=True)
    except AmountError as exc:
        raise ValueError(f"{what}: {exc}") from exc


def parse_price(raw: Mapping[str, Any], where: str) -> ModelPrice:
    allowed = {"input", "cached_input", "output", "request", "max_output_tokens"}
    extra = set(raw) - allowed
    if extra:
        raise ValueError(f"{where}: unknown price fields {sorted(extra)}")
    if "input" not in raw or "output" not in raw:
        raise ValueError(f"{where}: input and output prices are required (credits per million tokens)")
    inp = _units(raw["input"], f"{where}.input")
    mot = raw.get("max_output_tokens")
    if mot is not None and (not isinstance(mot, int) or isinstance(mot, bool) or mot < 1):
        raise ValueError(f"{where}.max_output_tokens must be a positive integer")
    return ModelPrice(
        input=inp,
        output=_units(raw["output"], f"{where}.output"),
        cached_input=_units(raw.get("cached_input", raw["input"]), f"{where}.cached_input"),
        request=_units(raw.get("request", 0), f"{where}.request"),
        max_output_tokens=mot,
    )


@dataclass(frozen=True, slots=True)
class PricingTable:
    models: dict[str, ModelPrice]
    default: ModelPrice | None = None
    version: int = 0

    def price_of(self, model: str | None) -> ModelPrice | None:
        """The model's price, else the default (None: refuse the model)."""
        if model and model in self.models:
            return self.models[model]
        return self.default

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], version: int = 0) -> PricingTable:
        if not isinstance(raw, Mapping):
            raise ValueError("pricing must be an object")
        extra = set(raw) - {"models", "default"}
        if extra:
            raise ValueError(f"pricing: unknown fields {sorted(extra)}")
        models_raw = raw.get("models") or {}
        if not isinstance(models_raw, Mapping):
            raise ValueError("pricing.models must be an object of model name -> price")
        models = {str(k): parse_price(v, f"models.{k}") for k, v in models_raw.items()}
        default = parse_price(raw["default"], "default") if raw.get("default") else None
        return cls(models=models, default=default, version=version)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"models": {k: v.to_json() for k, v in sorted(self.models.items())}}
        if self.default:
            out["default"] = self.default.to_json()
        return out

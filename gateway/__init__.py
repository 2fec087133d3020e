"""credit-gateway: a Redis-backed metering gateway for LLM APIs."""

__version__ = "0.1.0"

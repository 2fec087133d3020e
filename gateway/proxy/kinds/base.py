"""The interface of an upstream kind: what the proxy asks of the API it meters.

An adapter (one module per kind, registered in gateway/proxy/kinds/__init__.py) owns
everything that differs between upstream APIs: the metered routes, the fields that cap or
multiply a request's output, the credential header, the client headers the upstream may
see, how usage is read from an answer and from a stream, and the error body. The hold
lifecycle (gateway/proxy/forward.py) never names a kind: it asks the adapter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from ...core.pricing import Usage
from ...http_errors import error_body
from ..stream_meter import StreamMeter
from ..worst_case import OutputPlan, output_plan, set_output_cap


class Adapter(ABC):
    """One upstream kind. Subclasses set the class attributes and implement the methods;
    one instance per kind lives in the registry."""

    # The name an upstream's `kind` gives in the configuration.
    name: ClassVar[str]
    # The POST paths metered for this kind.
    routes: ClassVar[tuple[str, ...]]
    # Other paths whose refusals take this kind's error format (by prefix).
    error_prefixes: ClassVar[tuple[str, ...]] = ()
    # Client headers passed on: an allow-list. Anything else could change who is billed
    # upstream, what is billed (features priced at other rates) or tell the upstream about
    # the client. An upstream's `forward_headers` adds to it; its `headers` win.
    forwarded_headers: ClassVar[frozenset[str]] = frozenset({"accept"})
    # Headers every request to this kind carries unless the configuration sets them.
    default_headers: ClassVar[Mapping[str, str]] = {}
    # The values an upstream's `chat_cap_field` may take (the first is the default); empty:
    # the kind has one cap field per route and no choice.
    chat_cap_fields: ClassVar[tuple[str, ...]] = ()
    # Every field that caps the output, on any route: each one a request names is
    # validated, counted and rewritten with the cap (a compatible server may obey another
    # route's field). `route_cap_fields`: the field(s) a route gets even when unnamed.
    cap_fields: ClassVar[tuple[str, ...]] = ()
    route_cap_fields: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    # Fields that multiply the output (choices generated, and billed, per request).
    multiplier_fields: ClassVar[tuple[str, ...]] = ()
    # The error "type" of each HTTP status, and the type for any other status.
    error_types: ClassVar[Mapping[int, str]] = {}
    default_error_type: ClassVar[str] = "api_error"

    # -- forwarding --------------------------------------------------------------------

    @abstractmethod
    def auth_headers(self, api_key: str) -> dict[str, str]:
        """The header(s) carrying the gateway's credential for this upstream."""

    # -- the worst case ----------------------------------------------------------------

    def generates_output(self, path: str) -> bool:
        """False for routes billed on input alone (embeddings): no output cap to send."""
        return True

    def exact_input_tokens(self, path: str, body: dict[str, Any]) -> int:
        """Input tokens the request states exactly (token arrays), 0 when it does not:
        a floor under the size-based estimate."""
        return 0

    @property
    def count_fields(self) -> tuple[str, ...]:
        """The integer request fields the worst case is computed from."""
        return self.cap_fields + self.multiplier_fields

    def output_plan(self, path: str, body: dict[str, Any], chars_per_token: int) -> OutputPlan:
        """The output the request asks for (raises BadRequest on malformed fields)."""
        if not self.generates_output(path):
            return OutputPlan(None)
        return output_plan(body, self.cap_fields, self.multiplier_fields)

    def set_output_cap(self, path: str, body: dict[str, Any], tokens: int, chat_field: str) -> None:
        """Writes the output cap the hold paid for into the request, in every field the
        upstream may obey; `chat_field` is the upstream's configured chat_cap_field."""
        set_output_cap(body, self.route_cap_fields.get(path, ()), tokens, self.cap_fields)

    def ask_stream_usage(self, path: str, body: dict[str, Any]) -> bool:
        """Makes a streamed request report its usage when the API only does so on demand.
        True: the usage event was asked for on the client's behalf (keep it from them)."""
        return False

    def is_asked_usage_event(self, event: dict[str, Any]) -> bool:
        """Whether a stream event is the usage event ask_stream_usage asked for."""
        return False

    def features(self, path: str, body: dict[str, Any]) -> set[str]:
        """The billed-beyond-tokens features (gateway/proxy/features.py) a request uses."""
        return set()

    # -- usage -------------------------------------------------------------------------

    @abstractmethod
    def usage_of(self, path: str, body: Any) -> Usage | None:
        """Usage of a whole (non-streamed) answer, or None when it carries none (or none
        that is counts)."""

    @abstractmethod
    def answer_texts(self, body: Any) -> list[str] | None:
        """The texts a whole answer generated (its output tokens when it reports no usage):
        one entry per message part, tool call argument or text block. None: not an answer
        shape known here (estimate from its size)."""

    @abstractmethod
    def stream_meter(self, keep_chars: int | None = None) -> StreamMeter:
        """A meter for one SSE stream of this kind."""

    # -- refusals ----------------------------------------------------------------------

    def error_body(self, status: int, code: str, message: str, details: Mapping[str, Any]) -> dict[str, Any]:
        """A refusal in this upstream's own error format, so client SDKs read it as usual."""
        return error_body(code, message, details, fields=self.error_fields(status))

    def error_fields(self, status: int) -> dict[str, Any]:
        """The format's own keys in the error object (never replaced by details)."""
        return {"type": self.error_types.get(status, self.default_error_type)}

    def claims(self, path: str) -> bool:
        """Whether refusals on `path` take this kind's format."""
        return path in self.routes or (bool(self.error_prefixes) and path.startswith(self.error_prefixes))

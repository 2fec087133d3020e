"""The OpenAI kind: chat completions, completions, embeddings and the Responses API (and any
server compatible with them: vLLM, TGI, LiteLLM...)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from ...core.pricing import Usage, ceil_div
from ..features import tools_used
from ..stream_meter import StreamMeter
from ..usage import add_text, count, parsed
from ..worst_case import OutputPlan, output_plan, set_output_cap
from .base import Adapter

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"

# Built-in tool types (by prefix) and the feature each is.
_TOOLS = (
    ("web_search", "web_search"),
    ("file_search", "file_search"),
    ("code_interpreter", "code_interpreter"),
    ("computer_use", "computer_use"),
    ("image_generation", "image_generation"),
    ("mcp", "mcp"),
)


class OpenAI(Adapter):
    name = "openai"
    routes = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)
    forwarded_headers = frozenset({"accept", "openai-beta"})
    # OpenAI refuses max_tokens for its reasoning models; some compatible servers only know
    # max_tokens: the upstream's configuration says which a chat request gets.
    chat_cap_fields = ("max_completion_tokens", "max_tokens")
    cap_fields = ("max_tokens", "max_completion_tokens", "max_output_tokens")
    route_cap_fields: ClassVar[Mapping[str, tuple[str, ...]]] = {
        COMPLETIONS: ("max_tokens",),
        RESPONSES: ("max_output_tokens",),
    }
    multiplier_fields = ("n", "best_of")  # best_of completions are generated (and billed) server-side
    error_types: ClassVar[Mapping[int, str]] = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        402: "insufficient_quota",
        403: "permission_error",
        404: "invalid_request_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_exceeded",
        502: "server_error",
        503: "server_error",
        504: "server_error",
    }
    default_error_type = "server_error"

    def error_fields(self, status: int) -> dict[str, Any]:
        return {**super().error_fields(status), "param": None}

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"}

    def generates_output(self, path: str) -> bool:
        return path != EMBEDDINGS

    def exact_input_tokens(self, path: str, body: dict[str, Any]) -> int:
        """An embeddings input given as token arrays, counted exactly (a JSON array of small
        ints is 2 bytes a token, below any size-based estimate); 0 for text."""
        if path != EMBEDDINGS:
            return 0
        inp = body.get("input")
        if not isinstance(inp, list) or not inp:
            return 0
        if all(isinstance(t, int) and not isinstance(t, bool) for t in inp):
            return len(inp)
        return sum(len(x) for x in inp if isinstance(x, list))

    def output_plan(self, path: str, body: dict[str, Any], chars_per_token: int) -> OutputPlan:
        if path != CHAT:
            return super().output_plan(path, body, chars_per_token)
        extra = _prediction_tokens(body.get("prediction"), chars_per_token)
        return output_plan(body, self.cap_fields, self.multiplier_fields, extra)

    def set_output_cap(self, path: str, body: dict[str, Any], tokens: int, chat_field: str) -> None:
        if path != CHAT:
            super().set_output_cap(path, body, tokens, chat_field)
            return
        # Whichever of the chat fields the caller used (both, consistently, if it used both),
        # else the upstream's chat_cap_field.
        named = [f for f in self.chat_cap_fields if body.get(f) is not None]
        set_output_cap(body, named or [chat_field], tokens, self.cap_fields)

    def ask_stream_usage(self, path: str, body: dict[str, Any]) -> bool:
        if path not in (CHAT, COMPLETIONS):
            return False
        opts = body["stream_options"] if isinstance(body.get("stream_options"), dict) else {}
        if opts.get("include_usage"):
            return False
        body["stream_options"] = {**opts, "include_usage": True}
        return True

    def is_asked_usage_event(self, event: dict[str, Any]) -> bool:
        return bool(event.get("usage")) and not event.get("choices")

    def features(self, path: str, body: dict[str, Any]) -> set[str]:
        found: set[str] = set()
        if body.get("service_tier") not in (None, "auto", "default"):
            found.add("service_tier")
        found |= tools_used(body, _TOOLS)
        if body.get("web_search_options") is not None:
            found.add("web_search")
        modalities = body.get("modalities")
        if body.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
            found.add("audio")
        if body.get("background"):
            found.add("background")
        if path == RESPONSES and any(
            body.get(f) is not None for f in ("previous_response_id", "conversation", "prompt")
        ):
            found.add("stored_context")
        return found

    def usage_of(self, path: str, body: Any) -> Usage | None:
        if not isinstance(body, dict):
            return None
        return from_openai_usage(body.get("usage"), output_required=path != EMBEDDINGS)

    def answer_texts(self, body: Any) -> list[str] | None:
        if not isinstance(body, dict):
            return None
        out: list[str] = []
        if isinstance(body.get("choices"), list):
            for ch in body["choices"]:
                if not isinstance(ch, dict):
                    continue
                msg = ch.get("message")
                if isinstance(msg, dict):
                    if msg.get("audio"):
                        return None  # audio tokens are not text
                    content = msg.get("content")
                    if isinstance(content, list):
                        for part in content:
                            if isinstance(part, dict):
                                add_text(out, part.get("text"))
                    else:
                        add_text(out, content)
                    add_text(out, msg.get("refusal"))
                    for call in msg.get("tool_calls") or ():
                        fn = call.get("function") if isinstance(call, dict) else None
                        if isinstance(fn, dict):
                            add_text(out, fn.get("name"))
                            add_text(out, fn.get("arguments"))
                    fc = msg.get("function_call")
                    if isinstance(fc, dict):
                        add_text(out, fc.get("name"))
                        add_text(out, fc.get("arguments"))
                else:
                    add_text(out, ch.get("text"))  # legacy completions
            return out
        if isinstance(body.get("output"), list):  # Responses API
            for item in body["output"]:
                if not isinstance(item, dict):
                    continue
                if item.get("type") == "message":
                    for part in item.get("content") or ():
                        if isinstance(part, dict):
                            add_text(
                                out,
                                part.get("text")
                                if part.get("type") == "output_text"
                                else part.get("refusal"),
                            )
                elif item.get("type") == "function_call":
                    add_text(out, item.get("name"))
                    add_text(out, item.get("arguments"))
            return out
        if isinstance(body.get("data"), list):  # embeddings: vectors, no generated text
            return out
        return None

    def stream_meter(self, keep_chars: int | None = None) -> StreamMeter:
        return OpenAIStreamMeter(keep_chars)


def from_openai_usage(u: Any, output_required: bool = True) -> Usage | None:
    """chat/completions/embeddings use prompt_/completion_tokens; responses uses
    input_/output_tokens. None: no usage, or usage that is not counts (then the gateway
    counts it); embeddings report no output (`output_required` False)."""

    def parse(u: dict[str, Any]) -> Usage:
        if "input_tokens" in u or "output_tokens" in u:
            details = u.get("input_tokens_details") or {}
            return Usage(
                input=count(u, "input_tokens", True),
                output=count(u, "output_tokens", output_required),
                cached_input=count(details, "cached_tokens") if isinstance(details, dict) else 0,
            )
        details = u.get("prompt_tokens_details") or {}
        return Usage(
            input=count(u, "prompt_tokens", True),
            output=count(u, "completion_tokens", output_required),
            cached_input=count(details, "cached_tokens") if isinstance(details, dict) else 0,
        )

    return parsed(parse, u)


def _prediction_tokens(pred: Any, chars_per_token: int) -> int:
    """Predicted output that the model rejects is billed at output rates: count it in."""
    if not isinstance(pred, dict):
        return 0
    content = pred.get("content")
    if isinstance(content, str):
        size = len(content.encode())
    elif isinstance(content, list):
        size = sum(
            len(p["text"].encode()) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    else:
        return 0
    return ceil_div(size, chars_per_token)


class OpenAIStreamMeter(StreamMeter):
    """Chat and completions chunks (usage in the last chunk when asked), and Responses API
    events (usage in response.completed)."""

    def _event(self, obj: dict[str, Any]) -> None:
        t = obj.get("type")
        if isinstance(t, str) and t.startswith("response."):  # Responses API stream
            if t in _RESPONSES_TEXT and isinstance(obj.get("delta"), str):
                self._text(obj.get("output_index"), obj["delta"])
            resp = obj.get("response")
            if isinstance(resp, dict) and resp.get("usage"):
                self.usage = from_openai_usage(resp["usage"])
                self.final = self.usage is not None  # malformed: counted instead
            return
        if obj.get("usage"):
            self.usage = from_openai_usage(obj["usage"])
            self.final = self.usage is not None  # malformed: counted instead
        for ch in obj.get("choices") or ():
            if not isinstance(ch, dict):
                continue
            delta = ch.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str):
                    self._text(ch.get("index"), content)
                if len(delta) > 1 or content is None:  # rarer: a refusal, tool or function calls
                    self._delta_calls(ch.get("index"), delta)
            elif isinstance(ch.get("text"), str):  # legacy completions
                self._text(ch.get("index"), ch["text"])

    def _delta_calls(self, index: Any, delta: dict[str, Any]) -> None:
        if isinstance(delta.get("refusal"), str):
            self._text(index, delta["refusal"])
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                key = (index, "tool", call.get("index"))
                for k in ("name", "arguments"):
                    if isinstance(fn.get(k), str):
                        self._text(key, fn[k])
        fc = delta.get("function_call")
        if isinstance(fc, dict):
            for k in ("name", "arguments"):
                if isinstance(fc.get(k), str):
                    self._text((index, "function"), fc[k])


# Responses API stream events whose delta is generated text.
_RESPONSES_TEXT = frozenset(
    {"response.output_text.delta", "response.refusal.delta", "response.function_call_arguments.delta"}
)

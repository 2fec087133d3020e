"""Token counts with the model's own tokenizer, offline.

For the requests and answers whose usage the upstream never reported (a stream cut before
its usage chunk, an answer without usage) the proxy charges counted tokens where it knows
the model's tokenizer, and falls back to its size estimate where it does not (None here).

Tokenizers: OpenAI's o200k_base and cl100k_base, through toktok-rs, whose wheels carry the
two vocabularies compiled in: nothing is downloaded, ever (tiktoken fetches its BPE files
on first use). Its counts equal tiktoken's (docs/tokens.md: how that was checked, and why
this package). Anthropic publishes no offline tokenizer for Claude: None (estimated).

Loading an encoding takes about a second and 15-30 MB, once per process, on first use:
call the counting from a worker thread (asyncio.to_thread), never on the event loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import orjson

log = logging.getLogger("credit.proxy.tokens")

O200K = "o200k_base"
CL100K = "cl100k_base"

# Exact names, then prefixes (first match wins; gpt-4o before gpt-4-). Dated and suffixed
# variants (gpt-4o-mini-2024-07-18, o3-pro, gpt-5-codex) take their family's encoding.
_EXACT = {
    "gpt-4": CL100K,
    "gpt-3.5-turbo": CL100K,
    "gpt-3.5": CL100K,
    "gpt-35-turbo": CL100K,
    "text-embedding-3-small": CL100K,
    "text-embedding-3-large": CL100K,
    "text-embedding-ada-002": CL100K,
    "davinci-002": CL100K,
    "babbage-002": CL100K,
    "o1": O200K,
    "o3": O200K,
    "o4-mini": O200K,
}
_PREFIXES = (
    ("gpt-4o", O200K),
    ("chatgpt-4o", O200K),
    ("gpt-4.1", O200K),
    ("gpt-4.5", O200K),
    ("gpt-5", O200K),
    ("o1-", O200K),
    ("o3-", O200K),
    ("o4-", O200K),
    ("gpt-4-", CL100K),
    ("gpt-3.5-turbo-", CL100K),
    ("gpt-35-turbo-", CL100K),
)

# OpenAI's chat format (the cookbook "How to count tokens with tiktoken", checked there
# against the API's prompt_tokens): every message costs 3 tokens around its strings, a
# name 1 more, and the reply is primed with 3 (<|start|>assistant<|message|>).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# The same cookbook's function (tool) definitions: tokens per function, per parameter
# block, per parameter, per enum list and item, and at the end of all tools.
_TOOL_COSTS = {  # encoding -> (func_init, prop_init, prop_key, enum_init, enum_item, func_end)
    O200K: (7, 3, 3, -3, 3, 12),
    CL100K: (10, 3, 3, -3, 3, 12),
}


def encoding_for(model: str | None) -> str | None:
    """The encoding a model name uses, or None when no tokenizer is known for it."""
    if not isinstance(model, str) or not model:
        return None
    if model.startswith("ft:"):  # fine-tuned: ft:<base model>:<org>:<suffix>:<id>
        model = model[3:].split(":", 1)[0]
    name = _EXACT.get(model)
    if name is not None:
        return name
    for prefix, name in _PREFIXES:
        if model.startswith(prefix):
            return name
    return None


_lock = threading.Lock()
_loaded: dict[str, Callable[[str], int] | None] = {}  # per process: the vocabularies are large
_missing_logged = False


def _load(name: str) -> Callable[[str], int] | None:
    """The count function of an encoding, loaded once per process; None when the tokenizer
    package is not installed (logged once)."""
    if name in _loaded:
        return _loaded[name]
    global _missing_logged
    with _lock:
        if name in _loaded:
            return _loaded[name]
        try:
            import toktok

            if hasattr(toktok, "_encoding"):
                # Its tokenizer object counts one text without building the ids; the public
                # batch_count costs some 20 us more per call (its thread pool).
                fn = toktok._encoding(name).count
            else:
                fn = _batch_counter(toktok, name)
                fn("")  # loads the encoding now, under the lock
        except ImportError as exc:
            if not _missing_logged:
                log.warning(
                    "no tokenizer package (toktok-rs): token counts are estimated from sizes (%s)", exc
                )
                _missing_logged = True
            fn = None
        except Exception as exc:  # an incompatible toktok: estimate rather than fail a settle
            log.error("the tokenizer package cannot load %s: %r; token counts are estimated", name, exc)
            fn = None
        _loaded[name] = fn
        return fn


def _batch_counter(toktok: Any, name: str) -> Callable[[str], int]:
    def count(text: str) -> int:
        return toktok.batch_count([text], name, threads=1)[0]

    return count


def _counter(encoding: str) -> Callable[[str], int] | None:
    fn = _load(encoding)
    if fn is None:
        return None

    def count(text: str) -> int:
        try:
            return fn(text)
        except UnicodeEncodeError:  # lone surrogates (json takes them): counted as U+FFFD, as tiktoken does
            return fn(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))

    return count


class _Unknown(Exception):
    """Part of the request cannot be counted exactly (an image, say): estimate it all."""


class TokenCounter:
    """Counts text and request prompts for the models whose tokenizer is known.

    Every method returns None where it cannot count (unknown model, a part it cannot
    count, the tokenizer package missing): the caller then estimates. Thread-safe."""

    def encoding_for(self, model: str | None) -> str | None:
        return encoding_for(model)

    def available(self, model: str | None) -> bool:
        """Whether this model's text can be counted (loads its encoding)."""
        enc = encoding_for(model)
        return enc is not None and _load(enc) is not None

    def preload(self, *encodings: str) -> None:
        """Loads the encodings now (all known ones by default) instead of at first use."""
        for name in encodings or (O200K, CL100K):
            _load(name)

    def count_text(self, model: str | None, text: str) -> int | None:
        """Tokens of a plain text (special-token strings in it count as text, as in a
        prompt or an answer), or None when no tokenizer is known for the model."""
        enc = encoding_for(model)
        count = _counter(enc) if enc else None
        if count is None:
            return None
        try:
            return count(text) if text else 0
        except Exception:  # never fail a settle over a count: estimate instead
            log.exception("counting %d characters for %s failed; estimated", len(text), model)
            return None

    def count_prompt(self, path: str, body: dict[str, Any]) -> int | None:
        """Input tokens of an OpenAI request body (the model named in it), or None.

        /v1/chat/completions: messages by OpenAI's chat format, plus tools/functions by the
        cookbook's formula (an approximation for nested schemas) and a response_format
        JSON schema as its JSON text (approximate). /v1/completions: prompt (text, texts or
        token arrays). /v1/embeddings: input (the same; token arrays count exactly by their
        length). /v1/responses: instructions and input items counted as chat messages
        (OpenAI publishes no formula for it; approximate); previous_response_id, a stored
        prompt or a conversation carry input the proxy cannot see: None. An image, audio or
        file part makes the whole prompt None (their tokens depend on the file)."""
        if not isinstance(body, dict):
            return None
        enc = encoding_for(body.get("model"))
        count = _counter(enc) if enc is not None else None
        if enc is None or count is None:
            return None
        try:
            if path == "/v1/chat/completions":
                return _chat_prompt(count, enc, body)
            if path == "/v1/completions":
                return _texts_or_tokens(count, body.get("prompt")) + _text(count, body.get("suffix"))
            if path == "/v1/embeddings":
                return _texts_or_tokens(count, body.get("input"))
            if path == "/v1/responses":
                return _responses_prompt(count, enc, body)
        except _Unknown:
            return None
        except Exception:  # a shape this code did not foresee: estimate rather than fail a settle
            log.exception("counting the prompt of %s for %s failed; estimated", path, body.get("model"))
            return None
        return None


# -- the request shapes ------------------------------------------------------------------------


def _text(count: Callable[[str], int], value: Any) -> int:
    return count(value) if isinstance(value, str) and value else 0


def _texts_or_tokens(count: Callable[[str], int], value: Any) -> int:
    """A prompt/input: a text, a token array, or a list of either."""
    if isinstance(value, str):
        return _text(count, value)
    if not isinstance(value, list):
        raise _Unknown
    if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return len(value)  # one token array
    total = 0
    for item in value:
        if isinstance(item, str):
            total += _text(count, item)
        elif isinstance(item, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in item):
            total += len(item)
        else:
            raise _Unknown
    return total


def _content(count: Callable[[str], int], content: Any) -> int:
    """A message's content: a text, or a list of parts whose text parts are counted."""
    if content is None:
        return 0
    if isinstance(content, str):
        return _text(count, content)
    if not isinstance(content, list):
        raise _Unknown
    total = 0
    for part in content:
        if isinstance(part, str):
            total += _text(count, part)
            continue
        if not isinstance(part, dict):
            raise _Unknown
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
            total += _text(count, part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            total += _text(count, part["refusal"])
        else:  # image_url, input_image, input_audio, file, input_file, ...
            raise _Unknown
    return total


def _message(count: Callable[[str], int], message: Any) -> int:
    """One chat message: its overhead, every string field (role, name, tool_call_id, ...),
    its content, and the calls an assistant message carries (name and arguments). Other
    fields a client echoes back from an answer (annotations, refusal: null) add nothing."""
    if not isinstance(message, dict):
        raise _Unknown
    total = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if key == "content":
            total += _content(count, value)
        elif isinstance(value, str):
            total += _text(count, value)
            if key == "name":
                total += TOKENS_PER_NAME
        elif key == "tool_calls" and isinstance(value, list):
            for call in value:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    total += _text(count, fn.get("name")) + _text(count, fn.get("arguments"))
        elif key == "function_call" and isinstance(value, dict):
            total += _text(count, value.get("name")) + _text(count, value.get("arguments"))
        elif key == "audio" and value is not None:
            raise _Unknown  # an earlier spoken answer: its tokens are not in the request
    return total


def _tools(count: Callable[[str], int], enc: str, functions: list[dict[str, Any]]) -> int:
    """Function definitions by the cookbook's formula; a parameter whose schema goes deeper
    than type/description/enum adds its JSON text (approximate)."""
    if not functions:
        return 0
    func_init, prop_init, prop_key, enum_init, enum_item, func_end = _TOOL_COSTS[enc]
    total = 0
    for fn in functions:
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _Unknown
        total += func_init
        desc = fn["description"] if isinstance(fn.get("description"), str) else ""
        total += count(fn["name"] + ":" + desc.removesuffix("."))
        params = fn["parameters"] if isinstance(fn.get("parameters"), dict) else {}
        props = params["properties"] if isinstance(params.get("properties"), dict) else {}
        if props:
            total += prop_init
        for key, prop in props.items():
            total += prop_key
            if not isinstance(prop, dict):
                raise _Unknown
            ptype = prop.get("type")
            if not isinstance(ptype, str):
                ptype = orjson.dumps(ptype).decode() if ptype is not None else ""
            pdesc = prop["description"] if isinstance(prop.get("description"), str) else ""
            if isinstance(prop.get("enum"), list):
                total += enum_init
                for item in prop["enum"]:
                    total += enum_item + count(item if isinstance(item, str) else orjson.dumps(item).decode())
            total += count(f"{key}:{ptype}:{pdesc.removesuffix('.')}")
            rest = {k: v for k, v in prop.items() if k not in ("type", "description", "enum")}
            if rest:
                total += count(orjson.dumps(rest).decode())
    return total + func_end


def _chat_functions(body: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for tool in body.get("tools") or ():
        if (
            isinstance(tool, dict)
            and tool.get("type") == "function"
            and isinstance(tool.get("function"), dict)
        ):
            out.append(tool["function"])
        else:
            raise _Unknown  # a custom or built-in tool: no known formula
    for fn in body.get("functions") or ():
        out.append(fn)
    return out


def _schema(count: Callable[[str], int], fmt: Any) -> int:
    """A structured-output schema (response_format / text.format): its JSON text."""
    if not isinstance(fmt, dict):
        return 0
    schema = fmt["json_schema"] if isinstance(fmt.get("json_schema"), dict) else fmt
    if isinstance(schema.get("schema"), dict):
        return count(orjson.dumps(schema["schema"]).decode())
    return 0


def _chat_prompt(count: Callable[[str], int], enc: str, body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _Unknown
    total = sum(_message(count, m) for m in messages) + REPLY_PRIMING
    total += _tools(count, enc, _chat_functions(body))
    return total + _schema(count, body.get("response_format"))


def _responses_prompt(count: Callable[[str], int], enc: str, body: dict[str, Any]) -> int:
    if body.get("previous_response_id") or body.get("prompt") or body.get("conversation"):
        raise _Unknown  # input stored upstream
    total = REPLY_PRIMING
    if isinstance(body.get("instructions"), str):
        total += TOKENS_PER_MESSAGE + count("developer") + _text(count, body["instructions"])
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise _Unknown
    for item in items:
        if not isinstance(item, dict):
            raise _Unknown
        kind = item.get("type", "message")
        if kind == "message":
            total += (
                TOKENS_PER_MESSAGE + _text(count, item.get("role")) + _content(count, item.get("content"))
            )
        elif kind == "function_call":
            total += TOKENS_PER_MESSAGE + _text(count, item.get("name")) + _text(count, item.get("arguments"))
        elif kind == "function_call_output":
            output = item.get("output")
            total += TOKENS_PER_MESSAGE + (
                _text(count, output) if isinstance(output, str) else _content(count, output)
            )
        else:  # reasoning items, item references, built-in tool calls: not visible here
            raise _Unknown
    functions = []
    for tool in body.get("tools") or ():
        if isinstance(tool, dict) and tool.get("type") == "function":
            functions.append(tool)  # the Responses API's function tools are flat
        else:
            raise _Unknown
    total += _tools(count, enc, functions)
    text = body.get("text")
    return total + (_schema(count, text.get("format")) if isinstance(text, dict) else 0)

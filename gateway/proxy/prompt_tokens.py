"""Input tokens of an OpenAI request body, by OpenAI's chat format, given a text counter.

/v1/chat/completions: messages by the chat format, plus tools/functions by the cookbook's
formula (an approximation for nested schemas) and a response_format JSON schema as its
JSON text (approximate). /v1/completions: prompt (text, texts or token arrays).
/v1/embeddings: input (the same; token arrays count exactly by their length).
/v1/responses: instructions and input items counted as chat messages (OpenAI publishes no
formula for it; approximate). What cannot be counted exactly raises Uncountable: an image,
audio or file part (their tokens depend on the file), and a previous_response_id, stored
prompt or conversation (input the proxy cannot see).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

# The encodings the counting formulas are known for (tiktoken's names).
O200K = "o200k_base"
CL100K = "cl100k_base"

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


class Uncountable(Exception):
    """Part of the request cannot be counted exactly (an image, say): estimate it all."""


def prompt_tokens(count: Callable[[str], int], enc: str, path: str, body: dict[str, Any]) -> int | None:
    """The input tokens of `body` sent to `path`, counted with `count` (the text counter of
    encoding `enc`); None for a path whose shape is not known here."""
    if path == "/v1/chat/completions":
        return _chat_prompt(count, enc, body)
    if path == "/v1/completions":
        return _texts_or_tokens(count, body.get("prompt")) + _text(count, body.get("suffix"))
    if path == "/v1/embeddings":
        return _texts_or_tokens(count, body.get("input"))
    if path == "/v1/responses":
        return _responses_prompt(count, enc, body)
    return None


def _text(count: Callable[[str], int], value: Any) -> int:
    return count(value) if isinstance(value, str) and value else 0


def _texts_or_tokens(count: Callable[[str], int], value: Any) -> int:
    """A prompt/input: a text, a token array, or a list of either."""
    if isinstance(value, str):
        return _text(count, value)
    if not isinstance(value, list):
        raise Uncountable
    if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return len(value)  # one token array
    total = 0
    for item in value:
        if isinstance(item, str):
            total += _text(count, item)
        elif isinstance(item, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in item):
            total += len(item)
        else:
            raise Uncountable
    return total


def _content(count: Callable[[str], int], content: Any) -> int:
    """A message's content: a text, or a list of parts whose text parts are counted."""
    if content is None:
        return 0
    if isinstance(content, str):
        return _text(count, content)
    if not isinstance(content, list):
        raise Uncountable
    total = 0
    for part in content:
        if isinstance(part, str):
            total += _text(count, part)
            continue
        if not isinstance(part, dict):
            raise Uncountable
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
            total += _text(count, part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            total += _text(count, part["refusal"])
        else:  # image_url, input_image, input_audio, file, input_file, ...
            raise Uncountable
    return total


def _message(count: Callable[[str], int], message: Any) -> int:
    """One chat message: its overhead, every string field (role, name, tool_call_id, ...),
    its content, and the calls an assistant message carries (name and arguments). Other
    fields a client echoes back from an answer (annotations, refusal: null) add nothing."""
    if not isinstance(message, dict):
        raise Uncountable
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
            raise Uncountable  # an earlier spoken answer: its tokens are not in the request
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
            raise Uncountable
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
                raise Uncountable
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
            raise Uncountable  # a custom or built-in tool: no known formula
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
        raise Uncountable
    total = sum(_message(count, m) for m in messages) + REPLY_PRIMING
    total += _tools(count, enc, _chat_functions(body))
    return total + _schema(count, body.get("response_format"))


def _responses_prompt(count: Callable[[str], int], enc: str, body: dict[str, Any]) -> int:
    if body.get("previous_response_id") or body.get("prompt") or body.get("conversation"):
        raise Uncountable  # input stored upstream
    total = REPLY_PRIMING
    if isinstance(body.get("instructions"), str):
        total += TOKENS_PER_MESSAGE + count("developer") + _text(count, body["instructions"])
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise Uncountable
    for item in items:
        if not isinstance(item, dict):
            raise Uncountable
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
            raise Uncountable
    functions = []
    for tool in body.get("tools") or ():
        if isinstance(tool, dict) and tool.get("type") == "function":
            functions.append(tool)  # the Responses API's function tools are flat
        else:
            raise Uncountable
    total += _tools(count, enc, functions)
    text = body.get("text")
    return total + (_schema(count, text.get("format")) if isinstance(text, dict) else 0)

"""Counting the usage of an answer the upstream reported none for (or not all of).

A stream cut before its usage, or a whole answer without any, is charged for its prompt
and generated text counted with the model's tokenizer where one is known, and estimated
from sizes (chars_per_token) where not. Counting may load a vocabulary (about a second,
once per process) and takes milliseconds on a long text, so it runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..core.pricing import Usage, ceil_div
from .call import Call
from .stream_meter import StreamMeter
from .tokens import TokenCounter
from .usage import count_output


async def stream_usage(tokens: TokenCounter, call: Call, meter: StreamMeter, chars_per_token: int) -> Usage:
    """The usage to settle a stream at: the upstream's own final usage, else counted."""
    if meter.usage is not None and meter.final:
        return meter.usage
    return await asyncio.to_thread(counted_stream, tokens, call, meter, chars_per_token)


async def answer_usage(
    tokens: TokenCounter, call: Call, answer: Any, size: int, chars_per_token: int
) -> Usage:
    """The usage of a whole answer that reported none: counted (see counted_answer)."""
    return await asyncio.to_thread(counted_answer, tokens, call, answer, size, chars_per_token)


def counted_stream(tokens: TokenCounter, call: Call, meter: StreamMeter, chars_per_token: int) -> Usage:
    """A stream's usage with the model's tokenizer where it is known: the streamed text, and
    the prompt when no usage came at all; the size estimates where it is not."""
    u = meter.usage
    output = meter.output_tokens(lambda t: tokens.count_text(call.model, t), chars_per_token)
    if u is None:
        counted = tokens.count_prompt(call.path, call.body)
        return Usage(input=call.est_input if counted is None else counted, output=output)
    return Usage(
        input=u.input,
        output=max(u.output, output),
        cached_input=u.cached_input,
        cache_write=u.cache_write,
    )


def counted_answer(tokens: TokenCounter, call: Call, answer: Any, size: int, chars_per_token: int) -> Usage:
    """A whole answer without usage: its prompt and its generated text counted (or
    estimated), its size when it is not an answer shape the call's kind knows."""
    texts = call.kind.answer_texts(answer)
    if texts is None:
        output = ceil_div(size, chars_per_token)
    else:
        output = count_output(texts, lambda t: tokens.count_text(call.model, t), chars_per_token)
    counted = tokens.count_prompt(call.path, call.body)
    return Usage(input=call.est_input if counted is None else counted, output=output)

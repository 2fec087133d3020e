"""Token counting for the metering proxy: exact counts against published and independently
computed figures, offline loading, the fallbacks, and what StreamMeter keeps of a stream."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.proxy import tokens as tokens_mod
from gateway.proxy.kinds import adapter
from gateway.proxy.tokens import CL100K, O200K, TokenCounter, encoding_for
from gateway.proxy.usage import count_output

OPENAI, ANTHROPIC = adapter("openai"), adapter("anthropic")

REPO = Path(__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


# -- which encoding a model uses ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", O200K),
        ("gpt-4o-mini", O200K),
        ("gpt-4o-2024-08-06", O200K),
        ("chatgpt-4o-latest", O200K),
        ("gpt-4.1", O200K),
        ("gpt-4.1-nano", O200K),
        ("gpt-5", O200K),
        ("gpt-5-mini", O200K),
        ("gpt-5.1", O200K),
        ("o1", O200K),
        ("o1-mini", O200K),
        ("o3", O200K),
        ("o3-pro", O200K),
        ("o4-mini", O200K),
        ("o4-mini-2025-04-16", O200K),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", O200K),
        ("gpt-4", CL100K),
        ("gpt-4-0613", CL100K),
        ("gpt-4-turbo", CL100K),
        ("gpt-4-32k", CL100K),
        ("gpt-3.5-turbo", CL100K),
        ("gpt-3.5-turbo-0125", CL100K),
        ("gpt-35-turbo-16k", CL100K),
        ("text-embedding-3-small", CL100K),
        ("text-embedding-3-large", CL100K),
        ("text-embedding-ada-002", CL100K),
        ("ft:gpt-3.5-turbo-0125:acme::x", CL100K),
        # No offline tokenizer: Anthropic publishes none; unknown names are not guessed.
        ("claude-3-5-sonnet-20241022", None),
        ("claude-sonnet-4-5", None),
        ("gpt-test", None),
        ("llama-3", None),
        ("o1x", None),
        ("gpt-40", None),
        ("", None),
        (None, None),
    ],
)
def test_encoding_for_model(model, expected):
    assert encoding_for(model) == expected


# -- exact counts ---------------------------------------------------------------------------------


# The OpenAI cookbook "How to count tokens with tiktoken" (its printed outputs), and
# "hello world" = [15339, 1917] in cl100k_base.
@pytest.mark.parametrize(
    ("model", "text", "expected"),
    [
        ("gpt-4", "hello world", 2),
        ("gpt-4o", "tiktoken is great!", 6),
        ("gpt-4", "antidisestablishmentarianism", 6),
        ("gpt-4o", "antidisestablishmentarianism", 6),
        ("gpt-4", "2 + 2 = 4", 7),
        ("gpt-4o", "2 + 2 = 4", 7),
        ("gpt-4", "お誕生日おめでとう", 9),
        ("gpt-4o", "お誕生日おめでとう", 8),
    ],
)
def test_published_counts(counter, model, text, expected):
    assert counter.count_text(model, text) == expected


# Counted independently with OpenAI's tiktoken 0.14 (encode_ordinary) on the .tiktoken files
# whose sha256 equals the expected_hash in tiktoken's own registry.
TIKTOKEN_COUNTS = [
    ("Привет, мир! Как дела сегодня?", 16, 9),
    ("مرحبا بالعالم، كيف حالك اليوم؟", 23, 10),
    ("नमस्ते दुनिया, आज आप कैसे हैं?", 31, 11),
    ("你好，世界！今天过得怎么样？", 16, 9),  # noqa: RUF001 (full-width punctuation on purpose)
    ("Great job 👍🏽 on the 🚀 launch! 👨‍👩‍👧‍👦", 31, 22),
    ("def f(x):\n    return x ** 2  # square\n", 14, 14),
    ("    \n\n\t  spaces   and\r\ntabs  ", 8, 8),
    ("<|endoftext|> is plain text here", 11, 11),  # a special token's text in a prompt is text
]


@pytest.mark.parametrize(("text", "cl100k", "o200k"), TIKTOKEN_COUNTS)
def test_counts_equal_tiktoken(counter, text, cl100k, o200k):
    assert counter.count_text("gpt-4", text) == cl100k
    assert counter.count_text("gpt-4o-mini", text) == o200k


def test_lone_surrogates_count_as_replacement_characters(counter):
    # json (the fallback parser) takes "\ud800"; tiktoken counts it as U+FFFD.
    assert counter.count_text("gpt-4o", "ab\ud800cd") == counter.count_text("gpt-4o", "ab\ufffdcd") == 3


def test_unknown_model_is_not_counted(counter):
    assert counter.count_text("claude-3-5-sonnet-20241022", "hello") is None
    assert counter.count_text("gpt-test", "hello") is None
    assert (
        counter.count_prompt(CHAT, {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]})
        is None
    )
    assert (
        counter.count_prompt(
            "/v1/messages",
            {"model": "claude-3-5-sonnet-20241022", "messages": [{"role": "user", "content": "x"}]},
        )
        is None
    )
    assert counter.count_prompt(CHAT, {"messages": [{"role": "user", "content": "x"}]}) is None  # no model


# -- prompts --------------------------------------------------------------------------------------


COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch "
        "base on opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]
COOKBOOK_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_TOOL_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


# The prompt_tokens the OpenAI API reported for these requests (printed in the cookbook).
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-3.5-turbo", 129),
        ("gpt-4", 129),
        ("gpt-4-0613", 129),
        ("gpt-4o", 124),
        ("gpt-4o-mini", 124),
    ],
)
def test_chat_prompt_matches_the_apis_prompt_tokens(counter, model, expected):
    assert counter.count_prompt(CHAT, {"model": model, "messages": COOKBOOK_MESSAGES}) == expected


@pytest.mark.parametrize(
    ("model", "expected"), [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)]
)
def test_chat_prompt_with_tools_matches_the_apis_prompt_tokens(counter, model, expected):
    body = {"model": model, "messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS}
    assert counter.count_prompt(CHAT, body) == expected
    # the legacy functions field is the same definitions
    legacy = {
        "model": model,
        "messages": COOKBOOK_TOOL_MESSAGES,
        "functions": [COOKBOOK_TOOLS[0]["function"]],
    }
    assert counter.count_prompt(CHAT, legacy) == expected


def test_chat_content_parts_count_as_their_text_and_images_are_not_counted(counter):
    text = "tiktoken is great!"
    as_string = counter.count_prompt(
        CHAT, {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
    )
    as_parts = counter.count_prompt(
        CHAT,
        {
            "model": "gpt-4o",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "tiktoken is"}, {"type": "text", "text": " great!"}],
                }
            ],
        },
    )
    assert as_string == 3 + 1 + 6 + 3  # message, "user", the text, reply priming
    assert as_parts == as_string
    image = {
        "model": "gpt-4o",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            }
        ],
    }
    assert counter.count_prompt(CHAT, image) is None  # the caller estimates


def test_chat_assistant_tool_calls_and_tool_results_are_counted(counter):
    count = lambda t: counter.count_text("gpt-4o", t)  # noqa: E731
    body = {
        "model": "gpt-4o",
        "messages": [
            {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "annotations": [],
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_current_weather", "arguments": '{"location":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
        ],
    }
    expected = (
        3
        + count("assistant")
        + count("get_current_weather")
        + count('{"location":"Paris"}')
        + 3
        + count("tool")
        + count("call_1")
        + count("22 C")
        + 3
    )
    assert counter.count_prompt(CHAT, body) == expected


def test_completions_prompt_and_embeddings_input(counter):
    for path, field in (("/v1/completions", "prompt"), ("/v1/embeddings", "input")):
        model = "gpt-3.5-turbo-instruct" if path == "/v1/completions" else "text-embedding-3-small"

        def c(v, path=path, model=model, field=field):
            return counter.count_prompt(path, {"model": model, field: v})

        assert c("hello world") == 2
        assert c(["hello world", "2 + 2 = 4"]) == 2 + 7
        assert c([15339, 1917, 0]) == 3  # a token array counts exactly by its length
        assert c([[15339, 1917], [1, 2, 3]]) == 5
        assert c({"not": "a prompt"}) is None


def test_responses_input(counter):
    count = lambda t: counter.count_text("gpt-4o", t)  # noqa: E731
    r = lambda body: counter.count_prompt("/v1/responses", {"model": "gpt-4o", **body})  # noqa: E731
    as_text = r({"input": "tiktoken is great!"})
    assert as_text == counter.count_prompt(
        CHAT, {"model": "gpt-4o", "messages": [{"role": "user", "content": "tiktoken is great!"}]}
    )
    items = r(
        {
            "instructions": "Be brief.",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "tiktoken is great!"}]}],
        }
    )
    assert items == as_text + 3 + count("developer") + count("Be brief.")
    # input the proxy cannot see, or cannot count
    assert r({"input": "hi", "previous_response_id": "resp_1"}) is None
    assert (
        r({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]})
        is None
    )


# -- loading --------------------------------------------------------------------------------------


def _without_network() -> list[str]:
    """A command prefix running a process with no network at all (a network namespace of
    its own, where this user may make one): native code cannot reach out either."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


def test_first_load_never_touches_the_network(tmp_path):
    """A fresh process, every Python socket call refused (an audit hook) and, where possible,
    no network at all; hub and tiktoken offline with empty caches: the first load still
    counts exactly, and happens only on first use."""
    script = textwrap.dedent("""
        import sys
        def refuse(event, args):
            if event.startswith(("socket.", "urllib.")):
                raise RuntimeError(f"network touched: {event} {args!r}")
        sys.addaudithook(refuse)
        from gateway.proxy.tokens import TokenCounter
        c = TokenCounter()
        assert "toktok" not in sys.modules, "loaded before first use"
        print(c.count_text("gpt-4", "hello world"), c.count_text("gpt-4o", "tiktoken is great!"))
    """)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TIKTOKEN_CACHE_DIR": str(tmp_path),
        "XDG_CACHE_HOME": str(tmp_path),
        "HOME": str(tmp_path),
        "no_proxy": "",
        "http_proxy": "http://0.0.0.0:9",
        "https_proxy": "http://0.0.0.0:9",
    }
    out = subprocess.run(
        [*_without_network(), sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "6"]
    assert list(tmp_path.iterdir()) == []  # nothing cached or downloaded


@pytest.fixture
def fresh_loader(monkeypatch):
    """An empty per-process cache (restored afterwards)."""
    monkeypatch.setattr(tokens_mod, "_loaded", {})
    monkeypatch.setattr(tokens_mod, "_missing_logged", False)


def test_missing_tokenizer_package_estimates_and_logs_once(fresh_loader, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "toktok", None)  # import toktok -> ImportError
    c = TokenCounter()
    with caplog.at_level(logging.WARNING, logger="credit.proxy.tokens"):
        assert c.count_text("gpt-4o", "hello") is None
        assert c.count_text("gpt-4", "hello") is None
        assert (
            c.count_prompt(CHAT, {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}) is None
        )
        assert c.available("gpt-4o") is False
    warnings = [r for r in caplog.records if "no tokenizer package" in r.getMessage()]
    assert len(warnings) == 1


def test_an_encoding_loads_once_per_process(fresh_loader, monkeypatch):
    import toktok

    loads = []
    real = toktok._encoding

    def counting(name, *a, **kw):
        loads.append(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(toktok, "_encoding", counting)
    a, b = TokenCounter(), TokenCounter()
    for _ in range(3):
        assert a.count_text("gpt-4o", "hello world") == 2
        assert b.count_text("gpt-4o-mini", "hello world") == 2
    assert a.count_text("gpt-4", "hello world") == 2
    assert loads == [O200K, CL100K]


# -- StreamMeter: the output text of a stream -----------------------------------------------------


def _chat_event(text: str, index: int = 0) -> str:
    return json.dumps(
        {"object": "chat.completion.chunk", "choices": [{"index": index, "delta": {"content": text}}]}
    )


def test_a_cut_stream_is_counted_from_its_text(counter):
    """The issue's case: a stream cut before its usage chunk was charged ceil(chars / 4)."""
    m = OPENAI.stream_meter()
    for piece in ("お誕生", "日おめ", "でとう"):
        m.feed(_chat_event(piece))
    assert m.usage is None and m.texts() == ["お誕生日おめでとう"]
    assert m.output_tokens(lambda t: counter.count_text("gpt-4o", t), 4) == 8  # was ceil(9 / 4) = 3
    m = OPENAI.stream_meter()
    for piece in ("anti", "dis", "establishment", "arianism"):
        m.feed(_chat_event(piece))
    assert m.output_tokens(lambda t: counter.count_text("gpt-4", t), 4) == 6  # was ceil(28 / 4) = 7


def test_unknown_model_output_is_estimated_as_before():
    m = OPENAI.stream_meter()
    for piece in ("tok ",) * 9:
        m.feed(_chat_event(piece))
    assert m.text_chars == 36
    assert m.output_tokens(lambda t: None, 4) == 9 and m.output_tokens(lambda t: None, 5) == 8


def test_each_choice_and_block_is_kept_apart(counter):
    m = OPENAI.stream_meter()
    for a, b in zip(("2 +", " 2 =", " 4"), ("hello", " world", ""), strict=False):
        m.feed(_chat_event(a, 0))
        m.feed(_chat_event(b, 1))
    assert m.texts() == ["2 + 2 = 4", "hello world"]
    assert m.output_tokens(lambda t: counter.count_text("gpt-4o", t), 4) == 7 + 2
    a = ANTHROPIC.stream_meter()
    for i, text in ((0, "Let me think"), (1, "The answer"), (0, " more"), (1, " is 4")):
        a.feed(
            json.dumps(
                {"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": text}}
            )
        )
    assert a.texts() == ["Let me think more", "The answer is 4"]


def test_tool_call_arguments_and_refusals_are_output():
    m = OPENAI.stream_meter()
    m.feed(
        json.dumps(
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": "call_1",
                                    "type": "function",
                                    "function": {"name": "get_weather", "arguments": ""},
                                }
                            ],
                        },
                    }
                ]
            }
        )
    )
    for piece in ('{"loc', 'ation":', '"Paris"}'):
        m.feed(
            json.dumps(
                {
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]},
                        }
                    ]
                }
            )
        )
    m.feed(json.dumps({"choices": [{"index": 1, "delta": {"refusal": "I can't"}}]}))
    assert m.texts() == ['get_weather{"location":"Paris"}', "I can't"]
    r = OPENAI.stream_meter()
    r.feed(
        json.dumps(
            {"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "Hi"}
        )
    )
    r.feed(
        json.dumps({"type": "response.function_call_arguments.delta", "output_index": 1, "delta": '{"a":1}'})
    )
    assert r.texts() == ["Hi", '{"a":1}'] and r.text_chars == 9


def test_kept_text_is_capped_and_the_rest_estimated(counter):
    m = OPENAI.stream_meter(keep_chars=11)
    for piece in ("hello", " world", " and", " more", " text"):
        m.feed(_chat_event(piece))
    assert m.texts() == ["hello world"] and m.kept_chars == 11 and m.text_chars == 25
    # "hello world" counted (2), the 14 characters past the cap estimated: ceil(14 / 4) = 4
    assert m.output_tokens(lambda t: counter.count_text("gpt-4o", t), 4) == 2 + 4


def test_many_small_deltas_are_joined_without_losing_text():
    m = ANTHROPIC.stream_meter()
    pieces = [f"w{i} " for i in range(5000)]
    for p in pieces:
        m.feed(
            json.dumps(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}
            )
        )
    assert m.texts() == ["".join(pieces)]
    assert len(m._parts[0]) < 512 and len(m._chunks[0]) == 5000 // 512


# -- whole answers without usage ------------------------------------------------------------------


def test_answer_texts_of_whole_answers():
    chat = {
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello", "refusal": None}},
            {
                "index": 1,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
            },
        ],
    }
    assert OPENAI.answer_texts(chat) == ["Hello", "f", "{}"]
    assert OPENAI.answer_texts({"object": "text_completion", "choices": [{"index": 0, "text": "Hi"}]}) == [
        "Hi"
    ]
    responses = {
        "object": "response",
        "output": [
            {"type": "reasoning", "summary": []},
            {
                "type": "message",
                "content": [{"type": "output_text", "text": "Hi"}, {"type": "refusal", "refusal": "No"}],
            },
            {"type": "function_call", "name": "f", "arguments": "{}"},
        ],
    }
    assert OPENAI.answer_texts(responses) == ["Hi", "No", "f", "{}"]
    embeddings = {"object": "list", "data": [{"object": "embedding", "embedding": [0.1] * 1536}]}
    assert OPENAI.answer_texts(embeddings) == []  # vectors are not output tokens
    anthropic = {
        "type": "message",
        "content": [
            {"type": "thinking", "thinking": "hmm"},
            {"type": "text", "text": "Hi"},
            {"type": "tool_use", "name": "f", "input": {"a": "é"}},
        ],
    }
    assert ANTHROPIC.answer_texts(anthropic) == ["hmm", "Hi", "f", '{"a":"é"}']
    assert OPENAI.answer_texts({"something": "else"}) is None
    assert OPENAI.answer_texts([1, 2]) is None


def test_count_output(counter):
    gpt4o = lambda t: counter.count_text("gpt-4o", t)  # noqa: E731
    assert count_output(["tiktoken is great!", "2 + 2 = 4"], gpt4o, 4) == 6 + 7
    assert count_output(["tiktoken is great!", "2 + 2 = 4"], lambda t: None, 4) == 7  # ceil(27 / 4)
    assert count_output([], gpt4o, 4) == 0


def test_a_failing_tokenizer_means_an_estimate_not_an_error(fresh_loader, monkeypatch, caplog):
    def broken(text):
        raise RuntimeError("tokenizer bug")

    monkeypatch.setitem(tokens_mod._loaded, O200K, broken)
    c = TokenCounter()
    with caplog.at_level(logging.ERROR, logger="credit.proxy.tokens"):
        assert c.count_text("gpt-4o", "hello") is None
        assert (
            c.count_prompt(CHAT, {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}) is None
        )
    assert len(caplog.records) == 2

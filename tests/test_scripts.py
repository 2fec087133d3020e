"""The script registry's checks: each script's declared key count, and its includes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.core.engine import CreditEngine
from gateway.core.recovery import _scripts as run_in_pipeline
from gateway.core.scripts import ScriptError, ScriptRegistry


def _scripts(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "includes").mkdir()
    (tmp_path / "includes" / "lib.lua").write_text("local function one() return 1 end\n")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_every_packaged_script_declares_its_keys():
    reg = ScriptRegistry()
    assert reg["reserve"].keys_declared() == "11 to 12"
    assert reg["grant"].keys_declared() == "9"
    assert reg["expire"].keys_declared() == "at least 9"
    assert not [s.name for s in reg.scripts.values() if re.search(r"^--@include", s.source, re.MULTILINE)]


async def test_call_with_too_few_keys_names_the_script(engine: CreditEngine):
    keys = engine.keys.account_keys("u1", "op-1", "op-1")[:8]
    with pytest.raises(ScriptError, match=r"script 'grant' takes 9 keys, got 8"):
        await engine.scripts.call(engine.script_redis, "grant", keys, [])


async def test_call_with_too_many_keys_names_the_script(engine: CreditEngine):
    keys = [*engine.keys.hold_keys("u1", "op-1", "h1"), "extra-1", "extra-2"]
    with pytest.raises(ScriptError, match=r"script 'settle' takes 11 to 12 keys, got 13"):
        await engine.scripts.call(engine.script_redis, "settle", keys, [])


async def test_call_below_an_open_range_names_the_script(engine: CreditEngine):
    with pytest.raises(ScriptError, match=r"script 'expire' takes at least 9 keys, got 3"):
        await engine.scripts.call(engine.script_redis, "expire", ["a", "b", "c"], [])


async def test_unknown_script_is_named(engine: CreditEngine):
    with pytest.raises(ScriptError, match=r"no script 'nope'"):
        await engine.scripts.call(engine.script_redis, "nope", [], [])


def test_unknown_include_is_reported_by_name(tmp_path):
    root = _scripts(
        tmp_path, {"ok.lua": "--@keys 1\n--@include lib\n", "bad.lua": "--@keys 1\n--@include libb\n"}
    )
    with pytest.raises(ScriptError, match=r"script 'bad' includes 'libb': there is no includes/libb\.lua"):
        ScriptRegistry(root)


def test_script_without_a_keys_line_is_refused(tmp_path):
    root = _scripts(tmp_path, {"nokeys.lua": "--@include lib\nreturn 1\n"})
    with pytest.raises(ScriptError, match=r"script 'nokeys' must declare its keys"):
        ScriptRegistry(root)


def test_empty_key_range_is_refused(tmp_path):
    root = _scripts(tmp_path, {"backwards.lua": "--@keys 3-2\nreturn 1\n"})
    with pytest.raises(ScriptError, match=r"script 'backwards': '--@keys 3-2' is an empty range"):
        ScriptRegistry(root)


def test_include_is_inlined_and_keys_line_read(tmp_path):
    root = _scripts(tmp_path, {"ok.lua": "--@keys 2+\n--@include lib\nreturn one()\n"})
    s = ScriptRegistry(root)["ok"]
    assert "local function one()" in s.source
    assert (s.min_keys, s.max_keys) == (2, None)


async def test_a_rebuild_pipeline_refuses_a_call_with_the_wrong_key_count_before_sending_any(
    engine: CreditEngine,
):
    good = engine.keys.partition(0)
    calls = [
        ([good.rebuild, good.ready], ["take", "t1", 30_000, "1"]),
        ([engine.keys.partition(1).rebuild], ["take", "t1", 30_000, "1"]),
    ]
    with pytest.raises(ScriptError, match=r"script 'rebuild_lease' takes 2 keys, got 1"):
        await run_in_pipeline(engine, "rebuild_lease", calls)
    assert not await engine.redis.exists(good.rebuild)  # the valid call before it was not sent

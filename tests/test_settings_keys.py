"""Key settings: what a key may be, and that a refusal never shows key material (on the
terminal of `credit-gateway serve`, in logs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.core.settings import Settings, parse_keys

GOOD = "Gk" + "7" * 38  # 40 characters
SECRET_SHORT = "shortButSecretQ9"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("   ", "holds no key"),
        (" , ,", "holds no key"),
        ("a" + " " * 30 + "b", "no spaces"),
        ("k" * 20 + "\t" + "k" * 20, "no spaces"),
        ("k" * 20 + "\x00" + "k" * 20, "control"),
        ("k" * 20 + "\u00e9" + "k" * 20, "printable ASCII"),
        (f"{GOOD},{SECRET_SHORT}", "at least 32"),
        ("sha256:" + "g" * 64, "64 hex digits"),
        ("sha256:" + "a" * 63, "64 hex digits"),
    ],
)
def test_bad_key_lists_are_refused_without_echoing_them(raw, says):
    with pytest.raises(ValidationError) as info:
        Settings(admin_keys=raw)
    text = "; ".join(e["msg"] for e in info.value.errors())
    assert says in text
    assert SECRET_SHORT not in text and GOOD not in text


def test_good_key_lists_parse():
    assert (
        len(parse_keys(f"{GOOD}, {GOOD[::-1]},")) == 2
    )  # spaces around entries and a trailing comma are fine
    assert parse_keys("") == []
    assert len(parse_keys("sha256:" + "ab" * 32)) == 1


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("credit-gateway")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "gateway.cli"]


@pytest.mark.parametrize(
    "env",
    [
        {"CREDIT_ADMIN_KEYS": f"{GOOD},{SECRET_SHORT}"},
        {"CREDIT_CLIENT_KEYS": f"{SECRET_SHORT}{' ' * 20}{SECRET_SHORT}"},
        {"CREDIT_ADMIN_KEYS": f"{GOOD},{SECRET_SHORT}", "CREDIT_PORT": "not-a-port"},
    ],
)
@pytest.mark.parametrize("command", [["serve"], ["worker"], ["-m", "gateway.worker"]])
def test_a_bad_key_exits_naming_the_variable_never_the_key(tmp_path, env, command):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CREDIT_")}
    clean["PYTHONPATH"] = str(ROOT)  # this checkout's code, whatever the venv has installed
    argv = [sys.executable, *command] if command[0] == "-m" else [*_cli(), *command]
    p = subprocess.run(
        argv,
        env={**clean, "CREDIT_REDIS_URL": "redis://127.0.0.1:1/0", **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0
    out = p.stdout + p.stderr
    name = next(iter(env))
    assert f"{name}:" in p.stderr, out
    assert SECRET_SHORT not in out and GOOD not in out and "input_value" not in out
    if "CREDIT_PORT" in env:
        assert "CREDIT_PORT:" in p.stderr and "not-a-port" not in out


def test_library_mode_refuses_a_bad_key_list_without_echoing_it(monkeypatch):
    from gateway.core.settings import SettingsError
    from gateway.library import credit_engine

    monkeypatch.setenv("CREDIT_ADMIN_KEYS", f"{GOOD},{SECRET_SHORT}")
    with pytest.raises(SettingsError) as e:
        credit_engine()
    assert (
        "CREDIT_ADMIN_KEYS" in str(e.value) and SECRET_SHORT not in str(e.value) and GOOD not in str(e.value)
    )

"""The proxy's configuration file (TOML or YAML) and its environment overrides."""

from __future__ import annotations

import pytest

from gateway.proxy.config import ConfigError, load_config

TOML = """
[gateway]
min_output_tokens = 8
hold_margin_seconds = 10

[[upstreams]]
name = "open-ai"
kind = "openai"
base_url = "https://api.example.com/"
api_key_env = "MY_OPENAI_KEY"
timeout_seconds = 60
models = ["gpt-x"]

[[upstreams]]
name = "claude"
kind = "anthropic"
base_url = "https://anthropic.example.com"
api_key = "in-file-key"

[pricing.models."gpt-x"]
input = "2.5"
output = "10"

[rate_limits]
requests_per_minute = 600
"""

YAML = """
upstreams:
  - name: local
    kind: openai
    base_url: http://127.0.0.1:9999
    models: ["*"]
pricing:
  models:
    m: {input: "1", output: "2"}
rate_limits: {tokens_per_minute: 1000}
"""


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_toml_with_environment_overrides(tmp_path):
    path = write(tmp_path, "gw.toml", TOML)
    cfg = load_config(path, env={"MY_OPENAI_KEY": "sk-env"})
    oa, cl = cfg.upstreams
    assert (oa.base_url, oa.api_key, oa.timeout_seconds, oa.models) == (
        "https://api.example.com",
        "sk-env",
        60,
        ("gpt-x",),
    )
    assert cl.api_key == "in-file-key" and cl.headers["anthropic-version"]
    assert cfg.rate_limits.requests_per_minute == 600 and cfg.rate_limits.tokens_per_minute == 0
    assert cfg.min_output_tokens == 8 and cfg.hold_margin_seconds == 10
    # CREDIT_UPSTREAM_<NAME>_* win over the file (non-alphanumerics in the name become _).
    env = {
        "MY_OPENAI_KEY": "sk-env",
        "CREDIT_UPSTREAM_OPEN_AI_BASE_URL": "https://proxy.internal",
        "CREDIT_UPSTREAM_OPEN_AI_API_KEY": "sk-override",
        "CREDIT_UPSTREAM_OPEN_AI_TIMEOUT": "5",
    }
    oa = load_config(path, env=env).upstreams[0]
    assert (oa.base_url, oa.api_key, oa.timeout_seconds) == ("https://proxy.internal", "sk-override", 5)


def test_yaml(tmp_path):
    cfg = load_config(write(tmp_path, "gw.yaml", YAML), env={})
    assert cfg.upstreams[0].serves("anything") and cfg.rate_limits.tokens_per_minute == 1000
    assert "m" in cfg.pricing.models


@pytest.mark.parametrize(
    "bad",
    [
        TOML + "\n[surprise]\nx = 1\n",
        TOML.replace('base_url = "https://api.example.com/"', 'base_url = "file:///etc/passwd"'),
        TOML.replace("timeout_seconds = 60", "timeout_seconds = 0"),
        TOML.replace("requests_per_minute = 600", "requests_per_minute = -1"),
        TOML.replace("requests_per_minute = 600", "requests_per_second = 10"),
        TOML.replace('kind = "anthropic"', 'kind = "gemini"'),
        TOML.replace('name = "claude"', 'name = "open-ai"'),
        "this is not toml [",
    ],
)
def test_bad_files_are_refused_at_start(tmp_path, bad):
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, "gw.toml", bad), env={"MY_OPENAI_KEY": "k"})


def test_a_bad_override_is_refused(tmp_path):
    path = write(tmp_path, "gw.toml", TOML)
    with pytest.raises(ConfigError):
        load_config(path, env={"CREDIT_UPSTREAM_OPEN_AI_TIMEOUT": "soon"})
    with pytest.raises(ConfigError):
        load_config(path, env={"CREDIT_UPSTREAM_OPEN_AI_BASE_URL": "http://x/?q=1"})


def test_a_bad_base_url_is_refused_without_its_credentials(tmp_path):
    cfg = tmp_path / "g.toml"
    cfg.write_text('[[upstreams]]\nname = "u"\nbase_url = "https://user:s3cret@example.com/v1?api-key=k3y"\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg), env={})
    assert "s3cret" not in str(e.value) and "k3y" not in str(e.value) and "***@example.com" in str(e.value)


def test_public_url_never_shows_a_credential():
    from gateway.core.redact import public_url

    assert public_url("redis://:pw@h:6379/0") == "redis://***@h:6379/0"
    assert public_url("mongodb://u:p@h1,h2/?authSource=admin") == "mongodb://***@h1,h2/"
    assert public_url("http://127.0.0.1:9100") == "http://127.0.0.1:9100"

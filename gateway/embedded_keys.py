"""Embedded mode's own admin and client keys, kept across restarts as digests.

`credit-gateway serve` in embedded mode with no CREDIT_ADMIN_KEYS / CREDIT_CLIENT_KEYS
generates the keys it lacks, shows them once, and keeps only their SHA-256 digests
(`sha256:<hex>`, the same form CREDIT_*_KEYS accepts) in a file beside the SQLite file
(`<sqlite path>.keys`, mode 0600). Later starts read the digests from that file, so the
keys shown the first time keep working; nothing can print them again. Keys configured in
the environment win over the file, kind by kind. `credit-gateway keys --new` (or deleting
the file) makes new keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from .core.settings import Settings, parse_keys

KINDS = ("admin", "client")


class KeysFileError(Exception):
    """The keys file cannot be read or is malformed; the message names it."""


@dataclass
class EmbeddedKeys:
    path: Path
    generated: dict[str, str] = field(default_factory=dict)  # kind -> plain key, made now (show once)
    from_file: list[str] = field(default_factory=list)  # kinds whose digests came from the file
    from_env: list[str] = field(default_factory=list)  # kinds configured in the environment


def keys_file(settings: Settings) -> Path:
    return Path(settings.sqlite_path + ".keys")


def new_key() -> str:
    return secrets.token_urlsafe(32)


def digest_entry(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def read_keys_file(path: Path) -> dict[str, list[str]]:
    """The digests kept in `path` by kind ({} when there is no file)."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise KeysFileError(f"cannot read the keys file {path}: {exc}") from exc
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        out: dict[str, list[str]] = {}
        for kind in KINDS:
            entries = data.get(kind) or []
            if not isinstance(entries, list) or not all(
                isinstance(e, str) and e.startswith("sha256:") for e in entries
            ):
                raise ValueError(f"{kind!r} must be a list of sha256:<hex> entries")
            parse_keys(",".join(entries))
            if entries:
                out[kind] = entries
        return out
    except ValueError as exc:
        raise KeysFileError(f"the keys file {path} is malformed ({exc}); delete it to make new keys") from exc


def write_keys_file(path: Path, digests: dict[str, list[str]]) -> None:
    """Replaces `path` atomically with the digests; the file is readable by its owner only."""
    body = json.dumps({k: digests[k] for k in KINDS if digests.get(k)}, indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # in case the file pre-existed with wider rights
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_keys(settings: Settings) -> EmbeddedKeys:
    """Fills the settings' missing admin/client keys from the keys file, generating (and
    keeping) the kinds the file lacks. Changes `settings` in place."""
    path = keys_file(settings)
    result = EmbeddedKeys(path)
    configured = {"admin": settings.admin_key_digests, "client": settings.client_key_digests}
    result.from_env = [k for k in KINDS if configured[k]]
    missing = [k for k in KINDS if not configured[k]]
    if not missing:
        return result
    stored = read_keys_file(path)
    for kind in missing:
        if kind in stored:
            result.from_file.append(kind)
        else:
            key = new_key()
            result.generated[kind] = key
            stored[kind] = [digest_entry(key)]
    if result.generated:
        write_keys_file(path, stored)
    for kind in missing:
        setattr(settings, f"{kind}_keys", ",".join(stored[kind]))
    return result


def replace_keys(settings: Settings, kinds: list[str]) -> dict[str, str]:
    """New keys for `kinds`, their digests written over the old ones in the keys file.
    Returns the plain keys (the caller shows them once)."""
    path = keys_file(settings)
    stored = read_keys_file(path)
    made = {}
    for kind in kinds:
        made[kind] = new_key()
        stored[kind] = [digest_entry(made[kind])]
    write_keys_file(path, stored)
    return made

"""URLs as they may be shown (logs, error messages): never a credential in them."""

from __future__ import annotations

from urllib.parse import urlsplit


def public_url(url: str) -> str:
    """`url` without its user:password@ part (shown as ***@), query and fragment (they may
    carry a key: ?api-key=...)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else "<not a URL>"

"""Server-sent events framing: where an event ends in a buffer, and the data it carries."""

from __future__ import annotations


def event_end(buf: bytes) -> tuple[int, int]:
    """Where the first complete SSE event ends: (index, separator length), or (-1, 0)."""
    i = buf.find(b"\n\n")
    j = buf.find(b"\r\n\r\n")
    if j >= 0 and (i < 0 or j < i):
        return j, 4
    return (i, 2) if i >= 0 else (-1, 0)


def sse_data(event: bytes) -> str:
    """The data of one event: its `data:` lines joined by newlines."""
    lines = [
        ln[5:].lstrip() for ln in event.decode("utf-8", "replace").splitlines() if ln.startswith("data:")
    ]
    return "\n".join(lines)

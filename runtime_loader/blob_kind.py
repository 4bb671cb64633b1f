"""Recognise what a blob holds from its first bytes, for errors that say "this is not an
executable, it is the weights" instead of blaming the runtime's version."""

from __future__ import annotations

import struct

_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


def blob_kind(data: bytes) -> str | None:
    """What the bytes are, when they are recognisably one of the non-executable kinds a store
    holds: "safetensors weights", "JSON (a release manifest)", "JSON", "text", or an empty
    blob; None for anything else (an executable, or bytes of unknown kind)."""
    if not data:
        return "nothing (an empty blob)"
    if len(data) >= 10:
        (header,) = struct.unpack_from("<Q", data)
        if 2 <= header <= min(len(data) - 8, _SAFETENSORS_MAX_HEADER) and data[8:9] == b"{":
            return "safetensors weights"
    head = data[:64].lstrip()
    if head[:1] in (b"{", b"["):
        if b"application/vnd.kiln.release" in data:  # canonical JSON sorts it past "graphs"
            return "JSON (a release manifest)"
        return "JSON"
    sample = data[:4096]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = sample[: exc.start].decode("utf-8") if exc.start > len(sample) - 4 else ""
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "text"
    return None

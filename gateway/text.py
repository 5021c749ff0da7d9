"""Making text from the wire safe to record: control characters escaped, length bounded."""

from __future__ import annotations


def safe_text(value: object, *, limit: int = 64) -> str:
    """Printable-ASCII rendering of a peer-supplied value (AE title, address, UID).

    Control, non-ASCII and backslash characters become ``\\xNN`` escapes so that what is
    written to logs, audit rows and exports cannot inject lines or markup.
    """
    text = value if isinstance(value, str) else str(value)
    out = []
    for ch in text[:limit]:
        code = ord(ch)
        if 0x20 <= code < 0x7F and ch != "\\":
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    if len(text) > limit:
        out.append("...")
    return "".join(out)

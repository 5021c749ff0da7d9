"""UID syntax checks (PS3.5 9.1): what a peer sends is validated before it is used."""

from __future__ import annotations

import re

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def is_valid_uid(value: object) -> bool:
    """True for a PS3.5 UID: at most 64 characters, digits in dot-separated components,
    no leading zero in a component, no trailing NUL or space."""
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.fullmatch(value))

"""Values of received data sets: pydicom converts a raw value on its first access, and what a
peer sent may not convert (a US value of 3 bytes, a number that is not one, a sequence that
does not walk). Every reader of received values goes through here, so none raises.
"""

from __future__ import annotations

import struct

from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

# what converting a received raw value may raise
DECODE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    NotImplementedError,
    AttributeError,
    struct.error,
    BytesLengthException,  # a value of the wrong length (not a ValueError)
    EOFError,
    OSError,  # a sequence value pydicom cannot walk ("No tag to read")
    RecursionError,
)


class UnreadableValue(ValueError):
    """A value of a received data set does not decode; names the keyword, never the value."""

    def __init__(self, keyword: str) -> None:
        self.keyword = keyword
        super().__init__(f"{keyword} does not decode")


def value_texts(ds: Dataset, keyword: str) -> list[str]:
    """The values of top-level ``keyword`` as text, [] when absent or empty; a sequence is not
    text (its items are data sets). UnreadableValue when the value does not decode."""
    try:
        value = ds.get(keyword)
        if value is None or isinstance(value, Sequence) or value == "":
            return []
        if isinstance(value, MultiValue | list | tuple):
            return [str(v) for v in value]
        return [str(value)]
    except DECODE_ERRORS as exc:
        raise UnreadableValue(keyword) from exc

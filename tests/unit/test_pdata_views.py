"""A received P-DATA-TF decoded over the socket's buffer (gateway.dicom.reactor._pdata_over):
the same items as pynetdicom's own decoding of the PDU, each item's data a view into the one
buffer, no copy (pynetdicom's ``_decode_pdu`` made four)."""

from __future__ import annotations

from typing import Any

import pytest
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from gateway.dicom.reactor import _pdata_over


def _pdu(*items: tuple[int, bytes]) -> bytes:
    """A P-DATA-TF of (context ID, data with its control header) items, by pynetdicom."""
    primitive = P_DATA()
    value_list: Any = [[ctx, data] for ctx, data in items]
    primitive.presentation_data_value_list = value_list
    return bytes(P_DATA_TF(primitive).encode())


ITEMS = [
    pytest.param([(1, b"\x03" + b"c" * 150)], id="command"),
    pytest.param([(1, b"\x00" + bytes(range(256)) * 512)], id="data-128k"),
    pytest.param([(1, b"\x00" + b"a" * 100), (3, b"\x02" + b"b" * 7), (5, b"\x01")], id="three"),
]


@pytest.mark.parametrize("items", ITEMS)
def test_the_same_items_as_pynetdicom_each_a_view(items: list[tuple[int, bytes]]) -> None:
    encoded = _pdu(*items)
    theirs = P_DATA_TF()
    theirs.decode(encoded)
    body = bytearray(encoded[6:])
    ours = _pdata_over(body)
    got = ours.to_primitive().presentation_data_value_list
    want = theirs.to_primitive().presentation_data_value_list
    assert [(cx, bytes(data)) for cx, data in got] == want == items
    for _cx, data in got:
        assert isinstance(data, memoryview) and data.obj is body  # the buffer itself
        assert isinstance(data[0], int) and bytes(data[1:]) == bytes(data)[1:]
    body[-1] ^= 0xFF  # a view: the buffer's bytes are the item's
    assert bytes(got[-1][1])[-1] == encoded[-1] ^ 0xFF


def test_items_that_run_past_the_body_fail_as_pynetdicom_fails() -> None:
    """pynetdicom's decoder is what runs: a bad body raises as it raises there (and the DUL
    answers what the decoder raises as an invalid PDU, Evt19)."""
    encoded = bytearray(_pdu((1, b"\x00" + b"x" * 40)))
    encoded[6:10] = (1000).to_bytes(4, "big")  # an item length past the end
    with pytest.raises(Exception) as theirs:
        P_DATA_TF().decode(bytes(encoded))
    with pytest.raises(Exception) as ours:
        _pdata_over(encoded[6:])
    assert type(ours.value) is type(theirs.value)

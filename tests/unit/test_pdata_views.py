"""A received P-DATA-TF decoded over the socket's buffer (gateway.dicom.reactor._pdata_over):
the same items as pynetdicom's own decoding of the PDU, each item's data a view into the one
buffer, no copy (pynetdicom's ``_decode_pdu`` made four)."""

from __future__ import annotations

import pytest
from pynetdicom.pdu import P_DATA_TF

from gateway.dicom.reactor import _pdata_over
from tests.support.pdus import pdata_tf

ITEMS = [
    pytest.param([(1, 0x03, b"c" * 150)], id="command"),
    pytest.param([(1, 0x00, bytes(range(256)) * 512)], id="data-128k"),
    pytest.param([(1, 0x00, b"a" * 100), (3, 0x02, b"b" * 7), (5, 0x01, b"")], id="three"),
]


@pytest.mark.parametrize("items", ITEMS)
def test_the_same_items_as_pynetdicom_each_a_view(items: list[tuple[int, int, bytes]]) -> None:
    encoded = pdata_tf(*items)
    theirs = P_DATA_TF()
    theirs.decode(encoded)
    body = bytearray(encoded[6:])
    ours = _pdata_over(body)
    got = ours.to_primitive().presentation_data_value_list
    want = theirs.to_primitive().presentation_data_value_list
    assert (
        [(cx, bytes(data)) for cx, data in got]
        == want
        == [(cx, bytes([ctrl]) + data) for cx, ctrl, data in items]
    )
    for _cx, data in got:
        assert isinstance(data, memoryview) and data.obj is body  # the buffer itself
        assert isinstance(data[0], int) and bytes(data[1:]) == bytes(data)[1:]
    body[-1] ^= 0xFF  # a view: the buffer's bytes are the item's
    assert bytes(got[-1][1])[-1] == encoded[-1] ^ 0xFF


def test_items_that_run_past_the_body_fail_as_pynetdicom_fails() -> None:
    """pynetdicom's decoder is what runs: a bad body raises as it raises there (and the DUL
    answers what the decoder raises as an invalid PDU, Evt19)."""
    encoded = bytearray(pdata_tf((1, 0x00, b"x" * 40)))
    encoded[6:10] = (1000).to_bytes(4, "big")  # an item length past the end
    with pytest.raises(Exception) as theirs:
        P_DATA_TF().decode(bytes(encoded))
    with pytest.raises(Exception) as ours:
        _pdata_over(encoded[6:])
    assert type(ours.value) is type(theirs.value)

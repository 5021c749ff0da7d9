"""Values pydicom and pynetdicom quote in their messages never reach the node's log."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import warnings
from collections.abc import Iterator

import pytest
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from gateway import logging as node_log
from gateway.logging import configure


@pytest.fixture
def node_logging() -> Iterator[io.StringIO]:
    """The node's logging (configure()), its handler writing to a buffer instead of stderr."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("pydicom").level
    configure()
    assert sys.excepthook is node_log._log_uncaught
    assert threading.excepthook is node_log._log_uncaught_in_thread
    out = io.StringIO()
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # not once per place: every warning is checked
            yield out
    finally:
        sys.excepthook, threading.excepthook = sys.__excepthook__, threading.__excepthook__
        logging.captureWarnings(False)
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("pydicom").setLevel(saved[2])


def test_gateway_turns_pydicoms_value_validation_off() -> None:
    assert config.settings.reading_validation_mode == config.IGNORE
    assert config.settings.writing_validation_mode == config.IGNORE
    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a validation warning would raise here
        ds.PatientBirthDate = "1947-03-15"
        ds.PatientSex = "janet"
        assert DataElement(0x00200052, "UI", "1.2.0377.4").value == "1.2.0377.4"


def test_library_warnings_are_logged_with_their_values_redacted(node_logging) -> None:
    # validation forced back on for this element: pydicom warns and logs, quoting the value
    DataElement(0x00100030, "DA", "1947-03-15", validation_mode=config.WARN)
    logging.getLogger("pynetdicom.acse").warning("peer sent %s", "'Doe^Janet'")
    logging.getLogger("gateway.test").warning("the node's own message 'kept'")
    err = node_logging.getvalue()
    assert "1947-03-15" not in err and "Janet" not in err
    records = [json.loads(line) for line in err.splitlines()]  # every line is a JSON record
    by_logger = {r["logger"]: r["msg"] for r in records}
    assert "Invalid value for VR DA: '<value>'" in by_logger["py.warnings"]
    assert by_logger["pynetdicom.acse"] == "peer sent '<value>'"
    assert by_logger["gateway.test"] == "the node's own message 'kept'"


def test_uncaught_exceptions_are_logged_by_type_not_message(node_logging) -> None:
    def fail() -> None:
        raise ValueError("Invalid value for PatientName: Doe^Janet")

    # pytest puts its own thread hook in place while a test runs: the node's (installed by
    # configure, checked in the fixture) is put back for this thread
    saved = threading.excepthook
    threading.excepthook = node_log._log_uncaught_in_thread
    try:
        t = threading.Thread(target=fail, name="receiver-7")
        t.start()
        t.join()
    finally:
        threading.excepthook = saved
    try:
        raise KeyError("MRN7781234")
    except KeyError:
        sys.excepthook(*sys.exc_info())  # what the interpreter calls for an uncaught one
    err = node_logging.getvalue()
    assert "Janet" not in err and "MRN7781234" not in err
    records = [json.loads(line) for line in err.splitlines()]
    assert [(r["error"], r.get("thread_name")) for r in records] == [
        ("ValueError", "receiver-7"),
        ("KeyError", None),
    ]
    assert all(
        r["level"] == "error" and "test_library_log_redaction.py" in r["at"] for r in records
    )

"""DIMSE status codes the gateway answers and how it reads a destination's answers.

PS3.7 Annex C (general statuses) and PS3.4 B.2.3 (Storage Service Class statuses).
"""

from __future__ import annotations

from enum import Enum

SUCCESS = 0x0000
# PS3.4 B.2.3: refused, out of resources
OUT_OF_RESOURCES = 0xA700
# PS3.4 B.2.3: error, data set does not match SOP class
DATASET_MISMATCH = 0xA900
# PS3.4 B.2.3: error, cannot understand
CANNOT_UNDERSTAND = 0xC000
# PS3.7 C.4: failure, processing failure / duplicate SOP instance / invalid object instance
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
INVALID_OBJECT_INSTANCE = 0x0117
SOP_CLASS_NOT_SUPPORTED = 0x0122


class StatusClass(Enum):
    SUCCESS = "success"
    WARNING = "warning"
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


def classify(status: int) -> StatusClass:
    """How the transfer worker treats a destination's C-STORE status.

    A7xx (out of resources) may clear, so it retries; A9xx, Cxxx and the PS3.7 failures
    (0x01xx, 0x02xx) will not change by resending, so they are permanent; Bxxx and 0x0001
    are warnings: delivered, recorded, never hidden.
    """
    if status == SUCCESS:
        return StatusClass.SUCCESS
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return StatusClass.WARNING
    if 0xA700 <= status <= 0xA7FF:
        return StatusClass.RETRYABLE
    if status in (0x0213, 0x0210):  # resource limitation / duplicate invocation
        return StatusClass.RETRYABLE
    return StatusClass.PERMANENT

"""Presentation contexts the SCP supports: every storage SOP class, as sent.

The storage SOP classes come from pydicom's UID registry (every "... Storage" SOP class,
retired ones included, Storage Commitment excluded). Transfer syntaxes are every one
pydicom knows except the deflated ones: Deflated Explicit VR Little Endian is not offered,
because pynetdicom inflates it without a bound (a 1 MiB message can become 1 GiB), and
JPIP referenced syntaxes, whose pixels are a URL elsewhere.
"""

from __future__ import annotations

from functools import cache

import pydicom.uid as pydicom_uid
from pydicom._uid_dict import UID_dictionary
from pynetdicom.presentation import PresentationContext, build_context

VERIFICATION = "1.2.840.10008.1.1"  # PS3.4 A.4: Verification SOP Class

UNCOMPRESSED = (
    pydicom_uid.ExplicitVRLittleEndian,
    pydicom_uid.ImplicitVRLittleEndian,
)


@cache
def storage_sop_classes() -> tuple[str, ...]:
    out = []
    for uid, entry in UID_dictionary.items():
        name, kind = entry[0], entry[1]
        if kind == "SOP Class" and "Storage" in name and "Commitment" not in name:
            out.append(uid)
    return tuple(sorted(out))


@cache
def accepted_transfer_syntaxes() -> tuple[str, ...]:
    """Compressed syntaxes first, uncompressed last.

    pynetdicom accepts the first syntax of *this* list that the requestor proposed; with
    compressed ones first, a modality proposing its file's own syntax next to an
    uncompressed one is accepted as sent and never asked to transcode.
    """
    uncompressed = [*UNCOMPRESSED, pydicom_uid.ExplicitVRBigEndian]
    compressed = [
        str(ts)
        for ts in pydicom_uid.AllTransferSyntaxes
        if "Deflate" not in ts.name and "JPIP" not in ts.name and ts not in uncompressed
    ]
    return tuple(compressed) + tuple(str(t) for t in uncompressed)


# PS3.4 C.6.1.3 / C.6.2.3: Patient Root and Study Root FIND, MOVE and GET
QUERY_RETRIEVE = (
    "1.2.840.10008.5.1.4.1.2.1.1",
    "1.2.840.10008.5.1.4.1.2.1.2",
    "1.2.840.10008.5.1.4.1.2.1.3",
    "1.2.840.10008.5.1.4.1.2.2.1",
    "1.2.840.10008.5.1.4.1.2.2.2",
    "1.2.840.10008.5.1.4.1.2.2.3",
)


def scp_contexts(*, query_retrieve: bool = False) -> list[PresentationContext]:
    """With ``query_retrieve``, the Q/R SOP classes too, and storage contexts that accept a
    C-GET requestor's SCP/SCU Role Selection (PS3.7 D.3.3.4), so sub-operations can be sent
    back on its association; without a proposal the default roles stay."""
    syntaxes = list(accepted_transfer_syntaxes())
    contexts = [build_context(VERIFICATION, list(UNCOMPRESSED))]
    for uid in storage_sop_classes():
        cx = build_context(uid, syntaxes)
        if query_retrieve:
            cx.scu_role = True
            cx.scp_role = True
        contexts.append(cx)
    if query_retrieve:
        contexts += [build_context(uid, list(UNCOMPRESSED)) for uid in QUERY_RETRIEVE]
    return contexts


def is_storage_sop_class(uid: str) -> bool:
    return uid in set(storage_sop_classes())

"""C-FIND and C-MOVE SCU towards an upstream PACS (PS3.4 C.4.1 and C.4.2, SCU side).

The node asks the upstream on its callers' behalf: C-FIND with the caller's identifier,
and C-MOVE with this node's own AE title as the Move Destination, so the upstream's
C-STORE sub-operations arrive at the node's SCP and are spooled and indexed as usual.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydicom.dataset import Dataset
from pynetdicom import AE

from gateway.config.model import UpstreamConfig
from gateway.dicom.scu import associate
from gateway.errors import RetryableError

FIND = {
    "PATIENT": "1.2.840.10008.5.1.4.1.2.1.1",
    "STUDY": "1.2.840.10008.5.1.4.1.2.2.1",
}
MOVE = {
    "PATIENT": "1.2.840.10008.5.1.4.1.2.1.2",
    "STUDY": "1.2.840.10008.5.1.4.1.2.2.2",
}


class UpstreamClient:
    def __init__(self, cfg: UpstreamConfig, *, calling_ae_title: str) -> None:
        self.cfg = cfg
        self.calling_ae_title = cfg.calling_ae_title or calling_ae_title

    def _associate(self, sop_class: str) -> object:
        ae = AE(ae_title=self.calling_ae_title)
        ae.connection_timeout = self.cfg.timeout
        ae.acse_timeout = self.cfg.timeout
        ae.dimse_timeout = self.cfg.timeout
        ae.network_timeout = self.cfg.timeout
        ae.add_requested_context(sop_class)
        assoc = associate(ae, self.cfg.host, self.cfg.port, ae_title=self.cfg.ae_title)
        if not assoc.is_established:
            raise RetryableError("upstream PACS refused or unreachable")
        return assoc

    def find(self, model: str, identifier: Dataset) -> Iterator[Dataset]:
        """The upstream's matches (pending identifiers)."""
        assoc = self._associate(FIND[model])
        try:
            for status, ds in assoc.send_c_find(identifier, FIND[model]):  # type: ignore[attr-defined]
                if status is None:
                    raise RetryableError("upstream C-FIND: no response")
                if int(status.Status) in (0xFF00, 0xFF01) and ds is not None:
                    yield ds
        finally:
            if assoc.is_established:  # type: ignore[attr-defined]
                assoc.release()  # type: ignore[attr-defined]

    def move(self, model: str, identifier: Dataset) -> int:
        """Ask the upstream to C-MOVE what ``identifier`` selects to this node; the final
        status."""
        assoc = self._associate(MOVE[model])
        final = -1
        try:
            for status, _ds in assoc.send_c_move(  # type: ignore[attr-defined]
                identifier, self.calling_ae_title, MOVE[model]
            ):
                if status is None:
                    raise RetryableError("upstream C-MOVE: no response")
                final = int(status.Status)
        finally:
            if assoc.is_established:  # type: ignore[attr-defined]
                assoc.release()  # type: ignore[attr-defined]
        return final

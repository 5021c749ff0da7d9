"""DICOM TLS (PS3.15 B.9, the BCP 195 profile): the contexts for the listener and for
destinations, from the configuration's file names.

The listener's certificate and key default to ``<state_dir>/keys/tls.crt`` and ``tls.key``
(``dicom-gateway keys init`` makes them). A destination's server is always verified: its
certificate must chain to the destination's ``ca_file`` and name ``server_name`` (or the
host), and match ``pin_sha256`` when one is given.
"""

from __future__ import annotations

import ssl

from gateway.config import DestinationConfig, GatewayConfig
from gateway.crypto.tls import client_context, server_context


def listener_context(cfg: GatewayConfig) -> ssl.SSLContext | None:
    """The TLS listener's server context, or None when ``dicom.tls.enabled`` is false.

    Raises CryptoError naming the file when a certificate, key or CA does not load.
    """
    tls = cfg.dicom.tls
    if not tls.enabled:
        return None
    return server_context(
        cert_file=cfg.tls_cert_file,
        key_file=cfg.tls_key_file,
        client_ca_file=tls.ca_file,
        require_client_cert=tls.require_client_cert,
        allow_tls12=tls.allow_tls12,
        crl_file=tls.crl_file,
    )


def destination_context(dest: DestinationConfig) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for a destination: (context, server name), or None."""
    tls = dest.tls
    if tls is None:
        return None
    context = client_context(
        ca_file=tls.ca_file,
        cert_file=tls.cert_file,
        key_file=tls.key_file,
        allow_tls12=tls.allow_tls12,
        crl_file=tls.crl_file,
    )
    return context, tls.server_name or dest.host

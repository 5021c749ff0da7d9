"""Calling AE titles bound to client certificate names; the TLS configuration checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.config.model import DicomConfig, TLSBinding
from gateway.dicom.server import Admission, certificate_names
from gateway.errors import ConfigError

BINDINGS = (TLSBinding("CT1", "ct1.example"), TLSBinding("CT1B", "ct1.example"))


@pytest.mark.parametrize(
    ("calling", "names", "mismatch"),
    [
        ("CT1", frozenset({"ct1.example", "localhost"}), False),
        ("CT1B", frozenset({"ct1.example"}), False),
        ("CT1", None, True),  # bound, but not over TLS
        ("CT1", frozenset({"mr1.example"}), True),  # bound, another certificate
        ("OTHER", frozenset({"ct1.example"}), True),  # a bound certificate as another AE
        ("OTHER", frozenset({"mr1.example"}), False),  # neither bound
        ("OTHER", None, False),
    ],
)
def test_certificate_binding(calling: str, names: frozenset[str] | None, mismatch: bool) -> None:
    admission = Admission(DicomConfig(tls_bindings=BINDINGS))
    assert admission.certificate_mismatch(calling, names) is mismatch


def test_certificate_names_from_getpeercert() -> None:
    peer = {
        "subject": ((("countryName", "CH"),), (("commonName", "ct1.example"),)),
        "subjectAltName": (("DNS", "ct1.example"), ("IP Address", "127.0.0.1")),
    }
    assert certificate_names(peer) == {"ct1.example", "127.0.0.1"}
    assert certificate_names({}) == frozenset()
    assert certificate_names(None) == frozenset()


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("[dicom.tls]\nenabled = true\n", "dicom.tls.ca_file"),
        ("[dicom.tls]\nplain = false\n", "dicom.tls.plain"),
        ("[dicom]\nport = 2762\n[dicom.tls]\nenabled = true\nca_file = 'x'\n", "dicom.tls.port"),
        ("[dicom.tls]\ncert_file = 'a.crt'\n", "dicom.tls.key_file"),
        ("[[dicom.tls_bindings]]\ncalling_ae = '*'\ncertificate_name = 'x'\n", "calling_ae"),
        ("[[dicom.tls_bindings]]\ncalling_ae = 'CT1'\ncertificate_name = ''\n", "certificate_name"),
        (
            "[[destinations]]\nname = 'p'\nae_title = 'P'\n"
            "tls = { ca_file = 'c', pin_sha256 = 'x' }\n",
            "pin_sha256",
        ),
        ("[[destinations]]\nname = 'p'\nae_title = 'P'\ntls = { cert_file = 'c' }\n", "ca_file"),
    ],
)
def test_tls_config_errors_name_the_key(tmp_path: Path, body: str, key: str) -> None:
    path = tmp_path / "g.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=key):
        load_config(path)

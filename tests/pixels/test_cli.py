"""``dicom-gateway pixels suggest`` / ``preview`` and ``deid --profile basic-pixels``."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import deid_data
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from gateway.cli import main
from gateway.deid.pixel_rules import parse_rules

RGB_IMAGE = Path(os.path.dirname(deid_data.__file__)) / "data" / "ultrasounds" / "RGB_IMAGE.dcm"


def test_suggest_writes_a_rule_that_parses_and_covers_the_header(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["pixels", "suggest", str(RGB_IMAGE)]) == 0
    draft = capsys.readouterr().out
    (rule,) = parse_rules(draft, path="<draft>")
    assert rule.match.matches(pydicom.dcmread(RGB_IMAGE, stop_before_pixels=True))
    top = [r for r in rule.regions if r.edge == "top"]
    assert top and top[0].size >= 55  # the two header lines end at row ~55
    assert "ZZZDOWNTIME" not in draft and "47431395" not in draft
    assert tomllib.loads(draft)["rule"][0]["device"].startswith("SIEMENS S2000")


def test_preview_renders_the_cleaned_frame(tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    src = get_testdata_file("OBXXXX1A.dcm")
    assert main(["pixels", "preview", "--profile", "basic-pixels", src, "--out", str(out)]) == 0
    img = Image.open(out).convert("RGB")
    assert img.size == (800, 600)
    assert img.getpixel((0, 0)) == (255, 0, 0)  # the region outline
    assert img.getpixel((400, 30)) == (0, 0, 0)  # the band, blanked


def test_preview_of_an_unknown_device_names_its_signature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = get_testdata_file("color-pl.dcm")
    code = main(
        ["pixels", "preview", "--profile", "basic-pixels", src, "--out", str(tmp_path / "x")]
    )
    assert code == 1 and "Acme Products" in capsys.readouterr().err


def test_deid_cli_cleans_pixels_too(tmp_path: Path) -> None:
    secret = tmp_path / "s.key"
    secret.write_text("a-project-secret-for-this-test-0123456789abcdef\n")
    secret.chmod(0o600)
    out = tmp_path / "out"
    src = get_testdata_file("US1_UNCR.dcm")
    args = ["deid", "--profile", "basic-pixels", "--secret", str(secret), "--out", str(out), src]
    assert main(args) == 0
    (written,) = out.glob("*.dcm")
    ds = pydicom.dcmread(written)
    assert ds.BurnedInAnnotation == "NO"
    assert not ds.pixel_array[:106].any()

"""Clean Pixel Data for one instance: rule, blank, OCR check, markers; fail closed.

Called by :func:`gateway.deid.files.deidentify_bytes` after the tag-level engine, with the original
(for its signature, geometry and identifying values) and the de-identified output (which gets the
cleaned Pixel Data). What happens:

* an instance that can carry burned-in text (:func:`~gateway.deid.pixel_rules.at_risk`) and
  matches no rule raises :class:`~gateway.errors.DeidError` with its device signature (with
  ``ocr = "detect"``, also the boxes where text was found);
* a matched rule's regions are blanked in every frame and the frames re-encoded losslessly;
* with ``ocr`` verify or detect the cleaned frames are OCR'd (all, or first/last/sample of long
  cines); identifying-looking text left raises DeidError naming frame and box;
* only when cleaning ran *and* the OCR check passed does the output say BurnedInAnnotation NO and
  carry CID 7050 code 113101 (Clean Pixel Data Option).

Instances not at risk and matching no rule pass unchanged (with ``detect`` they are OCR'd first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway.deid import ocr as ocr_mod
from gateway.deid import pixels
from gateway.deid.leak import collect
from gateway.deid.pixel_rules import PixelOptions, at_risk, signature
from gateway.deid.profiles import Profile
from gateway.deid.table import METHOD_CODES
from gateway.errors import DeidError

CLEAN_PIXEL_DATA_CODE = "113101"
_DOCUMENT_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.104.2"})


@dataclass
class PixelReport:
    """What Clean Pixel Data did to one instance (device facts and counts, never text)."""

    at_risk: str | None = None
    rule: str | None = None
    cleaned: bool = False
    frames: int = 0
    ocr: str = "off"
    ocr_frames: list[int] = field(default_factory=list)
    ocr_words: int = 0
    ocr_passed: bool = False
    transfer_syntax: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "at_risk": self.at_risk,
            "rule": self.rule,
            "cleaned": self.cleaned,
            "frames": self.frames,
            "ocr": self.ocr,
            "ocr_frames": self.ocr_frames,
            "ocr_words": self.ocr_words,
            "ocr_passed": self.ocr_passed,
            "transfer_syntax": self.transfer_syntax,
        }


def needles_of(original: Dataset, profile: Profile) -> frozenset[str]:
    """Identifying values of the original for the OCR check (short numbers left out)."""
    words = collect(original, profile=profile).words()
    return frozenset(w for w in words if not (w.isdigit() and len(w) < 6))


def clean_instance(
    original: Dataset, out: Dataset, profile: Profile, *, engine: ocr_mod.OcrEngine
) -> PixelReport:
    """Apply the profile's Clean Pixel Data to ``out`` (see the module docstring)."""
    opts = profile.pixels
    assert opts is not None
    report = PixelReport(at_risk=at_risk(original), ocr=opts.ocr)
    rule = opts.rules.first_match(original)
    has_pixels = original.get_item("PixelData") is not None
    sop = str(original.get("SOPClassUID", "") or "").strip()
    if not has_pixels:
        if sop in _DOCUMENT_CLASSES:
            raise DeidError(
                f"a document ({report.at_risk}) cannot be cleaned of burned-in text: "
                f"{signature(original)}"
            )
        return report
    if rule is None:
        if opts.ocr == "detect":
            found = _ocr_check(original, None, None, opts, profile, engine, report)
            if found:
                raise DeidError(
                    f"no pixel rule matches and text was found ({'; '.join(found)}): "
                    f"{signature(original)}"
                )
        if report.at_risk is not None:
            raise DeidError(
                f"burned-in text risk ({report.at_risk}) and no pixel rule matches: "
                f"{signature(original)}"
            )
        return report
    report.rule = rule.name
    g = pixels.check_geometry(original, max_pixel_bytes=opts.max_pixel_bytes)
    arr, photometric = pixels.decode(original, g)
    if not arr.flags.writeable:
        arr = arr.copy()
    boxes, mask = pixels.rule_regions(rule, original, g.rows, g.columns)
    pixels.blank(arr, boxes, mask, pixels.fill_value(original, photometric, g))
    report.cleaned = True
    report.frames = g.frames
    if opts.ocr != "off":
        found = _ocr_check(original, arr, photometric, opts, profile, engine, report)
        if found:
            raise DeidError(
                f"OCR found identifying-looking text after rule {rule.name!r}: {'; '.join(found)}"
            )
        report.ocr_passed = True
    pixels.encode_into(out, arr, photometric, g, original, encode=opts.encode)
    report.transfer_syntax = str(out.file_meta.TransferSyntaxUID)
    method = [str(v) for v in out.get("DeidentificationMethod", None) or []]
    out.DeidentificationMethod = [*method, "PS3.15 E.3.1 burned-in text rules"]
    if report.ocr_passed:
        out.BurnedInAnnotation = "NO"
        _add_method_code(out)
    return report


def _ocr_check(
    original: Dataset,
    arr: NDArray[Any] | None,
    photometric: str | None,
    opts: PixelOptions,
    profile: Profile,
    engine: ocr_mod.OcrEngine,
    report: PixelReport,
) -> list[str]:
    """Descriptions of identifying-looking words (at most 8), OCR'ing the sampled frames."""
    if arr is None or photometric is None:
        g = pixels.check_geometry(original, max_pixel_bytes=opts.max_pixel_bytes)
        arr, photometric = pixels.decode(original, g)
    n = arr.shape[0]
    report.ocr_frames = ocr_mod.frames_to_check(
        n, all_up_to=opts.ocr_all_frames_up_to, sample=opts.ocr_sample
    )
    needles = needles_of(original, profile)
    palette = original if photometric == "PALETTE COLOR" else None
    findings: list[str] = []
    for i in report.ocr_frames:
        frame: NDArray[Any] = np.asarray(arr[i])
        words = ocr_mod.find_text(
            engine,
            frame,
            photometric,
            scale=opts.ocr_scale,
            min_confidence=opts.ocr_min_confidence,
            palette=palette,
        )
        report.ocr_words += len(words)
        for f in ocr_mod.identifying(words, frame=i, needles=needles, allow=opts.allow):
            findings.append(f.describe())
    if len(findings) > 8:
        findings = [*findings[:8], f"+{len(findings) - 8} more"]
    return findings


def _add_method_code(out: Dataset) -> None:
    code = METHOD_CODES.get("clean_pixel_data") or next(
        c for c in METHOD_CODES.values() if c.code_value == CLEAN_PIXEL_DATA_CODE
    )
    seq = list(out.get("DeidentificationMethodCodeSequence", None) or [])
    if any(str(i.get("CodeValue", "")) == CLEAN_PIXEL_DATA_CODE for i in seq):
        return
    item = Dataset()
    item.CodeValue = code.code_value
    item.CodingSchemeDesignator = code.coding_scheme_designator
    item.CodeMeaning = code.code_meaning
    seq.append(item)
    out.DeidentificationMethodCodeSequence = Sequence(seq)

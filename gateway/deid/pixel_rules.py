"""Burned-in text rules (PS3.15 E.3.1 Clean Pixel Data): device signatures mapped to regions.

Rules are data: TOML files in a rule folder (``deid_profiles/pixels/``), read in file-name order;
the first rule whose signature matches an instance decides its regions. A rule file::

    [[rule]]
    name = "ge-logiq-700-640x480"         # shown in reports and method texts (a device fact)
    device = "GE LOGIQ 700, 640x480"      # what it is for (free text for the admin)
    match = { all = [                     # conditions on top-level keywords of the original
        { attribute = "Manufacturer", contains = "G.E." },
        { attribute = "Rows", equals = 480 },
        { not = { attribute = "ImageType", one_of = ["SCREEN SAVE"] } },
    ] }
    regions = [
        { x = 0, y = 0, width = 640, height = 105 },   # a rectangle
        { top = 30 }, { bottom = 24 }, { left = 10 }, { right = 40 },   # edge bands
    ]
    keep = "ultrasound-regions"   # optional: also blank all outside SequenceOfUltrasoundRegions

Conditions: ``equals`` (a string, or a number compared numerically), ``contains``
(case-insensitive substring), ``regex`` (``re.search``), ``one_of`` (a list for ``equals``) and
``present`` (true/false), combined with ``all``, ``any`` and ``not``. A multi-valued attribute
(ImageType) matches when any of its values does; ``contains`` and ``regex`` also see the values
joined with ``\\``. A missing attribute matches only ``present = false``.

Which instances are *at risk* (can carry burned-in text, so they must match a rule or be refused)
is :func:`at_risk`. Bad rule files raise :class:`~gateway.errors.ProfileError` with file and line.

Values come from received files: one that does not decode (a US value of 3 bytes, a number
that is not one) fails closed. A rule whose condition reads it does not match, and
:func:`at_risk` names the instance at risk.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from gateway.errors import ProfileError
from gateway.received import UnreadableValue, value_texts

# SOP classes whose pixels are screens, captures or documents (PS3.4 Annex B)
_AT_RISK_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image (retired)",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced US Volume",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image (retired)",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF (scanned document)",
    "1.2.840.10008.5.1.4.1.1.104.2": "Encapsulated CDA",
    "1.2.840.10008.5.1.4.1.1.77.1.1": "VL Endoscopic Image",  # often with a text overlay
}
_AT_RISK_MODALITIES = frozenset({"US", "SC", "OT", "DOC", "XC", "ES"})
_SCREEN_IMAGE_TYPE = re.compile(r"SCREEN|SECONDARY|CAPTURE|DOSE|REPORT", re.I)
_SCREEN_MODALITIES = frozenset({"XA", "RF", "CT", "NM", "PT", "MG", "DX", "CR", "MR"})
_DOSE_TEXT = re.compile(r"dose|screen ?save|patient protocol", re.I)

_RULE_KEYS = {"name", "device", "match", "regions", "keep"}
_OPS = {"equals", "contains", "regex", "one_of", "present"}


def _get(ds: Dataset, keyword: str) -> list[str]:
    """The values of top-level ``keyword`` stripped; UnreadableValue if it does not decode."""
    return [v.strip() for v in value_texts(ds, keyword)]


def _text(ds: Dataset, keyword: str) -> str:
    return "\\".join(_get(ds, keyword))


def at_risk(ds: Dataset) -> str | None:
    """Why ``ds`` can carry burned-in text (a reason naming the class), or None.

    US, SC, OT and document classes, screen captures and dose screens (ImageType values such as
    SECONDARY or SCREEN SAVE, dose series descriptions) of XA/RF/CT/NM/PT and other modalities,
    and any instance whose BurnedInAnnotation is YES, or one of these attributes does not decode.
    """
    try:
        sop = _text(ds, "SOPClassUID")
        if sop in _AT_RISK_SOP_CLASSES:
            return f"SOP class {_AT_RISK_SOP_CLASSES[sop]}"
        modality = _text(ds, "Modality").upper()
        if modality in _AT_RISK_MODALITIES:
            return f"modality {modality}"
        if _text(ds, "BurnedInAnnotation").upper() == "YES":
            return "BurnedInAnnotation YES"
        image_type = _text(ds, "ImageType")
        if modality in _SCREEN_MODALITIES or not modality:
            if _SCREEN_IMAGE_TYPE.search(image_type):
                return f"{modality or 'image'} screen capture (ImageType)"
            if _DOSE_TEXT.search(_text(ds, "SeriesDescription")):
                return f"{modality or 'image'} dose screen (SeriesDescription)"
    except UnreadableValue as exc:  # fail closed: what cannot be read may be anything
        return f"{exc.keyword} unreadable"
    return None


def signature(ds: Dataset) -> str:
    """The device facts an admin needs to write a rule (no patient data)."""

    def text(keyword: str) -> str:
        try:
            return _text(ds, keyword)
        except UnreadableValue:
            return "(unreadable)"

    sop = text("SOPClassUID")
    fields = [
        ("Manufacturer", text("Manufacturer")),
        ("ManufacturerModelName", text("ManufacturerModelName")),
        ("Modality", text("Modality")),
        ("Rows", text("Rows")),
        ("Columns", text("Columns")),
        (
            "SOPClassUID",
            sop + (f" ({_AT_RISK_SOP_CLASSES[sop]})" if sop in _AT_RISK_SOP_CLASSES else ""),
        ),
    ]
    return ", ".join(f"{k}={v!r}" for k, v in fields)


# -- conditions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One node of a signature: ``op`` in all/any/not/equals/contains/regex/one_of/present."""

    op: str
    attribute: str = ""
    value: Any = None
    children: tuple[Condition, ...] = ()

    def matches(self, ds: Dataset) -> bool:
        """Whether ``ds`` matches; UnreadableValue if a value it reads does not decode."""
        if self.op == "all":
            return all(c.matches(ds) for c in self.children)
        if self.op == "any":
            return any(c.matches(ds) for c in self.children)
        if self.op == "not":
            return not self.children[0].matches(ds)
        values = _get(ds, self.attribute)
        if self.op == "present":
            return bool(values) == bool(self.value)
        if not values:
            return False
        joined = "\\".join(values)
        if self.op == "equals":
            return any(_equal(v, self.value) for v in values)
        if self.op == "one_of":
            return any(_equal(v, e) for v in values for e in self.value)
        if self.op == "contains":
            needle = str(self.value).lower()
            return any(needle in v.lower() for v in (*values, joined))
        if self.op == "regex":
            return any(self.value.search(v) for v in (*values, joined))
        raise ValueError(f"unknown condition {self.op}")


def _equal(value: str, expected: Any) -> bool:
    if isinstance(expected, bool) or not isinstance(expected, int | float):
        return value == str(expected)
    try:
        return float(value) == float(expected)
    except ValueError:
        return False


def parse_condition(doc: Any) -> Condition:
    """A condition table (see the module docstring); ValueError naming what is wrong."""
    if not isinstance(doc, dict):
        raise ValueError("a condition must be a table")
    for combo in ("all", "any"):
        if combo in doc:
            if len(doc) != 1 or not isinstance(doc[combo], list) or not doc[combo]:
                raise ValueError(f"{combo!r} takes a non-empty list of conditions and nothing else")
            return Condition(combo, children=tuple(parse_condition(c) for c in doc[combo]))
    if "not" in doc:
        if len(doc) != 1:
            raise ValueError("'not' takes one condition and nothing else")
        return Condition("not", children=(parse_condition(doc["not"]),))
    attribute = doc.get("attribute")
    if not isinstance(attribute, str) or tag_for_keyword(attribute) is None:
        raise ValueError(f"attribute {attribute!r} is not a DICOM keyword")
    ops = [k for k in doc if k != "attribute"]
    if len(ops) != 1 or ops[0] not in _OPS:
        raise ValueError(f"condition on {attribute} needs one of {', '.join(sorted(_OPS))}")
    op = ops[0]
    value = doc[op]
    if op == "regex":
        try:
            value = re.compile(str(value))
        except re.error as exc:
            raise ValueError(f"regex for {attribute}: {exc}") from None
    elif op == "one_of":
        if not isinstance(value, list) or not value:
            raise ValueError(f"one_of for {attribute} must be a non-empty list")
        value = tuple(value)
    elif op == "present":
        if not isinstance(value, bool):
            raise ValueError(f"present for {attribute} must be true or false")
    elif not isinstance(value, str | int | float):
        raise ValueError(f"{op} for {attribute} must be a string or a number")
    return Condition(op, attribute, value)


# -- regions and rules ------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """A rectangle in pixels, or an edge band (``edge`` in top/bottom/left/right, ``size``)."""

    x: int = 0
    y: int = 0
    width: int = 0
    height: int = 0
    edge: str = ""
    size: int = 0

    def box(self, rows: int, columns: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) clipped to the image, x1/y1 exclusive."""
        if self.edge == "top":
            x0, y0, x1, y1 = 0, 0, columns, self.size
        elif self.edge == "bottom":
            x0, y0, x1, y1 = 0, rows - self.size, columns, rows
        elif self.edge == "left":
            x0, y0, x1, y1 = 0, 0, self.size, rows
        elif self.edge == "right":
            x0, y0, x1, y1 = columns - self.size, 0, columns, rows
        else:
            x0, y0, x1, y1 = self.x, self.y, self.x + self.width, self.y + self.height
        return (
            max(0, min(columns, x0)),
            max(0, min(rows, y0)),
            max(0, min(columns, x1)),
            max(0, min(rows, y1)),
        )


@dataclass(frozen=True)
class Rule:
    name: str
    device: str
    match: Condition
    regions: tuple[Region, ...]
    keep_ultrasound_regions: bool
    source: str  # file:line


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    sha256: str  # of the rule files, in order

    def first_match(self, ds: Dataset) -> Rule | None:
        """The first rule that matches; a rule that reads a value that does not decode does
        not match (fail closed: an instance at risk with no rule is refused)."""
        for rule in self.rules:
            try:
                if rule.match.matches(ds):
                    return rule
            except UnreadableValue:
                continue
        return None


def _parse_region(doc: Any) -> Region:
    if not isinstance(doc, dict):
        raise ValueError("a region must be a table")
    edges = [k for k in ("top", "bottom", "left", "right") if k in doc]
    if edges:
        if len(doc) != 1:
            raise ValueError("an edge band is one of top/bottom/left/right = N and nothing else")
        size = doc[edges[0]]
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= 65535:
            raise ValueError(f"{edges[0]} must be a positive number of pixels")
        return Region(edge=edges[0], size=size)
    keys = {"x", "y", "width", "height"}
    if set(doc) != keys:
        raise ValueError("a rectangle is { x, y, width, height } (or an edge band: top = N)")
    vals = {k: doc[k] for k in keys}
    for k, v in vals.items():
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 65535:
            raise ValueError(f"{k} must be a whole number of pixels, 0-65535")
    if vals["width"] == 0 or vals["height"] == 0:
        raise ValueError("a rectangle needs a width and a height")
    return Region(x=vals["x"], y=vals["y"], width=vals["width"], height=vals["height"])


def _line_of(text: str, index: int) -> int:
    matches = list(re.finditer(r"^[ \t]*\[\[[ \t]*rule[ \t]*\]\]", text, re.M))
    if index < len(matches):
        return text.count("\n", 0, matches[index].start()) + 1
    return 1


def parse_rules(text: str, *, path: str) -> list[Rule]:
    """The rules of one file; ProfileError naming the file and the rule's line."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        raise ProfileError(path, int(m.group(1)) if m else None, f"not TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ProfileError(path, None, "not TOML: arrays or tables nested too deeply") from None
    unknown = set(doc) - {"rule"}
    if unknown:
        raise ProfileError(
            path, None, f"unknown key {sorted(unknown)[0]!r} (a rule file has [[rule]])"
        )
    raw = doc.get("rule", [])
    if not isinstance(raw, list):
        raise ProfileError(path, None, "rule must be an array of tables ([[rule]])")
    rules = []
    for i, r in enumerate(raw):
        line = _line_of(text, i)
        try:
            if not isinstance(r, dict):
                raise ValueError("must be a table")
            for k in r:
                if k not in _RULE_KEYS:
                    raise ValueError(f"unknown key {k!r}")
            name = r.get("name")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]{1,48}", name):
                raise ValueError("name is 1-48 letters, digits, '.', '_', '+' or '-'")
            if "match" not in r:
                raise ValueError("needs a match (the device signature)")
            keep = r.get("keep")
            if keep not in (None, "ultrasound-regions"):
                raise ValueError("keep must be 'ultrasound-regions'")
            regions_doc = r.get("regions", [])
            if not isinstance(regions_doc, list):
                raise ValueError("regions must be an array of regions")
            regions = tuple(_parse_region(g) for g in regions_doc)
            if not regions and keep is None:
                raise ValueError("needs regions, keep = 'ultrasound-regions', or both")
            rules.append(
                Rule(
                    name=name,
                    device=str(r.get("device", "")),
                    match=parse_condition(r["match"]),
                    regions=regions,
                    keep_ultrasound_regions=keep is not None,
                    source=f"{path}:{line}",
                )
            )
        except ValueError as exc:
            raise ProfileError(path, line, f"rule {i + 1}: {exc}") from None
    return rules


def load_rules(folder: Path) -> RuleSet:
    """Every ``*.toml`` of ``folder`` in file-name order; duplicate rule names are refused."""
    if not folder.is_dir():
        raise ProfileError(str(folder), None, "pixel rule folder does not exist")
    rules: list[Rule] = []
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.toml")):
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(str(path), None, f"cannot read: {exc}") from None
        digest.update(path.name.encode() + b"\0" + text.encode() + b"\0")
        rules.extend(parse_rules(text, path=str(path)))
    seen: dict[str, str] = {}
    for rule in rules:
        if rule.name in seen:
            raise ProfileError(
                rule.source, None, f"rule name {rule.name!r} also at {seen[rule.name]}"
            )
        seen[rule.name] = rule.source
    return RuleSet(tuple(rules), digest.hexdigest())


# -- the profile's [pixels] table -------------------------------------------------------------

_PIXEL_KEYS = {
    "clean",
    "rules",
    "ocr",
    "ocr_all_frames_up_to",
    "ocr_sample",
    "ocr_min_confidence",
    "ocr_scale",
    "allow",
    "encode",
    "max_pixel_bytes",
}


@dataclass(frozen=True)
class PixelOptions:
    """Clean Pixel Data settings of a profile (its ``[pixels]`` table), with the loaded rules."""

    rules: RuleSet
    rules_dir: str
    ocr: str = "verify"  # off | verify | detect
    ocr_all_frames_up_to: int = 16  # OCR every frame of instances with at most this many
    ocr_sample: int = 8  # else the first, the last and this many frames spread between
    ocr_min_confidence: int = 50  # tesseract word confidence (0-100) below which a word is noise
    ocr_scale: int = 2  # upscale factor before OCR (small annotation fonts)
    allow: tuple[re.Pattern[str], ...] = ()  # OCR words matching one in full are never flagged
    encode: str = "explicit"  # explicit (Explicit VR Little Endian) | rle (RLE Lossless)
    max_pixel_bytes: int = 1 << 30  # decoded size bound; larger instances are refused


def parse_pixel_options(doc: Any, *, profile_dir: Path) -> PixelOptions | None:
    """The ``[pixels]`` table; None when absent or ``clean = false``. ValueError on bad keys."""
    if not isinstance(doc, dict):
        raise ValueError("[pixels] must be a table")
    for k in doc:
        if k not in _PIXEL_KEYS:
            raise ValueError(f"unknown key pixels.{k}")
    clean = doc.get("clean", True)
    if not isinstance(clean, bool):
        raise ValueError("pixels.clean must be true or false")
    if not clean:
        return None
    rules_name = doc.get("rules", "pixels")
    if not isinstance(rules_name, str) or not rules_name:
        raise ValueError("pixels.rules must be a folder name or path")
    folder = Path(rules_name)
    if not folder.is_absolute():
        folder = profile_dir / folder
    ocr = doc.get("ocr", "verify")
    if ocr not in ("off", "verify", "detect"):
        raise ValueError("pixels.ocr must be 'off', 'verify' or 'detect'")
    ints = {}
    for k, low, high, default in (
        ("ocr_all_frames_up_to", 1, 100000, 16),
        ("ocr_sample", 0, 10000, 8),
        ("ocr_min_confidence", 0, 100, 50),
        ("ocr_scale", 1, 4, 2),
        ("max_pixel_bytes", 1, 1 << 34, 1 << 30),
    ):
        v = doc.get(k, default)
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            raise ValueError(f"pixels.{k} must be a whole number from {low} to {high}")
        ints[k] = v
    allow = doc.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        raise ValueError("pixels.allow must be a list of regular expressions")
    try:
        patterns = tuple(re.compile(a, re.I) for a in allow)
    except re.error as exc:
        raise ValueError(f"pixels.allow: {exc}") from None
    encode = doc.get("encode", "explicit")
    if encode not in ("explicit", "rle"):
        raise ValueError("pixels.encode must be 'explicit' or 'rle'")
    try:
        rules = load_rules(folder)
    except ProfileError as exc:
        raise ValueError(f"pixels.rules: {exc}") from None
    return PixelOptions(
        rules=rules,
        rules_dir=str(folder),
        ocr=ocr,
        allow=patterns,
        encode=encode,
        **ints,
    )

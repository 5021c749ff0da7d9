"""The leak gate: no identifying value of the original may appear anywhere in the output.

``leak_check(original, output)`` collects the original's identifying values and searches the whole
output for them: every element at every depth (file meta, private, UN and other byte values; pixel
data excepted, that is the pixel cleaner's and OCR's job), and returns the tag paths of the hits,
never the values. Rules, chosen to catch real leaks without drowning in generic words:

What is identifying (collected from every depth and the file meta of the original):
  * names: every PN value, whole and by component (components of 3+ characters);
  * dates: every DA value and the date part of DT, searched as YYYYMMDD, YYYY-MM-DD, DD.MM.YYYY
    and MM/DD/YYYY;
  * UIDs: every UI value that is not a well-known DICOM UID (pydicom's UID dictionary);
  * whole values of text elements (AE, LO, SH, ST, LT, UT, UC, and CS/IS/DS where Table E.1-1 does
    not keep them): IDs, accession, study ID, addresses, phone numbers, institution and station
    names, ...; and their free-text words of 4+ characters;
  * private and UN elements: text values as above; bytes as runs of printable characters.
  Not collected: coded and structural attributes (``NON_IDENTIFYING``: code values and meanings,
  context identifiers, ...), values the profile's *options* deliberately retain (e.g. dates with
  Retain Longitudinal Full Dates, device identity with Retain Device Identity) — but values kept by
  a
  profile's own ``keep`` / ``replace`` items are collected, so the gate catches a profile that keeps
  an identifying value.

How it matches (normalised: lower case; separators ``^``, space, comma, ``-``, ``.``, ``/``
ignored):
  * needles of 8+ characters anywhere inside an element's normalised text (so ``DOE^JOHN``,
    ``Doe, John``, ``2004-08-26`` and a UID embedded in a longer value are found);
  * shorter needles as whole words, or as 2-4 adjacent words joined (``John Doe`` -> ``johndoe``);
  * needles made of digits only and shorter than 6 match only a whole text value (short numbers
    occur in every measurement);
  * free-text words and name components that are generic are skipped: words of the DICOM data
    dictionary's keywords, a short list of common English and clinical words, and the words this
    engine writes itself (``ANONYMIZED``, the method texts). Values equal to a dummy are skipped.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterator
from functools import lru_cache
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom._uid_dict import UID_dictionary
from pydicom.charset import decode_bytes, default_encoding
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import TEXT_VR_DELIMS, PersonName

from gateway.deid.profiles import Profile
from gateway.deid.table import OPTIONS, ROWS, SAFE_PRIVATE
from gateway.deid.values import DUMMY

NON_IDENTIFYING = frozenset(
    {
        "CodeValue",
        "CodingSchemeDesignator",
        "CodingSchemeVersion",
        "CodeMeaning",
        "LongCodeValue",
        "URNCodeValue",
        "MappingResource",
        "MappingResourceName",
        "MappingResourceUID",
        "ContextIdentifier",
        "ContextUID",
        "ContextGroupVersion",
        "ContextGroupLocalVersion",
        "ContextGroupExtensionCreatorUID",
        "CodingSchemeUID",
        "CodingSchemeRegistry",
        "CodingSchemeExternalID",
        "CodingSchemeName",
        "CodingSchemeResponsibleOrganization",
        "Manufacturer",
        "ManufacturerModelName",
        "SoftwareVersions",
        "ConvolutionKernel",
        "FilterType",
        "SequenceName",
        "ReceiveCoilName",
        "TransmitCoilName",
        "ImagedNucleus",
        "PulseSequenceName",
        "SpecificCharacterSet",
        "ImplementationVersionName",
        "ImplementationClassUID",
        "SOPClassUID",
        "ReferencedSOPClassUID",
        "MediaStorageSOPClassUID",
        "TransferSyntaxUID",
    }
)
_COMMON = (
    "the and with without from that this there their have been were will would should could "
    "into onto over under after before left right upper lower axial coronal sagittal oblique "
    "contrast chest head neck brain spine abdomen pelvis knee hand foot body scan image images "
    "series study exam view views phantom test testing sample samples none unknown normal study "
    "anonymous anonymized anon patient doctor male female other routine protocol report reports "
    "primary secondary original derived localizer scout dicom gateway profile basic table key "
    "from dcm default mode data file files slice slices thick thin standard clinical research "
    "ct mr us cr dx mg pt nm sr rt seg yes no"
)
_WORD = re.compile(r"[^\W_]+")
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "AT", "OF", "OD"})
_TEXT_VRS = frozenset({"AE", "LO", "SH", "ST", "LT", "UT", "UC", "PN", "CS", "IS", "DS", "UR"})
_FREE_TEXT = frozenset({"LO", "ST", "LT", "UT", "UC", "SH"})
_BYTES_VRS = frozenset({"OB", "OW", "UN", "OL", "OV"})
_WELL_KNOWN = frozenset(UID_dictionary)
_NON_IDENTIFYING_TAGS = frozenset(
    int(keyword_dict[k]) for k in NON_IDENTIFYING if k in keyword_dict
)
_NON_IDENTIFYING_PATHS = frozenset(
    f"({t >> 16:04X},{t & 0xFFFF:04X})" for t in _NON_IDENTIFYING_TAGS
)
_FREE_WORD_CATEGORIES = frozenset({"text", "bytes"})
_CLEAN_OPTIONS = frozenset({"clean_descriptors", "clean_structured_content", "clean_graphics"})
_VOCABULARY_VRS = frozenset({"CS", "IS", "DS", "UI", "AS", "DA", "TM", "DT"})
_VOCABULARY_OUT = frozenset({"CS", "AS"})
_PRINTABLE_RUN = re.compile(rb"[\x20-\x7e]{4,}")


@lru_cache(maxsize=1)
def generic_words() -> frozenset[str]:
    """Words never searched as free text: DICOM keyword parts, common words, our own output."""
    words = set(_COMMON.split())
    split = re.compile(r"[A-Z][a-z]+|[A-Z]+(?![a-z])|\d+")
    for kw in keyword_dict:
        words.update(w.lower() for w in split.findall(kw) if len(w) >= 3)
    for v in DUMMY.values():
        if isinstance(v, str):
            words.add(v.lower())
    return frozenset(words)


def _canon(text: str) -> str:
    return "".join(_WORD.findall(text.lower()))


def _values(v: Any) -> list[Any]:
    if v is None:
        return []
    if isinstance(v, MultiValue | list | tuple):
        return list(v)
    return [v]


class Needles:
    """The identifying values of one original, normalised for search."""

    def __init__(self) -> None:
        self.long: dict[str, str] = {}
        self.short: dict[str, str] = {}
        self.short_numeric: dict[str, str] = {}
        self.vocabulary: dict[str, str] = {}  # path -> original value of coded/defined elements

    def add(self, canon: str, category: str) -> None:
        if len(canon) < 3:
            return
        if canon.isdigit():
            if len(canon) >= 8:
                self.long.setdefault(canon, category)
            elif len(canon) >= 6:
                self.short.setdefault(canon, category)
            elif len(canon) >= 4:
                self.short_numeric.setdefault(canon, category)
            return
        if len(canon) >= 8:
            self.long.setdefault(canon, category)
        else:
            self.short.setdefault(canon, category)

    def words(self) -> frozenset[str]:
        """The needles that are not free-text words: names, IDs, dates, UIDs, places."""
        return frozenset(
            w
            for d in (self.short, self.long, self.short_numeric)
            for w, category in d.items()
            if category not in _FREE_WORD_CATEGORIES
        )

    def __len__(self) -> int:
        return len(self.long) + len(self.short) + len(self.short_numeric)


_DUMMY_CANON = frozenset(_canon(v) for v in DUMMY.values() if isinstance(v, str) and v)


def _exempt_tags(profile: Profile | None) -> tuple[frozenset[int], bool, bool, bool]:
    if profile is None:
        return frozenset(), False, False, False
    return _exempt_for_options(frozenset(profile.options))


@lru_cache(maxsize=64)
def _exempt_for_options(opts: frozenset[str]) -> tuple[frozenset[int], bool, bool, bool]:
    """The tags the options retain, and the option flags: computed once per option set (it
    was rebuilt from the whole table for every instance)."""
    tags = frozenset(
        t for t, r in ROWS.items() if any(r.options.get(o) == "K" for o in opts if o in OPTIONS)
    )
    return (
        tags,
        "retain_longitudinal_full_dates" in opts,
        "retain_uids" in opts,
        "retain_safe_private" in opts,
    )


def collect(original: Dataset, *, profile: Profile | None = None) -> Needles:
    """The identifying values of ``original`` (see the module docstring for what counts)."""
    exempt, full_dates, keep_uids, safe_private = _exempt_tags(profile)
    cleaned_text = profile is not None and bool(profile.options & _CLEAN_OPTIONS)
    generic = generic_words()
    n = Needles()
    kept_by_option: set[str] = set()

    def add_text(text: str, category: str, *, words: bool) -> None:
        c = _canon(text)
        if len(c) >= 4 and c not in _DUMMY_CANON and c not in generic and len(set(c)) > 1:
            n.add(c, category)
        if words:
            for w in _WORD.findall(text.lower()):
                if len(w) >= 4 and w not in generic and len(set(w)) > 1:
                    n.add(w, "text")

    def walk(ds: Dataset, prefix: str) -> None:
        for elem in _elements(ds, skip=exempt):
            tag = int(elem.tag)
            vr = elem.VR
            if vr in _VOCABULARY_OUT or tag in _NON_IDENTIFYING_TAGS:
                path = f"{prefix}({tag >> 16:04X},{tag & 0xFFFF:04X})"
                n.vocabulary[path] = _text_of(elem.value).lower()
            if tag in exempt and vr != "SQ":
                for v in _values(elem.value):
                    kept_by_option.add(_canon(str(v)))
                    kept_by_option.update(_WORD.findall(str(v).lower()))
                continue
            if tag in _PIXEL_TAGS or tag in _NON_IDENTIFYING_TAGS or tag in exempt:
                continue
            if tag >> 16 & 1 and tag & 0xFFFF <= 0x00FF:
                continue  # private creators name vendors, not patients
            private = bool(tag >> 16 & 1)
            if private and safe_private and _is_safe(ds, tag):
                continue
            if vr == "SQ":
                path = f"{prefix}({tag >> 16:04X},{tag & 0xFFFF:04X})"
                for i, item in enumerate(elem.value or []):
                    walk(item, f"{path}[{i}]/")
                continue
            if vr == "PN":
                for v in _values(elem.value):
                    pn = v if isinstance(v, PersonName) else PersonName(str(v))
                    add_text(str(pn), "name", words=False)
                    for comp in (
                        pn.family_name,
                        pn.given_name,
                        pn.middle_name,
                        pn.name_suffix,
                        *(str(pn).split("=")[1:]),
                    ):
                        c = _canon(comp)
                        if len(c) >= 3 and c not in generic:
                            n.add(c, "name")
                continue
            if vr in ("DA", "DT"):
                if full_dates:
                    continue
                for v in _values(elem.value):
                    head = str(v).replace(".", "")
                    for d in re.findall(r"\d{8}", head if vr == "DA" else head[:8]):
                        if d != "19000101":
                            y, m, dd = d[:4], d[4:6], d[6:]
                            for form in (d, dd + m + y, m + dd + y):
                                n.add(form, "date")
                continue
            if vr == "UI":
                if keep_uids:
                    continue
                for v in _values(elem.value):
                    u = str(v).strip("\x00 ")
                    if u and u not in _WELL_KNOWN:
                        n.add(_canon(u), "uid")
                continue
            if vr in _NUMERIC_VRS or vr == "TM" or vr == "AS":
                continue
            if vr in _BYTES_VRS:
                raw = elem.value if isinstance(elem.value, bytes) else b""
                for run in _PRINTABLE_RUN.findall(raw):
                    add_text(run.decode("ascii"), "bytes", words=True)
                continue
            if vr in ("IS", "DS") and private:
                continue  # private numbers: measurements, not identifiers
            if vr in ("CS", "IS", "DS") and not private:
                row = ROWS.get(tag)
                if row is None or row.basic == "K":
                    continue
            row = ROWS.get(tag)
            if private:
                category = "private"
            elif row is None or "clean_descriptors" in row.options:
                category = "text"  # descriptors: free text, generic words are no leak
            else:
                category = row.keyword
            if category == "text" and cleaned_text:
                for v in _values(elem.value):  # kept, cleaned of the other categories
                    kept_by_option.add(_canon(str(v)))
                continue
            for v in _values(elem.value):
                add_text(str(v), category, words=vr in _FREE_TEXT or vr == "AE" or private)

    walk(original, "")
    meta = getattr(original, "file_meta", None)
    if meta is not None:
        walk(meta, "meta/")
    for d in (n.long, n.short, n.short_numeric):
        for value in kept_by_option & d.keys():
            del d[value]
    return n


def scrub_words(original: Dataset) -> frozenset[str]:
    """Lower-case words of the original's identifying values, for cleaning free text."""
    return collect(original).words()


def _is_safe(ds: Dataset, tag: int) -> bool:
    elem = tag & 0xFFFF
    if elem <= 0x00FF:
        return False
    creator = ds.get((tag & 0xFFFF0000) | (elem >> 8))
    if creator is None:
        return False
    name = str(creator.value).strip().upper()
    return (tag >> 16, name, elem & 0xFF) in SAFE_PRIVATE


_NUMBER_SIZES = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "UV": 8, "SV": 8}


class _Decoded:
    """An element's tag, VR and value as pydicom's conversion gives them (values as the
    strings pydicom builds its value objects from), decoded from the element's bytes without
    building those objects: the gate needs the text, and pydicom's conversion took ~15 us an
    element, most of the gate's time."""

    __slots__ = ("VR", "tag", "value")

    def __init__(self, tag: int, vr: str, value: str | list[str] | bytes) -> None:
        self.tag = tag
        self.VR = vr
        self.value = value


_SPLIT_ASCII = frozenset({"AS", "CS", "DA", "DT", "TM", "UI"})
_SPLIT_TEXT = frozenset({"SH", "LO", "UC"})
_SINGLE_TEXT = frozenset({"ST", "LT", "UT"})
_RAW_BYTES = frozenset({"OB", "OW", "OL", "OV"})
_DECODED_VRS = _SPLIT_ASCII | _SPLIT_TEXT | _SINGLE_TEXT | _RAW_BYTES | {"AE", "DS", "IS", "UR"}


def _encodings(ds: Dataset) -> list[str]:
    """The character sets of ``ds``'s text, as pydicom passes them to its converters."""
    enc = ds._character_set
    if not enc:
        return [default_encoding]
    return [enc] if isinstance(enc, str) else list(enc)


def _decoded(raw: RawDataElement, encodings: list[str]) -> _Decoded | None:
    """``raw`` decoded as pydicom's converters decode it (``pydicom.values``, default
    configuration), or None where only pydicom's conversion will do: PN (its component
    groups decode apart), UN (pydicom may look its VR up), SQ, numbers, private elements read
    in implicit VR (their VR depends on the private dictionary) and unread values."""
    value = raw.value
    vr = raw.VR
    if value is None:
        return None
    tag = int(raw.tag)
    if vr is None:  # implicit VR: a public tag takes the dictionary's VR, as pydicom does
        if tag >> 16 & 1:
            return None
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return None
    if vr not in _DECODED_VRS:
        return None
    if vr in _RAW_BYTES:
        return _Decoded(tag, vr, value)
    parts: list[str]
    if vr in _SPLIT_ASCII:  # multi_string: trailing padding off, split
        parts = value.decode(default_encoding).rstrip(" \x00").split("\\")
    elif vr in _SPLIT_TEXT:  # convert_text: decode, split, trailing padding off each
        text = decode_bytes(value, encodings, TEXT_VR_DELIMS)
        parts = [v.rstrip("\0 ") for v in text.split("\\")]
    elif vr in _SINGLE_TEXT:  # convert_single_string
        parts = [decode_bytes(value, encodings, TEXT_VR_DELIMS).rstrip("\0 ")]
    elif vr == "AE":  # leading and trailing spaces are not significant
        parts = [v.strip() for v in value.decode(default_encoding).split("\\")]
    elif vr in ("DS", "IS"):  # numbers keep their text, without spaces (pydicom's DS/IS
        # strip them; a value that is no number keeps pydicom's text up to its spaces, which
        # the gate ignores in numbers)
        parts = [v.strip() for v in value.decode(default_encoding).rstrip(" \x00").split("\\")]
    else:  # UR
        parts = [value.decode(default_encoding).rstrip()]
    return _Decoded(tag, vr, parts[0] if len(parts) == 1 else parts)


def _converted(ds: Dataset, tag: Any, encodings: list[str]) -> Any:
    """The element ``tag`` of ``ds`` for the gate: decoded from its bytes where
    :func:`_decoded` can, else converted by pydicom; one pydicom cannot convert is searched
    as raw bytes (UN)."""
    raw = ds.get_item(tag)
    if isinstance(raw, RawDataElement):
        fast = _decoded(raw, encodings)
        if fast is not None:
            return fast
    try:
        return ds[tag]
    except Exception:  # noqa: BLE001 - an undecodable element is searched as raw bytes
        if raw is None:
            return None
        return DataElement(tag, "UN", bytes(raw.value or b""))


def _elements(ds: Dataset, *, skip: frozenset[int] | None = None) -> Iterator[Any]:
    """The elements of ``ds`` (see :func:`_converted`). With ``skip`` (the exempt tags),
    binary numbers read in explicit VR that :func:`collect` does not read (not exempt, not a
    ``NON_IDENTIFYING`` tag) are left out unconverted: numbers are never needles. One whose
    length pydicom could not convert is still converted, fails and is searched as bytes."""
    encodings = _encodings(ds)
    for tag in list(ds.keys()):
        if skip is not None:
            raw = ds.get_item(tag)
            size = _NUMBER_SIZES.get(raw.VR or "") if isinstance(raw, RawDataElement) else None
            if (
                size is not None
                and raw.value is not None
                and len(raw.value) % size == 0
                and int(tag) not in skip
                and int(tag) not in _NON_IDENTIFYING_TAGS
            ):
                continue
        elem = _converted(ds, tag, encodings)
        if elem is not None:
            yield elem


def _searched(ds: Dataset) -> Iterator[Any]:
    """The output's elements that are searched, converted from their bytes only then:
    pixel data and binary numbers are never searched, so never converted (an element read
    in implicit VR has no VR before conversion: it is converted, then checked)."""
    encodings = _encodings(ds)
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if int(tag) in _PIXEL_TAGS or (raw is not None and raw.VR in _NUMERIC_VRS):
            continue
        elem = _converted(ds, tag, encodings)
        if elem is not None:
            yield elem


def _output_texts(ds: Dataset, prefix: str, out: list[tuple[str, str, str]]) -> None:
    for elem in _searched(ds):
        tag = int(elem.tag)
        vr = elem.VR
        if tag in _PIXEL_TAGS or vr in _NUMERIC_VRS:
            continue
        path = f"{prefix}({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if vr == "SQ":
            for i, item in enumerate(elem.value or []):
                _output_texts(item, f"{path}[{i}]/", out)
            continue
        text = _text_of(elem.value)
        if text:
            if vr in _BYTES_VRS and vr != "UN" and not tag >> 16 & 1:
                vr = "public-bytes"
            out.append((path, vr, text.lower()))


def _text_of(v: Any) -> str:
    if isinstance(v, bytes | bytearray):
        return bytes(v).decode("latin-1")
    return "\\".join(str(x) for x in _values(v))


def leak_check(
    original: Dataset, output: Dataset | bytes, *, profile: Profile | None = None
) -> list[str]:
    """Tag paths of the output where an identifying value of ``original`` appears (sorted)."""
    return sorted({path for path, _category, _needle in _hits(original, output, profile)})


def _hits(
    original: Dataset, output: Dataset | bytes, profile: Profile | None
) -> list[tuple[str, str, str]]:
    """(path, category, needle) per hit; the needle is patient data: never log or return it."""
    needles = collect(original, profile=profile)
    out_ds: Dataset
    if isinstance(output, bytes | bytearray):
        try:
            out_ds = dcmread(BytesIO(bytes(output)), force=True)
        except Exception:  # noqa: BLE001 - an output that does not parse cannot be proven clean
            return [("<output does not parse>", "", "")]
    else:
        out_ds = output
    texts: list[tuple[str, str, str]] = []
    try:
        meta = getattr(out_ds, "file_meta", None)
        if meta is not None:
            _output_texts(meta, "meta/", texts)
        _output_texts(out_ds, "", texts)
    except Exception:  # noqa: BLE001 - an output that does not decode cannot be proven clean
        return [("<output does not decode>", "", "")]
    hits: list[tuple[str, str, str]] = []
    starts: list[int] = []
    parts: list[str] = []
    vocab: list[bool] = []
    pos = 0
    short = needles.short
    numeric = needles.short_numeric

    unchanged = needles.vocabulary

    def keep(k: int, category: str, needle: str) -> None:
        path, vr, text = texts[k]
        if category in _FREE_WORD_CATEGORIES and vocab[k]:
            return  # a generic word in a code meaning or a defined term is not a leak
        if unchanged.get(path) == text and (
            vr in _VOCABULARY_OUT or path.rsplit("/", 1)[-1] in _NON_IDENTIFYING_PATHS
        ):
            return  # a coded/defined value passed through unchanged: vocabulary, not a leak
        hits.append((path, category, needle))

    everything = {**needles.short_numeric, **needles.short, **needles.long}
    for k, (path, vr, text) in enumerate(texts):
        words = _WORD.findall(text)
        canon = "".join(words)
        starts.append(pos)
        vocab.append(
            vr in _VOCABULARY_VRS
            or vr == "public-bytes"
            or path.rsplit("/", 1)[-1] in _NON_IDENTIFYING_PATHS
        )
        if vr in ("DS", "IS"):  # numbers: only a whole value equal to a needle is a hit
            for value in text.split("\\"):
                c = "".join(_WORD.findall(value))
                if c in everything:
                    keep(k, everything[c], c)
            canon = ""
            words = []
        elif vr == "public-bytes":  # binary data: printable noise, long needles only
            words = []
        parts.append(canon)
        pos += len(canon) + 1
        if short:
            nw = len(words)
            for i in range(nw):
                acc = words[i]
                if acc in short:
                    keep(k, short[acc], acc)
                for j in range(i + 1, min(i + 4, nw)):
                    acc += words[j]
                    if acc in short:
                        keep(k, short[acc], acc)
        if numeric and vr in _TEXT_VRS and vr not in ("IS", "DS") and canon in numeric:
            keep(k, numeric[canon], canon)
    if needles.long:
        hay = "\x00".join(parts)
        for needle, category in needles.long.items():
            i = hay.find(needle)
            while i != -1:
                k = bisect_right(starts, i) - 1
                keep(k, category, needle)
                nxt = starts[k + 1] if k + 1 < len(starts) else len(hay)
                i = hay.find(needle, nxt)
    return hits

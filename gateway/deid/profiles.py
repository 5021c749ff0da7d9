"""De-identification profiles: TOML files in ``deid_profiles/``, parsed once into frozen objects.

A profile is an ordered list of items; the first item that claims an element decides its action,
and PS3.15 Table E.1-1 (with the options the profile switches on) is the catch-all after the items,
followed by the sweep by VR of elements the table does not list. See ``deid_profiles/basic.toml``
for
the commented format. Anything that does not parse, an unknown key, an unknown option or action, a
bad tag: :class:`~gateway.errors.ProfileError` naming the file, the line and the reason.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword

from gateway.deid import choices
from gateway.deid.keys import validate_format
from gateway.deid.pixel_rules import PixelOptions, parse_pixel_options
from gateway.deid.table import OPTIONS, ROWS
from gateway.errors import ProfileError

ACTIONS = frozenset({"D", "Z", "X", "K", "C", "U", "keep", "replace", "remove", *choices.DEFAULTS})
VRS = frozenset(
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
    "UR US UT UV".split()
)
_TABLE_KEYWORDS = {r.keyword: t for t, r in ROWS.items() if r.keyword}
_TAG_TEXT = re.compile(r"^\(?\s*([0-9A-Fa-fXx]{4})\s*,\s*([0-9A-Fa-fXx]{4})\s*\)?$")
_TOP_KEYS = {"name", "description", "edition", "options", "pseudonyms", "dates", "item", "pixels"}
_ITEM_KEYS = {"name", "tag", "tags", "private", "vr", "action", "value", "when"}


@dataclass(frozen=True)
class Target:
    """What an item claims: tags under a mask, a private element by creator, or a VR."""

    mask: int = 0  # tag & mask == value; an exact tag has mask 0xFFFFFFFF
    value: int = 0
    creator: str | None = None  # private: upper-cased, stripped creator
    group: int | None = None  # private: group, or any odd group
    element: int | None = None  # private: low byte of the element, or any
    vr: str | None = None

    def exact_tag(self) -> int | None:
        return self.value if self.mask == 0xFFFFFFFF and self.creator is None else None


@dataclass(frozen=True)
class Item:
    index: int
    label: str
    targets: tuple[Target, ...]
    action: str
    value: str | None
    when: tuple[tuple[int, tuple[str, ...]], ...]
    line: int


@dataclass(frozen=True)
class Profile:
    name: str
    path: str
    sha256: str
    description: str = ""
    options: frozenset[str] = frozenset()
    items: tuple[Item, ...] = ()
    pseudonymize: bool = True
    patient_id_format: str = "PID-{digest:12}"
    patient_name_format: str = "ANON^{digest:8}"
    date_shift_days: tuple[int, int] = (-3650, -365)
    pixels: PixelOptions | None = None  # Clean Pixel Data ([pixels] table with its rule folder)


def default_search_dirs() -> list[Path]:
    """``$DICOM_GATEWAY_PROFILES``, ``./deid_profiles`` and the repository's ``deid_profiles``."""
    dirs = []
    env = os.environ.get("DICOM_GATEWAY_PROFILES")
    if env:
        dirs.append(Path(env))
    dirs.append(Path.cwd() / "deid_profiles")
    dirs.append(Path(__file__).resolve().parents[2] / "deid_profiles")
    return dirs


def load_profile(
    name_or_path: str | os.PathLike[str], search_dir: str | os.PathLike[str] | None = None
) -> Profile:
    """Load a profile by name (``basic``, from ``search_dir`` or the default dirs) or by path."""
    text = str(name_or_path)
    candidate = Path(text)
    if os.sep in text or text.endswith(".toml") or candidate.is_file():
        return parse_profile_file(candidate)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
        raise ProfileError(text, None, "a profile name is letters, digits, '.', '_' or '-'")
    dirs = [Path(search_dir)] if search_dir is not None else default_search_dirs()
    for d in dirs:
        p = d / f"{text}.toml"
        if p.is_file():
            return parse_profile_file(p)
    raise ProfileError(text, None, f"no profile {text!r} in {', '.join(map(str, dirs))}")


def parse_profile_file(path: Path) -> Profile:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProfileError(str(path), None, f"cannot read: {exc.strerror}") from None
    return parse_profile(raw.decode("utf-8", "replace"), path=str(path), name=path.stem)


def _line_of(text: str, pattern: str, start: int = 0) -> int | None:
    rx = re.compile(pattern, re.M)
    m = rx.search(text, start)
    return text.count("\n", 0, m.start()) + 1 if m else None


def parse_profile(text: str, *, path: str = "<profile>", name: str = "profile") -> Profile:
    """Parse profile TOML ``text``; ``path`` and line numbers go into any :class:`ProfileError`."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        line = int(m.group(1)) if m else text.count("\n") + 1
        raise ProfileError(path, line, f"not TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ProfileError(path, None, "not TOML: arrays or tables nested too deeply") from None

    def fail(reason: str, pattern: str | None = None, start: int = 0) -> ProfileError:
        return ProfileError(path, _line_of(text, pattern, start) if pattern else None, reason)

    for key in doc:
        if key not in _TOP_KEYS:
            raise fail(f"unknown key {key!r}", rf"^\s*\[*\s*{re.escape(key)}\b")
    edition = doc.get("edition")
    if edition is not None and edition != "2026c":
        raise fail(f"edition {edition!r}: this gateway ships PS3.15 2026c", r"^\s*edition\b")
    options = doc.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise fail("options must be a list of option names", r"^\s*options\b")
    for o in options:
        if o not in OPTIONS:
            raise fail(
                f"unknown option {o!r} (known: {', '.join(OPTIONS)})", rf"[\"']{re.escape(o)}[\"']"
            )
    opts = frozenset(options)
    if {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"} <= opts:
        raise fail("full dates and modified dates options exclude each other", r"^\s*options\b")

    pseudo = doc.get("pseudonyms", {})
    dates = doc.get("dates", {})
    if not isinstance(pseudo, dict) or not isinstance(dates, dict):
        raise fail("[pseudonyms] and [dates] must be tables")
    for k in pseudo:
        if k not in {"enabled", "patient_id", "patient_name"}:
            raise fail(f"unknown key pseudonyms.{k}", rf"^\s*{re.escape(k)}\b")
    for k in dates:
        if k != "shift_days":
            raise fail(f"unknown key dates.{k}", rf"^\s*{re.escape(k)}\b")
    pid_fmt = pseudo.get("patient_id", Profile.patient_id_format)
    pname_fmt = pseudo.get("patient_name", Profile.patient_name_format)
    for k, fmt in (("patient_id", pid_fmt), ("patient_name", pname_fmt)):
        try:
            if not isinstance(fmt, str):
                raise ValueError("must be a string")
            validate_format(fmt)
            if len(fmt) > 64 or "\\" in fmt:
                raise ValueError("too long or holds a backslash")
        except ValueError as exc:
            raise fail(f"pseudonyms.{k}: {exc}", rf"^\s*{k}\b") from None
    enabled = pseudo.get("enabled", True)
    if not isinstance(enabled, bool):
        raise fail("pseudonyms.enabled must be true or false", r"^\s*enabled\b")
    shift = dates.get("shift_days", list(Profile.date_shift_days))
    if (
        not isinstance(shift, list)
        or len(shift) != 2
        or not all(isinstance(d, int) for d in shift)
        or shift[0] > shift[1]
        or 0 in range(shift[0], shift[1] + 1)
        or max(abs(shift[0]), abs(shift[1])) > 36500
    ):
        raise fail("dates.shift_days must be [low, high], low <= high, excluding 0", r"shift_days")

    items_doc = doc.get("item", [])
    if not isinstance(items_doc, list):
        raise fail("item must be an array of tables ([[item]])", r"^\s*item\b")
    items = []
    pos = 0
    for i, it in enumerate(items_doc):
        line = _line_of(text, r"^[ \t]*\[\[[ \t]*item[ \t]*\]\]", pos) or 0
        m = re.compile(r"^[ \t]*\[\[[ \t]*item[ \t]*\]\]", re.M).search(text, pos)
        pos = m.end() if m else pos
        try:
            items.append(_parse_item(i, it, line))
        except ValueError as exc:
            raise ProfileError(path, line or None, f"item {i + 1}: {exc}") from None
    pixels = None
    if "pixels" in doc:
        try:
            pixels = parse_pixel_options(doc["pixels"], profile_dir=Path(path).parent)
        except ValueError as exc:
            raise fail(str(exc), r"^\s*\[\s*pixels\s*\]") from None
    digest = hashlib.sha256(text.encode())
    if pixels is not None:  # the rule library is part of what the profile does
        digest.update(b"\0pixel-rules\0" + pixels.rules.sha256.encode())
    return Profile(
        name=str(doc.get("name", name)),
        path=path,
        sha256=digest.hexdigest(),
        description=str(doc.get("description", "")),
        options=opts,
        items=tuple(items),
        pseudonymize=enabled,
        patient_id_format=pid_fmt,
        patient_name_format=pname_fmt,
        date_shift_days=(shift[0], shift[1]),
        pixels=pixels,
    )


def _parse_item(index: int, it: Any, line: int) -> Item:
    if not isinstance(it, dict):
        raise ValueError("must be a table")
    for k in it:
        if k not in _ITEM_KEYS:
            raise ValueError(f"unknown key {k!r}")
    targets: list[Target] = []
    given = [k for k in ("tag", "tags", "private", "vr") if k in it]
    if len(given) != 1:
        raise ValueError("needs exactly one of tag, tags, private, vr")
    if "tag" in it or "tags" in it:
        specs = [it["tag"]] if "tag" in it else it["tags"]
        if not isinstance(specs, list) or not specs:
            raise ValueError("tags must be a non-empty list")
        targets = [parse_tag_target(s) for s in specs]
    elif "private" in it:
        targets = [_parse_private(it["private"])]
    else:
        vr = it["vr"]
        if not isinstance(vr, str) or vr not in VRS:
            raise ValueError(f"unknown VR {vr!r}")
        targets = [Target(vr=vr)]
    action = it.get("action")
    if not isinstance(action, str) or action not in ACTIONS:
        raise ValueError(f"unknown action {action!r} (known: {', '.join(sorted(ACTIONS))})")
    if action == "remove":
        action = "X"
    value = it.get("value")
    if (action == "replace") != (value is not None):
        raise ValueError("value goes with action = 'replace', and only with it")
    if value is not None and not isinstance(value, str):
        raise ValueError("value must be a string")
    when: list[tuple[int, tuple[str, ...]]] = []
    when_doc = it.get("when", {})
    if not isinstance(when_doc, dict):
        raise ValueError("when must be a table { Keyword = value or [values] }")
    for kw, want in when_doc.items():
        tag = _keyword_tag(kw)
        if not isinstance(want, str | list):
            raise ValueError(f"when.{kw} must be a string or a list of strings")
        wanted = (want,) if isinstance(want, str) else tuple(want)
        if not wanted or not all(isinstance(w, str) for w in wanted):
            raise ValueError(f"when.{kw} must be a string or a list of strings")
        when.append((tag, wanted))
    label = str(it.get("name", f"item {index + 1}"))
    return Item(index, label, tuple(targets), action, value, tuple(when), line)


def _keyword_tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        tag = _TABLE_KEYWORDS.get(keyword)
    if tag is None:
        raise ValueError(f"unknown keyword {keyword!r}")
    return int(tag)


def parse_tag_target(spec: Any) -> Target:
    """``(0010,0010)``, ``00100010``, a keyword, or a mask such as ``(60xx,4000)``."""
    if not isinstance(spec, str):
        raise ValueError(f"tag {spec!r} must be a string")
    s = spec.strip()
    m = _TAG_TEXT.match(s)
    if m is None and re.fullmatch(r"[0-9A-Fa-fXx]{8}", s):
        m = _TAG_TEXT.match(f"{s[:4]},{s[4:]}")
    if m is None:
        return Target(mask=0xFFFFFFFF, value=_keyword_tag(s))
    digits = m.group(1) + m.group(2)
    mask = value = 0
    for ch in digits:
        mask <<= 4
        value <<= 4
        if ch not in "xX":
            mask |= 0xF
            value |= int(ch, 16)
    return Target(mask=mask, value=value)


def _parse_private(spec: Any) -> Target:
    if not isinstance(spec, dict):
        raise ValueError("private must be a table {creator, group, element}")
    for k in spec:
        if k not in {"creator", "group", "element"}:
            raise ValueError(f"unknown key private.{k}")
    creator = spec.get("creator")
    if not isinstance(creator, str) or not creator.strip():
        raise ValueError("private.creator must be a non-empty string")
    group = element = None
    if "group" in spec:
        group = int(str(spec["group"]), 16)
        if not group & 1:
            raise ValueError("private.group must be odd")
    if "element" in spec:
        element = int(str(spec["element"])[-2:], 16)
    return Target(creator=creator.strip().upper(), group=group, element=element)

"""The tag-level de-identification engine: PS3.15 Annex E applied by profile, in one walk.

For each element at every depth the first rule that claims it decides:

1. forced rules: command (0000), file meta (0002) and directory (0004) groups in the data set, group
   lengths, Icon Image Sequence, digital signatures and trailing padding are removed;
2. the profile's items, in order (conditions evaluated once per instance against the top level);
3. Table E.1-1 with the profile's options (an option cell overrides the basic action; K over C when
   two options disagree), compound codes resolved by :mod:`gateway.deid.choices`; Patient ID and
   Patient's Name get keyed pseudonyms; private elements by the pattern row and the safe private
   list;
4. the sweep by VR for elements the table does not list: PN replaced, DA/DT/TM removed (or kept /
   shifted per the longitudinal options), free text (LO, SH, ST, LT, UT, UC), AE and UN removed (or
   cleaned with Clean Descriptors), UI values replaced unless they are well-known DICOM UIDs.

The output is built beside the input (the input is never modified; unchanged elements are shared,
raw). File meta is rebuilt. Any error raises :class:`~gateway.errors.DeidError` naming the tag path
and the exception type, never a value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from gateway.deid import choices, values
from gateway.deid.keys import ProjectKey
from gateway.deid.leak import scrub_words
from gateway.deid.profiles import Item, Profile, Target
from gateway.deid.table import EDITION, METHOD_CODES, SAFE_PRIVATE, Row, row_for
from gateway.errors import DeidError

IMPLEMENTATION_CLASS_UID = "2.25.160433625094383398532409316400779421593"
IMPLEMENTATION_VERSION_NAME = "DCMGW_DEID_1"

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
ICON_IMAGE_SEQUENCE = 0x00880200
_FORCED_REMOVE = {
    ICON_IMAGE_SEQUENCE: "Icon Image Sequence",
    0xFFFAFFFA: "digital signatures",
    0xFFFCFFFC: "trailing padding",
}
_MARKER_TAGS = (0x00120062, 0x00120063, 0x00120064, 0x00280303)
_DATE_VRS = frozenset({"DA", "DT"})
_SWEEP_TEXT = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "AE"})
_WELL_KNOWN_UIDS = frozenset(UID_dictionary)
_VALUE_UNREAD = frozenset({"Z", "D", "PNAME", "REPLACE"})  # actions that never read the value


@dataclass(frozen=True)
class Decision:
    """What happens to one element: an action code, the rule that chose it, and its option."""

    code: str  # X Z D K C U U* KEEP REPLACE PID PNAME UW CREATOR
    rule: str
    value: str | None = None
    option: str | None = None
    sweep_text: bool = False  # swept free text: cleaned instead of removed in a cleaning context


@dataclass
class Report:
    """What the engine did to one instance; tag paths and rule names only, never values."""

    profile: str
    profile_sha256: str
    edition: str
    key_id: str
    actions: list[tuple[str, str, str]] = field(default_factory=list)  # (path, rule, code)
    options_acted: set[str] = field(default_factory=set)
    method_codes: list[str] = field(default_factory=list)
    longitudinal_temporal_information: str = "REMOVED"
    pixels: dict[str, Any] | None = None  # Clean Pixel Data, when the profile has it
    transfer_syntax_uid: str = ""  # of the encoded output (deidentify_bytes sets it)

    def to_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {} if self.pixels is None else {"pixels": self.pixels}
        if self.transfer_syntax_uid:
            extra["transfer_syntax_uid"] = self.transfer_syntax_uid
        return {
            **extra,
            "profile": self.profile,
            "profile_sha256": self.profile_sha256,
            "edition": self.edition,
            "key_id": self.key_id,
            "options_acted": sorted(self.options_acted),
            "method_codes": self.method_codes,
            "longitudinal_temporal_information_modified": self.longitudinal_temporal_information,
            "actions": [{"path": p, "rule": r, "action": c} for p, r, c in self.actions],
        }


class _Instance:
    """Per-instance state of one walk."""

    __slots__ = (
        "cache",
        "date_shift",
        "dates_shifted",
        "identifying",
        "patient_key",
        "report",
        "root",
    )

    def __init__(
        self, root: Dataset, report: Report, cache: dict[Any, Decision], patient_key: str
    ) -> None:
        self.root = root
        self.report = report
        self.cache = cache
        self.patient_key = patient_key
        self.date_shift: int | None = None
        self.dates_shifted = False
        self.identifying: frozenset[str] | None = None


def _effective_vr(tag: int, vr: str | None) -> str:
    if vr is not None and vr != "UN":
        return vr
    if tag >> 16 & 1:
        return vr or "UN"
    try:
        dvr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return dvr if len(dvr) == 2 else "OB" if dvr.startswith("OB") else "US"


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class Engine:
    """A profile compiled with a project key. Thread-safe after construction only per instance
    call (each call keeps its own state; the decision caches are filled idempotently)."""

    def __init__(self, profile: Profile, key: ProjectKey) -> None:
        self.profile = profile
        self.key = key
        opts = profile.options
        self._options_k_first = sorted(opts, key=lambda o: (0 if o.startswith("retain") else 1, o))
        self._full_dates = "retain_longitudinal_full_dates" in opts
        self._modified_dates = "retain_longitudinal_modified_dates" in opts
        self._clean_descriptors = "clean_descriptors" in opts
        self._safe_private = "retain_safe_private" in opts
        self._retain_uids = "retain_uids" in opts
        self._exact: dict[int, list[Item]] = {}
        self._other: list[Item] = []
        self._conditional = tuple(i for i in profile.items if i.when)
        self._caches: dict[tuple[bool, ...], dict[Any, Decision]] = {}

    # -- resolution ---------------------------------------------------------------------------

    def _item_matches(self, target: Target, tag: int, vr: str, creator: str | None) -> bool:
        if target.vr is not None:
            return target.vr == vr
        if target.creator is not None:
            if creator is None or creator != target.creator:
                return False
            if target.group is not None and target.group != tag >> 16:
                return False
            return target.element is None or target.element == tag & 0xFF
        return (tag & target.mask) == target.value

    def _resolve(
        self, tag: int, vr: str, creator: str | None, active: tuple[bool, ...]
    ) -> Decision:
        group, elem = tag >> 16, tag & 0xFFFF
        if group in (0x0000, 0x0002, 0x0004) or elem == 0x0000:
            return Decision("X", "forced:group")
        if tag in _FORCED_REMOVE:
            return Decision("X", "forced:" + _FORCED_REMOVE[tag].replace(" ", "-").lower())
        private = bool(group & 1)
        if private and elem < 0x0010:
            return Decision("X", "forced:private-reserved")
        conditional = {id(i): a for i, a in zip(self._conditional, active, strict=True)}
        for item in self.profile.items:
            if item.when and not conditional[id(item)]:
                continue
            if any(self._item_matches(t, tag, vr, creator) for t in item.targets):
                return self._item_decision(item, tag, vr)
        if private:
            if elem <= 0x00FF:
                return Decision("CREATOR", "private-creator")
            if creator is None:
                return Decision("X", "table:private(no creator)")
            if self._safe_private and (group, creator, elem & 0xFF) in SAFE_PRIVATE:
                return Decision("K", "option:retain_safe_private", option="retain_safe_private")
            return Decision("X", "table:private")
        row = row_for(tag)
        if row is not None:
            return self._table_decision(row, tag, vr)
        return self._sweep(vr)

    def _item_decision(self, item: Item, tag: int, vr: str) -> Decision:
        rule = f"item:{item.label}"
        if item.action == "keep":
            return Decision("KEEP", rule)
        if item.action == "replace":
            return Decision("REPLACE", rule, value=item.value)
        row = row_for(tag)
        return Decision(choices.resolve(item.action, row.keyword if row else ""), rule)

    def _table_decision(self, row: Row, tag: int, vr: str) -> Decision:
        code, option = row.basic, None
        for o in self._options_k_first:
            if o in row.options:
                code, option = row.options[o], o
                break
        code = choices.resolve(code, row.keyword)
        rule = "table:" + (option or "basic")
        if option is None and self.profile.pseudonymize:
            if tag == PATIENT_ID:
                return Decision("PID", "table:basic+pseudonym")
            if tag == PATIENT_NAME:
                return Decision("PNAME", "table:basic+pseudonym")
        if code in ("C", "K") and row.tag in ("60xx3000", "50xxxxxx"):
            # overlay bit planes and curve data cannot be cleaned at tag level: removed
            return Decision("X", rule + "(binary)")
        return Decision(code, rule, option=option)

    def _sweep(self, vr: str) -> Decision:
        if vr == "PN":
            return Decision("D", "sweep:PN")
        if vr in _DATE_VRS or vr == "TM":
            if self._full_dates:
                return Decision("K", f"sweep:{vr}", option="retain_longitudinal_full_dates")
            if self._modified_dates:
                code = "K" if vr == "TM" else "C"
                return Decision(code, f"sweep:{vr}", option="retain_longitudinal_modified_dates")
            return Decision("X", f"sweep:{vr}")
        if vr in _SWEEP_TEXT or vr == "UN":
            if self._clean_descriptors:
                return Decision("C", f"sweep:{vr}", option="clean_descriptors", sweep_text=True)
            return Decision("X", f"sweep:{vr}", sweep_text=True)
        if vr == "UI":
            if self._retain_uids:
                return Decision("K", "sweep:UI", option="retain_uids")
            return Decision("UW", "sweep:UI")
        return Decision("K", "sweep:keep")

    # -- the walk -----------------------------------------------------------------------------

    def deidentify(self, ds: Dataset) -> tuple[Dataset, Report]:
        report = Report(self.profile.name, self.profile.sha256, EDITION, self.key.key_id)
        path = ""
        try:
            active = tuple(self._condition(i, ds) for i in self._conditional)
            cache = self._caches.setdefault(active, {})
            patient_key = str(ds.get("PatientID", "") or "") or str(
                ds.get("StudyInstanceUID", "") or ""
            )
            st = _Instance(ds, report, cache, patient_key)
            out = self._walk(ds, st, "", None, active)
            path = "<file meta>"
            self._markers(out, st)
            out.file_meta = self._file_meta(ds, out)
            out.preamble = b"\x00" * 128
        except DeidError:
            raise
        except Exception as exc:  # noqa: BLE001 - fail closed: any error quarantines
            where = getattr(exc, "_deid_path", path) or "<dataset>"
            raise DeidError(
                f"profile {self.profile.name!r} failed at {where}: {type(exc).__name__}"
            ) from None
        return out, report

    def _condition(self, item: Item, ds: Dataset) -> bool:
        for tag, wanted in item.when:
            elem = ds.get(BaseTag(tag))
            if elem is None:
                return False
            v = elem.value
            vals = (
                [str(x).strip() for x in v]
                if isinstance(v, MultiValue | list)
                else [str(v).strip()]
            )
            if not any(x in wanted for x in vals):
                return False
        return True

    def _walk(
        self,
        ds: Dataset,
        st: _Instance,
        prefix: str,
        clean_ctx: str | None,
        active: tuple[bool, ...],
    ) -> Dataset:
        out = Dataset()
        enc = ds.original_encoding
        if enc[0] is not None:
            out.set_original_encoding(enc[0], enc[1], ds.original_character_set)
        creators: list[int] = []
        kept_blocks: set[tuple[int, int]] = set()
        cache = st.cache
        for btag in list(ds.keys()):
            tag = int(btag)
            try:
                raw = ds.get_item(btag)
                if raw is None:
                    continue
                vr = _effective_vr(tag, raw.VR)
                creator: str | None = None
                if tag >> 16 & 1 and tag & 0xFFFF > 0x00FF:
                    creator = _creator(ds, tag)
                    key: Any = (tag & 0xFFFF00FF, creator, vr)
                else:
                    key = (tag, vr)
                d = cache.get(key)
                if d is None:
                    d = self._resolve(tag, vr, creator, active)
                    cache[key] = d
                if d.code == "CREATOR":
                    creators.append(tag)
                    continue
                code = d.code
                if d.sweep_text and clean_ctx is not None and code == "X":
                    code = "C"
                    st.report.options_acted.add(clean_ctx)
                if code == "X":
                    st.report.actions.append((prefix + _tag_text(tag), d.rule, "X"))
                elif code in ("K", "KEEP") and vr != "SQ":
                    # raw elements pass through as read; implicit ones are decoded so the writer
                    # knows their VR
                    _store(out, btag, raw if raw.VR is not None else ds[btag])
                    if code == "KEEP":
                        st.report.actions.append((prefix + _tag_text(tag), d.rule, "keep"))
                else:
                    new = self._apply(ds, btag, vr, d, code, st, prefix, clean_ctx, active)
                    if new is not None:
                        _store(out, btag, new)
                if d.option is not None:
                    st.report.options_acted.add(d.option)
                if tag >> 16 & 1 and btag in out:
                    kept_blocks.add((tag >> 16, (tag >> 8) & 0xFF))
            except DeidError:
                raise
            except Exception as exc:
                if not hasattr(exc, "_deid_path"):
                    exc._deid_path = prefix + _tag_text(tag)  # type: ignore[attr-defined]
                raise
        for ctag in creators:
            if (ctag >> 16, ctag & 0xFF) in kept_blocks:
                creator_elem = ds.get_item(BaseTag(ctag))
                if creator_elem is not None:
                    out[BaseTag(ctag)] = creator_elem
            else:
                st.report.actions.append((prefix + _tag_text(ctag), "private-creator", "X"))
        return out

    def _apply(
        self,
        ds: Dataset,
        btag: BaseTag,
        vr: str,
        d: Decision,
        code: str,
        st: _Instance,
        prefix: str,
        clean_ctx: str | None,
        active: tuple[bool, ...],
    ) -> DataElement | None:
        path = prefix + _tag_text(int(btag))
        st.report.actions.append((path, d.rule, code if code != "UW" else "U"))
        if vr == "SQ":
            if code == "Z":
                return DataElement(btag, "SQ", Sequence([]))
            if code == "REPLACE":
                raise DeidError(f"{path}: 'replace' cannot target a sequence")
            ctx = clean_ctx
            if code == "C":
                ctx = d.option or clean_ctx or "clean_descriptors"
            elem = ds[btag]
            items = [
                self._walk(item, st, f"{path}[{i}]/", ctx, active)
                for i, item in enumerate(elem.value or [])
            ]
            return DataElement(btag, "SQ", Sequence(items))
        raw = ds.get_item(btag)
        if (
            code in _VALUE_UNREAD
            and isinstance(raw, RawDataElement)
            and raw.VR is not None
            and raw.VR not in ("UN", "SQ")
            and len(raw.VR) == 2
            and not (code == "D" and raw.VR == "UI")
        ):
            # the action writes a value of the element's VR without reading the old one: the
            # VR read in explicit VR is the VR pydicom's conversion would give, so the value
            # is never converted
            return self._unread(btag, raw.VR, d, code, st)
        elem = ds[btag]
        vr = elem.VR if elem.VR != "UN" or vr == "UN" else vr
        if code == "Z":
            return DataElement(btag, vr, values.empty_value(vr))
        if code == "D":
            if vr == "UI":
                return DataElement(btag, vr, self._map_uids(elem.value, skip_well_known=True))
            if vr == "UN":
                return DataElement(btag, vr, b"")  # VR unknown: an empty value is valid for any
            return DataElement(btag, vr, values.DUMMY[vr])
        if code in ("U", "UW", "U*"):
            if vr != "UI":
                raise DeidError(f"{path}: U on a {vr} element")
            return DataElement(btag, vr, self._map_uids(elem.value, skip_well_known=True))
        if code == "K" or code == "KEEP":
            return elem
        if code == "PID":
            v = "" if elem.value is None else str(elem.value)
            fmt = self.profile.patient_id_format
            return DataElement(btag, vr, self.key.pseudonym("patient-id", v, fmt))
        if code == "PNAME":
            fmt = self.profile.patient_name_format
            return DataElement(btag, vr, self.key.pseudonym("patient-name", st.patient_key, fmt))
        if code == "REPLACE":
            return DataElement(btag, vr, _typed(vr, d.value or ""))
        if code == "C":
            return self._clean(elem, vr, st, ds)
        raise DeidError(f"{path}: unknown action {code}")

    def _unread(self, btag: BaseTag, vr: str, d: Decision, code: str, st: _Instance) -> DataElement:
        if code == "Z":
            return DataElement(btag, vr, values.empty_value(vr))
        if code == "D":
            return DataElement(btag, vr, values.DUMMY[vr])
        if code == "PNAME":
            fmt = self.profile.patient_name_format
            return DataElement(btag, vr, self.key.pseudonym("patient-name", st.patient_key, fmt))
        return DataElement(btag, vr, _typed(vr, d.value or ""))  # REPLACE

    def _clean(self, elem: DataElement, vr: str, st: _Instance, ds: Dataset) -> DataElement | None:
        v = elem.value
        if vr in _DATE_VRS:
            days = self._shift(st)
            f = values.shift_date if vr == "DA" else values.shift_datetime
            st.dates_shifted = True
            return DataElement(elem.tag, vr, _map_values(v, lambda s: f(s, days)))
        if vr == "TM":
            return elem
        if vr == "PN":
            return DataElement(elem.tag, vr, values.DUMMY["PN"])
        if vr == "UI":
            return DataElement(elem.tag, vr, self._map_uids(v, skip_well_known=True))
        if vr == "AE":
            return DataElement(
                elem.tag, vr, _map_values(v, lambda s: self.key.pseudonym("ae", s, "AE{digest:14}"))
            )
        ident = self._identifying(st)
        if vr in values.TEXT_VRS:
            return DataElement(elem.tag, vr, _map_values(v, lambda s: values.clean_text(s, ident)))
        if vr == "UN" or vr in values.BINARY_VRS:
            raw = bytes(v or b"")
            if vr == "UN" and raw and all(32 <= b < 127 or b in (0, 9, 10, 13) for b in raw):
                text = values.clean_text(raw.decode("ascii"), ident)
                data = text.encode("ascii")
                return DataElement(elem.tag, vr, data + b" " * (len(data) & 1))
            return None  # opaque bytes cannot be cleaned: removed
        return elem  # CS, numbers: nothing free-form to clean

    def _identifying(self, st: _Instance) -> frozenset[str]:
        if st.identifying is None:
            st.identifying = scrub_words(st.root)
        return st.identifying

    def _shift(self, st: _Instance) -> int:
        if st.date_shift is None:
            low, high = self.profile.date_shift_days
            st.date_shift = self.key.date_shift_days(st.patient_key, low, high)
        return st.date_shift

    def _map_uids(self, v: Any, *, skip_well_known: bool) -> Any:
        def one(u: str) -> str:
            u = u.strip("\x00 ")
            if not u or (skip_well_known and u in _WELL_KNOWN_UIDS):
                return u
            return self.key.uid(u)

        return _map_values(v, one)

    # -- markers and file meta ----------------------------------------------------------------

    def _markers(self, out: Dataset, st: _Instance) -> None:
        rep = st.report
        acted = [o for o in rep.options_acted if o in METHOD_CODES]
        codes = [METHOD_CODES["basic"], *(METHOD_CODES[o] for o in sorted(acted))]
        rep.method_codes = [c.code_value for c in codes]
        if st.dates_shifted:
            rep.longitudinal_temporal_information = "MODIFIED"
        elif "retain_longitudinal_full_dates" in rep.options_acted:
            rep.longitudinal_temporal_information = "UNMODIFIED"
        _put(out, 0x00120062, "CS", "YES")  # Patient Identity Removed
        method = [
            f"dicom-gateway profile {self.profile.name}"[:64],
            f"PS3.15 {EDITION} Table E.1-1",
            f"key {self.key.key_id}",
        ]
        _put(out, 0x00120063, "LO", method)  # De-identification Method
        seq = []
        for c in codes:
            item = Dataset()
            _put(item, 0x00080100, "SH", c.code_value)
            _put(item, 0x00080102, "SH", c.coding_scheme_designator)
            _put(item, 0x00080104, "LO", c.code_meaning)
            seq.append(item)
        out.DeidentificationMethodCodeSequence = Sequence(seq)
        _put(out, 0x00280303, "CS", rep.longitudinal_temporal_information)

    def _file_meta(self, ds: Dataset, out: Dataset) -> FileMetaDataset:
        sop_class = out.get("SOPClassUID")
        sop_instance = out.get("SOPInstanceUID")
        if not sop_class or not sop_instance:
            raise DeidError("not a composite instance: no SOP Class UID or SOP Instance UID")
        old = getattr(ds, "file_meta", None)
        ts: str | None = str(old.get("TransferSyntaxUID") or "") if old is not None else None
        if not ts:
            implicit, little = ds.original_encoding
            if implicit:
                ts = str(ImplicitVRLittleEndian)
            else:
                ts = str(ExplicitVRLittleEndian if little in (True, None) else ExplicitVRBigEndian)
        meta = FileMetaDataset()
        _put(meta, 0x00020001, "OB", b"\x00\x01")  # File Meta Information Version
        _put(meta, 0x00020002, "UI", sop_class)  # Media Storage SOP Class UID
        _put(meta, 0x00020003, "UI", sop_instance)  # Media Storage SOP Instance UID
        _put(meta, 0x00020010, "UI", UID(str(ts)))  # Transfer Syntax UID
        _put(meta, 0x00020012, "UI", UID(IMPLEMENTATION_CLASS_UID))
        _put(meta, 0x00020013, "SH", IMPLEMENTATION_VERSION_NAME)
        return meta


def _put(ds: Dataset, tag: int, vr: str, value: Any) -> None:
    """``ds.Keyword = value`` for a public, non-sequence, non-pixel element of the dictionary's
    VR, without the keyword lookup: all Dataset.__setitem__ does for such an element is store
    it (FileMetaDataset's only checks that the tag is in group 0002)."""
    ds._dict[BaseTag(tag)] = DataElement(tag, vr, value)


def _store(out: Dataset, btag: BaseTag, elem: DataElement | RawDataElement) -> None:
    """``out[btag] = elem``. For a public element other than a sequence all
    ``Dataset.__setitem__`` does is check the tag and store it, so it is stored directly (as
    :func:`_put` does); private elements (their creator is looked up) and sequences (their
    items learn their parent) go through ``__setitem__``."""
    if btag >> 16 & 1 or elem.VR == "SQ":
        out[btag] = elem
    else:
        out._dict[btag] = elem


def _creator(ds: Dataset, tag: int) -> str | None:
    ctag = BaseTag((tag & 0xFFFF0000) | ((tag >> 8) & 0xFF))
    elem = ds.get(ctag)
    if elem is None or not elem.value:
        return None
    v = elem.value
    if isinstance(v, bytes):
        v = v.decode("latin-1")
    return str(v).strip().upper()


def _map_values(v: Any, f: Callable[[str], str]) -> Any:
    if v is None:
        return v
    if isinstance(v, MultiValue | list | tuple):
        return [f(str(x)) for x in v]
    return f(str(v))


def _typed(vr: str, text: str) -> Any:
    if vr in ("US", "SS", "UL", "SL", "UV", "SV"):
        return int(text)
    if vr in ("FL", "FD"):
        return float(text)
    if vr in values.BINARY_VRS:
        data = text.encode("ascii")
        return data + b"\x00" * (len(data) & 1)
    return text


@lru_cache(maxsize=16)
def engine_for(profile: Profile, key: ProjectKey) -> Engine:
    return Engine(profile, key)


def deidentify(ds: Dataset, profile: Profile, keys: ProjectKey) -> tuple[Dataset, Report]:
    """De-identify ``ds`` (left unchanged) by ``profile`` with the project key ``keys``.

    Returns the new data set (file meta rebuilt, ready to write) and the :class:`Report`.
    Raises :class:`~gateway.errors.DeidError` on any failure, with a reason free of patient data.
    """
    return engine_for(profile, keys).deidentify(ds)

"""``dicom-gateway pixels``: author and check burned-in text rules.

* ``pixels suggest INPUT...`` OCRs the first frame of sample images of one device and prints a
  draft rule (signature from their headers, regions covering the text found) for review;
* ``pixels preview --profile NAME INPUT --out PNG`` renders the cleaned first frame with the
  matching rule's regions outlined (red; ultrasound regions kept: green).

These are admin tools run on sample images: the draft quotes no text, only boxes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gateway.errors import DeidError, ProfileError

_SIGNATURE_KEYS = ("Manufacturer", "ManufacturerModelName", "Modality", "Rows", "Columns")


def add_parsers(sub: Any) -> None:
    """Add ``pixels suggest`` and ``pixels preview`` to the main parser's subparsers."""
    px = sub.add_parser("pixels", help="burned-in text rules: suggest a draft, preview a rule")
    psub = px.add_subparsers(dest="action", required=True)
    su = psub.add_parser("suggest", help="OCR sample images of a device, print a draft rule")
    su.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM files of one device")
    su.add_argument("--margin", type=int, default=4, help="pixels added around text (4)")
    su.add_argument("--scale", type=int, default=2, help="OCR upscaling (2)")
    pv = psub.add_parser("preview", help="render the cleaned first frame with regions outlined")
    pv.add_argument("--profile", required=True, help="a profile name or path with [pixels]")
    pv.add_argument("--out", required=True, metavar="PNG", help="the PNG to write")
    pv.add_argument("input", metavar="INPUT", help="a DICOM file")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "suggest":
            print(suggest([Path(p) for p in args.inputs], margin=args.margin, scale=args.scale))
            return 0
        return preview(args.profile, Path(args.input), Path(args.out))
    except (DeidError, ProfileError, OSError) as exc:
        print(f"dicom-gateway: {exc}", file=sys.stderr)
        return 1


def _read(path: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, ValueError, EOFError) as exc:
        raise DeidError(f"{path}: not DICOM ({type(exc).__name__})") from None


def _first_frame(ds: Any) -> tuple[NDArray[Any], str, Any]:
    from gateway.deid import pixels

    g = pixels.check_geometry(ds, max_pixel_bytes=1 << 31)
    arr, photometric = pixels.decode(ds, g)
    return arr, photometric, g


def suggest(inputs: list[Path], *, margin: int, scale: int) -> str:
    """A draft rule TOML for the device of ``inputs`` (their first frames OCR'd)."""
    from gateway.deid import ocr

    engine = ocr.OcrEngine()
    signatures: dict[str, set[str]] = {k: set() for k in _SIGNATURE_KEYS}
    boxes: list[tuple[int, int, int, int]] = []
    rows = columns = 0
    for path in inputs:
        ds = _read(path)
        for k in _SIGNATURE_KEYS:
            signatures[k].add(str(ds.get(k, "") or "").strip())
        arr, photometric, g = _first_frame(ds)
        rows, columns = max(rows, g.rows), max(columns, g.columns)
        palette = ds if photometric == "PALETTE COLOR" else None
        for w in ocr.find_text(
            engine, arr[0], photometric, scale=scale, min_confidence=50, palette=palette
        ):
            boxes.append((w.x, w.y, w.x + w.width, w.y + w.height))
    lines = [
        "# Draft burned-in text rule from `dicom-gateway pixels suggest`: review it, and check",
        f"# it with `pixels preview`. {len(inputs)} sample(s), {len(boxes)} text box(es) found.",
        "[[rule]]",
        f'name = "{_slug(signatures)}"',
        f'device = "{_device(signatures)}"',
        "match = { all = [",
    ]
    for k in _SIGNATURE_KEYS:
        vals = sorted(v for v in signatures[k] if v)
        if not vals:
            continue
        if k in ("Rows", "Columns"):
            lines.append(f'    {{ attribute = "{k}", one_of = [{", ".join(vals)}] }},')
        elif len(vals) == 1:
            lines.append(f'    {{ attribute = "{k}", equals = "{_esc(vals[0])}" }},')
        else:
            quoted = ", ".join(f'"{_esc(v)}"' for v in vals)
            lines.append(f'    {{ attribute = "{k}", one_of = [{quoted}] }},')
    lines.append("] }")
    regions = _regions(boxes, rows, columns, margin)
    if not regions:
        lines.append("# no text found: add regions by hand")
        regions = ["{ top = 1 }"]
    lines.append("regions = [")
    lines.extend(f"    {r}," for r in regions)
    lines.append("]")
    return "\n".join(lines)


def _regions(
    boxes: list[tuple[int, int, int, int]], rows: int, columns: int, margin: int
) -> list[str]:
    """A top and a bottom band for text near those edges, rectangles for the rest."""
    top = [b for b in boxes if b[3] <= rows * 0.2]
    bottom = [b for b in boxes if b[1] >= rows * 0.85]
    rest = [b for b in boxes if b not in top and b not in bottom]
    out = []
    if top:
        out.append(f"{{ top = {min(rows, max(b[3] for b in top) + margin)} }}")
    if bottom:
        out.append(f"{{ bottom = {min(rows, rows - min(b[1] for b in bottom) + margin)} }}")
    for x0, y0, x1, y1 in _merge(rest, max(12, 3 * margin)):
        x0, y0 = max(0, x0 - margin), max(0, y0 - margin)
        x1, y1 = min(columns, x1 + margin), min(rows, y1 + margin)
        out.append(f"{{ x = {x0}, y = {y0}, width = {x1 - x0}, height = {y1 - y0} }}")
    return out


def _merge(boxes: list[tuple[int, int, int, int]], gap: int) -> list[tuple[int, int, int, int]]:
    """Merge boxes that touch (within ``gap``), so a text block is one rectangle."""
    merged = [list(b) for b in sorted(boxes)]
    changed = True
    while changed:
        changed = False
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                a, b = merged[i], merged[j]
                if (
                    a[0] - gap <= b[2]
                    and b[0] - gap <= a[2]
                    and a[1] - gap <= b[3]
                    and b[1] - gap <= a[3]
                ):
                    merged[i] = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
                    del merged[j]
                    changed = True
                    break
            if changed:
                break
    return [(a, b, c, d) for a, b, c, d in merged]


def _esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _device(sig: dict[str, set[str]]) -> str:
    parts = [
        ", ".join(sorted(v for v in sig[k] if v)) for k in ("Manufacturer", "ManufacturerModelName")
    ]
    size = "/".join(
        f"{c}x{r}" for c, r in zip(sorted(sig["Columns"]), sorted(sig["Rows"]), strict=False)
    )
    return _esc(" ".join(p for p in parts if p) + (f", {size}" if size else ""))


def _slug(sig: dict[str, set[str]]) -> str:
    import re

    words = [sorted(sig[k])[0] if sig[k] else "" for k in ("Manufacturer", "ManufacturerModelName")]
    slug = re.sub(r"[^a-z0-9]+", "-", " ".join(words).lower()).strip("-")[:40]
    return slug or "draft"


def preview(profile_name: str, path: Path, out: Path) -> int:
    """Write the cleaned first frame of ``path`` with the regions outlined to ``out``."""
    from PIL import Image, ImageDraw

    from gateway.deid import load_profile, pixels
    from gateway.deid.pixel_rules import signature

    profile = load_profile(profile_name)
    if profile.pixels is None:
        raise DeidError(f"profile {profile.name!r} has no [pixels] table")
    ds = _read(path)
    rule = profile.pixels.rules.first_match(ds)
    if rule is None:
        print(f"dicom-gateway: no pixel rule matches: {signature(ds)}", file=sys.stderr)
        return 1
    arr, photometric, g = _first_frame(ds)
    first = np.array(arr[:1])
    boxes, mask = pixels.rule_regions(rule, ds, g.rows, g.columns)
    pixels.blank(first, boxes, mask, pixels.fill_value(ds, photometric, g))
    img = Image.fromarray(_display(first[0], photometric, ds)).convert("RGB")
    draw = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in boxes:
        if x1 > x0 and y1 > y0:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 0, 0), width=2)
    if rule.keep_ultrasound_regions:
        for item in ds.get("SequenceOfUltrasoundRegions", None) or []:
            draw.rectangle(
                (
                    int(item.RegionLocationMinX0),
                    int(item.RegionLocationMinY0),
                    int(item.RegionLocationMaxX1),
                    int(item.RegionLocationMaxY1),
                ),
                outline=(0, 255, 0),
                width=2,
            )
    img.save(out, format="PNG")
    print(f"{out}: rule {rule.name} ({rule.source}), {len(boxes)} region(s)")
    return 0


def _display(frame: NDArray[Any], photometric: str, ds: Any) -> NDArray[np.uint8]:
    from pydicom.pixels.processing import apply_color_lut, convert_color_space

    a = frame
    if photometric == "PALETTE COLOR":
        a = apply_color_lut(a, ds)
    elif photometric.startswith("YBR"):
        a = convert_color_space(a, "YBR_FULL", "RGB")
    f = a.astype(np.float64)
    lo, hi = float(f.min()), float(f.max())
    if a.dtype != np.uint8:
        f = (f - lo) * (255.0 / max(hi - lo, 1.0))
    if photometric == "MONOCHROME1":
        f = 255.0 - f
    return f.clip(0, 255).astype(np.uint8)

"""The OCR check of cleaned pixels: Debian's tesseract in process (tesserocr), one reused engine.

:class:`OcrEngine` owns one ``PyTessBaseAPI`` and serialises calls on a lock, so the delivery
workers share a single tesseract (it is neither cheap to start nor thread-safe). :func:`find_text`
turns a frame (any photometric, any depth) into 8-bit grey, dark text on light, upscaled, and
returns the words tesseract is confident about with their boxes in frame pixels.

:func:`identifying` decides which of those words look identifying: a value of the original
header (names, IDs, dates, institutions: the leak gate's needles), anything shaped like a date,
a number of 6+ digits, an ID-like token (letters and 5+ digits), a name written ``LAST^FIRST`` or
``LAST, FIRST`` in capitals, or a field label such as ``DOB`` or ``Name:``. Words matching one of
the profile's ``allow`` patterns in full are never flagged. Messages name frames and boxes, never
the text read.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from gateway.errors import DeidError


@dataclass(frozen=True)
class Word:
    text: str
    confidence: float
    x: int
    y: int
    width: int
    height: int

    def box(self) -> str:
        return f"x={self.x} y={self.y} w={self.width} h={self.height}"


class OcrEngine:
    """One tesseract engine, created on first use and reused; thread-safe by a lock."""

    def __init__(self, *, lang: str = "eng", tessdata: str | None = None) -> None:
        self._lang = lang
        self._tessdata = tessdata
        self._api: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        if self._api is None:
            try:
                import tesserocr
            except ImportError:
                raise DeidError("OCR check required but tesserocr is not installed") from None
            kwargs: dict[str, Any] = {"lang": self._lang, "psm": tesserocr.PSM.SPARSE_TEXT}
            if self._tessdata:
                kwargs["path"] = self._tessdata
            try:
                self._api = tesserocr.PyTessBaseAPI(**kwargs)
            except RuntimeError as exc:
                raise DeidError(f"OCR engine cannot start: {exc}") from None
        return self._api

    def words(self, gray: NDArray[np.uint8]) -> list[Word]:
        """Words tesseract finds in an 8-bit grey image, with confidence and box."""
        import tesserocr

        h, w = gray.shape
        data = np.ascontiguousarray(gray).tobytes()
        out: list[Word] = []
        with self._lock:
            api = self._get()
            api.SetImageBytes(data, w, h, 1, w)
            api.Recognize()
            it = api.GetIterator()
            level = tesserocr.RIL.WORD
            for r in tesserocr.iterate_level(it, level):
                try:
                    text = r.GetUTF8Text(level)
                except RuntimeError:  # tesserocr's "No text returned" for an empty word
                    continue
                if not text or not text.strip():
                    continue
                box = r.BoundingBox(level)
                if box is None:
                    continue
                x0, y0, x1, y1 = box
                out.append(Word(text.strip(), float(r.Confidence(level)), x0, y0, x1 - x0, y1 - y0))
            api.Clear()
        return out


_DEFAULT: OcrEngine | None = None
_DEFAULT_LOCK = threading.Lock()


def default_engine() -> OcrEngine:
    """The process's shared engine (one tesseract for all workers)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = OcrEngine()
        return _DEFAULT


def to_gray(
    frame: NDArray[Any], photometric: str, *, palette: Dataset | None = None
) -> NDArray[np.uint8]:
    """8-bit grey of one frame for OCR: dark text on white, whatever the input's polarity."""
    a = frame
    if photometric == "PALETTE COLOR" and palette is not None:
        from pydicom.pixels.processing import apply_color_lut

        a = apply_color_lut(a, palette)
        photometric = "RGB"
    if a.ndim == 3:
        if photometric.startswith("YBR"):
            y = a[..., 0].astype(np.float32)
        else:
            f = a.astype(np.float32)
            # max channel: coloured annotation (yellow, green) reads as bright as white text
            y = f.max(axis=-1)
    else:
        y = a.astype(np.float32)
    if a.dtype == np.uint8:
        g = y  # 8-bit: brightness is absolute (a dim speckle field is no text)
    else:
        lo, hi = float(y.min()), float(y.max())
        if hi <= lo:
            return np.full(y.shape, 255, dtype=np.uint8)
        g = (y - lo) * (255.0 / (hi - lo))
    if photometric == "MONOCHROME1":
        g = 255.0 - g
    if float(np.median(g)) < 128:
        # a dark screen with light annotation (ultrasound, consoles, dose screens): light text on
        # any background band becomes black on white, which tesseract reads best
        return np.where(g >= 150, 0, 255).astype(np.uint8)
    return g.astype(np.uint8)  # dark text on a light page


def upscale(gray: NDArray[np.uint8], factor: int) -> NDArray[np.uint8]:
    if factor <= 1:
        return gray
    return np.repeat(np.repeat(gray, factor, axis=0), factor, axis=1)


def find_text(
    engine: OcrEngine,
    frame: NDArray[Any],
    photometric: str,
    *,
    scale: int,
    min_confidence: float,
    palette: Dataset | None = None,
) -> list[Word]:
    """Confident words of one frame, boxes in the frame's pixel coordinates."""
    gray = upscale(to_gray(frame, photometric, palette=palette), scale)
    words = []
    for w in engine.words(gray):
        if w.confidence < min_confidence:
            continue
        words.append(
            Word(
                w.text,
                w.confidence,
                w.x // scale,
                w.y // scale,
                -(-w.width // scale),
                -(-w.height // scale),
            )
        )
    return words


def frames_to_check(n: int, *, all_up_to: int, sample: int) -> list[int]:
    """Every frame of short instances; the first, the last and ``sample`` spread between."""
    if n <= all_up_to:
        return list(range(n))
    inner = [round(1 + i * (n - 3) / max(1, sample - 1)) for i in range(sample)] if sample else []
    return sorted({0, n - 1, *(i for i in inner if 0 < i < n - 1)})


# -- what looks identifying ---------------------------------------------------------------------

_DATE = re.compile(
    r"\b(\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|"
    r"\d{1,2}[-/. ]?(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*[-/. ]?\d{2,4})\b",
    re.I,
)
_LONG_NUMBER = re.compile(r"\d{6,}")
_ID_LIKE = re.compile(r"^(?=(?:.*\d){5})(?=.*[A-Za-z])[A-Za-z0-9-]{6,}$")
_NAME_SHAPE = re.compile(r"^[A-Z][A-Za-z'-]+(\^|,)[A-Z]?[A-Za-z'-]*$")
_LABEL = re.compile(
    r"^(name|patient|pat|dob|d\.o\.b|birth|born|mrn|accession|acc|ssn|id|pid|sex|age)[:#.]?$",
    re.I,
)
_CANON = re.compile(r"[^\W_]+")


def _canon(text: str) -> str:
    return "".join(_CANON.findall(text.lower()))


@dataclass(frozen=True)
class Finding:
    frame: int
    word: Word
    why: str  # the kind of match: header-value, date, number, id, name, label

    def describe(self) -> str:
        return f"frame {self.frame} box {self.word.box()} ({self.why})"


def identifying(
    words: list[Word],
    *,
    frame: int,
    needles: Iterable[str],
    allow: Iterable[re.Pattern[str]],
) -> list[Finding]:
    """The words (and runs of 2-4 adjacent words) that look identifying."""
    allow = tuple(allow)
    needle_set = {n for n in needles if len(n) >= 4}
    long_needles = [n for n in needle_set if len(n) >= 8]
    kept = [w for w in words if not any(p.fullmatch(w.text) for p in allow)]
    found: list[Finding] = []
    for i, w in enumerate(kept):
        why = _why(w.text)
        if why is None:
            c = _canon(w.text)
            if c in needle_set or any(n in c for n in long_needles if len(c) >= 8):
                why = "header-value"
        if why is None:
            for k in (2, 3, 4):
                run = kept[i : i + k]
                if len(run) < k or not _same_line(run):
                    break
                joined = _canon("".join(x.text for x in run))
                if joined in needle_set or _DATE.search(" ".join(x.text for x in run)):
                    why = "header-value" if joined in needle_set else "date"
                    break
        if why is not None:
            found.append(Finding(frame, w, why))
    return found


def _why(text: str) -> str | None:
    t = text.strip(" .,;:")
    if _DATE.search(text):
        return "date"
    if _LONG_NUMBER.search(text):
        return "number"
    if _ID_LIKE.match(t):
        return "id"
    if _NAME_SHAPE.match(text) and text.upper() == text and len(t) >= 5:
        return "name"
    if _LABEL.match(text):
        return "label"
    return None


def _same_line(run: list[Word]) -> bool:
    first = run[0]
    for a, b in itertools.pairwise(run):
        if (
            abs(b.y - first.y) > max(4, first.height // 2)
            or b.x < a.x
            or b.x - (a.x + a.width) > 3 * max(a.height, 8)
        ):
            return False
    return True

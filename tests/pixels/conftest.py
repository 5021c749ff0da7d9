"""Shared fixtures of the pixel-cleaning tests: the shipped profile, a key, one OCR engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.deid import ProjectKey, generate_secret_file, load_profile
from gateway.deid.ocr import OcrEngine
from gateway.deid.profiles import Profile, parse_profile_file

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def key(tmp_path_factory: pytest.TempPathFactory) -> ProjectKey:
    path = tmp_path_factory.mktemp("secret") / "project.secret"
    generate_secret_file(path)
    return ProjectKey.from_file(path)


@pytest.fixture(scope="session")
def engine() -> Iterator[OcrEngine]:
    yield OcrEngine()


@pytest.fixture(scope="session")
def profile() -> Profile:
    return load_profile("basic-pixels", REPO / "deid_profiles")


def profile_with(tmp: Path, extra_rules: str = "", **pixels: str) -> Profile:
    """basic-pixels with the shipped rules plus ``extra_rules`` and [pixels] keys replaced."""
    rules = tmp / "rules"
    rules.mkdir(exist_ok=True)
    for f in (REPO / "deid_profiles" / "pixels").glob("*.toml"):
        (rules / f.name).write_text(f.read_text())
    if extra_rules:
        (rules / "zz-test.toml").write_text(extra_rules)
    text = (REPO / "deid_profiles" / "basic-pixels.toml").read_text()
    text = text.replace('rules = "pixels"', f'rules = "{rules}"')
    for k, v in pixels.items():
        lines = [ln for ln in text.splitlines() if not ln.startswith(f"{k} =")]
        at = lines.index("[pixels]") + 1
        lines.insert(at, f"{k} = {v}")
        text = "\n".join(lines) + "\n"
    path = tmp / "test-pixels.toml"
    path.write_text(text)
    return parse_profile_file(path)

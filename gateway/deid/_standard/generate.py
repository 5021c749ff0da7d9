"""Generate the de-identification package data from the standard's tables.

Reads the CSVs parsed from PS3.15 (``../shared/standard/``, see its README) and writes, beside this
module, the JSON files the engine loads at import time:

* ``annex_e_<edition>.json``: Table E.1-1, basic action and every option column per tag or pattern;
* ``safe_private_<edition>.json``: Table E.3.10-1, safe private attributes (group, creator, low
  byte);
* ``cid7050_<edition>.json``: PS3.16 CID 7050, de-identification method codes per option.

Run it when a new edition of the tables lands (never hand-edit the JSON)::

    python -m gateway.deid._standard.generate [STANDARD_DIR] [--edition 2026c]

``build(standard_dir, edition)`` returns the same data in memory, so a test can compare the shipped
files with the CSVs.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

EDITION = "2026c"
OPTION_COLUMNS = (
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_longitudinal_full_dates",
    "retain_longitudinal_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
)
HERE = Path(__file__).resolve().parent


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def build(standard_dir: Path, edition: str = EDITION) -> dict[str, dict[str, Any]]:
    """Return ``{file name: JSON document}`` built from the CSVs in ``standard_dir``."""
    table = []
    for r in _rows(standard_dir / "annex_e_table.csv"):
        table.append(
            {
                "tag": r["tag"]
                if "x" in r["tag"] or r["tag"].startswith("g")
                else r["tag"].upper(),
                "keyword": r["keyword"],
                "name": r["name"],
                "retired": r["retired"] == "Y",
                "in_std_comp_iod": r["in_std_comp_iod"] == "Y",
                "basic": r["basic_action"],
                "options": {c: r[c] for c in OPTION_COLUMNS if r[c]},
            }
        )
    safe = [
        {
            "group": r["group"].upper(),
            "element": r["element"].lower()[-2:].upper(),
            "creator": r["private_creator"],
            "vr": r["vr"],
            "vm": r["vm"],
        }
        for r in _rows(standard_dir / "annex_e_safe_private_attributes.csv")
    ]
    codes = [
        {
            "code_value": r["code_value"],
            "coding_scheme_designator": r["coding_scheme_designator"],
            "code_meaning": r["code_meaning"],
            "section": r["ps3_15_section"],
            "column": r["annex_e_table_column"],
        }
        for r in _rows(standard_dir / "cid7050_deid_method_codes.csv")
    ]
    actions = {r["code"]: r["meaning"] for r in _rows(standard_dir / "annex_e_action_codes.csv")}
    source = "DICOM PS3.15 " + edition + " (see ../shared/standard/README.md)"
    return {
        f"annex_e_{edition}.json": {
            "edition": edition,
            "source": source + ", Table E.1-1 and E.1-1a",
            "action_codes": actions,
            "attributes": table,
        },
        f"safe_private_{edition}.json": {
            "edition": edition,
            "source": source + ", Table E.3.10-1",
            "attributes": safe,
        },
        f"cid7050_{edition}.json": {
            "edition": edition,
            "source": "DICOM PS3.16 " + edition + " CID 7050",
            "codes": codes,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "standard_dir", nargs="?", type=Path, default=HERE.parents[2] / ".." / "shared" / "standard"
    )
    p.add_argument("--edition", default=EDITION)
    args = p.parse_args(argv)
    for name, doc in build(args.standard_dir, args.edition).items():
        (HERE / name).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", "utf-8")
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

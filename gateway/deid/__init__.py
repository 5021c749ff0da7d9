"""De-identification: PS3.15 Annex E profiles, keyed pseudonyms and the leak gate.

A pure package: no logging of values, no metrics, no I/O except its own package data, profile files,
the secret file and (in :mod:`gateway.deid.files` only) the instance being de-identified.

* :func:`load_profile` / :class:`Profile`: TOML profiles from ``deid_profiles/``;
* :class:`ProjectKey`: the per-project secret (a file) and its key id;
* :func:`deidentify`: ``Dataset -> (Dataset, Report)``, fail closed with ``DeidError``;
* :func:`leak_check`: tag paths of the output that hold an identifying value of the original;
* :func:`deidentify_file` / :func:`deidentify_bytes`: read, de-identify, write, gate.
"""

from gateway.deid.engine import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    Engine,
    Report,
    deidentify,
)
from gateway.deid.files import DeidResult, deidentify_bytes, deidentify_file
from gateway.deid.keys import ProjectKey, generate_secret_file
from gateway.deid.leak import leak_check
from gateway.deid.profiles import Profile, load_profile
from gateway.deid.table import EDITION

__all__ = [
    "EDITION",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "DeidResult",
    "Engine",
    "Profile",
    "ProjectKey",
    "Report",
    "deidentify",
    "deidentify_bytes",
    "deidentify_file",
    "generate_secret_file",
    "leak_check",
    "load_profile",
]

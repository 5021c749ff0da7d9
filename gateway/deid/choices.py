"""Where Table E.1-1 offers a choice, the one this gateway makes, and why.

PS3.15 Table E.1-1a: ``X/Z`` = X unless Z is required by the IOD (Type 3 vs 2), ``X/D`` = X unless
D is
required (Type 3 vs 1), ``X/Z/D`` likewise, ``Z/D`` = Z unless D is required (Type 2 vs 1) and
``X/Z/U*`` = X unless the sequence must stay with its instance UIDs replaced.

The engine does not know each instance's IOD, so the rule is a default per code plus a short list of
attributes that are Type 1 or 2 in common IODs (patient, study, series, equipment, image, SR
document,
presentation state, RT and enhanced multi-frame modules), where X would make the output invalid:

* ``X/Z`` -> X, except Type 2 somewhere common -> Z (listed below);
* ``X/D`` -> X, except Type 1 somewhere common -> D;
* ``X/Z/D`` -> X, except the listed ones -> Z or D;
* ``Z/D`` -> Z, except Type 1 somewhere common -> D (Content Date/Time are Type 1 in SR documents);
* ``X/Z/U*`` -> U*: the sequence is kept and every UID inside it is replaced like any other UID, so
  Referenced Image / Source Image references still resolve within the de-identified set.

The patient, study and series attributes that are Type 1 or 2 (Patient's Name, Patient ID, Birth
Date,
Sex, Study Date/Time, Referring Physician, Study ID, Accession Number, the instance UIDs) are Z, D
or U
in the table itself, so no attribute of those modules is ever removed by a choice made here.
"""

from __future__ import annotations

DEFAULTS = {"X/Z": "X", "X/D": "X", "X/Z/D": "X", "Z/D": "Z", "X/Z/U*": "U*"}

# keyword -> the code chosen instead of the default, with the module that requires it.
EXCEPTIONS: dict[str, str] = {
    # Z/D: Type 1 in common IODs
    "ContentDate": "D",  # SR Document General (1), General Image (2C)
    "ContentTime": "D",  # SR Document General (1)
    "InstructionPerformedDateTime": "D",  # Instruction Sequence items (1)
    # X/D: Type 1 in common IODs
    "ObservationDateTime": "D",  # SR content items (1C)
    "StartAcquisitionDateTime": "D",  # Enhanced acquisition context (1C)
    "EndAcquisitionDateTime": "D",
    "TreatmentDate": "D",  # RT treatment records
    "TreatmentTime": "D",
    # X/Z/D: Type 1 or 2 in common IODs
    "AcquisitionDateTime": "D",  # Multi-frame Functional Groups / Enhanced images (1C)
    "DeviceSerialNumber": "D",  # Enhanced General Equipment (1)
    # X/Z: Type 2 in common IODs
    "AcquisitionContextSequence": "Z",  # Acquisition Context module (2)
    "PatientSexNeutered": "Z",  # Patient module, non-human subjects (2C)
    "TreatmentMachineName": "Z",  # RT Treatment Machine Record (2)
    "ReviewerName": "Z",  # Approval module (2C)
}


def resolve(code: str, keyword: str) -> str:
    """The single action code (D, Z, X, K, C, U or U*) that ``code`` means for ``keyword``."""
    if "/" not in code:
        return code
    if code not in DEFAULTS:
        raise ValueError(f"unknown compound action code {code!r}")
    return EXCEPTIONS.get(keyword, DEFAULTS[code])

"""C-FIND on the index: PS3.4 C.2.2.2 matchers to SQL, and the rows behind each level.

The Query/Retrieve information models (PS3.4 C.6.1 Patient Root, C.6.2 Study Root) map onto
the index's tables: PATIENT is the studies grouped by Patient ID, STUDY a ``studies`` row,
SERIES a ``series`` row with its study, IMAGE the newest version of an ``instances`` row
with its series and study. Keys of the query level and the levels above it are matched;
every value reaches the database as a bound parameter, wildcards through an escaped
``LIKE`` (PostgreSQL) or ``GLOB`` (SQLite, whose ``LIKE`` ignores case) pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from gateway.index.models import Instance, Series, Study
from gateway.qr.matching import (
    Matcher,
    Range,
    Single,
    UIDList,
    Universal,
    Wildcard,
    glob_pattern,
    like_literal,
    like_pattern,
)

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
ESCAPE = "\\"


@dataclass(frozen=True)
class Attribute:
    level: str
    vr: str
    column: InstrumentedAttribute[str]


ATTRIBUTES: dict[str, Attribute] = {
    "PatientID": Attribute("PATIENT", "LO", Study.patient_id),
    "PatientName": Attribute("PATIENT", "PN", Study.patient_name),
    "PatientBirthDate": Attribute("PATIENT", "DA", Study.patient_birth_date),
    "PatientSex": Attribute("PATIENT", "CS", Study.patient_sex),
    "StudyInstanceUID": Attribute("STUDY", "UI", Study.study_instance_uid),
    "StudyDate": Attribute("STUDY", "DA", Study.study_date),
    "StudyTime": Attribute("STUDY", "TM", Study.study_time),
    "AccessionNumber": Attribute("STUDY", "SH", Study.accession_number),
    "StudyID": Attribute("STUDY", "SH", Study.study_id),
    "StudyDescription": Attribute("STUDY", "LO", Study.study_description),
    "ReferringPhysicianName": Attribute("STUDY", "PN", Study.referring_physician_name),
    "ModalitiesInStudy": Attribute("STUDY", "CS", Series.modality),  # any series' modality
    "SeriesInstanceUID": Attribute("SERIES", "UI", Series.series_instance_uid),
    "Modality": Attribute("SERIES", "CS", Series.modality),
    "SeriesNumber": Attribute("SERIES", "IS", Series.series_number),
    "SeriesDescription": Attribute("SERIES", "LO", Series.series_description),
    "SOPInstanceUID": Attribute("IMAGE", "UI", Instance.sop_instance_uid),
    "SOPClassUID": Attribute("IMAGE", "UI", Instance.sop_class_uid),
    "InstanceNumber": Attribute("IMAGE", "IS", Instance.instance_number),
}

COUNTS = {
    "NumberOfPatientRelatedStudies": "PATIENT",
    "NumberOfPatientRelatedSeries": "PATIENT",
    "NumberOfPatientRelatedInstances": "PATIENT",
    "NumberOfStudyRelatedSeries": "STUDY",
    "NumberOfStudyRelatedInstances": "STUDY",
    "NumberOfSeriesRelatedInstances": "SERIES",
}

# the unique key of each level (PS3.4 C.6.1.1 / C.6.2.1)
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


def at_or_above(attribute_level: str, level: str) -> bool:
    return LEVELS.index(attribute_level) <= LEVELS.index(level)


def condition(
    column: Any, matcher: Matcher, *, vr: str, dialect: str
) -> ColumnElement[bool] | None:
    """The SQL condition for one key; ``None`` for universal matching."""
    folded = vr == "PN"
    if isinstance(matcher, Universal):
        return None
    if isinstance(matcher, Single):
        if folded:  # case-insensitive literal match
            pattern = like_literal(matcher.value, ESCAPE)
            if dialect == "postgresql":
                return column.ilike(pattern, escape=ESCAPE)  # type: ignore[no-any-return]
            return column.like(pattern, escape=ESCAPE)  # type: ignore[no-any-return]
        return column == matcher.value  # type: ignore[no-any-return]
    if isinstance(matcher, UIDList):
        return column.in_(matcher.uids)  # type: ignore[no-any-return]
    if isinstance(matcher, Wildcard):
        if dialect == "postgresql":
            pattern = like_pattern(matcher.pattern, ESCAPE)
            op = column.ilike if folded else column.like
            return op(pattern, escape=ESCAPE)  # type: ignore[no-any-return]
        if folded:  # SQLite LIKE: case-insensitive (ASCII)
            return column.like(  # type: ignore[no-any-return]
                like_pattern(matcher.pattern, ESCAPE), escape=ESCAPE
            )
        return column.op("GLOB")(glob_pattern(matcher.pattern))  # type: ignore[no-any-return]
    assert isinstance(matcher, Range)
    parts: list[ColumnElement[bool]] = [column != ""]
    if matcher.lower:
        parts.append(column >= matcher.lower)
    if matcher.upper:
        parts.append(func.substr(column, 1, len(matcher.upper)) <= matcher.upper)
    return and_(*parts)


def _conditions(
    matchers: dict[str, Matcher], level: str, dialect: str
) -> list[ColumnElement[bool]]:
    out: list[ColumnElement[bool]] = []
    for keyword, matcher in matchers.items():
        attribute = ATTRIBUTES.get(keyword)
        if attribute is None or not at_or_above(attribute.level, level):
            continue  # not a matching key here: treated as universal (returned empty)
        if keyword == "ModalitiesInStudy":
            inner = aliased(Series)
            values = (
                [Single(v) for v in matcher.value.split("\\") if v]
                if isinstance(matcher, Single)
                else [matcher]
            )
            alternatives = [
                c
                for c in (condition(inner.modality, m, vr="CS", dialect=dialect) for m in values)
                if c is not None
            ]
            if alternatives:
                out.append(
                    exists(
                        select(inner.series_instance_uid).where(
                            inner.study_instance_uid == Study.study_instance_uid,
                            or_(*alternatives),
                        )
                    )
                )
            continue
        cond = condition(attribute.column, matcher, vr=attribute.vr, dialect=dialect)
        if cond is not None:
            out.append(cond)
    return out


def find_rows(
    session: Session, *, level: str, matchers: dict[str, Matcher], limit: int
) -> list[dict[str, str]]:
    """Up to ``limit`` rows of the level, each a keyword -> text mapping."""
    dialect = session.get_bind().dialect.name
    where = _conditions(matchers, level, dialect)
    rows: list[dict[str, str]] = []
    if level == "PATIENT":
        stmt = (
            select(
                Study.patient_id,
                func.max(Study.patient_name),
                func.max(Study.patient_birth_date),
                func.max(Study.patient_sex),
            )
            .where(*where)
            .group_by(Study.patient_id)
            .order_by(Study.patient_id)
            .limit(limit)
        )
        for pid, name, birth, sex in session.execute(stmt):
            rows.append(
                {
                    "PatientID": pid,
                    "PatientName": name,
                    "PatientBirthDate": birth,
                    "PatientSex": sex,
                }
            )
        return rows
    if level == "STUDY":
        for study in session.execute(
            select(Study).where(*where).order_by(Study.study_instance_uid).limit(limit)
        ).scalars():
            rows.append(_study_values(study))
        return rows
    if level == "SERIES":
        series_stmt = (
            select(Series, Study)
            .join(Study, Study.study_instance_uid == Series.study_instance_uid)
            .where(*where)
            .order_by(Series.study_instance_uid, Series.series_instance_uid)
            .limit(limit)
        )
        for series, study in session.execute(series_stmt):
            rows.append({**_study_values(study), **_series_values(series)})
        return rows
    newer = aliased(Instance)
    image_stmt = (
        select(Instance, Series, Study)
        .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
        .join(Study, Study.study_instance_uid == Instance.study_instance_uid)
        .where(
            *where,
            ~exists(
                select(newer.id).where(
                    newer.sop_instance_uid == Instance.sop_instance_uid,
                    newer.version > Instance.version,
                )
            ),
        )
        .order_by(Instance.series_instance_uid, Instance.sop_instance_uid)
        .limit(limit)
    )
    for instance, series, study in session.execute(image_stmt):
        rows.append(
            {
                **_study_values(study),
                **_series_values(series),
                "SOPInstanceUID": instance.sop_instance_uid,
                "SOPClassUID": instance.sop_class_uid,
                "InstanceNumber": instance.instance_number,
            }
        )
    return rows


def _study_values(study: Study) -> dict[str, str]:
    return {
        "PatientID": study.patient_id,
        "PatientName": study.patient_name,
        "PatientBirthDate": study.patient_birth_date,
        "PatientSex": study.patient_sex,
        "StudyInstanceUID": study.study_instance_uid,
        "StudyDate": study.study_date,
        "StudyTime": study.study_time,
        "AccessionNumber": study.accession_number,
        "StudyID": study.study_id,
        "StudyDescription": study.study_description,
        "ReferringPhysicianName": study.referring_physician_name,
        "ModalitiesInStudy": study.modalities,
    }


def _series_values(series: Series) -> dict[str, str]:
    return {
        "SeriesInstanceUID": series.series_instance_uid,
        "Modality": series.modality,
        "SeriesNumber": series.series_number,
        "SeriesDescription": series.series_description,
    }


def _latest() -> ColumnElement[bool]:
    newer = aliased(Instance)
    return ~exists(
        select(newer.id).where(
            newer.sop_instance_uid == Instance.sop_instance_uid,
            newer.version > Instance.version,
        )
    )


def related_counts(session: Session, row: dict[str, str], wanted: set[str]) -> dict[str, str]:
    """The number-of-related keys asked for (PS3.4 C.3.2/C.3.3/C.3.4), for one result row."""
    out: dict[str, str] = {}

    def count(stmt: Any) -> str:
        return str(int(session.execute(stmt).scalar_one() or 0))

    instances = func.count(func.distinct(Instance.sop_instance_uid))
    if "NumberOfPatientRelatedStudies" in wanted:
        out["NumberOfPatientRelatedStudies"] = count(
            select(func.count()).where(Study.patient_id == row["PatientID"])
        )
    if "NumberOfPatientRelatedSeries" in wanted:
        out["NumberOfPatientRelatedSeries"] = count(
            select(func.count(Series.series_instance_uid))
            .join(Study, Study.study_instance_uid == Series.study_instance_uid)
            .where(Study.patient_id == row["PatientID"])
        )
    if "NumberOfPatientRelatedInstances" in wanted:
        out["NumberOfPatientRelatedInstances"] = count(
            select(instances)
            .join(Study, Study.study_instance_uid == Instance.study_instance_uid)
            .where(Study.patient_id == row["PatientID"])
        )
    if "NumberOfStudyRelatedSeries" in wanted:
        out["NumberOfStudyRelatedSeries"] = count(
            select(func.count()).where(Series.study_instance_uid == row["StudyInstanceUID"])
        )
    if "NumberOfStudyRelatedInstances" in wanted:
        out["NumberOfStudyRelatedInstances"] = count(
            select(instances).where(Instance.study_instance_uid == row["StudyInstanceUID"])
        )
    if "NumberOfSeriesRelatedInstances" in wanted:
        out["NumberOfSeriesRelatedInstances"] = count(
            select(instances).where(Instance.series_instance_uid == row["SeriesInstanceUID"])
        )
    return out


def instances_for(
    session: Session, *, level: str, matchers: dict[str, Matcher], limit: int
) -> list[Instance]:
    """The newest version of every instance a C-MOVE/C-GET identifier selects."""
    dialect = session.get_bind().dialect.name
    where = _conditions(matchers, "IMAGE", dialect)
    stmt = (
        select(Instance)
        .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
        .join(Study, Study.study_instance_uid == Instance.study_instance_uid)
        .where(*where, _latest())
        .order_by(Instance.study_instance_uid, Instance.series_instance_uid, Instance.id)
        .limit(limit)
    )
    return list(session.execute(stmt).scalars())

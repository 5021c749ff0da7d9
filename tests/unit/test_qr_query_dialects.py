"""C-FIND matching in SQL on both index back ends: the PostgreSQL LIKE/ILIKE path and the
SQLite GLOB/LIKE path give the same answers as the in-memory PS3.4 matcher, with ``%``,
``_`` and ``\\`` taken literally (gateway/qr/query.py)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from gateway.index.db import Database
from gateway.index.models import Series, Study
from gateway.qr import query
from gateway.qr.matching import matches, multi_value_matches, parse

STUDIES = [
    # uid, patient name, patient id, date, description, modality
    ("1.2.1", "Doe^Jane", "PID-1", "20240110", "Head 100%_x", "CT"),
    ("1.2.2", "DOE^John", "PID-2", "20240215", "Head 100AB x", "MR"),
    ("1.2.3", "Müller^Jörg", "PID_3", "20240320", "back\\slash", "CT"),
    ("1.2.4", "Roe^Rita", "PID%4", "", "[bracket] study", "US"),
]

QUERIES = [
    ("PatientName", "doe^jane"),
    ("PatientName", "DOE*"),
    ("PatientName", "d?e^j*"),
    ("PatientName", "müller*"),
    ("PatientName", "%"),
    ("PatientName", "_oe^Jane"),
    ("PatientID", "PID_3"),
    ("PatientID", "PID?3"),
    ("PatientID", "PID%4"),
    ("PatientID", "PID*"),
    ("PatientID", "pid-1"),
    ("StudyDescription", "*100%_x"),
    ("StudyDescription", "*back\\slash*"),
    ("StudyDescription", "back\\slash"),
    ("StudyDescription", "[bracket]*"),
    ("StudyDescription", "Head*"),
    ("StudyDate", "20240201-20240331"),
    ("StudyDate", "-20240110"),
    ("StudyDate", "20240215-"),
    ("StudyInstanceUID", "1.2.1\\1.2.4"),
    ("ModalitiesInStudy", "CT"),
    ("ModalitiesInStudy", "M?"),
    ("ModalitiesInStudy", "US\\MR"),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'index.sqlite3'}")
        database.migrate()
        _fill(database)
        yield database
        database.dispose()
        return
    pg_url = request.getfixturevalue("pg_url")
    import psycopg

    u = make_url(pg_url)
    conninfo = " ".join(
        f"{k}={v}"
        for k, v in {
            "host": u.query.get("host") or u.host,
            "port": u.port,
            "dbname": u.database,
            "user": u.username,
            "password": u.password,
        }.items()
        if v
    )
    schema = f"qr_{secrets.token_hex(6)}"
    with psycopg.connect(conninfo, autocommit=True) as con:
        con.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in pg_url else "?"
    database = Database(f"{pg_url}{sep}options=-csearch_path%3D{schema}")
    try:
        database.migrate()
        _fill(database)
        assert database.engine.dialect.name == "postgresql"
        yield database
    finally:
        database.dispose()
        with psycopg.connect(conninfo, autocommit=True) as con:
            con.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _fill(database: Database) -> None:
    now = datetime(2024, 1, 1, tzinfo=UTC)
    with database.session() as s:
        for uid, name, pid, date, description, modality in STUDIES:
            s.add(
                Study(
                    study_instance_uid=uid,
                    patient_id=pid,
                    patient_name=name,
                    study_date=date,
                    study_description=description,
                    modalities=modality,
                    first_received_at=now,
                    last_received_at=now,
                )
            )
            s.add(Series(series_instance_uid=f"{uid}.1", study_instance_uid=uid, modality=modality))


def _expected(keyword: str, value: str) -> set[str]:
    attribute = query.ATTRIBUTES[keyword]
    matcher = parse(attribute.vr, value)
    column = {
        "PatientName": 1,
        "PatientID": 2,
        "StudyDate": 3,
        "StudyDescription": 4,
        "ModalitiesInStudy": 5,
        "StudyInstanceUID": 0,
    }[keyword]
    if keyword == "ModalitiesInStudy":
        return {s[0] for s in STUDIES if multi_value_matches(matcher, s[column], vr="CS")}
    return {s[0] for s in STUDIES if matches(matcher, s[column], vr=attribute.vr)}


@pytest.mark.parametrize(("keyword", "value"), QUERIES)
def test_sql_matching_agrees_with_ps34_rules(db: Database, keyword: str, value: str) -> None:
    matcher = parse(query.ATTRIBUTES[keyword].vr, value)
    with db.session() as s:
        rows = query.find_rows(s, level="STUDY", matchers={keyword: matcher}, limit=100)
    found = {r["StudyInstanceUID"] for r in rows}
    expected = _expected(keyword, value)
    if keyword == "PatientName" and not value.isascii() and db.engine.dialect.name == "sqlite":
        # SQLite's LIKE folds ASCII only; the answer is still a subset, never a wrong match
        assert found <= expected
        return
    assert found == expected, (keyword, value)


def test_the_expected_answers_are_not_trivial() -> None:
    """The table above exercises both outcomes: keys that match some and keys that match
    none of the studies, escapes included."""
    sizes = {(k, v): len(_expected(k, v)) for k, v in QUERIES}
    assert sizes[("PatientName", "%")] == 0
    assert sizes[("PatientName", "_oe^Jane")] == 0
    assert sizes[("PatientID", "PID_3")] == 1
    assert sizes[("StudyDescription", "*100%_x")] == 1
    assert sizes[("StudyDescription", "back\\slash")] == 1
    assert sizes[("PatientName", "DOE*")] == 2

"""gateway.audit.chain against a real SQLite index: tampering is found, appends are ordered."""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text

from gateway.audit import chain
from gateway.audit.chain import GENESIS, AuditRecord, _digest, append, verify
from gateway.errors import AuditChainError
from gateway.index.db import Database
from gateway.index.models import AuditEvent, AuditHead

T0 = datetime(2024, 1, 15, 10, 0, 0, tzinfo=UTC)
COLUMNS = (
    "recorded_at, event_type, outcome, node, calling_ae_title, called_ae_title, address, "
    "sop_class_uid, sop_instance_uid, study_instance_uid, delivery_id, status, detail, "
    "prev_hash, hash"
)


def _record(i: int) -> AuditRecord:
    return AuditRecord(
        event_type="c-store",
        outcome="success",
        calling_ae_title=f"MOD{i}",
        called_ae_title="GATEWAY",
        address="10.0.0.7",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=f"1.2.3.{i}",
        study_instance_uid="1.2.3",
        status=0,
        detail={"n": i, "size": 1000 + i},
    )


def _fill(db: Database, n: int = 10) -> None:
    for i in range(1, n + 1):
        with db.session() as s:
            assert append(s, _record(i), node="node-1", now=T0 + timedelta(seconds=i)) == i


def _verify(db: Database) -> int:
    with db.session() as s:
        return verify(s)


def _bad_seq(db: Database) -> int:
    with pytest.raises(AuditChainError) as info:
        _verify(db)
    assert f"audit row {info.value.sequence}:" in str(info.value)
    return info.value.sequence


def _sql(db: Database, statement: str, **params: object) -> None:
    with db.session() as s:
        s.execute(text(statement), params)


def test_empty_chain_verifies(db: Database) -> None:
    assert _verify(db) == 0


def test_untouched_chain_verifies(db: Database) -> None:
    _fill(db)
    assert _verify(db) == 10
    with db.session() as s:
        rows = s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars().all()
        head = s.execute(select(AuditHead)).scalar_one()
    assert rows[0].prev_hash == GENESIS
    for a, b in itertools.pairwise(rows):
        assert b.prev_hash == a.hash
    assert head.seq == 10
    assert head.hash == rows[-1].hash


def test_append_in_rolled_back_transaction_leaves_no_trace(db: Database) -> None:
    _fill(db, 3)
    with pytest.raises(RuntimeError), db.session() as s:
        append(s, _record(4), node="node-1", now=T0)
        raise RuntimeError("work failed")
    assert _verify(db) == 3
    with db.session() as s:
        assert append(s, _record(4), node="node-1", now=T0) == 4
    assert _verify(db) == 4


def test_peer_text_is_escaped(db: Database) -> None:
    with db.session() as s:
        append(
            s,
            AuditRecord("association", "rejected", calling_ae_title="EVIL\nAE\\"),
            node="n",
            now=T0,
        )
    with db.session() as s:
        row = s.execute(select(AuditEvent)).scalar_one()
    assert "\n" not in row.calling_ae_title
    assert row.calling_ae_title == "EVIL\\x0aAE\\x5c"
    assert _verify(db) == 1


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("event_type", "'c-echo'"),
        ("outcome", "'failure'"),
        ("node", "'node-2'"),
        ("calling_ae_title", "'OTHER'"),
        ("address", "'10.0.0.8'"),
        ("sop_instance_uid", "'1.2.3.999'"),
        ("status", "272"),
        ("status", "NULL"),
        ("detail", "'{}'"),
        ("recorded_at", "'2024-01-15 10:00:05.000001'"),
        ("delivery_id", "'x'"),
    ],
)
def test_edited_column_is_found(db: Database, column: str, value: str) -> None:
    _fill(db)
    _sql(db, f"UPDATE audit_events SET {column} = {value} WHERE seq = 5")
    assert _bad_seq(db) == 5


def test_edited_hash_is_found(db: Database) -> None:
    _fill(db)
    _sql(db, "UPDATE audit_events SET hash = :h WHERE seq = 4", h="f" * 64)
    assert _bad_seq(db) == 4


def test_deleted_middle_row_is_found(db: Database) -> None:
    _fill(db)
    _sql(db, "DELETE FROM audit_events WHERE seq = 5")
    assert _bad_seq(db) == 5


def test_deleted_first_row_is_found(db: Database) -> None:
    _fill(db)
    _sql(db, "DELETE FROM audit_events WHERE seq = 1")
    assert _bad_seq(db) == 1


def test_deleted_last_row_is_found_against_the_head(db: Database) -> None:
    _fill(db)
    _sql(db, "DELETE FROM audit_events WHERE seq = 10")
    with pytest.raises(AuditChainError) as info:
        _verify(db)
    assert info.value.sequence == 10
    assert "head" in info.value.reason


def test_truncated_tail_with_head_rewound_is_consistent(db: Database) -> None:
    # rewinding the head too is indistinguishable from a shorter chain: documented limit
    _fill(db)
    _sql(db, "DELETE FROM audit_events WHERE seq > 8")
    with pytest.raises(AuditChainError):
        _verify(db)


def test_inserted_middle_row_is_found(db: Database) -> None:
    _fill(db)
    # make room at 6 and put a copy of row 3 there
    _sql(db, "UPDATE audit_events SET seq = seq + 1000 WHERE seq >= 6")
    _sql(db, "UPDATE audit_events SET seq = seq - 999 WHERE seq >= 1000")
    _sql(
        db,
        f"INSERT INTO audit_events (seq, {COLUMNS}) SELECT 6, {COLUMNS} FROM audit_events"
        " WHERE seq = 3",
    )
    assert _bad_seq(db) == 6


def test_inserted_row_with_duplicate_content_at_end_is_found(db: Database) -> None:
    _fill(db)
    _sql(
        db,
        f"INSERT INTO audit_events (seq, {COLUMNS}) SELECT 11, {COLUMNS} FROM audit_events"
        " WHERE seq = 10",
    )
    assert _bad_seq(db) == 11


def test_forged_row_appended_past_the_head_is_found(db: Database) -> None:
    # a row that links and hashes correctly, but the head was not moved: row 11 is bad
    _fill(db)
    with db.session() as s:
        last = s.execute(select(AuditEvent).where(AuditEvent.seq == 10)).scalar_one()
        forged = AuditEvent(
            seq=11,
            recorded_at=T0 + timedelta(seconds=11),
            event_type="c-store",
            outcome="success",
            node="node-1",
            calling_ae_title="FORGER",
            called_ae_title="GATEWAY",
            address="10.0.0.66",
            sop_class_uid="",
            sop_instance_uid="",
            study_instance_uid="",
            delivery_id="",
            status=0,
            detail="{}",
            prev_hash=last.hash,
            hash="",
        )
        forged.hash = _digest(forged)
        s.add(forged)
    assert _bad_seq(db) == 11


def test_swapped_rows_are_found(db: Database) -> None:
    _fill(db)
    sets = ", ".join(
        f"{c} = (SELECT {c} FROM audit_events b WHERE b.seq = "
        "CASE audit_events.seq WHEN 3 THEN 7 ELSE 3 END)"
        for c in (c.strip() for c in COLUMNS.split(","))
    )
    _sql(db, f"UPDATE audit_events SET {sets} WHERE seq IN (3, 7)")
    with db.session() as s:
        three = s.execute(select(AuditEvent).where(AuditEvent.seq == 3)).scalar_one()
        assert three.sop_instance_uid == "1.2.3.7"  # the swap really happened
    assert _bad_seq(db) == 3


def test_swapped_sequence_numbers_are_found(db: Database) -> None:
    _fill(db)
    _sql(db, "UPDATE audit_events SET seq = 1000 WHERE seq = 4")
    _sql(db, "UPDATE audit_events SET seq = 4 WHERE seq = 6")
    _sql(db, "UPDATE audit_events SET seq = 6 WHERE seq = 1000")
    assert _bad_seq(db) == 4


def test_edited_head_is_found(db: Database) -> None:
    _fill(db)
    _sql(db, "UPDATE audit_head SET hash = :h", h="e" * 64)
    assert _bad_seq(db) == 10
    _sql(db, "UPDATE audit_head SET seq = 12")
    assert _bad_seq(db) == 11


def test_verify_reads_in_batches(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = chain._rows
    monkeypatch.setattr(chain, "_rows", lambda session: rows(session, batch=3))
    _fill(db)
    assert _verify(db) == 10
    _sql(db, "UPDATE audit_events SET outcome = 'x' WHERE seq = 8")
    assert _bad_seq(db) == 8


def test_concurrent_appends_make_a_dense_verifying_chain(db: Database) -> None:
    threads_n, per_thread = 8, 50
    errors: list[BaseException] = []
    seqs: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(threads_n)

    def run(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                with db.session() as s:
                    seq = append(s, _record(t * 1000 + i), node=f"w{t}", now=datetime.now(UTC))
                with lock:
                    seqs.append(seq)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not errors, errors
    total = threads_n * per_thread
    assert sorted(seqs) == list(range(1, total + 1))
    with db.session() as s:
        stored = s.execute(select(AuditEvent.seq).order_by(AuditEvent.seq)).scalars().all()
    assert list(stored) == list(range(1, total + 1))
    assert _verify(db) == total

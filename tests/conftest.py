"""Shared fixtures. Helpers live in tests/support/ (they never import ``gateway``)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.datasets import make_ct_study
from tests.support.peers import Orthanc, StoreSCP, in_private_netns
from tests.support.pg import pg_conninfo


def pytest_report_header(config: pytest.Config) -> str:
    if in_private_netns():
        return "network: private namespace (loopback only)"
    return (
        "network: HOST namespace -- Orthanc/storescp will bind all interfaces; "
        "prefer scripts/test (runs pytest under `unshare -n`)"
    )


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A started Orthanc (AET ORTHANC) with empty storage; killed afterwards.

    Teardown uses SIGKILL: the storage is thrown away, and a graceful Orthanc
    1.10 shutdown costs ~3.5 s per test.
    """
    with Orthanc(tmp_path, aet="ORTHANC") as server:
        try:
            yield server
        finally:
            server.kill()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    """A started DCMTK storescp (AET STORESCP) writing into tmp_path/storescp."""
    with StoreSCP(tmp_path / "storescp") as scp:
        yield scp


@pytest.fixture
def pg_url() -> str:
    """SQLAlchemy URL of a PostgreSQL test database (env GATEWAY_TEST_PG_URL).

    Skipped when unset locally; under CI (CI=true) a missing database fails.
    """
    url = os.environ.get("GATEWAY_TEST_PG_URL", "")
    if not url:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(
                "GATEWAY_TEST_PG_URL is not set under CI: PostgreSQL tests must not be "
                "skipped. Run the suite via scripts/test (it starts/locates PostgreSQL)."
            )
        pytest.skip("GATEWAY_TEST_PG_URL not set (scripts/test sets it)")
    return url


@pytest.fixture
def pg_schema_url(pg_url: str) -> Iterator[tuple[str, str]]:
    """(SQLAlchemy URL whose search_path is a fresh schema, the schema); dropped after."""
    import psycopg

    schema = f"g_{secrets.token_hex(6)}"
    conninfo = pg_conninfo(pg_url)
    with psycopg.connect(conninfo, autocommit=True) as con:
        con.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in pg_url else "?"
    try:
        yield f"{pg_url}{sep}options=-csearch_path%3D{schema}", schema
    finally:
        with psycopg.connect(conninfo, autocommit=True) as con:
            con.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def ct_study_small(tmp_path: Path) -> list[Path]:
    """Five 64x64 CT instances of one study/series."""
    return make_ct_study(tmp_path / "ct_small", 5, seed=1)


@pytest.fixture
def ct_study_large(tmp_path: Path) -> list[Path]:
    """Fifty 256x256 CT instances of one study/series (~6.5 MB)."""
    return make_ct_study(tmp_path / "ct_large", 50, rows=256, cols=256, seed=2)

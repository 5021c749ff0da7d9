"""Alembic environment: runs on the connection the gateway hands over."""

from __future__ import annotations

from alembic import context

from gateway.index.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only the gateway runs these migrations
    raise RuntimeError("run migrations through gateway.index.db.Database.migrate()")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()

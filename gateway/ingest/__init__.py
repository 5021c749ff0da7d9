"""Ingest: authorise, spool, index and audit what modalities send."""

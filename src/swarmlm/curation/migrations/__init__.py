"""Alembic migrations of the curation store (run by :func:`swarmlm.curation.db.migrate`)."""

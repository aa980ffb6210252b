"""Alembic migrations of the trackstream schema (a package so that wheels ship them)."""

"""Persistence: SQLAlchemy 2.0 models, engine setup and Alembic migrations."""

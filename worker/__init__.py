"""The segq worker: Celery tasks around a pipeline of plain functions. Never imports Flask."""

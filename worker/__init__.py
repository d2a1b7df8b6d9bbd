"""The Celery worker: runs jobs against Triton and writes results to Postgres."""

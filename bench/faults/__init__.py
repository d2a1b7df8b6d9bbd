"""The project's own fault suite (`make faults`, `python -m bench.faults`): its own Postgres cluster
and Redis, the local Triton, workers and the API under a steady submit load while faults are injected;
it prints per scenario what was submitted, completed, failed, lost and finished twice, and how long
recovery took. See bench/README.md."""

"""The local stack for development, tests and the benchmark: `python -m devstack up` (`make dev`)."""

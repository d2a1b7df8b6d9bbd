"""Throughput benchmark: the local Triton driven directly (the ceiling) vs through the platform."""

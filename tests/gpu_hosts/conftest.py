"""Fixtures for the nvidia_triton/ and triton_models/ tests (helpers live in gpuhost_testlib)."""

from gpuhost_testlib import fake_vast, tool_env

__all__ = ["fake_vast", "tool_env"]

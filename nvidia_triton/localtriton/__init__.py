"""Local Triton: the real tritonserver binary serving a CPU simulation of the vLLM backend.

``LocalTriton`` starts it (tests, dev, benchmarks); ``simulate`` predicts the exact text it returns.
"""

from localtriton.engine import SimResult, simulate
from localtriton.launcher import LocalTriton, LocalTritonError

__all__ = ["LocalTriton", "LocalTritonError", "SimResult", "simulate"]

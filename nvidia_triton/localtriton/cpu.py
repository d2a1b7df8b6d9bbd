"""The CPU the real engine runs on here: which dtype it computes fastest in.

bfloat16 is fast only with the CPU's own bf16 instructions (AVX512-BF16, AMX). Without them oneDNN
falls back to plain torch kernels ("Failed to create oneDNN linear") and float32 is several times
faster: SmolLM2-135M on a 2-core AVX2 EPYC, 16 concurrent jobs of 128 tokens, 26 tokens/s in
bfloat16 against 103 in float32, first token 0.92 s against 0.20 s (bench/README.md).
"""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def engine_dtype(requested: str | None, flags: frozenset[str]) -> str | None:
    """The dtype to run: bfloat16 (asked for, or the model's own with "auto") becomes float32 on a
    CPU without bf16 instructions; anything else as asked."""
    if requested in (None, "auto", "bfloat16") and not flags & BF16_FLAGS:
        return "float32"
    return requested

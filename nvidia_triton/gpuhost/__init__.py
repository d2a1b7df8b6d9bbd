"""Provision a Vast.ai GPU host running Triton with the vLLM backend (see nvidia_triton/Makefile)."""

"""Talking to Triton: admin over HTTP (httpx), inference over gRPC streaming (tritonclient)."""

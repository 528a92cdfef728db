"""Per-request and per-step wiring into vLLM's V1 model runner (`vllm.v1.worker.gpu_model_runner`).

- `_update_states`: free the slots of finished and preempted/resumed requests (a resumed one recomposes).
- `_prepare_inputs`: after the batch layout is known, admit requests new to steering (from the runner's
  `requests` map) and write the per-token indices.
- `_determine_batch_execution_and_padding`: a step that holds a capture request runs without CUDA graphs
  (`unlock_vllm.capture`).
"""

from __future__ import annotations

from unlock_vllm import seams
from unlock_vllm.state import STATE_ATTR
from unlock_vllm.wrapping import wrap


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
            req_ids = batch.req_ids[:num_reqs]
            for req_id in req_ids:
                if req_id not in state.rows_of:
                    state.admit(req_id, self.requests[req_id].sampling_params)
            state.write_step(
                req_ids=req_ids,
                num_scheduled=num_scheduled_tokens[:num_reqs].astype("int64"),
                num_computed=batch.num_computed_tokens_cpu[:num_reqs].astype("int64"),
                num_prompt=batch.num_prompt_tokens[:num_reqs].astype("int64"),
            )
        return result

    return prepare_inputs


def _determine_batch_execution_and_padding(original):
    def determine(self, *args, **kwargs):
        state = getattr(self, STATE_ATTR, None)
        if state is not None and state.capture.live:
            kwargs["force_eager"] = True
        return original(self, *args, **kwargs)

    return determine


def wire() -> None:
    GPUModelRunner = seams.get("RunnerV1")
    wrap(GPUModelRunner, "_update_states", _update_states)
    wrap(GPUModelRunner, "_prepare_inputs", _prepare_inputs)
    wrap(GPUModelRunner, "_determine_batch_execution_and_padding", _determine_batch_execution_and_padding)

"""Per-request and per-step wiring into vLLM's Model Runner V2 (`vllm.v1.worker.gpu.model_runner`), the
GPU default from vLLM 0.33. V2 keeps no per-request sampling params on the runner and gets preempted
requests back as new ones (their prompt plus output as prefill), so:

- `finish_requests`: free the slots of finished requests, and of preempted ones (kept in the registry's
  users: they recompose when re-added).
- `add_requests`: admit each new or re-added request, composing its rows from its sampling params.
- `prepare_inputs`: from the returned InputBatch (batch order, tokens scheduled and computed per request)
  and the request states' prompt lengths, write the per-token indices. Prefill context parallelism and
  speculative decoding, whose token layout is settled on the device, are refused at install.
- `dispatch_cg_and_sync_dp` (the module's helper that picks a step's CUDA graph, called after
  `add_requests`): a step that holds a capture request runs without graphs (`unlock_vllm.capture`).
"""

from __future__ import annotations

from unlock_vllm import capture, seams
from unlock_vllm.state import STATE_ATTR
from unlock_vllm.wrapping import wrap


def _finish_requests(original):
    def finish_requests(self, scheduler_output, *args, **kwargs):
        state = getattr(self, STATE_ATTR, None)
        if state is not None:
            state.free(scheduler_output.finished_req_ids, finished=True)
            state.free(scheduler_output.preempted_req_ids or (), finished=False)
        return original(self, scheduler_output, *args, **kwargs)

    return finish_requests


def _add_requests(original):
    def add_requests(self, scheduler_output, *args, **kwargs):
        state = getattr(self, STATE_ATTR, None)
        if state is not None:
            for new in scheduler_output.scheduled_new_reqs:
                state.admit(new.req_id, new.sampling_params)
        return original(self, scheduler_output, *args, **kwargs)

    return add_requests


def _prepare_inputs(original):
    def prepare_inputs(self, *args, **kwargs):
        batch = original(self, *args, **kwargs)
        state = getattr(self, STATE_ATTR, None)
        if state is not None:
            num_reqs = batch.num_reqs
            rows = batch.idx_mapping_np[:num_reqs]
            state.write_step(
                req_ids=list(batch.req_ids[:num_reqs]),
                num_scheduled=batch.num_scheduled_tokens[:num_reqs].astype("int64"),
                num_computed=batch.num_computed_tokens_np[:num_reqs].astype("int64"),
                num_prompt=self.req_states.prompt_len.np[rows].astype("int64"),
            )
        return batch

    return prepare_inputs


def _dispatch_cg_and_sync_dp(original):
    def dispatch(*args, **kwargs):
        if capture.live():  # one runner per worker process: the process's recorder is this runner's
            kwargs["need_eager"] = True
        return original(*args, **kwargs)

    return dispatch


def wire() -> None:
    wrap(seams.get("runner_v2_module"), "dispatch_cg_and_sync_dp", _dispatch_cg_and_sync_dp)
    GPUModelRunner = seams.get("RunnerV2")
    wrap(GPUModelRunner, "finish_requests", _finish_requests)
    wrap(GPUModelRunner, "add_requests", _add_requests)
    wrap(GPUModelRunner, "prepare_inputs", _prepare_inputs)

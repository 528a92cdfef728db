"""Run one vLLM engine configuration in its own process and write the results as JSON.

Usage: python engine_job.py SPEC.json OUT.json. Each test engine (plugin on/off, eager/compiled) runs in a
fresh process so that the plugin's process-wide wrapping and torch.compile state never leak between them.

SPEC keys: model, plugin (bool: steering engine vs an engine with the plugin excluded by VLLM_PLUGINS),
device ("cpu" | "cuda"), model_runner ("v1" | "v2"), cudagraph_mode (compiled CUDA: "FULL" | "PIECEWISE"),
tensor_parallel_size, pipeline_parallel_size, env (variables for the job), eager, prefix_caching,
max_num_batched_tokens, max_tokens, mode ("sync" | "async_register"), and
phases: [{"register": [path, ...], "unregister": [sha, ...], "requests": [{"prompt", "selection"}]}].
A selection is [[sha256, strength, mode], ...]; the phases run one after the other, each request list as
one engine batch. Instead of "prompt" a request may give "extend": {"phase": i, "extra": [ids]}: the
token ids of phase i's first request, its generated tokens and `extra` (a follow-up turn).
A phase may also hold "capture": {"id", "prompts", "layers", "positions"[, "take": false]}: capture
requests (as the API server sends them: unsteered, one token, a cache salt of their own) run in the same batch
as the phase's requests; the phase then records every rank's `unlock_capture_take` reply, tensors as lists.
"""

from __future__ import annotations

import json
import os
import sys


def _setup_env(spec: dict) -> None:
    os.environ.update(spec.get("env", {}))
    if spec.get("device", "cpu") == "cpu":
        os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    # A fresh compile cache per job, so a cached graph of another configuration can never be loaded.
    os.environ["VLLM_CACHE_ROOT"] = spec["cache_root"]
    if not spec["plugin"]:
        os.environ["VLLM_PLUGINS"] = "no-such-plugin"  # an allow-list that excludes `unlock`
    if spec.get("mode", "sync") == "sync":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def _engine_args(spec: dict) -> dict:
    args = dict(
        model=spec["model"],
        dtype="float32",
        seed=0,
        max_model_len=spec.get("max_model_len", 1024),
        max_num_seqs=16,
        enforce_eager=spec["eager"],
        enable_prefix_caching=spec.get("prefix_caching", False),
        block_size=32,  # the CPU backend's smallest; short prompts then fill whole (cacheable) blocks
        kv_cache_memory_bytes=spec.get("kv_cache_bytes", 64 * 2**20),
    )
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        if spec.get(key, 1) > 1:
            args[key] = spec[key]
    if spec.get("cudagraph_mode"):
        args["compilation_config"] = {"cudagraph_mode": spec["cudagraph_mode"]}
    if spec.get("max_num_batched_tokens"):
        args["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
        args["enable_chunked_prefill"] = True
    if spec["plugin"]:
        import unlock_vllm

        args.update(
            unlock_vllm.engine_kwargs(
                max_capabilities=spec.get("max_capabilities", 8),
                model_runner=spec.get("model_runner", "v1"),
            )
        )
    return args


def _params(spec: dict, request: dict):
    """Greedy params; `selection` is encoded, `raw` is sent as is (to test malformed input)."""
    from unlock_vllm.request import EXTRA_ARGS_KEY, encode_selection
    from vllm import SamplingParams

    if "raw" in request:
        extra = {EXTRA_ARGS_KEY: request["raw"]}
    elif request.get("selection"):
        extra = {EXTRA_ARGS_KEY: encode_selection(request["selection"])}
    else:
        extra = None
    return SamplingParams(
        temperature=0.0, max_tokens=spec["max_tokens"], logprobs=0, ignore_eos=True, extra_args=extra
    )


def _result(output) -> dict:
    completion = output.outputs[0]
    logprobs = [
        float(step[token].logprob)
        for token, step in zip(completion.token_ids, completion.logprobs, strict=True)
    ]
    return {
        "prompt_token_ids": list(output.prompt_token_ids),
        "token_ids": list(completion.token_ids),
        "logprobs": logprobs,
        "cached": output.num_cached_tokens,
    }


def _prompt(request: dict, done: list[dict]):
    if "extend" not in request:
        return request["prompt"]
    earlier = done[request["extend"]["phase"]]["outputs"][0]
    return {
        "prompt_token_ids": earlier["prompt_token_ids"] + earlier["token_ids"] + request["extend"]["extra"]
    }


def _capture_requests(capture: dict) -> tuple[list, list]:
    from unlock_vllm.capture import CAPTURE_KEY, capture_args
    from vllm import SamplingParams

    prompts, params = [], []
    for index, prompt in enumerate(capture["prompts"]):
        prompts.append({"prompt": prompt, "cache_salt": f"{capture['id']}-{index}"})
        args = capture_args(capture["id"], index, capture["layers"], capture["positions"])
        params.append(SamplingParams(temperature=0.0, max_tokens=1, extra_args={CAPTURE_KEY: args}))
    return prompts, params


def _taken(replies: list[dict]) -> list[dict]:
    from safetensors.torch import load

    return [
        {"rank": r.get("rank"), "ok": r["ok"], "error": r["error"],
         "tensors": {k: v.tolist() for k, v in load(r["data"]).items()} if r.get("data") else {}}
        for r in replies
    ]  # fmt: skip


def run_sync(spec: dict) -> dict:
    from vllm import LLM

    llm = LLM(**_engine_args(spec))
    rpc = llm.collective_rpc if spec["plugin"] else None
    result: dict = {"status_start": rpc("unlock_status")[0] if rpc else None, "phases": []}
    for phase in spec["phases"]:
        record: dict = {"register": [], "unregister": []}
        for path, sha in phase.get("register", []):
            record["register"].append(rpc("unlock_register", args=(path, sha))[0])
        for sha in phase.get("unregister", []):
            record["unregister"].append(rpc("unlock_unregister", args=(sha,))[0])
        requests = phase.get("requests", [])
        capture = phase.get("capture")
        prompts = [_prompt(r, result["phases"]) for r in requests]
        params = [_params(spec, r) for r in requests]
        if capture:
            more_prompts, more_params = _capture_requests(capture)
            prompts, params = prompts + more_prompts, params + more_params
        if prompts:
            outputs = llm.generate(prompts, params, use_tqdm=False)
            record["outputs"] = [_result(o) for o in outputs[: len(requests)]]
        if capture and capture.get("take", True):
            record["capture"] = _taken(rpc("unlock_capture_take", args=(capture["id"],)))
        if rpc:
            record["status"] = rpc("unlock_status")[0]
        result["phases"].append(record)
    result["status_end"] = rpc("unlock_status")[0] if rpc else None
    result["status_all"] = rpc("unlock_status") if rpc else None  # one reply per TP/PP rank
    return result


async def _run_async_register(spec: dict) -> dict:
    """AsyncLLM (engine core in its own process): register and unregister while a request runs.

    spec: "preregister" [path, sha] used by "long" (which must outlive the RPCs), "register" [path, sha]
    used by "late", and "stale", which selects the preregistered capability after its unregistering.
    """
    import asyncio

    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**_engine_args(spec)))
    try:
        started = asyncio.Event()

        async def generate(request_id: str, request: dict) -> dict:
            params = _params(spec, request)
            params.max_tokens = request.get("max_tokens", params.max_tokens)
            final = None
            async for output in engine.generate(request["prompt"], params, request_id):
                final = output
                started.set()
            return _result(final)

        rpc = engine.collective_rpc
        result: dict = {"preregister": (await rpc("unlock_register", args=tuple(spec["preregister"])))[0]}
        long_task = asyncio.create_task(generate("long", spec["long"]))
        await started.wait()
        result["register"] = (await rpc("unlock_register", args=tuple(spec["register"])))[0]
        result["unregister"] = (await rpc("unlock_unregister", args=(spec["preregister"][1],)))[0]
        result["long_running_after_rpcs"] = not long_task.done()
        result["late"] = await generate("late", spec["late"])
        result["stale"] = await generate("stale", spec["stale"])
        result["long"] = await long_task
        result["status_end"] = (await rpc("unlock_status"))[0]
        return result
    finally:
        engine.shutdown()


def main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    _setup_env(spec)
    if spec.get("mode", "sync") == "sync":
        result = run_sync(spec)
    else:
        import asyncio

        result = asyncio.run(_run_async_register(spec))
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

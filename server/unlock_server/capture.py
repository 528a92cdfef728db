"""`/v1/capture` (admin): the served model's residual stream after chosen decoder layers, read by the engine
that serves it, so `unlock align --target-url` needs no second copy of the weights.

`GET` describes the model as an artifact records it, and this server's limits. `POST` {"prompts", "layers",
"positions", "dtype"} runs each prompt as an unsteered request for one token with a cache salt of its own
(every prompt token is computed, none comes from the prefix cache), marked for capture
(`unlock_vllm.capture`); the workers' rows come back through one RPC after the requests finish. The answer
is a safetensors body in the layout of an `unlock capture` chunk (`unlock.streams`): ``layer.<l>`` [rows,
hidden] with the prompts' rows one after the other, ``ids``, ``ends`` and ``lengths``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, Literal

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .auth import require_admin
from .engine import Workers, capture_params
from .errors import APIError

CAPTURE_PATH = "/v1/capture"
MAX_BODY_BYTES = 16 * 1024 * 1024  # of the request's JSON: prompts are text
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

router = APIRouter(dependencies=[Depends(require_admin)])


class CaptureBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(min_length=1)
    layers: list[int] | None = None  # None: every decoder layer
    positions: Literal["last", "all"] = "last"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    model: str | None = None  # the served name, checked when given


class Tokenized(BaseModel):
    ids: list[int]
    ends: list[int]  # the character offset where each token ends, -1 for one covering no text


def _engine(request: Request) -> Any:
    return request.app.state.engine_client


def describe(request: Request) -> dict[str, Any]:
    from unlock.identity import config_sha256_of, model_name

    engine, service, settings = (
        _engine(request),
        request.app.state.unlock_service,
        request.app.state.unlock_settings,
    )
    config = engine.model_config
    architectures = getattr(config.hf_config, "architectures", None) or [type(config.hf_config).__name__]
    return {
        "model": service.shape.served_names[0],
        "name": model_name(config.model),
        "architecture": architectures[0],
        "num_layers": service.shape.num_layers,
        "hidden_size": service.shape.hidden_size,
        "config_sha256": config_sha256_of(config.model, config.hf_config.to_json_string),
        "dtype": str(config.dtype).removeprefix("torch."),
        "offsets": bool(getattr(engine.get_tokenizer(), "is_fast", False)),
        "limits": settings.capture_limits(),
    }


@router.get(CAPTURE_PATH)
async def capture_info(request: Request) -> dict[str, Any]:
    return describe(request)


def tokenize(tokenizer: Any, prompt: str) -> Tokenized:
    """Token ids as vLLM makes them for a completion prompt, and where each token ends in the text."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
        ends = [end if end > start else -1 for start, end in encoded["offset_mapping"]]
        return Tokenized(ids=list(encoded["input_ids"]), ends=ends)
    ids = list(tokenizer.encode(prompt, add_special_tokens=True))
    return Tokenized(ids=ids, ends=[-1] * len(ids))


def _layers(asked: list[int] | None, num_layers: int) -> list[int]:
    if asked is None:
        return list(range(num_layers))
    bad = [i for i in asked if not -num_layers <= i < num_layers]
    if bad or not asked:
        raise APIError(
            400, f"layers must be indices of the {num_layers} decoder layers, got {asked}", "layers"
        )
    return sorted({i % num_layers for i in asked})


async def _body(request: Request) -> CaptureBody:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"capture body of {len(raw)} bytes is over {MAX_BODY_BYTES}", "body")
    try:
        return CaptureBody.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise APIError(400, f"invalid capture request: {where}: {first['msg']}", where) from None


def _check_limits(body: CaptureBody, tokens: list[Tokenized], layers: list[int], request: Request) -> None:
    limits = request.app.state.unlock_settings.capture_limits()
    hidden = request.app.state.unlock_service.shape.hidden_size
    max_len = _engine(request).model_config.max_model_len
    if len(body.prompts) > limits["max_prompts"]:
        raise APIError(
            413, f"{len(body.prompts)} prompts, over this server's {limits['max_prompts']}", "prompts"
        )
    for i, t in enumerate(tokens):
        if not t.ids or len(t.ids) + 1 > max_len:
            raise APIError(
                400,
                f"prompt {i} has {len(t.ids)} tokens: it needs 1 to {max_len - 1} (max_model_len)",
                "prompts",
            )
    total = sum(len(t.ids) for t in tokens)
    if total > limits["max_tokens"]:
        raise APIError(413, f"{total} prompt tokens, over this server's {limits['max_tokens']}", "prompts")
    rows = total if body.positions == "all" else len(tokens)
    size = rows * len(layers) * hidden * DTYPES[body.dtype].itemsize
    if size > limits["max_bytes"]:
        raise APIError(
            413,
            f"the capture would return {size} bytes, over this server's {limits['max_bytes']}: "
            "send fewer prompts or layers, positions 'last', or dtype float16",
            "prompts",
        )


async def _run(
    engine: Any, capture_id: str, tokens: list[Tokenized], layers: list[int], positions: str
) -> None:
    async def one(index: int, ids: list[int]) -> None:
        prompt = {"prompt_token_ids": ids, "cache_salt": f"unlock-capture-{capture_id}-{index}"}
        params = capture_params(capture_id, index, layers, positions)
        async for _ in engine.generate(prompt, params, f"unlock-capture-{capture_id}-{index}"):
            pass

    await asyncio.gather(*(one(i, t.ids) for i, t in enumerate(tokens)))


def _assemble(
    replies: list[bytes], body: CaptureBody, tokens: list[Tokenized], layers: list[int], info: dict[str, Any]
) -> bytes:
    """The workers' rows (one TP rank per pipeline stage recorded them) as one `unlock.streams` chunk."""
    got: dict[str, torch.Tensor] = {}
    for data in replies:
        got.update(load_safetensors(data) if data else {})
    picked = [list(range(len(t.ids))) if body.positions == "all" else [len(t.ids) - 1] for t in tokens]
    for index, want in enumerate(picked):
        positions = got.get(f"{index}.positions")
        missing = [layer for layer in layers if f"{index}.layer.{layer}" not in got]
        if positions is None or positions.tolist() != want or missing:
            raise APIError(500, f"the engine recorded an incomplete capture for prompt {index}")
    dtype = DTYPES[body.dtype]
    tensors = {
        f"layer.{layer}": torch.cat([got[f"{i}.layer.{layer}"] for i in range(len(tokens))]).to(dtype)
        for layer in layers
    }
    tensors["ids"] = torch.tensor(
        [t.ids[p] for t, ps in zip(tokens, picked, strict=True) for p in ps], dtype=torch.int64
    )
    tensors["ends"] = torch.tensor(
        [t.ends[p] for t, ps in zip(tokens, picked, strict=True) for p in ps], dtype=torch.int64
    )
    tensors["lengths"] = torch.tensor([len(ps) for ps in picked], dtype=torch.int64)
    from unlock.streams import chunk_metadata

    metadata = {
        **chunk_metadata(info["name"], info["num_layers"], info["hidden_size"], False, body.prompts),
        "positions": body.positions,
        "layers": json.dumps(layers),
        "dtype": body.dtype,
    }
    return save_safetensors(tensors, metadata)


@router.post(CAPTURE_PATH)
async def capture(request: Request) -> Response:
    body = await _body(request)
    info = describe(request)
    served_names = request.app.state.unlock_service.shape.served_names
    if body.model is not None and body.model not in served_names:
        raise APIError(404, f"this server serves {served_names}, not {body.model!r}", "model")
    layers = _layers(body.layers, info["num_layers"])
    tokenizer = _engine(request).get_tokenizer()
    tokens = [tokenize(tokenizer, p) for p in body.prompts]
    _check_limits(body, tokens, layers, request)
    workers: Workers = request.app.state.unlock_service.workers
    capture_id = uuid.uuid4().hex
    try:
        await _run(_engine(request), capture_id, tokens, layers, body.positions)
    finally:  # taken even when the requests failed or the client left: the rows must not stay in the workers
        replies = await workers.capture_take(capture_id)
    data = _assemble(replies, body, tokens, layers, info)
    return Response(data, media_type="application/octet-stream")

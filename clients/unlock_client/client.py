"""httpx clients for the capability endpoints (`/v1/capabilities`), sync and async."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx


class UnlockAPIError(RuntimeError):
    """A non-2xx answer; carries the server's OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.param = param


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        raise UnlockAPIError(response.status_code, error.get("message", ""), error.get("param"))
    except (ValueError, KeyError, TypeError):
        raise UnlockAPIError(response.status_code, response.text) from None


def _check(response: httpx.Response) -> Any:
    _raise_for_error(response)
    return response.json()


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _upload_params(name: str | None, replace: bool) -> dict[str, str]:
    params = {"name": name} if name else {}
    if replace:
        params["replace"] = "true"
    return params


def _default_base_url() -> str:
    return os.environ.get("UNLOCK_BASE_URL", "http://127.0.0.1:8000")


class UnlockClient:
    """`UnlockClient(base_url, api_key=...)`; use the admin key for upload/delete.

    `base_url` is the server root (`http://host:8000`), without `/v1`.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 120.0):
        self._http = httpx.Client(
            base_url=base_url or _default_base_url(), headers=_headers(api_key), timeout=timeout
        )

    def __enter__(self) -> UnlockClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def upload(self, path: str | Path, name: str | None = None, replace: bool = False) -> dict[str, Any]:
        with Path(path).open("rb") as f:  # streamed, not read into memory
            return _check(
                self._http.post("/v1/capabilities", content=f, params=_upload_params(name, replace))
            )

    def upload_bytes(self, data: bytes, name: str | None = None, replace: bool = False) -> dict[str, Any]:
        return _check(self._http.post("/v1/capabilities", content=data, params=_upload_params(name, replace)))

    def list(self) -> list[dict[str, Any]]:
        return _check(self._http.get("/v1/capabilities"))["data"]

    def get(self, name: str) -> dict[str, Any]:
        return _check(self._http.get(f"/v1/capabilities/{name}"))

    def delete(self, name: str) -> dict[str, Any]:
        return _check(self._http.delete(f"/v1/capabilities/{name}"))

    def health(self) -> dict[str, Any]:
        return _check(self._http.get("/health"))

    def served_models(self) -> list[str]:
        """The names the model is served under (`/v1/models` lists each capability beside them as
        `<model>+<name>`)."""
        return [m["id"] for m in _check(self._http.get("/v1/models"))["data"] if m.get("parent") is None]

    def served_model(self) -> str:
        """The served model's name."""
        names = self.served_models()
        if len(names) != 1:
            raise ValueError(f"cannot tell the served model among {names}")
        return names[0]

    def capture_info(self) -> dict[str, Any]:
        """What the capture endpoint reads (admin key): the model's name, config hash, sizes and limits."""
        return _check(self._http.get("/v1/capture"))

    def capture(
        self,
        prompts: list[str],
        layers: list[int] | None = None,
        positions: str = "last",
        dtype: str = "float32",
    ) -> bytes:
        """The residual stream after `layers` (default: all) at the prompts' last tokens or at every token:
        a safetensors file (`unlock.served` reads it)."""
        body: dict[str, Any] = {"prompts": prompts, "positions": positions, "dtype": dtype}
        if layers is not None:
            body["layers"] = layers
        response = self._http.post("/v1/capture", json=body)
        _raise_for_error(response)
        return response.content


class AsyncUnlockClient:
    """The async twin of `UnlockClient`."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 120.0):
        self._http = httpx.AsyncClient(
            base_url=base_url or _default_base_url(), headers=_headers(api_key), timeout=timeout
        )

    async def __aenter__(self) -> AsyncUnlockClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def upload(
        self, path: str | Path, name: str | None = None, replace: bool = False
    ) -> dict[str, Any]:
        return await self.upload_bytes(Path(path).read_bytes(), name, replace)

    async def upload_bytes(
        self, data: bytes, name: str | None = None, replace: bool = False
    ) -> dict[str, Any]:
        return _check(
            await self._http.post("/v1/capabilities", content=data, params=_upload_params(name, replace))
        )

    async def list(self) -> list[dict[str, Any]]:
        return _check(await self._http.get("/v1/capabilities"))["data"]

    async def get(self, name: str) -> dict[str, Any]:
        return _check(await self._http.get(f"/v1/capabilities/{name}"))

    async def delete(self, name: str) -> dict[str, Any]:
        return _check(await self._http.delete(f"/v1/capabilities/{name}"))

    async def health(self) -> dict[str, Any]:
        return _check(await self._http.get("/health"))

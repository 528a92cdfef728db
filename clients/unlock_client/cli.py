"""`unlockctl`: upload, list, show and delete capabilities, and chat with some switched on."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from unlock_client.client import UnlockAPIError, UnlockClient
from unlock_client.selection import capabilities_extra_body


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unlockctl", description="Manage and use unlock-serve capabilities."
    )
    parser.add_argument(
        "--base-url",
        default=os.environ.get("UNLOCK_BASE_URL", "http://127.0.0.1:8000"),
        help="server root, without /v1 (env UNLOCK_BASE_URL)",
    )
    parser.add_argument("--api-key", default=os.environ.get("UNLOCK_API_KEY"), help="env UNLOCK_API_KEY")
    parser.add_argument(
        "--admin-key",
        default=os.environ.get("UNLOCK_ADMIN_KEY"),
        help="for upload and delete (env UNLOCK_ADMIN_KEY); default: the API key",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("upload", help="upload a capability artifact (.safetensors)")
    up.add_argument("file")
    up.add_argument("--name", help="register under this name instead of the artifact's")
    up.add_argument("--replace", action="store_true", help="replace a capability of this name")
    sub.add_parser("list", help="list registered capabilities")
    show = sub.add_parser("show", help="show one capability")
    show.add_argument("name")
    delete = sub.add_parser("delete", help="delete a capability")
    delete.add_argument("name")

    chat = sub.add_parser("chat", help="send one chat message, optionally steered")
    chat.add_argument("message")
    chat.add_argument(
        "--capability",
        "-c",
        action="append",
        default=[],
        metavar="NAME[@STRENGTH][:POSITIONS]",
        help="switch a capability on (repeatable); its default strength when @ is omitted, its own positions "
        "(last_prompt, prompt, generated or all) when : is omitted",
    )
    chat.add_argument("--model", help="served model; default: the server's first base model")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--stream", action="store_true")
    return parser


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _chat(args: argparse.Namespace) -> None:
    import openai

    try:
        extra = capabilities_extra_body(args.capability) if args.capability else {}
    except ValueError as err:
        raise SystemExit(f"unlockctl: {err}") from None
    client = openai.OpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key=args.api_key or "none")
    model = args.model or next(m.id for m in client.models.list().data if getattr(m, "parent", None) is None)
    request = dict(
        model=model,
        messages=[{"role": "user", "content": args.message}],
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        extra_body=extra,
    )
    if args.stream:
        for chunk in client.chat.completions.create(stream=True, **request):
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
        print()
        return
    raw = client.chat.completions.with_raw_response.create(**request)
    print(raw.parse().choices[0].message.content)
    applied = raw.headers.get("x-unlock-capabilities")
    print(f"[capabilities: {applied or 'none'}]", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "chat":
        import openai

        try:
            _chat(args)
        except openai.APIStatusError as err:
            raise SystemExit(f"unlockctl: HTTP {err.status_code}: {err.message}") from None
        return
    key = args.admin_key or args.api_key if args.command in ("upload", "delete") else args.api_key
    try:
        with UnlockClient(args.base_url, api_key=key) as client:
            if args.command == "upload":
                _print_json(client.upload(args.file, name=args.name, replace=args.replace))
            elif args.command == "list":
                for cap in client.list():
                    print(
                        f"{cap['name']}\t{cap['mode']}\tstrength={cap['default_strength']:g}\t"
                        f"layers={len(cap['layers'])}\t{cap['sha256'][:12]}\t{cap['status']}"
                    )
            elif args.command == "show":
                _print_json(client.get(args.name))
            elif args.command == "delete":
                _print_json(client.delete(args.name))
    except UnlockAPIError as err:
        raise SystemExit(f"unlockctl: {err}") from None


if __name__ == "__main__":
    main()

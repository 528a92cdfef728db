"""`unlock`: build, inspect and try capabilities from the command line.

Every command exits with status 2 and a one-line message on stderr when its input is wrong, and writes its
output file only once it is complete (a temporary file renamed into place).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

from unlock._version import __version__
from unlock.align import DEFAULT_RANK, FULL_RANK
from unlock.artifacts import Capability
from unlock.calibrate import DEFAULT_STRENGTHS, EXTEND_STEPS
from unlock.combine import combine, parse_expression, resolve
from unlock.configs import AlignConfig, CaptureConfig, ExtractConfig
from unlock.data import load_questions
from unlock.directions import AGGREGATIONS
from unlock.extracted import Extracted
from unlock.model_cache import ModelCache, ModelOptions
from unlock.ops import MODES, OPERATORS
from unlock.ops import POSITIONS as STEER_POSITIONS
from unlock.pairing import POSITIONS
from unlock.pipeline import check_build, run_align, run_capture, run_extract
from unlock.templates import BUILTIN_TEMPLATES, load_template, render
from unlock.timer import Timer
from unlock.validation import DEFAULT_MAX_UPLOAD_BYTES, Limits

EXIT_USAGE = 2
PACKAGE_DATA = Path(__file__).parent / "data"  # the demo capability's extraction prompts


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    group.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass during capture")
    group.add_argument(
        "--chat-template", dest="chat", action="store_true", help="wrap prompts in the chat template"
    )
    group.add_argument(
        "--layers-module", help="dotted path of the decoder-layer ModuleList, if not found by itself"
    )


def add_extract_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("extraction")
    group.add_argument("--source-locked", required=True, help="source model without the capability")
    group.add_argument(
        "--source-unlocked", help="source model with it (default: --source-locked, other template)"
    )
    group.add_argument("--data", required=True, help="JSONL file, one object per line")
    group.add_argument(
        "--field", default="question", help="the field holding the question (default: question)"
    )
    group.add_argument("-n", type=int, default=64, help="number of examples (the first N of the file)")
    group.add_argument("--locked-template", default="direct", help="direct, cot, or a file with {question}")
    group.add_argument("--unlocked-template", default="cot", help="direct, cot, or a file with {question}")
    group.add_argument("--aggregation", choices=AGGREGATIONS, default="mean")


def number_list(kind: type) -> Callable[[str], tuple]:
    """An argparse type: "16" or "16,64,256" as a tuple of ``kind``."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {kind.__name__}s separated by commas, got {text!r}"
            ) from None

    return parse


def rank_list(text: str) -> tuple[int, ...]:
    """An argparse type: "full", "64" or "64,full" (full: every direction the rows determine)."""
    return tuple(FULL_RANK if part == "full" else number_list(int)(part)[0] for part in text.split(","))


def add_align_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("alignment and artifact")
    target = group.add_mutually_exclusive_group(required=True)
    target.add_argument("--target", help="the model to steer: its folder (or hub id)")
    target.add_argument(
        "--target-url",
        help="or the model an unlock-serve serves, read through its capture endpoint (the server's root, "
        "e.g. http://127.0.0.1:8000; needs --admin-key)",
    )
    add_admin_key(group)
    group.add_argument("--target-model", help="with --target-url: one of its served names (default: its own)")
    group.add_argument(
        "--rank",
        dest="ranks",
        type=rank_list,
        default=(DEFAULT_RANK,),
        metavar="K[,K...]",
        help=f"k = min(rank, pairs, hidden sizes) (default {DEFAULT_RANK}); 'full': every direction the rows "
        "determine; several: the one of lowest held-out error (the paper's recipe: 16 to 32)",
    )
    group.add_argument(
        "--center",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="centre activations before the fit (default; --no-center: the paper's uncentred fit)",
    )
    group.add_argument(
        "--ridge",
        dest="ridges",
        type=number_list(float),
        default=(0.1, 0.3, 1.0),
        metavar="R[,R...]",
        help="ridge on M, relative to the mean diagonal of X_s^T X_s; several (default 0.1,0.3,1): chosen "
        "with --rank by held-out error; 0: the paper's pinv",
    )
    group.add_argument(
        "--align-positions",
        choices=POSITIONS,
        default="auto",
        help="pair the streams at every token both tokenizations end at the same character (all), or at the "
        "last prompt token only (last, the paper's); auto (default): all where both tokenizers give "
        "character offsets and the same text, else last",
    )
    group.add_argument(
        "--align-data", help="JSONL alignment corpus, apart from the extraction prompts (default: those)"
    )
    group.add_argument("--align-field", default="question", help="the text field of --align-data")
    group.add_argument("--align-n", type=int, help="the first N texts of --align-data (default: all)")
    group.add_argument(
        "--align-template", help="template of the alignment texts: direct, cot, plain, FILE (default: locked)"
    )
    group.add_argument(
        "--align-skip",
        type=int,
        default=2,
        help="with --align-positions all: leave out each text's first N positions (sinks; default 2)",
    )
    group.add_argument(
        "--capture-dir", help="with --align-positions all: keep the captures here and reuse them (resumable)"
    )
    group.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="fraction of alignment texts left out of the fit and scored on (default 0: fit on every text)",
    )
    group.add_argument(
        "--cv-folds",
        type=int,
        default=5,
        help="with --holdout 0: held-out error by k-fold cross-validation over whole texts (default 5; "
        "0: none)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the held-out split and of the folds")
    group.add_argument("--layers", default="all", help="target layers: all, 4-12, 0,2,5, -1 (default all)")
    group.add_argument(
        "--select-layers",
        type=int,
        metavar="K",
        help="steer only the K of --layers whose held-out map error is lowest (chosen without labels)",
    )
    group.add_argument("--mode", choices=MODES, default="rotate", help="the operator (see docs/unlock.md)")
    group.add_argument(
        "--positions",
        choices=STEER_POSITIONS,
        help="the tokens it edits unless a request says otherwise (default: the mode's: "
        + ", ".join(f"{op.name} {op.default_positions}" for op in OPERATORS.values())
        + ")",
    )
    group.add_argument("--strength", type=float, default=0.1, help="default strength")
    group.add_argument("--name", required=True, help="capability name")
    group.add_argument("--store", choices=("factors", "directions"), default="factors")
    group.add_argument("-o", "--output", required=True, help="capability file to write (.safetensors)")


def add_admin_key(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--admin-key",
        default=os.environ.get("UNLOCK_ADMIN_KEY"),
        help="the server's admin key, for a served model (env UNLOCK_ADMIN_KEY)",
    )


def add_record_paths(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--record-paths",
        action="store_true",
        help="also record the models' folders on this machine (source_locked_path, target_path, ...); "
        "by default a model is recorded by name, architecture, sizes and config.json hash only",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlock", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"unlock {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="extract, align and write a capability in one go")
    add_extract_options(build)
    add_align_options(build)
    add_record_paths(build)
    add_model_options(build)

    extract = commands.add_parser("extract", help="source directions, written to an intermediate file")
    add_extract_options(extract)
    extract.add_argument("-o", "--output", required=True, help="intermediate file to write (.safetensors)")
    add_record_paths(extract)
    add_model_options(extract)

    capture = commands.add_parser(
        "capture", help="every token's stream of one model on a corpus, into a resumable store"
    )
    model = capture.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="the model's folder (or hub id)")
    model.add_argument("--model-url", help="or the model an unlock-serve serves (the server's root URL)")
    add_admin_key(capture)
    capture.add_argument("--data", required=True, help="JSONL file, one object per line")
    capture.add_argument("--field", default="question", help="the field holding the text")
    capture.add_argument("-n", type=int, default=None, help="the first N records (default: all)")
    capture.add_argument("--template", default="direct", help="direct, cot, plain, or a file with {question}")
    capture.add_argument(
        "--capture-dir", required=True, help="store root; chunks already there are kept (resumes)"
    )
    add_model_options(capture)

    align = commands.add_parser("align", help="map an `unlock extract` file into a target: the capability")
    align.add_argument("--extracted", required=True, help="file written by `unlock extract`")
    align.add_argument(
        "--source-locked",
        help="the source-locked model, when the extracted file records only its name (extracted without "
        "--record-paths) and alignment must capture it (--align-positions other than last, --align-data)",
    )
    add_align_options(align)
    add_record_paths(align)
    add_model_options(align)

    inspect = commands.add_parser("inspect", help="describe a capability file")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="print the metadata as JSON")

    combine = commands.add_parser(
        "combine", help="a weighted sum of capabilities of one target, as one capability"
    )
    combine.add_argument("expression", help="e.g. '0.5*cot + math - verbose' (files, or NAME.safetensors)")
    combine.add_argument("--name", required=True, help="capability name")
    combine.add_argument(
        "--strength", type=float, default=1.0, help="default strength (default 1: the expression as written)"
    )
    combine.add_argument("-o", "--output", required=True, help="capability file to write (.safetensors)")

    generate = commands.add_parser("generate", help="greedy generation with capabilities switched on")
    generate.add_argument("--model", required=True)
    generate.add_argument(
        "--capability",
        action="append",
        default=[],
        metavar="FILE[@STRENGTH[:POSITIONS]]",
        help="repeatable; POSITIONS overrides the capability's (last_prompt, prompt, generated, all)",
    )
    generate.add_argument("--prompt", action="append", required=True, help="repeatable; one generation each")
    generate.add_argument("--template", help="direct, cot or a file: the prompt is then the question")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--ignore-eos", action="store_true")
    generate.add_argument("--json", action="store_true", help="one JSON object per prompt with token ids")
    add_model_options(generate)

    calibrate = commands.add_parser(
        "calibrate",
        help="choose a capability's default strength without labels, through a running unlock-serve",
        description=calibrate_doc(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    calibrate.add_argument("file", help="the capability (.safetensors); rewritten with the chosen default")
    calibrate.add_argument("--url", required=True, help="the server's root, e.g. http://127.0.0.1:8000")
    calibrate.add_argument("--api-key", default=os.environ.get("UNLOCK_API_KEY"), help="env UNLOCK_API_KEY")
    calibrate.add_argument(
        "--admin-key", default=os.environ.get("UNLOCK_ADMIN_KEY"), help="uploads a probe (UNLOCK_ADMIN_KEY)"
    )
    calibrate.add_argument("--model", help="the served model's name (default: the one the server lists)")
    calibrate.add_argument(
        "--data", help="unlabelled prompts, JSONL (default: the capability's own extraction data, if found)"
    )
    calibrate.add_argument("--field", help="the field of --data holding the prompt (default: the artifact's)")
    calibrate.add_argument("-n", type=int, default=32, help="prompts (default 32)")
    calibrate.add_argument("--template", help="direct, cot or a file (default: the capability's locked one)")
    calibrate.add_argument(
        "--strengths", type=number_list(float), default=DEFAULT_STRENGTHS, help="comma-separated grid"
    )
    calibrate.add_argument(
        "--extend",
        type=int,
        default=EXTEND_STEPS,
        help=f"larger strengths tried past the grid while its top is the best ({EXTEND_STEPS}; 0: none)",
    )
    calibrate.add_argument("--max-tokens", type=int, default=48, help="tokens generated per prompt (48)")
    calibrate.add_argument(
        "--min-fraction", type=float, default=0.5, help="least fraction of prompts switched and on topic"
    )
    calibrate.add_argument("-o", "--output", help="where to write the calibrated capability (default: FILE)")
    calibrate.add_argument("--upload", action="store_true", help="then upload it under its name (replace)")
    return parser


def calibrate_doc() -> str:
    from unlock import calibrate

    return calibrate.__doc__


def pick(cls, args: argparse.Namespace):
    """Fill a config dataclass from the parsed arguments of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def cmd_extract(args: argparse.Namespace, timer: Timer) -> None:
    models = ModelCache(pick(ModelOptions, args), timer)
    extracted = run_extract(pick(ExtractConfig, args), models)
    with timer.stage("write"):
        extracted.save(args.output, record_paths=args.record_paths)
    print(f"wrote {args.output}: directions for {extracted.directions.shape[0]} source layers")
    print(timer.report())


def cmd_capture(args: argparse.Namespace, timer: Timer) -> None:
    models = ModelCache(pick(ModelOptions, args), timer)
    chunks = run_capture(pick(CaptureConfig, args), models)
    tokens = sum(len(ids) for chunk in chunks for ids in chunk.ids)
    print(f"{len(chunks)} chunks, {tokens} tokens in {chunks[0].path.parent if chunks else args.capture_dir}")
    print(timer.report())


def align_and_write(args: argparse.Namespace, extracted: Extracted, models: ModelCache) -> None:
    capability, _ = run_align(extracted, pick(AlignConfig, args), models)
    with models.timer.stage("write"):
        capability.save(args.output)
    print(describe(capability))
    print(f"wrote {args.output}")
    note = upload_size_note(capability)
    if note:
        print(note, file=sys.stderr)
    print(models.timer.report())


def upload_size_note(capability: Capability) -> str | None:
    """A warning when the file is over unlock-serve's default upload limit (factors of a high rank)."""
    size = len(capability.to_bytes())
    if size <= DEFAULT_MAX_UPLOAD_BYTES:
        return None
    dense = capability.target_directions()
    dense_mb = dense.numel() * dense.element_size() / 1e6
    hint = (
        f"; --store directions keeps the same steering in {dense_mb:.1f} MB (without the map), or choose "
        "a lower --rank"
        if capability.storage == "factors"
        else ""
    )
    return (
        f"note: {size / 2**20:.0f} MiB is over unlock-serve's default upload limit "
        f"({DEFAULT_MAX_UPLOAD_BYTES / 2**20:.0f} MiB, --max-upload-bytes){hint}"
    )


def cmd_align(args: argparse.Namespace, timer: Timer) -> None:
    models = ModelCache(pick(ModelOptions, args), timer)
    with timer.stage("read extracted"):
        extracted = Extracted.load(args.extracted)
    align_and_write(args, extracted, models)


def cmd_build(args: argparse.Namespace, timer: Timer) -> None:
    models = ModelCache(pick(ModelOptions, args), timer)
    extract_config = pick(ExtractConfig, args)
    check_build(extract_config, pick(AlignConfig, args), models)  # bad input fails before any capture
    align_and_write(args, run_extract(extract_config, models), models)


def describe(capability: Capability) -> str:
    meta = capability.metadata
    lines = [
        f"capability  {capability.name}",
        f"sha256      {capability.sha256}",
        f"mode        {capability.mode} (default strength {capability.default_strength:g}, edits "
        f"{capability.positions} tokens, {capability.row_norm} rows)",
        f"target      {capability.target_name} ({capability.target_architecture}, "
        f"{capability.target_num_layers} layers, hidden {capability.target_hidden_size})",
        f"storage     {capability.storage}"
        + (f" (rank {capability.tensors['align.m'].shape[-1]})" if capability.storage == "factors" else ""),
    ]
    if "source_locked" in meta:
        lines.append(f"source      locked {meta['source_locked']}, unlocked {meta.get('source_unlocked')}")
        lines.append(
            f"method      N={meta.get('n')}, {meta.get('aggregation')}, "
            f"templates {meta.get('locked_template')} -> {meta.get('unlocked_template')}"
        )
    if "combined_from" in meta:
        sources = json.loads(meta["combined_from"])
        parts = [f"{t['weight']:g}*{t['name']} ({t['sha256'][:12]})" for t in sources]
        lines.append(f"combined    {' + '.join(parts)}")
    if meta.get("alignment") == "identity":
        lines.append("alignment   identity (the target is the source-locked model: its own directions)")
    elif "rank" in meta:
        lines.append(
            f"alignment   {meta.get('align_positions', 'last')} positions of "
            f"{meta.get('align_n', meta.get('n'))} texts ({meta.get('align_data', 'extraction prompts')}): "
            f"{meta.get('n_pairs', meta.get('n_fit'))} pairs; fit on {meta.get('n_fit')} texts, "
            f"{meta.get('n_holdout')} held out; rank {meta.get('rank')}, ridge {meta.get('ridge', '0.0')}, "
            f"center={meta.get('center')}; error: {meta.get('error_kind', 'holdout')}"
        )
    if "layer_selection" in meta:
        lines.append(
            f"layers      {len(capability.layers)} of {json.loads(meta['candidate_layers'])} with the lowest "
            "held-out error"
        )
    if "grid_errors" in meta:
        lines.append(f"grid        mean held-out error {meta['grid_errors']}")
    lines.append(f"version     unlock {meta['unlock_version']}")
    errors = capability.alignment_errors or [math.nan] * len(capability.layers)
    sources = (
        json.loads(meta["source_layers"]) if "source_layers" in meta else [None] * len(capability.layers)
    )
    norms = capability.target_directions().norm(dim=-1).tolist()
    lines.append("layer  source  |r_t|       held-out error")
    for layer, source, norm, error in zip(capability.layers, sources, norms, errors, strict=True):
        lines.append(f"{layer:5d}  {'-' if source is None else source:>6}  {norm:10.4g}  {error:.4f}")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace, timer: Timer) -> None:
    capability = Capability.load(args.file)
    capability.validate()  # what the server would refuse, this refuses too
    if args.json:
        shapes = {name: list(t.shape) for name, t in capability.tensors.items()}
        print(
            json.dumps(
                {"sha256": capability.sha256, "metadata": capability.metadata, "tensors": shapes}, indent=2
            )
        )
    else:
        print(describe(capability))


def calibration_prompts(args: argparse.Namespace, capability: Capability) -> list[str]:
    """The prompts as a user would send them: the question field only (never an answer), in a template."""
    meta = capability.metadata
    data = args.data or meta.get("data")
    candidates = [Path(data), PACKAGE_DATA / data] if data else []
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise ValueError(f"no prompts: the capability's data {data!r} is not here; pass --data FILE.jsonl")
    template = args.template or meta.get("locked_template", "direct")
    if template not in BUILTIN_TEMPLATES and not Path(template).is_file():
        template = "direct"  # a template file of the builder's machine: the built-in of the same role
    questions = load_questions(found, args.field or meta.get("field", "question"), args.n)
    return [render(load_template(template), question) for question in questions]


def cmd_calibrate(args: argparse.Namespace, timer: Timer) -> None:
    from unlock.calibrate import calibrate_served, table

    capability = Capability.load(args.file)
    decision = calibrate_served(
        capability,
        args.url,
        calibration_prompts(args, capability),
        strengths=args.strengths,
        max_tokens=args.max_tokens,
        min_fraction=args.min_fraction,
        model=args.model,
        api_key=args.api_key,
        admin_key=args.admin_key,
        extend=args.extend,
    )
    print(table(decision))
    if decision.strength is None:
        raise ValueError(decision.reason)
    calibrated = capability.with_default_strength(decision.strength, decision.metadata())
    calibrated.save(args.output or args.file)
    print(f"{capability.name}: default strength {decision.strength:g} ({decision.reason})")
    if args.upload:
        from unlock_client import UnlockClient

        with UnlockClient(args.url, api_key=args.admin_key or args.api_key) as admin:
            admin.upload_bytes(calibrated.to_bytes(), replace=True)
        print(f"uploaded as {capability.name!r}")


def parse_capability(spec: str) -> tuple[Capability, float, str]:
    """FILE, FILE@STRENGTH or FILE@STRENGTH:POSITIONS (defaults: the capability's own); checked as the
    server checks an upload and a request."""
    path, value, positions = spec, None, None
    head, sep, tail = spec.rpartition("@")
    if sep:
        raw, _, maybe_positions = tail.partition(":")
        try:
            value = float(raw) if raw else None
            path, positions = head, maybe_positions or None
        except ValueError:
            pass  # an '@' inside the file name
    capability = Capability.load(path)
    capability.validate()
    limit = Limits().max_strength
    value = capability.default_strength if value is None else value
    if not math.isfinite(value) or abs(value) > limit:
        raise ValueError(f"strength in {spec!r} must be a finite number within ±{limit:g}")
    if positions is not None and positions not in STEER_POSITIONS:
        raise ValueError(f"positions in {spec!r} must be one of {STEER_POSITIONS}")
    return capability, value, positions or capability.positions


def cmd_combine(args: argparse.Namespace, timer: Timer) -> None:
    terms = [(weight, Capability.load(resolve(name))) for weight, name in parse_expression(args.expression)]
    capability = combine(terms, args.name, args.strength, args.expression)
    capability.save(args.output)
    print(describe(capability))
    print(f"wrote {args.output}")


def cmd_generate(args: argparse.Namespace, timer: Timer) -> None:
    from unlock.capture import format_prompts
    from unlock.steering import steered_generate

    selection = [parse_capability(spec) for spec in args.capability]  # bad files fail before the model loads
    lm = ModelCache(pick(ModelOptions, args), timer).get(args.model)
    for capability, *_ in selection:
        capability.check_target(lm.num_layers, lm.hidden_size)
    template = load_template(args.template) if args.template else "{question}"
    prompts = format_prompts(lm.tokenizer, args.prompt, template, args.chat)
    results = steered_generate(
        lm.model, lm.tokenizer, prompts, [selection] * len(prompts), args.max_new_tokens,
        ignore_eos=args.ignore_eos, chat=args.chat, layers=lm.layers,
    )  # fmt: skip
    for prompt, result in zip(prompts, results, strict=True):
        if args.json:
            record = {
                "prompt": prompt,
                "text": result.text,
                "token_ids": result.token_ids,
                "logprobs": result.logprobs,
            }
            print(json.dumps(record))
        else:
            print(result.text)


COMMANDS = {"build": cmd_build, "extract": cmd_extract, "capture": cmd_capture, "align": cmd_align,
            "inspect": cmd_inspect, "combine": cmd_combine, "generate": cmd_generate,
            "calibrate": cmd_calibrate}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args, Timer())
    except (
        ValueError,
        OSError,
    ) as err:  # ArtifactError is a ValueError; OSError covers unreadable models/files
        print(f"unlock {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())

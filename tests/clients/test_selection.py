"""The one grammar of a capability choice, `NAME[@STRENGTH][:POSITIONS]` (`unlock_client.spec`, which the
server's model-name parser uses too), the client's selection helpers, and the client's lightness: importing
it pulls in neither torch nor vLLM. No server is started."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from unlock_client import capabilities_extra_body, model_with_capabilities, parse_spec
from unlock_client.spec import Spec, SpecError, format_spec

from unlock.ops import POSITIONS

VALID = {
    "cot": Spec("cot"),
    "cot@0.15": Spec("cot", 0.15),
    "cot@-0.5:generated": Spec("cot", -0.5, "generated"),
    "cot@1e-2": Spec("cot", 0.01),
    "cot:all": Spec("cot", None, "all"),
    "my.cap-2_x@3": Spec("my.cap-2_x", 3.0),
    **{f"cot@1:{positions}": Spec("cot", 1.0, positions) for positions in POSITIONS},
    # The form only: the server refuses these values (non-finite strength, unknown positions).
    "cot@inf": Spec("cot", math.inf),
    "cot:middle": Spec("cot", None, "middle"),
}
INVALID = {
    "": "empty capability name",
    "@0.1": "empty capability name",
    ":all": "empty capability name",
    "@0.1:all": "empty capability name",
    "cot:": "empty positions",
    "cot@1:": "empty positions",
    "cot@high": "must be a number",
    "cot@": "must be a number",
    "cot@0.1@0.2": "must be a number",
}


@pytest.mark.parametrize(("text", "expected"), [*VALID.items(), *INVALID.items()], ids=[*VALID, *INVALID])
def test_the_grammar(text, expected):
    if isinstance(expected, Spec):
        assert parse_spec(text) == expected
        assert parse_spec(format_spec(expected)) == expected  # what the server writes reads back
    else:
        with pytest.raises(SpecError, match=expected):
            parse_spec(text)


def test_a_message_never_quotes_a_whole_oversized_spec():
    with pytest.raises(SpecError) as err:
        parse_spec("cot@" + "9" * 10_000 + "x")
    assert len(str(err.value)) < 200


def test_selection_helpers():
    assert capabilities_extra_body(["cot", "math@0.05"]) == {
        "capabilities": ["cot", {"name": "math", "strength": 0.05}]
    }
    assert capabilities_extra_body({"cot": 0.15}, seed=1) == {
        "capabilities": [{"name": "cot", "strength": 0.15}],
        "seed": 1,
    }
    assert capabilities_extra_body(["cot:all", "math@0.05:generated"]) == {
        "capabilities": [
            {"name": "cot", "positions": "all"},
            {"name": "math", "strength": 0.05, "positions": "generated"},
        ]
    }
    assert model_with_capabilities("m", ["cot@0.15", "math"]) == "m+cot@0.15+math"
    assert model_with_capabilities("m", ["cot@0.15:all", "math:prompt"]) == "m+cot@0.15:all+math:prompt"
    assert model_with_capabilities("m", {"cot": 0.15, "math": None}) == "m+cot@0.15+math"
    with pytest.raises(ValueError, match="empty positions"):
        capabilities_extra_body(["cot@1:"])


def test_importing_the_client_imports_neither_torch_nor_vllm():
    code = (
        "import sys, unlock_client, unlock_client.cli, unlock_client.spec\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'vllm', 'unlock', 'unlock_server'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

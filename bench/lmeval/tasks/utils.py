"""MATH scoring for tasks/unlock_math_fresh.yaml: the harness's own MATH normalisation and equivalence
(lm_eval.tasks.minerva_math) on the answer our prompt asks for (between <atok> and </atok>, or the last
\\boxed{} when there is no marker); math-verify on the whole text, as the harness does; and math-verify on
that asked-for answer (`math_verify_answer`). The whole-text math-verify finds a boxed or $-delimited answer
but not the bare one the `direct` prompt asks for after <atok>, so it favours outputs that box their answer
(steered ones do); the last metric is fair to both."""

from lm_eval.tasks.minerva_math.utils import (
    is_equiv,
    last_boxed_only_string,
    normalize_final_answer,
    remove_boxed,
)
from math_verify import parse, verify

MARKER = "<atok>"


def answer_of(text: str) -> str:
    if MARKER in text:
        return text.split(MARKER)[-1].split("</atok>")[0].strip()
    boxed = last_boxed_only_string(text)
    return remove_boxed(boxed) if boxed else ""


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    text, gold = results[0], parse(doc["solution"])
    answer = answer_of(text)
    exact = is_equiv(normalize_final_answer(answer), doc["answer"])
    return {
        "exact_match": int(exact),
        "math_verify": int(bool(verify(gold=gold, target=parse(text)))),
        "math_verify_answer": int(bool(answer) and bool(verify(gold=gold, target=parse(f"${answer}$")))),
    }

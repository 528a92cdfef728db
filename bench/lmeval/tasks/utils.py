"""MATH scoring for tasks/unlock_math_fresh.yaml: the harness's own MATH normalisation and equivalence
(lm_eval.tasks.minerva_math) on the answer our prompt asks for (between <atok> and </atok>, or the last
\\boxed{} when there is no marker), and math-verify on the whole text, as the harness does."""

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
    text = results[0]
    exact = is_equiv(normalize_final_answer(answer_of(text)), doc["answer"])
    return {
        "exact_match": int(exact),
        "math_verify": int(bool(verify(gold=parse(doc["solution"]), target=parse(text)))),
    }

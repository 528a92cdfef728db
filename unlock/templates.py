"""Prompt templates: the paper's two (``direct`` and ``cot``), user template files, optional chat wrapping.

Both built-ins share one structure (instruction, "Question:", the question, an "Answer:" line) and end with a
newline, so the last prompt token (where activations are read and steering applied) is the same kind of token.
The final answer goes between the markers ``<atok>`` and ``</atok>``.
"""

from __future__ import annotations

from pathlib import Path

ANSWER_OPEN, ANSWER_CLOSE = "<atok>", "</atok>"
PLACEHOLDER = "{question}"

BUILTIN_TEMPLATES = {
    "direct": (
        "Solve the problem below. End your response with the final answer written between "
        f"{ANSWER_OPEN} and {ANSWER_CLOSE}.\n\nQuestion: {PLACEHOLDER}\nAnswer:\n"
    ),
    "cot": (
        "Solve the problem below. Work through it step by step, then end your response with the final answer "
        f"written between {ANSWER_OPEN} and {ANSWER_CLOSE}.\n\nQuestion: {PLACEHOLDER}\n"
        "Answer: Let's think step by step.\n"
    ),
    "plain": PLACEHOLDER,  # the text as it is: for an alignment corpus of passages
}


def load_template(spec: str) -> str:
    """A built-in template by name, or the text of a template file that contains ``{question}``."""
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"unknown template {spec!r}: not a built-in ({', '.join(BUILTIN_TEMPLATES)}) and not a file"
        )
    text = path.read_text(encoding="utf-8")
    check_template(text, origin=str(path))
    return text


def check_template(text: str, origin: str = "template") -> None:
    if text.count(PLACEHOLDER) != 1:
        raise ValueError(
            f"{origin} must contain the placeholder {PLACEHOLDER} exactly once "
            f"(found {text.count(PLACEHOLDER)} times)"
        )


def render(template: str, question: str) -> str:
    """Fill the template; plain substitution, so other braces in the template need no escaping."""
    return template.replace(PLACEHOLDER, question)


def wrap_chat(tokenizer, prompt: str) -> str:
    """Put ``prompt`` in a user turn of the tokenizer's chat template, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"--chat-template asked for, but the tokenizer of {tokenizer.name_or_path!r} has no chat template"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def template_label(spec: str) -> str:
    """How a template is recorded in metadata: the built-in name, or ``file:<name>``."""
    return spec if spec in BUILTIN_TEMPLATES else f"file:{Path(spec).name}"

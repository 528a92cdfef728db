"""Chat with the `openai` SDK, once plain and once with a capability switched on.

Run against a server started with `.venv/bin/unlock-serve` (the embedded SmolLM2 default registers `cot`):
    .venv/bin/python clients/examples/chat_with_capabilities.py
Environment: UNLOCK_BASE_URL (default http://127.0.0.1:8000), UNLOCK_API_KEY, UNLOCK_CAPABILITY (default cot).
"""

import os

import openai
from unlock_client import capabilities_extra_body, model_with_capabilities

base_url = os.environ.get("UNLOCK_BASE_URL", "http://127.0.0.1:8000")
capability = os.environ.get("UNLOCK_CAPABILITY", "cot")
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=os.environ.get("UNLOCK_API_KEY", "none"))
model = next(m.id for m in client.models.list().data if getattr(m, "parent", None) is None)
question = "A shop sells pens at 3 dollars each. How much do 7 pens cost?"
messages = [{"role": "user", "content": question}]

plain = client.chat.completions.create(model=model, messages=messages, max_tokens=160, temperature=0)
print("plain:\n", plain.choices[0].message.content, "\n")

# Per request, in the body (extra_body); strengths are optional (default: the capability's own).
steered = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=160,
    temperature=0,
    extra_body=capabilities_extra_body({capability: 0.1}),
)
print(f"with {capability}@0.1:\n", steered.choices[0].message.content, "\n")

# Or by model name, for clients that cannot send extra fields: "<model>+cot@0.1".
by_name = client.chat.completions.create(
    model=model_with_capabilities(model, {capability: 0.1}), messages=messages, max_tokens=160, temperature=0
)
assert by_name.choices[0].message.content == steered.choices[0].message.content

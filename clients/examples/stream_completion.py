"""Stream a plain-text completion with a capability selected by model name (`<model>+cot`).

.venv/bin/python clients/examples/stream_completion.py
"""

import os

import openai

base_url = os.environ.get("UNLOCK_BASE_URL", "http://127.0.0.1:8000")
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=os.environ.get("UNLOCK_API_KEY", "none"))
model = next(m.id for m in client.models.list().data if getattr(m, "parent", None) is None)
prompt = "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?\nAnswer:\n"

stream = client.completions.create(
    model=f"{model}+cot", prompt=prompt, max_tokens=120, temperature=0, stream=True
)
for chunk in stream:
    print(chunk.choices[0].text, end="", flush=True)
print()

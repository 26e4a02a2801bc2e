"""Drive a running worker with the official `openai` Python client.

Usage: python3 openai_client.py BASE_URL MODEL
Exits non-zero (with an assertion message) on the first unexpected behaviour.
"""
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)

# Non-streaming chat, greedy: deterministic, with usage.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=16,
    temperature=0,
)
assert r.object == "chat.completion", r
assert r.choices[0].message.role == "assistant"
text = r.choices[0].message.content
assert "Paris" in text, text
assert r.choices[0].finish_reason in ("stop", "length")
assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 16
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

# Streaming chat gives the same text, and usage at the end when asked.
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=16,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
parts, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(parts) == text, ("".join(parts), text)
assert finish == r.choices[0].finish_reason
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens

# Text completion, length-limited.
c = client.completions.create(model=model, prompt="The capital of Germany is", max_tokens=5, temperature=0)
assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 5, c
assert "Berlin" in c.choices[0].text, c.choices[0].text

# Models.
ids = [m.id for m in client.models.list().data]
assert ids == [model], ids

# Errors surface as the SDK's typed exceptions with our reason codes.
def expect(code, status, **kwargs):
    try:
        client.chat.completions.create(model=kwargs.pop("model", model), **kwargs)
    except openai.APIStatusError as e:
        assert e.status_code == status, (e.status_code, e.body)
        assert e.body["code"] == code, e.body
        return
    raise AssertionError(f"expected {code}")

msgs = [{"role": "user", "content": "hi"}]
expect("model_not_found", 400, model="gpt-4", messages=msgs)
expect("invalid_sampling_params", 400, messages=msgs, temperature=5)
expect("invalid_sampling_params", 400, messages=msgs, top_p=1.5)
expect("invalid_sampling_params", 400, messages=msgs, max_tokens=0)
expect("context_length_exceeded", 400, messages=[{"role": "user", "content": "word " * 5000}])
expect("unsupported_parameter", 400, messages=msgs, n=2)
print("openai client: all checks passed")

"""The official `openai` package against the gateway: a whole answer, a stream, the
model list and a refusal. Prints one JSON summary line. Used by gateway/tests/e2e.rs."""
import json
import sys

import openai

url, token_file, model = sys.argv[1], sys.argv[2], sys.argv[3]
token = open(token_file).read().strip()
client = openai.OpenAI(base_url=url, api_key=token, max_retries=0, timeout=60)

raw = client.chat.completions.with_raw_response.create(
    model=model,
    messages=[{"role": "user", "content": "Nenne drei Flüsse in Deutschland."}],
    max_tokens=12,
    temperature=0,
    extra_headers={"x-data-classification": "restricted"},
)
resp = raw.parse()
stream_text = ""
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Hallo!"}],
    max_tokens=8,
    stream=True,
    extra_headers={"x-data-classification": "internal"},
):
    if chunk.choices and chunk.choices[0].delta.content:
        stream_text += chunk.choices[0].delta.content

denied_status, denied_code = None, None
try:
    openai.OpenAI(
        base_url=url, api_key=token, max_retries=0,
        default_headers={"x-data-classification": "top-secret"},
    ).chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
except openai.BadRequestError:
    pass
low = open(token_file.replace("de-bmi", "de-bmbf")).read().strip()
try:
    openai.OpenAI(base_url=url, api_key=low, max_retries=0).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "x"}],
        extra_headers={"x-data-classification": "restricted"},
    )
except openai.PermissionDeniedError as e:
    denied_status, denied_code = e.status_code, e.body.get("code") if isinstance(e.body, dict) else None

print(json.dumps({
    "pool": raw.headers.get("x-residency-pool"),
    "country": raw.headers.get("x-residency-country"),
    "text": resp.choices[0].message.content,
    "stream_text": stream_text,
    "models": [m.id for m in client.models.list()],
    "denied_status": denied_status,
    "denied_code": denied_code,
}))

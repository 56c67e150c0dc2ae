"""End-to-end checks with the official `openai` Python client against a running prefix-rft.

Usage: python openai_client.py BASE_URL   (e.g. http://127.0.0.1:PORT/v1)
Exits non-zero on the first failed check; prints one line per check.
"""
import sys

import openai
from openai import OpenAI

MODEL = "smollm2-135m-instruct"
BASE = sys.argv[1]
client = OpenAI(base_url=BASE, api_key="sk-acme-demo", max_retries=0)


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name}")


def expect_error(name, exc_type, status, fn, code=None):
    try:
        fn()
    except exc_type as e:
        check(name, e.status_code == status, f"status {e.status_code}")
        if code is not None:
            check(name + " code", e.code == code, f"code {e.code!r}")
        return
    check(name, False, "no error raised")


models = client.models.list()
check("models list has the base model", models.data[0].id == MODEL, models)

msgs = [{"role": "user", "content": "What is the capital of France?"}]
chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
text = chat.choices[0].message.content
check("chat returns text", bool(text) and chat.choices[0].finish_reason in ("stop", "length"), chat)
check("chat names the version", chat.system_fingerprint == "base", chat.system_fingerprint)
check("chat usage adds up", chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens)

raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, max_tokens=1, temperature=0)
check("x-adapter-version header", raw.headers.get("x-adapter-version") == "base", dict(raw.headers))

stream = client.chat.completions.create(
    model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
)
chunks = list(stream)
check("stream starts with the role", chunks[0].choices[0].delta.role == "assistant", chunks[0])
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("stream text equals the non-stream text", streamed == text, (streamed, text))
check("stream ends with usage", chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1, chunks[-1])

score = client.completions.create(model=MODEL, prompt="The sky is blue.", max_tokens=0, echo=True, logprobs=0)
lp = score.choices[0].logprobs
check("echo scoring returns the prompt", score.choices[0].text == "The sky is blue.", score.choices[0].text)
check("first prompt token has no logprob", lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:]), lp)
check("legacy logprobs shape", len(lp.tokens) == len(lp.text_offset) == len(lp.top_logprobs) == score.usage.prompt_tokens)

two = client.completions.create(model=MODEL, prompt="Roses are", max_tokens=4, n=2, seed=5)
check("n=2 returns two choices", sorted(c.index for c in two.choices) == [0, 1], two)

many = client.completions.create(model=MODEL, prompt=["Roses are", "The sky is"], max_tokens=4, n=2, temperature=0)
check("a list of prompts gives n choices per prompt, in order", [c.index for c in many.choices] == [0, 1, 2, 3], many)
alone = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0)
check("each prompt's choices answer that prompt", many.choices[2].text == alone.choices[0].text, (many, alone))

a = client.completions.create(model=MODEL, prompt="I like", max_tokens=6, temperature=1.0, seed=99)
b = client.completions.create(model=MODEL, prompt="I like", max_tokens=6, temperature=1.0, seed=99)
check("seed reproduces", a.choices[0].text == b.choices[0].text, (a.choices[0].text, b.choices[0].text))

full = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0).choices[0].text
stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=["7"])
check("stop string", stopped.choices[0].text == full.split("7")[0] and (("7" not in full) or stopped.choices[0].finish_reason == "stop"), (full, stopped))

bad_key = OpenAI(base_url=BASE, api_key="sk-wrong", max_retries=0)
expect_error("wrong key", openai.AuthenticationError, 401, lambda: bad_key.models.list())
expect_error("unknown model", openai.NotFoundError, 404,
             lambda: client.chat.completions.create(model="nope", messages=msgs, max_tokens=1), "model_not_found")
expect_error("empty messages", openai.BadRequestError, 400,
             lambda: client.chat.completions.create(model=MODEL, messages=[], max_tokens=1))
expect_error("temperature out of range", openai.BadRequestError, 400,
             lambda: client.chat.completions.create(model=MODEL, messages=msgs, temperature=5))
expect_error("prompt over the context", openai.BadRequestError, 400,
             lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * 9000}],
                                                    max_tokens=1, stream=True), "context_length_exceeded")
print("all checks passed")

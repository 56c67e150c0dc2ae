"""Produce engine/tests/fixtures/chat_template_hf.json.

The chat template stored in the GGUF, rendered by HF transformers' `apply_chat_template`
(jinja2, trim_blocks/lstrip_blocks) for a few small conversations, plus the token ids of each
rendered prompt (add_special_tokens=False). The engine's minijinja rendering and tokenizer must
reproduce both exactly.

Run with the oracle venv:  HF_HUB_OFFLINE=1 /work/oracle/venv/bin/python scripts/oracle/chat_template_hf.py
"""
import datetime
import hashlib
import json
import os
import sys
from pathlib import Path

import transformers
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = Path(os.environ.get("ORACLE_MODEL", REPO / "models" / MODEL_NAME))
OUT = REPO / "engine" / "tests" / "fixtures" / "chat_template_hf.json"

CONVERSATIONS = [
    # Two turns, no system message: the template inserts its default system prompt.
    ([{"role": "user", "content": "What is the capital of France?"},
      {"role": "assistant", "content": "The capital of France is Paris."},
      {"role": "user", "content": "And of Germany?"}], True),
    ([{"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello! How can I help?"}], False),
    # Own system message, multi-line and non-ASCII content.
    ([{"role": "system", "content": "You are terse."},
      {"role": "user", "content": "Translate «Grüße» to English.\nOne word."}], True),
    ([{"role": "user", "content": "  leading and trailing spaces  "}], True),
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    tok = AutoTokenizer.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name)
    cases = []
    for messages, add_generation_prompt in CONVERSATIONS:
        rendered = tok.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
        cases.append({
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "rendered": rendered,
            "ids": tok.encode(rendered, add_special_tokens=False),
        })
    fixture = {
        "meta": {
            "reference": "transformers apply_chat_template (GGUF tokenizer.chat_template)",
            "reference_version": transformers.__version__,
            "model_file": MODEL_NAME,
            "model_sha256": sha256(MODEL),
            "script": "scripts/oracle/" + Path(__file__).name,
            "date": datetime.date.today().isoformat(),
            "python": sys.version.split()[0],
        },
        "template": tok.chat_template,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {OUT.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Produce engine/tests/fixtures/tokenizer_llamacpp.json.

A second reference for the GGUF tokenizer: llama.cpp (through llama-cpp-python, vocab only)
tokenizing the same strings as tokenizer_hf.json (special tokens parsed, no BOS). Where
transformers' GGUF loader and llama.cpp disagree, the engine follows llama.cpp, which applies
the file's `tokenizer.ggml.pre` as the model's own tokenizer.json does (transformers ignores
`pre = smollm` and so skips SmolLM2's individual-digits split).

Run with the oracle venv after tokenizer_hf.py:
    /work/oracle/venv/bin/python scripts/oracle/tokenizer_llamacpp.py
"""
import datetime
import hashlib
import json
import os
import sys
from pathlib import Path

import llama_cpp

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = Path(os.environ.get("ORACLE_MODEL", REPO / "models" / MODEL_NAME))
FIXTURES = REPO / "engine" / "tests" / "fixtures"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    with open(FIXTURES / "tokenizer_hf.json", encoding="utf-8") as f:
        texts = [case["text"] for case in json.load(f)["cases"]]
    model = llama_cpp.Llama(str(MODEL), vocab_only=True, verbose=False)
    cases = [
        {"text": text, "ids": model.tokenize(text.encode("utf-8"), add_bos=False, special=True)}
        for text in texts
    ]
    fixture = {
        "meta": {
            "reference": "llama.cpp tokenizer (llama-cpp-python, vocab_only)",
            "reference_version": llama_cpp.__version__,
            "model_file": MODEL_NAME,
            "model_sha256": sha256(MODEL),
            "script": "scripts/oracle/" + Path(__file__).name,
            "date": datetime.date.today().isoformat(),
            "python": sys.version.split()[0],
            "add_bos": False,
            "parse_special": True,
            "count": len(cases),
        },
        "cases": cases,
    }
    with open(FIXTURES / "tokenizer_llamacpp.json", "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print("wrote engine/tests/fixtures/tokenizer_llamacpp.json", file=sys.stderr)


if __name__ == "__main__":
    main()

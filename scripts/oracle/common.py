"""Shared helpers for the reference oracles: model path, sha256, fixture `meta`, JSON writing.

The oracles are dev-time only: they turn references that nobody on this project
wrote (HF transformers, PEFT, llama.cpp) into small JSON fixtures the Rust tests read.
"""
import datetime
import hashlib
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = Path(os.environ.get("ORACLE_MODEL", REPO / "models" / MODEL_NAME))
FIXTURES = REPO / "engine" / "tests" / "fixtures"
PEFT_FIXTURES = REPO / "adapters" / "tests" / "fixtures" / "peft"
THREADS = 2
EOS_IDS = (2,)  # <|im_end|> is id 2 in this GGUF (also its eos)


def sha256(path=MODEL):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def meta(reference, version, script, **extra):
    m = {
        "reference": reference,
        "reference_version": version,
        "model_file": MODEL_NAME,
        "model_sha256": sha256(),
        "script": "scripts/oracle/" + Path(script).name,
        "date": datetime.date.today().isoformat(),
        "threads": THREADS,
        "python": sys.version.split()[0],
    }
    m.update(extra)
    return m


def write_fixture(name, obj, fixtures=FIXTURES):
    fixtures.mkdir(parents=True, exist_ok=True)
    path = fixtures / name
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {path.relative_to(REPO)}", file=sys.stderr)


def read_fixture(name, fixtures=FIXTURES):
    with open(fixtures / name, encoding="utf-8") as f:
        return json.load(f)


def hf_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name)


def hf_trainable_model():
    """The GGUF base through transformers (dequantised to float32), made acceptable to a
    `transformers.Trainer` (TRL's trainers): transformers still tags a GGUF model as quantized
    after dequantising it, and its Trainer refuses to train a quantized model, although the
    weights are plain floats."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name,
                                                 dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.is_quantized = False
    except AttributeError:
        pass
    return model


def log_softmax64(logits):
    """Row-wise log-softmax in float64 (numpy array [n, vocab])."""
    import numpy as np
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def score(logp, tokens, top5=False):
    """Fields of a logprobs fixture entry from a [n, vocab] float64 log-prob matrix."""
    import numpy as np
    n = len(tokens)
    out = {
        "logprobs": [round(float(logp[i, tokens[i + 1]]), 6) for i in range(n - 1)],
        "top1": [int(np.argmax(logp[i])) for i in range(n - 1)],
    }
    if top5:
        ids = [np.argsort(-logp[i], kind="stable")[:5] for i in range(n - 1)]
        out["top5"] = [
            {"ids": [int(j) for j in row], "logprobs": [round(float(logp[i, j]), 6) for j in row]}
            for i, row in enumerate(ids)
        ]
    return out

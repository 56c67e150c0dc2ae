#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs to fuzz/seeds/<target>/ (stdlib only, deterministic).

gguf_metadata: small llama GGUF images with a BPE tokenizer and a chat template in their
metadata. adapter_files: PEFT LoRA and prefix-tuning files shaped for the engine's TinySpec
(hidden 64, 2 layers, 4 heads, 2 KV heads), as `adapter_config.json`, 0xFF, safetensors.
request_json: request bodies of the two OpenAI endpoints. chat_template takes structured
(arbitrary) input and starts from nothing.
"""

import json
import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------- GGUF

T_U32, T_F32, T_STRING, T_ARRAY, T_U64, T_I32 = 4, 6, 8, 9, 10, 5


def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(ty, v):
    if ty == T_U32:
        return struct.pack("<I", v)
    if ty == T_I32:
        return struct.pack("<i", v)
    if ty == T_F32:
        return struct.pack("<f", v)
    if ty == T_U64:
        return struct.pack("<Q", v)
    if ty == T_STRING:
        return gguf_str(v)
    if ty == T_ARRAY:
        inner, items = v
        return struct.pack("<IQ", inner, len(items)) + b"".join(gguf_value(inner, x) for x in items)
    raise ValueError(ty)


def gguf(metadata, tensors):
    """metadata: [(key, type, value)]; tensors: [(name, dims, f32 values)]."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, ty, v in metadata:
        out += gguf_str(key) + struct.pack("<I", ty) + gguf_value(ty, v)
    offset, blobs = 0, []
    for name, dims, values in tensors:
        out += gguf_str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", 0, offset)
        blob = struct.pack(f"<{len(values)}f", *values)
        blob += b"\0" * (-len(blob) % 32)
        blobs.append(blob)
        offset += len(blob)
    out += b"\0" * (-len(out) % 32)
    return out + b"".join(blobs)


def tiny_gguf(with_template):
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [chr(c) for c in range(33, 127)] + ["Ġ", "he", "ll", "Ġt"]
    merges = ["h e", "l l", "Ġ t"]
    meta = [
        ("general.architecture", T_STRING, "llama"),
        ("llama.context_length", T_U32, 256),
        ("llama.embedding_length", T_U32, 64),
        ("llama.feed_forward_length", T_U32, 128),
        ("llama.block_count", T_U32, 2),
        ("llama.attention.head_count", T_U32, 4),
        ("llama.attention.head_count_kv", T_U32, 2),
        ("llama.rope.freq_base", T_F32, 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", T_F32, 1e-5),
        ("tokenizer.ggml.model", T_STRING, "gpt2"),
        ("tokenizer.ggml.pre", T_STRING, "smollm"),
        ("tokenizer.ggml.tokens", T_ARRAY, (T_STRING, tokens)),
        ("tokenizer.ggml.token_type", T_ARRAY, (T_I32, [3, 3, 3] + [1] * (len(tokens) - 3))),
        ("tokenizer.ggml.merges", T_ARRAY, (T_STRING, merges)),
        ("tokenizer.ggml.bos_token_id", T_U32, 1),
        ("tokenizer.ggml.eos_token_id", T_U32, 2),
    ]
    if with_template:
        meta.append(("tokenizer.chat_template", T_STRING,
                     "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                     "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"))
    rng = random.Random(1)
    tensors = [("token_embd.weight", [64, len(tokens)], [rng.uniform(-1, 1) for _ in range(64 * len(tokens))]),
               ("output_norm.weight", [64], [1.0] * 64)]
    return gguf(meta, tensors)

# ---------------------------------------------------------------- PEFT


def safetensors(tensors):
    header, data = {}, b""
    for name, shape, values in tensors:
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


HIDDEN, INTER, LAYERS, KV = 64, 128, 2, 32
DIMS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
        "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}


def lora(rank, modules, rslora=False):
    rng = random.Random(rank)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "use_rslora": rslora,
              "target_modules": modules, "base_model_name_or_path": "tiny"}
    tensors = []
    for layer in range(LAYERS):
        for m in modules:
            part = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            i, o = DIMS[m]
            base = f"base_model.model.model.layers.{layer}.{part}.{m}"
            tensors.append((f"{base}.lora_A.weight", [rank, i], [rng.uniform(-0.1, 0.1) for _ in range(rank * i)]))
            tensors.append((f"{base}.lora_B.weight", [o, rank], [rng.uniform(-0.1, 0.1) for _ in range(o * rank)]))
    return json.dumps(config).encode() + b"\xff" + safetensors(tensors)


def prefix(n):
    rng = random.Random(n)
    config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": n, "base_model_name_or_path": "tiny"}
    width = LAYERS * 2 * KV
    t = [("prompt_embeddings", [n, width], [rng.uniform(-1, 1) for _ in range(n * width)])]
    return json.dumps(config).encode() + b"\xff" + safetensors(t)


def main():
    seeds = {
        "gguf_metadata": {"tiny_with_template.gguf": tiny_gguf(True), "tiny.gguf": tiny_gguf(False)},
        "adapter_files": {"lora_r2_qv": lora(2, ["q_proj", "v_proj"]),
                          "lora_r1_all_rslora": lora(1, list(DIMS), rslora=True),
                          "prefix_2": prefix(2)},
        "request_json": {
            "chat": json.dumps({"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "Hi"}],
                                "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "seed": 1, "stop": ["\n"],
                                "logprobs": True, "top_logprobs": 2, "n": 2, "stream": True,
                                "stream_options": {"include_usage": True}}).encode(),
            "chat_parts": json.dumps({"model": "m", "max_completion_tokens": 4, "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                "frequency_penalty": 0.5, "presence_penalty": -0.5, "logit_bias": {"5": 1}}).encode(),
            "completion": json.dumps({"model": "m", "prompt": ["a", "b"], "max_tokens": 0, "echo": True,
                                      "logprobs": 1, "suffix": "", "stop": "x", "top_k": 5, "min_p": 0.1,
                                      "repetition_penalty": 1.1}).encode(),
        },
    }
    for target, files in seeds.items():
        d = os.path.join(HERE, "seeds", target)
        os.makedirs(d, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        print(f"{target}: {len(files)} seeds")


if __name__ == "__main__":
    main()

"""Produce adapters/tests/fixtures/peft/: four PEFT adapters and logprobs.json.

Reference for the adapter runtime: adapters made with Python PEFT (`get_peft_model` on HF
`transformers` running the GGUF dequantised to float32), their weights overwritten with seeded
normal values (PEFT starts LoRA B at zero, which would change nothing), saved with
`save_pretrained` (float32 safetensors; the README.md it writes is deleted):
  lora_r4_qv         LoRA r=4, alpha=8, q_proj v_proj
  lora_r8_rslora_ko  LoRA r=8, alpha=16, use_rslora, k_proj o_proj
  lora_r2_all        LoRA r=2, alpha=4, q k v o gate up down
  prefix_8           prefix tuning, 8 virtual tokens, no projection
All have task_type CAUSAL_LM, dropout 0; base_model_name_or_path is set to the upstream model id
rather than the local folder. logprobs.json holds, for the first COUNT texts of texts.py:
`tokens` (no BOS, as logprobs_hf.py), and for "base" and each adapter under "adapters",
`logprobs[i]` = log p(tokens[i+1] | tokens[..=i]) and `top1[i]` = argmax id at position i.
The base numbers equal logprobs_hf.json (checked here).

`peft_adapters.py --check ADAPTER_DIR NAME` loads ADAPTER_DIR with PeftModel.from_pretrained
(e.g. an adapter our Rust code exported), requires its safetensors keys to be exactly PEFT's,
prints max/mean |log-prob diff| against fixture entry NAME, exits 1 if mean > MAX_MEAN_DIFF.
PEFT also loads a minimal adapter_config.json ({"peft_type": "LORA", "r", "lora_alpha",
"use_rslora", "target_modules", "task_type": "CAUSAL_LM"} or {"peft_type": "PREFIX_TUNING",
"num_virtual_tokens", "task_type": "CAUSAL_LM"}): the rest defaults or, for the prefix sizes,
comes from the base model (checked by hand with --check on such copies of the fixtures).

Semantics (PEFT 0.21.2, transformers 5.25, Llama with GQA: L=30 layers, 9 query heads,
nkv=3 key/value heads, hd=64). Each point is re-derived by `manual_logprobs` below, an
independent float64 forward that reads the saved files, agreeing with PEFT to ~5e-5 while each
listed wrong variant is off by > 1e-2 (run prints both):

LoRA. Keys `base_model.model.model.layers.{l}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight` and
`base_model.model.model.layers.{l}.mlp.{gate,up,down}_proj.lora_{A,B}.weight` (no adapter name in
the key), A [r, in_features], B [out_features, r]; safetensors metadata {"format": "pt"}.
W' = W + s * B @ A with s = lora_alpha / r, or lora_alpha / sqrt(r) when use_rslora. Rows are
in Hugging Face order (q/k rows NOT in GGUF's rotary permutation). adapter_config.json fields
that matter: peft_type "LORA", r, lora_alpha, use_rslora, target_modules (a list in no
particular order; PEFT keeps a set), bias "none", fan_in_fan_out false, use_dora false,
rank_pattern {}, alpha_pattern {}, layers_to_transform null, task_type "CAUSAL_LM",
inference_mode true; save_pretrained writes ~40 more, mostly null.

Prefix tuning. One key `prompt_embeddings`, [num_virtual_tokens, L*2*nkv*hd] = [8, 11520]
(the embedding itself: with prefix_projection false nothing transforms it). Config: peft_type
"PREFIX_TUNING", num_virtual_tokens 8, num_layers 30, token_dim 192 and num_attention_heads 3
(GQA: PEFT sizes the prefix by the key/value heads, token_dim = nkv*hd, not hidden_size),
encoder_hidden_size 192, prefix_projection false, num_transformer_submodules 1.
Row t is virtual token t. Column ((l*2 + c)*nkv + h)*hd + d holds layer l, c=0 key / c=1 value,
key/value head h, dim d: layer l's keys are columns [2l*192, 2l*192+192), its values the next
192 columns, each block head-major (PEFT: view [nvt, 2L, nkv, hd], permute to [2L, nkv, nvt, hd],
split in pairs (key, value) per layer). These are put into the KV cache as they are: virtual
keys are NOT rotated by RoPE (they act as already-rotated keys) and values are used unchanged.
Real tokens get positions num_virtual_tokens + i (transformers takes position_ids from the
cache length), so their q and k are rotated at 8, 9, ...; every real token attends to all 8
virtual tokens plus the real tokens up to itself (query head j uses key/value head j // 3),
one softmax over both, scaled by 1/sqrt(hd). An all-zero prefix already moves the log-probs by
~0.95 nats on these texts (8 extra zero-score keys dilute attention), so prefix_8's shift is ~1.
"""
import copy
import json
import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

from common import (MODEL, PEFT_FIXTURES, REPO, THREADS, hf_tokenizer, log_softmax64, meta,
                    read_fixture, score, write_fixture)
from texts import TEXTS

COUNT = 8  # first texts of texts.py scored (the fixture stays small)
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # base_model_name_or_path written (not a local path)
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: (seed, std of the normal values written over every trainable tensor, config kwargs)
ADAPTERS = {
    "lora_r4_qv": (1, 0.05, dict(kind="lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "lora_r8_rslora_ko": (2, 0.03, dict(kind="lora", r=8, lora_alpha=16, use_rslora=True,
                                        target_modules=["k_proj", "o_proj"])),
    "lora_r2_all": (3, 0.05, dict(kind="lora", r=2, lora_alpha=4, target_modules=SEVEN)),
    "prefix_8": (4, 0.2, dict(kind="prefix", num_virtual_tokens=8)),
}
MAX_MEAN_DIFF = 1e-4  # --check: mean |logprob diff| allowed against the fixture


def peft_config(kind, **kw):
    from peft import LoraConfig, PrefixTuningConfig
    if kind == "lora":
        return LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **kw)
    return PrefixTuningConfig(task_type="CAUSAL_LM", **kw)


def base_model():
    torch.set_num_threads(THREADS)
    return AutoModelForCausalLM.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name,
                                                dtype=torch.float32).eval()


def logprobs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return log_softmax64(logits.numpy())


def make_adapter(base, name):
    """A PeftModel on a copy of `base` with seeded non-zero weights, saved to PEFT_FIXTURES/name."""
    from peft import get_peft_model
    seed, std, kw = ADAPTERS[name]
    model = get_peft_model(copy.deepcopy(base), peft_config(**kw)).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.requires_grad:  # lora_A / lora_B, or prompt_encoder.default.embedding.weight
                p.normal_(0.0, std)
    cfg = model.peft_config["default"]
    cfg.base_model_name_or_path = BASE_NAME
    if kw["kind"] == "lora":  # PEFT keeps a set, which would be saved in hash order
        cfg.target_modules = list(kw["target_modules"])
    out = PEFT_FIXTURES / name
    model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    files = sorted(f.name for f in out.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"], files
    print(f"wrote {out.relative_to(REPO)}", file=sys.stderr)
    return model


# ---- independent re-implementation (no PEFT, float64) used to pin down the semantics ----

def manual_logprobs(base, ids, tensors=None, config=None, rotate_prefix=False, prefix_pos0=False,
                    prefix_layout="l2hnd", rslora_scale=True):
    """Llama forward from the base state dict, with the adapter applied by hand from the saved
    safetensors `tensors` and `config` (adapter_config.json). The keyword switches select wrong
    variants of the prefix/LoRA semantics, to show that they do NOT match PEFT."""
    c = base.config
    sd = {k: v.detach().double() for k, v in base.state_dict().items()}
    nh, nkv, hd, L = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_hidden_layers
    theta = c.rope_parameters["rope_theta"]
    if config and config["peft_type"] == "LORA":
        r, alpha = config["r"], config["lora_alpha"]
        scale = alpha / (r ** 0.5) if (config["use_rslora"] and rslora_scale) else alpha / r
        for key, a in tensors.items():
            if ".lora_A.weight" not in key:
                continue
            mod = key[len("base_model.model."):-len(".lora_A.weight")]
            b = tensors[key.replace(".lora_A.", ".lora_B.")].double()
            sd[mod + ".weight"] = sd[mod + ".weight"] + scale * b @ a.double()
    nvt = 0
    if config and config["peft_type"] == "PREFIX_TUNING":
        emb = tensors["prompt_embeddings"].double()  # [nvt, L*2*nkv*hd]
        nvt = emb.shape[0]
        # layer l: key = columns [2l*nkv*hd, (2l+1)*nkv*hd), value = the next block; head-major
        kv = emb.view(nvt, L, 2, nkv, hd).permute(1, 2, 3, 0, 4)  # [L, 2, nkv, nvt, hd]
        if prefix_layout == "lv_k":  # wrong: value block first
            kv = kv.flip(1)
        elif prefix_layout == "2lhd":  # wrong: all keys of every layer, then all values
            kv = emb.view(nvt, 2, L, nkv, hd).permute(2, 1, 3, 0, 4)
        elif prefix_layout == "l2dh":  # wrong: dim-major inside a block
            kv = emb.view(nvt, L, 2, hd, nkv).permute(1, 2, 4, 0, 3)

    def rope(x, pos):  # x [heads, n, hd]; Hugging Face rotate-half convention
        inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = pos[:, None].double() * inv[None]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        rot = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos + rot * sin

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps) * w

    n = len(ids)
    pos = torch.arange(n) + (0 if prefix_pos0 else nvt)
    x = sd["model.embed_tokens.weight"][torch.tensor(ids)]
    # query i sees every virtual token and real tokens j <= i
    mask = torch.ones(n, nvt + n, dtype=torch.bool)
    mask[:, nvt:] = torch.tril(torch.ones(n, n, dtype=torch.bool))
    for l in range(L):
        p = f"model.layers.{l}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(n, nh, hd).transpose(0, 1)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(n, nkv, hd).transpose(0, 1)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(n, nkv, hd).transpose(0, 1)
        q, k = rope(q, pos), rope(k, pos)
        if nvt:
            pk, pv = kv[l, 0], kv[l, 1]
            if rotate_prefix:
                pk = rope(pk, torch.arange(nvt))
            k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        s = (q @ k.transpose(1, 2)) / hd ** 0.5
        a = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v
        x = x + a.transpose(0, 1).reshape(n, nh * hd) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        g = h @ sd[p + "mlp.gate_proj.weight"].T
        u = h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ sd[p + "mlp.down_proj.weight"].T
    logits = rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T
    return log_softmax64(logits.numpy())


def token_diffs(logp, ids, ref_logprobs):
    return np.abs(np.array([logp[i, ids[i + 1]] for i in range(len(ids) - 1)]) - np.array(ref_logprobs))


def verify_semantics(base, name, entries):
    """Re-derive the adapter's log-probs by hand from its saved files; wrong variants must differ."""
    from safetensors.torch import load_file
    d = PEFT_FIXTURES / name
    tensors = load_file(str(d / "adapter_model.safetensors"))
    config = json.loads((d / "adapter_config.json").read_text())
    variants = {"as documented": {}}
    if config["peft_type"] == "PREFIX_TUNING":
        variants.update({"prefix keys rotated": dict(rotate_prefix=True),
                         "real tokens at positions 0..": dict(prefix_pos0=True),
                         "value block before key block": dict(prefix_layout="lv_k"),
                         "all keys, then all values": dict(prefix_layout="2lhd"),
                         "head index fastest in a block": dict(prefix_layout="l2dh")})
    elif config["use_rslora"]:
        variants["alpha/r scaling"] = dict(rslora_scale=False)
    for label, kw in variants.items():
        diffs = np.concatenate([
            token_diffs(manual_logprobs(base, e["tokens"], tensors, config, **kw), e["tokens"],
                        e["adapters"][name]["logprobs"])
            for e in entries[:3]])
        print(f"  manual f64 re-implementation, {label}: max |diff| {diffs.max():.2e}", file=sys.stderr)
        if label == "as documented":
            assert diffs.max() < 1e-3, (name, label, diffs.max())
        else:
            assert diffs.max() > 1e-2, (name, label, diffs.max())


def check(base, adapter_dir, name, entries):
    """Load `adapter_dir` with PeftModel.from_pretrained and compare with fixture entry `name`.
    Returns True if the keys are exactly PEFT's and mean |logprob diff| <= MAX_MEAN_DIFF."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
    ok = True
    got = set(load_file(str(adapter_dir / "adapter_model.safetensors")).keys())
    want = set(get_peft_model_state_dict(model, save_embedding_layers=False).keys())
    if got != want:
        ok = False
        print(f"  keys: {len(got - want)} unexpected (e.g. {sorted(got - want)[:3]}), "
              f"{len(want - got)} missing (e.g. {sorted(want - got)[:3]})", file=sys.stderr)
    diffs, top1_mismatch = [], 0
    for e in entries:
        ids, ref = e["tokens"], e["adapters"][name]
        logp = logprobs(model, ids)
        diffs.append(token_diffs(logp, ids, ref["logprobs"]))
        top1_mismatch += sum(int(np.argmax(logp[i])) != t for i, t in enumerate(ref["top1"]))
    diffs = np.concatenate(diffs)
    print(f"  {adapter_dir} vs fixture '{name}': max |diff| {diffs.max():.2e}, mean |diff| "
          f"{diffs.mean():.2e}, top1 mismatches {top1_mismatch}/{len(diffs)}", file=sys.stderr)
    return ok and diffs.mean() <= MAX_MEAN_DIFF


def generate():
    import peft
    base = base_model()
    tok = hf_tokenizer()
    hf = read_fixture("logprobs_hf.json")["texts"]
    entries = []
    for k, text in enumerate(TEXTS[:COUNT]):
        ids = tok.encode(text, add_special_tokens=False)
        entry = {"text": text, "tokens": ids, "base": score(logprobs(base, ids), ids), "adapters": {}}
        assert hf[k]["tokens"] == ids
        entries.append(entry)
    d = max(float(np.abs(np.array(e["base"]["logprobs"]) - np.array(h["logprobs"])).max())
            for e, h in zip(entries, hf))
    print(f"base vs logprobs_hf.json: max |diff| {d:.2e}", file=sys.stderr)
    assert d < 1e-4, d

    summary = {}
    for name, (seed, std, kw) in ADAPTERS.items():
        model = make_adapter(base, name)
        shifts = []
        for e in entries:
            ids = e["tokens"]
            s = score(logprobs(model, ids), ids)
            e["adapters"][name] = s
            shifts.append(np.abs(np.array(s["logprobs"]) - np.array(e["base"]["logprobs"])))
        shift = float(np.concatenate(shifts).mean())
        print(f"{name}: mean |log-prob shift| vs base {shift:.3f} nats", file=sys.stderr)
        # an all-zero 8-token prefix alone already shifts ~0.95 nats (it dilutes attention),
        # so prefix_8 sits just above 1.0; its std is the one where seed-to-seed differences are large
        assert 0.05 <= shift <= 1.1, (name, shift)
        summary[name] = {"seed": seed, "init_std": std, "mean_abs_shift": round(shift, 4)}
        del model

    for name in ADAPTERS:
        print(f"{name}:", file=sys.stderr)
        verify_semantics(base, name, entries)
        assert check(base, PEFT_FIXTURES / name, name, entries), name

    write_fixture("logprobs.json", {
        "meta": meta(f"peft {peft.__version__} on transformers (GGUF dequantised to float32)",
                     peft.__version__, __file__, transformers_version=transformers.__version__,
                     torch_version=torch.__version__, dtype="float32", add_bos=False,
                     count=len(entries), adapters=summary),
        "texts": entries,
    }, PEFT_FIXTURES)


def main():
    args = sys.argv[1:]
    if not args:
        return generate()
    if len(args) != 3 or args[0] != "--check":
        sys.exit("usage: peft_adapters.py [--check ADAPTER_DIR FIXTURE_ADAPTER_NAME]")
    from pathlib import Path
    entries = read_fixture("logprobs.json", PEFT_FIXTURES)["texts"]
    if args[2] not in entries[0]["adapters"]:
        sys.exit(f"no adapter '{args[2]}' in the fixture (have: {', '.join(entries[0]['adapters'])})")
    ok = check(base_model(), Path(args[1]), args[2], entries)
    print("OK" if ok else "FAIL", file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

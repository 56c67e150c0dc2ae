"""Produce plugins/trainer/tests/fixtures/trl_dpo/: one DPO batch scored by TRL's DPOTrainer.

Reference for the trainer's DPO objective and its gradients: TRL's `DPOTrainer` with a PEFT
LoRA on HF `transformers` running the GGUF dequantised to float32, on CPU, in float32.

  adapter/       the initial adapter (PEFT `save_pretrained`, float32): LoRA r=2, lora_alpha=4
                 (scale 2) on q_proj k_proj v_proj up_proj down_proj of every layer, A and B
                 both seeded normal values of std INIT_STD (PEFT would start B at zero, where
                 policy = reference and the loss is exactly ln 2). Five modules rather than
                 seven keep the file under 2 MB; they cover the fused q/k/v split (q and k in
                 Hugging Face row order, k and v with GQA) and both halves of the MLP (up from
                 the fused gate/up, down from the 1536-wide side).
  fixture.json   the batch and what TRL computed on it.

The trainer is built the way a first version trains: `DPOTrainer(model, peft_config=...)` on
the bare base, so TRL's reference is the same model with the adapter disabled (the base), not
a copy of the adapter. DPOConfig defaults otherwise: loss_type ["sigmoid"], beta 0.1, no label
smoothing, no WPO weighting, no LD-DPO alpha, reference log-probs not precomputed. The initial
LoRA values are written into TRL's own PeftModel after construction.

The batch: PAIRS (plain text, not conversational) go through TRL's own dataset preparation
(its tokenisation, EOS appended to both completions, prompt/completion split), and the
resulting `prompt_ids`, `chosen_ids`, `rejected_ids` are written to the fixture, so the Rust
test reads token ids and tokenisation cannot differ. The batch is TRL's
`DataCollatorForPreference` over those rows, and `loss` is `trainer.compute_loss` (TRL's
`_compute_loss`: one forward of [chosen; rejected] with its fused LM head, the reference
forward under `use_adapter(model, None)`, `-logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()`),
then `loss.backward()` gives the gradients of every LoRA A and B.

`_compute_loss` returns only the loss (the per-pair log-probabilities are logged as batch
means), so the per-pair numbers come from the same calls it makes: the policy sums from the
model's fused-head forward on the same batch (the three lines `_compute_loss` runs) and the
reference sums from TRL's `compute_ref_log_probs`. Checked here: recomputing the loss from
them gives TRL's loss, their means equal the `logps/chosen`, `logps/rejected`,
`rewards/chosen`, `rewards/rejected` TRL logged, and plain `log_softmax` of full logits gives
the same sums (so the fused head is not what is being compared).

fixture.json (all sums over completion tokens only, float64 printed from float32 results):
  pairs[i]              prompt_ids, chosen_ids, rejected_ids, and policy/reference
                        chosen/rejected log-prob sums, rewards (beta * (policy - reference))
  loss, beta            TRL's batch loss (mean over pairs)
  grad_norm             global L2 norm of all LoRA gradients
  tensors[name]         for every LoRA tensor (name = the safetensors key without the
                        `base_model.model.` prefix): shape, L2 norm of its gradient, and
                        `dot_init` = <gradient, initial value> (a signed number per tensor, so a
                        flipped sign anywhere shows even where norms agree)
  full_grads[name]      the whole gradient (row-major) of FULL_GRADS
"""
import json
import math
import sys
import tempfile

import torch
import transformers

from common import REPO, THREADS, hf_tokenizer, hf_trainable_model, meta, write_fixture

OUT = REPO / "plugins" / "trainer" / "tests" / "fixtures" / "trl_dpo"
ADAPTER = OUT / "adapter"
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # base_model_name_or_path written
RANK, ALPHA = 2, 4
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
SEED, INIT_STD = 7, 0.06
BETA = 0.1
# Gradients written in full: a q/k B (rows in Hugging Face order), a GQA v A, MLP A and B.
FULL_GRADS = [
    "model.layers.3.self_attn.q_proj.lora_B.weight",
    "model.layers.17.self_attn.k_proj.lora_B.weight",
    "model.layers.29.self_attn.v_proj.lora_A.weight",
    "model.layers.0.mlp.up_proj.lora_A.weight",
    "model.layers.12.mlp.down_proj.lora_B.weight",
]
PAIRS = [
    {"prompt": "Question: What is the capital of France?\nAnswer:",
     "chosen": " The capital of France is Paris.",
     "rejected": " France does not have a capital city, it is ruled from the sea."},
    {"prompt": "Write one sentence about why the sky is blue.\n",
     "chosen": "Sunlight is scattered by air molecules, and blue light scatters the most.",
     "rejected": "Because the ocean paints it."},
]
MAX_FUSED_VS_PLAIN = 1e-4  # |sum difference| allowed between the fused head and log_softmax


def peft_key(param_name):
    """`base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight` ->
    `model.layers.3.self_attn.q_proj.lora_A.weight` (the saved key without its prefix)."""
    return param_name.removeprefix("base_model.model.").replace(".default.", ".")


def build_trainer(model, tok, out_dir):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM", target_modules=list(TARGETS))
    args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=len(PAIRS), beta=BETA,
                     report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0,
                     dataloader_num_workers=0, save_strategy="no")
    assert args.loss_type == ["sigmoid"] and args.label_smoothing == 0.0, args
    assert not args.use_weighting and args.ld_alpha is None and not args.precompute_ref_log_probs
    assert args.f_divergence_type == "reverse_kl", args.f_divergence_type
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
                         processing_class=tok, peft_config=lora)
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config, \
        "the reference must be the base with the adapter disabled"
    return trainer


def init_adapter(model):
    """Seeded non-zero A and B, written into TRL's PeftModel; returns {key: initial tensor}."""
    torch.manual_seed(SEED)
    init = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert ".lora_A." in name or ".lora_B." in name, name
                p.normal_(0.0, INIT_STD)
                init[peft_key(name)] = p.detach().clone()
    assert len(init) == 2 * len(TARGETS) * model.config.num_hidden_layers, len(init)
    return init


def save_adapter(model):
    cfg = model.peft_config["default"]
    cfg.base_model_name_or_path = BASE_NAME
    cfg.target_modules = list(TARGETS)  # PEFT keeps a set, which would be saved in hash order
    model.save_pretrained(str(ADAPTER))
    (ADAPTER / "README.md").unlink(missing_ok=True)
    files = sorted(f.name for f in ADAPTER.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"], files
    from safetensors.torch import load_file
    saved = load_file(str(ADAPTER / "adapter_model.safetensors"))
    print(f"wrote {ADAPTER.relative_to(REPO)} ({len(saved)} tensors)", file=sys.stderr)
    return saved


def policy_logps(trainer, batch):
    """Per-sequence completion log-prob sums [chosen; rejected] exactly as `_compute_loss`
    computes the policy's (same kwargs, same fused head, same slicing)."""
    kwargs = {k: v for k, v in batch.items()
              if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}}
    kwargs["use_cache"] = False
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = trainer.model(**kwargs, labels=labels, fused_lm_head=True)
    seq_len = batch["completion_mask"].size(1) - 1
    return out.log_probs[:, -seq_len:].sum(dim=1)


def plain_logps(model, batch):
    """The same sums from full logits and log_softmax in float64, without TRL."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tok = logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (tok * batch["completion_mask"][:, 1:]).sum(dim=1)


def score(trainer, tok):
    """Initialises and saves the adapter, runs TRL's loss on the batch, writes fixture.json."""
    import peft
    import trl
    from trl.trainer.utils import use_adapter
    rows = [{k: list(r[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
            for r in trainer.train_dataset]
    assert len(rows) == len(PAIRS)
    for r in rows:
        assert r["chosen_ids"][-1] == tok.eos_token_id and r["rejected_ids"][-1] == tok.eos_token_id
        print(f"pair: prompt {len(r['prompt_ids'])}, chosen {len(r['chosen_ids'])}, "
              f"rejected {len(r['rejected_ids'])} tokens", file=sys.stderr)

    pm = trainer.model
    init = init_adapter(pm)
    saved = save_adapter(pm)
    assert set(saved) == {"base_model.model." + k for k in init}, "saved keys"
    for k, v in init.items():
        assert torch.equal(saved["base_model.model." + k], v), k

    batch = trainer.data_collator(rows)
    pm.train()
    pm.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(pm, batch)
    loss.backward()
    grads = {peft_key(n): p.grad.detach().clone() for n, p in pm.named_parameters()
             if p.requires_grad}
    assert set(grads) == set(init)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    pm.eval()
    n = len(rows)
    pol = policy_logps(trainer, batch).double()
    ref_c, ref_r = (x.double() for x in trainer.compute_ref_log_probs(pm, batch))
    pol_c, pol_r = pol[:n], pol[n:]
    with use_adapter(pm, adapter_name=None):
        base_plain = plain_logps(pm, batch)
    pol_plain = plain_logps(pm, batch)
    d_pol = float((pol - pol_plain).abs().max())
    d_ref = float((torch.cat([ref_c, ref_r]) - base_plain).abs().max())
    print(f"fused head vs log_softmax: policy {d_pol:.2e}, reference {d_ref:.2e}", file=sys.stderr)
    assert max(d_pol, d_ref) < MAX_FUSED_VS_PLAIN, (d_pol, d_ref)

    margin = (pol_c - ref_c) - (pol_r - ref_r)
    recomputed = float(-torch.nn.functional.logsigmoid(BETA * margin).mean())
    loss_value = float(loss.detach())
    print(f"loss {loss_value:.6f} (ln 2 = {math.log(2):.6f}), recomputed {recomputed:.6f}, "
          f"margins {[round(float(m), 4) for m in margin]}, "
          f"rho {[round(float(x), 3) for x in torch.cat([pol_c - ref_c, pol_r - ref_r])]}", file=sys.stderr)
    assert abs(recomputed - loss_value) < 1e-5, (recomputed, loss_value)
    assert abs(loss_value - math.log(2)) > 0.02, "the adapter barely moves the policy"
    for key, ours in [("logps/chosen", pol_c.mean()), ("logps/rejected", pol_r.mean()),
                      ("rewards/chosen", BETA * (pol_c - ref_c).mean()),
                      ("rewards/rejected", BETA * (pol_r - ref_r).mean())]:
        assert abs(logged[key] - float(ours)) < 1e-4 * max(1.0, abs(float(ours))), (key, logged[key], ours)

    flat = torch.cat([g.flatten().double() for g in grads.values()])
    grad_norm = float(flat.norm())
    tensors = {
        k: {"shape": list(g.shape), "norm": float(g.double().norm()),
            "dot_init": float((g.double() * init[k].double()).sum())}
        for k, g in sorted(grads.items())
    }
    assert all(t["norm"] > 0 for t in tensors.values()), "a LoRA tensor got no gradient"
    print(f"grad norm {grad_norm:.6f} over {len(tensors)} tensors", file=sys.stderr)

    pairs = []
    for i, r in enumerate(rows):
        pairs.append({
            **r,
            "policy_chosen_logp": float(pol_c[i]), "policy_rejected_logp": float(pol_r[i]),
            "reference_chosen_logp": float(ref_c[i]), "reference_rejected_logp": float(ref_r[i]),
            "chosen_reward": BETA * float(pol_c[i] - ref_c[i]),
            "rejected_reward": BETA * float(pol_r[i] - ref_r[i]),
        })
    write_fixture("fixture.json", {
        "meta": meta(f"trl {trl.__version__} DPOTrainer + peft {peft.__version__} on transformers "
                     "(GGUF dequantised to float32)", trl.__version__, __file__,
                     transformers_version=transformers.__version__, peft_version=peft.__version__,
                     torch_version=torch.__version__, dtype="float32", loss_type="sigmoid",
                     dpo_reference="base (adapter disabled)", lora_rank=RANK, lora_alpha=ALPHA,
                     target_modules=TARGETS, init_seed=SEED, init_std=INIT_STD,
                     texts=PAIRS, trl_logged={k: logged[k] for k in sorted(logged)}),
        "beta": BETA,
        "loss": loss_value,
        "pairs": pairs,
        "grad_norm": grad_norm,
        "tensors": tensors,
        "full_grads": {k: [float(x) for x in grads[k].flatten()] for k in FULL_GRADS},
    }, OUT)


def main():
    torch.set_num_threads(THREADS)
    tok = hf_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:  # TRL's output_dir; nothing is saved there
        trainer = build_trainer(hf_trainable_model(), tok, tmp)
        score(trainer, tok)


if __name__ == "__main__":
    main()

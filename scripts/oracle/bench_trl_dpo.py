"""Training benchmark peer and data: TRL's DPOTrainer with a PEFT LoRA on SmolLM2.

`bench_trl_dpo.py data OUT.jsonl N` writes N preference rows whose prompt, chosen and rejected
each tokenise to exactly 64 tokens (random common words, cut at 64 tokens and decoded back),
as plain strings, so both trainers see the same rows.

`bench_trl_dpo.py run DATA.jsonl STEPS` trains LoRA r=16 (alpha 32) on all seven projections
with DPO (beta 0.1, batch 4, lr 5e-5, no evaluation, no checkpoints) on the CPU with
`THREADS` torch threads, reading the GGUF through transformers (dequantised to float32), and
prints one JSON object: steps, pairs, train seconds (TRL's own train_runtime), pairs/s, peak
RSS. The first, slower step counts, as it does for prefix-rft.
"""
import json
import os
import random
import resource
import sys
import time

from common import MODEL, hf_trainable_model

THREADS = int(os.environ.get("THREADS", "2"))
WORDS = ("time year people way day man thing woman life child world school state family "
         "student group country problem hand part place case week company system program "
         "question work government number night point home water room mother area money "
         "story fact month lot right study book eye job word business issue side kind head "
         "house service friend father power hour game line end member law car city community "
         "name president team minute idea kid body information back parent face others level "
         "office door health person art war history party result change morning reason "
         "research girl guy moment air teacher force education").split()


def exact(tok, rng, n):
    text = " ".join(rng.choice(WORDS) for _ in range(n * 2))
    ids = tok(text, add_special_tokens=False)["input_ids"][:n]
    out = tok.decode(ids)
    assert len(tok(out, add_special_tokens=False)["input_ids"]) == n, out
    return out


def data(path, n):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name)
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            row = {"prompt": exact(tok, rng, 64), "chosen": " " + exact(tok, rng, 63),
                   "rejected": " " + exact(tok, rng, 63)}
            f.write(json.dumps(row) + "\n")


def run(path, steps):
    import torch
    torch.set_num_threads(THREADS)
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    import trl
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = hf_trainable_model()
    ds = load_dataset("json", data_files=path, split="train")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"])
    args = DPOConfig(output_dir="/tmp/bench-trl-dpo", per_device_train_batch_size=4,
                     max_steps=steps, learning_rate=5e-5, beta=0.1, logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False,
                     dataloader_num_workers=0, seed=0, max_length=256)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=lora)
    setup = time.perf_counter() - t0
    out = trainer.train()
    secs = out.metrics["train_runtime"]
    pairs = steps * 4
    print(json.dumps({
        "name": "trl", "trl_version": trl.__version__, "torch_version": torch.__version__,
        "threads": THREADS, "steps": steps, "pairs": pairs, "setup_seconds": round(setup, 2),
        "train_seconds": round(secs, 2), "pairs_per_s": round(pairs / secs, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "base_dtype": "float32 (GGUF dequantised by transformers)",
    }))


if __name__ == "__main__":
    if sys.argv[1] == "data":
        data(sys.argv[2], int(sys.argv[3]))
    else:
        run(sys.argv[2], int(sys.argv[3]))

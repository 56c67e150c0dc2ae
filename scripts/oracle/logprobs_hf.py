"""Produce engine/tests/fixtures/logprobs_hf.json.

Reference next-token log-probs from HF `transformers` running the GGUF dequantised
to float32 (an independent implementation of the Llama forward pass). For each text:
`tokens`, `logprobs[i]` = log p(tokens[i+1] | tokens[..=i]), `top1[i]` = argmax id at
position i; `top5` for the first 3 texts. The engine's logits must match these within
quantisation tolerance (the engine runs Q4_1, this reference runs dequantised f32).
"""
import torch
import transformers
from transformers import AutoModelForCausalLM

from common import MODEL, THREADS, hf_tokenizer, log_softmax64, meta, score, write_fixture
from texts import TEXTS


def main():
    torch.set_num_threads(THREADS)
    tok = hf_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name,
                                                 dtype=torch.float32).eval()
    entries = []
    for k, text in enumerate(TEXTS):
        ids = tok.encode(text, add_special_tokens=False)
        assert 20 <= len(ids) <= 120, (len(ids), text)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        entry = {"text": text, "tokens": ids}
        entry.update(score(log_softmax64(logits.numpy()), ids, top5=k < 3))
        entries.append(entry)
    write_fixture("logprobs_hf.json", {
        "meta": meta("transformers AutoModelForCausalLM (GGUF dequantised to float32)",
                     transformers.__version__, __file__, torch_version=torch.__version__,
                     dtype="float32", add_bos=False, count=len(entries)),
        "texts": entries,
    })


if __name__ == "__main__":
    main()

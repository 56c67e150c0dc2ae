"""Produce engine/tests/fixtures/logprobs_llamacpp.json.

Same texts and the very same token ids as logprobs_hf.json (read from it), scored by
llama.cpp (llama-cpp-python) on the Q4_1 GGUF as is: the engine runs the same
quantised weights, so this is the tighter reference for it. Fields as in the HF
fixture; `meta.agreement_with_hf` says how far the two references are apart, which
sizes the tolerance the engine's tests can demand.
"""
import llama_cpp
import numpy as np

from common import MODEL, THREADS, log_softmax64, meta, read_fixture, score, write_fixture


def main():
    hf = read_fixture("logprobs_hf.json")
    llm = llama_cpp.Llama(str(MODEL), n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS,
                          n_batch=512, logits_all=True, verbose=False)
    entries, agree, deltas = [], [], []
    for k, ref in enumerate(hf["texts"]):
        ids = ref["tokens"]
        llm.reset()
        llm.eval(ids)
        logp = log_softmax64(llm.scores[: len(ids)])
        entry = {"text": ref["text"], "tokens": ids}
        entry.update(score(logp, ids, top5=k < 3))
        entries.append(entry)
        agree += [a == b for a, b in zip(entry["top1"], ref["top1"])]
        deltas += [abs(a - b) for a, b in zip(entry["logprobs"], ref["logprobs"])]
    agreement = {
        "positions": len(agree),
        "top1_agreement": round(float(np.mean(agree)), 4),
        "mean_abs_delta_logprob": round(float(np.mean(deltas)), 4),
        "max_abs_delta_logprob": round(float(np.max(deltas)), 4),
    }
    print("agreement llama.cpp vs transformers:", agreement)
    write_fixture("logprobs_llamacpp.json", {
        "meta": meta("llama-cpp-python (llama.cpp, Q4_1 as stored)", llama_cpp.__version__, __file__,
                     n_ctx=2048, n_batch=512, add_bos=False, count=len(entries),
                     agreement_with_hf=agreement),
        "texts": entries,
    })


if __name__ == "__main__":
    main()

"""llama.cpp side of `scripts/bench`: prints one JSON object with the peer's numbers.

Same GGUF, 2 threads (n_threads = n_threads_batch = 2), low-level llama-cpp-python API:
  prefill_tok_s  - prompt of 128 / 512 tokens in one llama_decode, fresh context each, median of 3
  decode_tok_s   - greedy argmax decode, 128 new tokens after an 8-token prompt, with
                   1, 4 and 16 sequences (one token per sequence per step, distinct seq_id);
                   aggregate tokens/s = sequences * steps / seconds
  peak_rss_mb    - peak resident set size of this process (getrusage)
"""
import json
import resource
import statistics
import sys
import time

import llama_cpp as lc
from llama_cpp._logger import set_verbose
import numpy as np

from common import MODEL, THREADS

PROMPT_LENS = (128, 512)
PARALLEL = (1, 4, 16)
SHORT_PROMPT, NEW_TOKENS, REPEATS = 8, 128, 3


def new_ctx(model, n_ctx, n_seq, n_batch=512):
    p = lc.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_batch, n_seq
    p.n_threads = p.n_threads_batch = THREADS
    ctx = lc.llama_init_from_model(model, p)
    assert ctx, "llama_init_from_model failed"
    return ctx


def decode(ctx, batch, entries):
    """entries: (token, pos, seq_id, want_logits) tuples, one batch row each."""
    for i, (tok, pos, seq, logits) in enumerate(entries):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits
    batch.n_tokens = len(entries)
    rc = lc.llama_decode(ctx, batch)
    assert rc == 0, f"llama_decode returned {rc}"


def argmax(ctx, i, n_vocab):
    return int(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())


def prefill(model, n, rng):
    times = []
    for _ in range(REPEATS):
        ctx, batch = new_ctx(model, 1024, 1), lc.llama_batch_init(512, 0, 1)
        toks = rng.integers(100, 40000, n)
        t0 = time.perf_counter()
        decode(ctx, batch, [(int(t), p, 0, p == n - 1) for p, t in enumerate(toks)])
        times.append(time.perf_counter() - t0)
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
    return n / statistics.median(times)


def parallel_decode(model, n_seq, n_vocab, rng):
    per_seq = 256  # >= SHORT_PROMPT + NEW_TOKENS; n_ctx must divide evenly by n_seq
    ctx, batch = new_ctx(model, per_seq * n_seq, n_seq), lc.llama_batch_init(512, 0, n_seq)
    rows = [(int(t), p, s, p == SHORT_PROMPT - 1)
            for s in range(n_seq) for p, t in enumerate(rng.integers(100, 40000, SHORT_PROMPT))]
    decode(ctx, batch, rows)
    last = [argmax(ctx, s * SHORT_PROMPT + SHORT_PROMPT - 1, n_vocab) for s in range(n_seq)]
    t0 = time.perf_counter()
    for step in range(NEW_TOKENS):
        decode(ctx, batch, [(last[s], SHORT_PROMPT + step, s, True) for s in range(n_seq)])
        last = [argmax(ctx, s, n_vocab) for s in range(n_seq)]
    dt = time.perf_counter() - t0
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    return n_seq * NEW_TOKENS / dt


def main():
    lc.llama_backend_init()
    set_verbose(False)  # llama.cpp logs: errors only
    model = lc.llama_model_load_from_file(str(MODEL).encode(), lc.llama_model_default_params())
    assert model, "model load failed"
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    rng = np.random.default_rng(0)
    prefill(model, 32, rng)  # warm-up (page in weights, allocate)
    out = {
        "peer": "llama.cpp",
        "version": f"llama-cpp-python {lc.__version__}",
        "threads": THREADS,
        "prefill_tok_s": {str(n): round(prefill(model, n, rng), 1) for n in PROMPT_LENS},
        "decode_tok_s": {str(k): round(parallel_decode(model, k, n_vocab, rng), 1) for k in PARALLEL},
    }
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    lc.llama_model_free(model)
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()

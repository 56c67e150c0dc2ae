"""Produce engine/tests/fixtures/greedy_llamacpp.json.

Ten chat prompts rendered with the GGUF's ChatML template (add_generation_prompt),
then 48 greedy tokens from llama.cpp: plain argmax over each next-token logits row
(not the sampler chain). `output_tokens` ends with the stop id when one was produced
(finish_reason "stop": id 2 = <|im_end|> = eos), else has 48 ids (finish_reason
"length"); `output_text` is the decode of the ids before the stop token.
"""
import llama_cpp
import numpy as np

from common import EOS_IDS, MODEL, THREADS, hf_tokenizer, meta, write_fixture

MAX_NEW = 48
SYS = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
PROMPTS = [
    [{"role": "user", "content": "What is the capital of Japan?"}],
    [{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
    [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
    [{"role": "user", "content": "A train travels 60 km per hour for 2.5 hours. How far does it go?"}],
    [{"role": "user", "content": "List five fruits that are red."}],
    [SYS, {"role": "user", "content": "Hi! Who are you?"},
     {"role": "assistant", "content": "I am an AI assistant. How can I help?"},
     {"role": "user", "content": "Recommend a book for a long flight."}],
    [{"role": "user", "content": "Translate to French: The cat is sleeping on the chair."}],
    [{"role": "user", "content": "Summarize the plot of Romeo and Juliet in one sentence."}],
    [SYS, {"role": "user", "content": "Give me a short motivational quote."}],
    [{"role": "user", "content": "Write a haiku about the ocean."}],
]


def main():
    tok = hf_tokenizer()
    llm = llama_cpp.Llama(str(MODEL), n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS,
                          n_batch=512, logits_all=True, verbose=False)
    cases = []
    for messages in PROMPTS:
        prompt_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tok.encode(prompt_text, add_special_tokens=False)
        llm.reset()
        llm.eval(prompt)
        out, finish = [], "length"
        while len(out) < MAX_NEW:
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            if nxt in EOS_IDS:
                finish = "stop"
                break
            llm.eval([nxt])
        text_ids = out[:-1] if finish == "stop" else out
        cases.append({"messages": messages, "prompt_text": prompt_text, "prompt_tokens": prompt,
                      "output_tokens": out, "output_text": tok.decode(text_ids),
                      "finish_reason": finish})
        print(repr(tok.decode(text_ids))[:100])
    write_fixture("greedy_llamacpp.json", {
        "meta": meta("llama-cpp-python (llama.cpp, Q4_1 as stored), argmax decoding",
                     llama_cpp.__version__, __file__, max_new_tokens=MAX_NEW, stop_ids=list(EOS_IDS),
                     chat_template="tokenizer.chat_template of the GGUF via transformers apply_chat_template",
                     count=len(cases)),
        "cases": cases,
    })


if __name__ == "__main__":
    main()

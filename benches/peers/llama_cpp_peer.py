"""llama.cpp (through llama-cpp-python) as a side-by-side peer of `dms ab`: greedy decoding of
token-id prompts, one sequence at a time, with prompt and decode timed apart.

Reads {"model": PATH, "prompts": [[ids]], "max_tokens": N, "threads": T} as JSON on stdin and
prints {"tokens": [[ids]], "prefill_tok_s": x, "decode_tok_s": y} on stdout.
"""
import json
import sys
import time

import llama_cpp
import numpy as np
from llama_cpp import Llama


def last_logits(llm):
    """The logits of the last evaluated token (with logits_all=False this binding leaves
    `Llama.scores` unfilled, so read them from llama.cpp directly)."""
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def main():
    job = json.load(sys.stdin)
    prompts, n = job["prompts"], job["max_tokens"]
    ctx = max(len(p) for p in prompts) + n + 8
    llm = Llama(model_path=job["model"], n_ctx=ctx, n_batch=max(512, ctx), n_threads=job["threads"],
                logits_all=False, verbose=False)
    out, prompt_toks, prompt_secs, decode_toks, decode_secs = [], 0, 0.0, 0, 0.0
    for p in [prompts[0]] + prompts:  # the first prompt once more, untimed, to warm up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(p)
        t1 = time.perf_counter()
        ids = []
        for _ in range(n):
            ids.append(int(np.argmax(last_logits(llm))))
            if len(ids) < n:
                llm.eval([ids[-1]])
        t2 = time.perf_counter()
        out.append((ids, len(p), t1 - t0, n - 1, t2 - t1))
    for ids, pt, ps, dt, ds in out[1:]:
        prompt_toks += pt
        prompt_secs += ps
        decode_toks += dt
        decode_secs += ds
    json.dump({"tokens": [o[0] for o in out[1:]],
               "prefill_tok_s": prompt_toks / max(prompt_secs, 1e-9),
               "decode_tok_s": decode_toks / max(decode_secs, 1e-9)}, sys.stdout)


if __name__ == "__main__":
    main()

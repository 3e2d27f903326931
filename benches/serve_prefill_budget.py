"""Prefill budget benchmark of `dms serve` on loopback (a benchmark, not a test).

Requests already decoding stall while the engine feeds a long prompt, unless the prompt is fed a
part per step (`[server] prefill_budget`, vLLM's chunked prefill). Per round: `--streams`
streamed requests start generating long answers; once each has its first tokens, `--long`
requests with prompts of about `--prompt-words` words arrive one after another. Reported: the
gaps between the decoding streams' tokens (median, 99th percentile, largest) while the long
prompts are fed, each long request's time to first token, and the decoding streams' answers
(the same text whatever the budget: greedy). Budgets alternate (0 = whole prompts, then each
given budget, then again) on fresh servers, without the prefix cache. Writes JSON and prints a table.

    cargo build --release --bin dms
    python3 benches/serve_prefill_budget.py --dms target/release/dms --config configs/serve.toml \
        --out benches/results/serve-prefill-budget.json

Python standard library only.
"""

import argparse
import json
import platform
import statistics
import threading
import time

from serve_load import pct, start_server, stream_chat

FILLER = ("The committee met again on the fourth floor, where the windows looked over the river and the old "
          "grain sheds, and went through the figures line by line until the light began to fail. ")


def stream(base, model, prompt, max_tokens, policy, out, started=None):
    """Streams one greedy chat request; appends (token times, text, time to first token) to `out`."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "cache_policy": policy}
    t0 = time.perf_counter()
    times, text = [], ""
    for chunk in stream_chat(base, body):
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            times.append(time.perf_counter())
            text += chunk["choices"][0]["delta"]["content"]
            if started is not None and len(times) == 3:
                started.release()
    out.append({"times": times, "text": text, "ttft_s": times[0] - t0 if times else None})


def one_round(base, model, policy, a):
    decoding, long_out = [], []
    started = threading.Semaphore(0)
    threads = [threading.Thread(target=stream, args=(base, model, f"Tell a long story about stream {i}.",
                                                     a.decode_tokens, policy, decoding, started))
               for i in range(a.streams)]
    for t in threads:
        t.start()
    for _ in threads:
        started.acquire()
    t_long = time.perf_counter()
    for i in range(a.long):
        words = FILLER.split()
        prompt = f"Document {i}. " + " ".join(words[(j + i) % len(words)] for j in range(a.prompt_words))
        prompt += " Summarise the document in one sentence."
        stream(base, model, prompt, 8, policy, long_out)
    t_end = time.perf_counter()
    for t in threads:
        t.join()
    # Gaps between consecutive tokens of the decoding streams while the long prompts were served.
    gaps = [b - a_ for d in decoding for a_, b in zip(d["times"], d["times"][1:]) if t_long <= b <= t_end]
    return {"gaps_s": gaps, "long_ttft_s": [r["ttft_s"] for r in long_out],
            "answers": sorted(d["text"] for d in decoding), "window_s": t_end - t_long}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dms", required=True, help="the dms binary")
    ap.add_argument("--config", required=True, help="engine config with a [server] table")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--policy", default="full")
    ap.add_argument("--budgets", default="256", help="comma-separated budgets compared with 0 (whole prompts)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--long", type=int, default=2)
    ap.add_argument("--prompt-words", type=int, default=1200)
    ap.add_argument("--decode-tokens", type=int, default=400)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    budgets = [0] + [int(b) for b in a.budgets.split(",")]
    runs = {b: [] for b in budgets}
    for _ in range(a.rounds):
        for b in budgets:
            proc, base = start_server(a.dms, a.config, ["--prefill-budget", str(b), "--no-prefix-cache"])
            try:
                runs[b].append(one_round(base, a.model, a.policy, a))
            finally:
                proc.terminate()
                proc.wait()
    report = {"machine": platform.node(), "date": time.strftime("%Y-%m-%d"), "config": a.config,
              "args": vars(a), "runs": {str(b): r for b, r in runs.items()}}
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    base_answers = runs[0][0]["answers"]
    print("| prefill budget | decoding streams' token gaps: median / p99 / max (s) | long prompts' TTFT, median (s) "
          "| same answers as budget 0 |")
    print("|---|---|---|---|")
    for b in budgets:
        gaps = [g for r in runs[b] for g in r["gaps_s"]]
        ttft = [t for r in runs[b] for t in r["long_ttft_s"]]
        same = sum(r["answers"] == base_answers for r in runs[b])
        name = "0 (whole prompts)" if b == 0 else str(b)
        print(f"| {name} | {statistics.median(gaps):.3f} / {pct(gaps, 99):.3f} / {max(gaps):.3f} | "
              f"{statistics.median(ttft):.2f} | {same}/{len(runs[b])} |")


if __name__ == "__main__":
    main()

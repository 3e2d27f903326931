"""Prefix caching benchmark of `dms serve` on loopback (a benchmark, not a test).

Multi-turn chats that share one long system prompt, one request in flight at a time: each turn
sends the whole history back (the system prompt, every earlier question and answer) with a new
question, greedy, streamed. The same chats run on a server with the prefix cache (the default)
and one started with --no-prefix-cache, alternating (on, off, on, off, ...) so that both see the
same machine state; per policy it reports time to first token by turn, the prompt tokens the
cache gave (`usage.prompt_tokens_details.cached_tokens`), whether the answers were the same
text, the ratio of the medians, and what the cache kept in the pool afterwards. Writes JSON and prints a table.

    cargo build --release --bin dms
    python3 benches/serve_prefix_cache.py --dms target/release/dms --config configs/serve.toml \
        --out benches/results/serve-prefix-cache.json

Python standard library only.
"""

import argparse
import json
import platform
import statistics
import time

from serve_load import metric, start_server, stream_chat

SYSTEM = (
    "You are a patient assistant for a small public library. Answer in two or three sentences, "
    "plainly, without lists. The library opens at nine and closes at six on weekdays, at four on "
    "Saturdays, and stays closed on Sundays and public holidays. Members may borrow up to eight "
    "books for three weeks and renew them twice unless someone else has reserved them. Late "
    "returns cost ten cents a day per book, capped at the price of the book. The reading room on "
    "the first floor is quiet; group study rooms on the second floor can be booked for two hours "
    "at a time at the front desk or by phone. Printing costs fifteen cents a page in black and "
    "white and fifty cents in colour. Children under twelve need a guardian's signature to join. "
    "The local history collection cannot leave the building, but the staff will scan pages on "
    "request. If you do not know an answer, say so and suggest asking at the front desk."
)
QUESTIONS = [
    ["How many books can I borrow?", "Can I keep them longer?", "What if I return one late?",
     "Is there a cap on the fine?"],
    ["When are you open on Saturday?", "And on Sunday?", "Can I book a study room for my group?",
     "For how long?"],
    ["My daughter is ten. Can she join?", "What does she need?", "Can she print her homework?",
     "How much is colour?"],
    ["Can I borrow the local history books?", "Could you scan a page for me?", "Where is the quiet room?",
     "Thanks. Anything else I should know?"],
]


def chat(base, model, messages, policy, max_tokens):
    """(answer text, time to first token, usage) of one streamed greedy chat request."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "cache_policy": policy}
    t0 = time.perf_counter()
    text, first, usage = "", None, None
    for chunk in stream_chat(base, body):
        if chunk.get("usage"):
            usage = chunk["usage"]
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = first or time.perf_counter()
            text += chunk["choices"][0]["delta"]["content"]
    return text, (first or time.perf_counter()) - t0, usage


def run_chats(base, model, policy, max_tokens):
    """Every chat, turn by turn: a list of (chat, turn, prompt tokens, cached tokens, ttft, answer)."""
    rows = []
    for c, questions in enumerate(QUESTIONS):
        messages = [{"role": "system", "content": SYSTEM}]
        for t, q in enumerate(questions):
            messages.append({"role": "user", "content": q})
            answer, ttft, usage = chat(base, model, messages, policy, max_tokens)
            messages.append({"role": "assistant", "content": answer})
            cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
            rows.append({"chat": c, "turn": t, "prompt_tokens": usage["prompt_tokens"], "cached_tokens": cached,
                         "ttft_s": ttft, "answer": answer})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dms", required=True, help="the dms binary")
    ap.add_argument("--config", required=True, help="engine config with a [server] table")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--policies", default="full,dms", help="comma-separated cache policies the config serves")
    ap.add_argument("--rounds", type=int, default=2, help="on/off pairs per policy")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    results = []
    for policy in a.policies.split(","):
        runs = {"on": [], "off": []}
        for _ in range(a.rounds):
            for mode, extra in (("on", []), ("off", ["--no-prefix-cache"])):
                proc, base = start_server(a.dms, a.config, extra)
                try:
                    rows = run_chats(base, a.model, policy, a.max_tokens)
                    # Idle afterwards, the pool holds only the kept states.
                    kept = {"states": metric(base, "dms_prefix_cache_states"),
                            "bytes": metric(base, "dms_kv_cache_bytes_allocated")}
                    runs[mode].append({"rows": rows, "kept": kept})
                finally:
                    proc.terminate()
                    proc.wait()
        results.append({"policy": policy, "runs": runs})
    report = {"machine": platform.node(), "date": time.strftime("%Y-%m-%d"), "config": a.config,
              "max_tokens": a.max_tokens, "rounds": a.rounds, "results": results}
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print("| policy | turn | prompt tokens (mean) | cached (mean) | TTFT on (s) | TTFT off (s) | off / on | same answers |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        on = [row for run in r["runs"]["on"] for row in run["rows"]]
        off = [row for run in r["runs"]["off"] for row in run["rows"]]
        for turn in sorted({row["turn"] for row in on}) + ["all"]:
            pick = (lambda rows: [x for x in rows if turn == "all" or x["turn"] == turn])
            a_on, a_off = pick(on), pick(off)
            t_on = statistics.median(x["ttft_s"] for x in a_on)
            t_off = statistics.median(x["ttft_s"] for x in a_off)
            same = sum(x["answer"] == y["answer"] for x, y in zip(a_on, a_off))
            print(f"| {r['policy']} | {turn} | {statistics.mean(x['prompt_tokens'] for x in a_on):.0f} | "
                  f"{statistics.mean(x['cached_tokens'] for x in a_on):.0f} | {t_on:.3f} | {t_off:.3f} | "
                  f"{t_off / t_on:.2f}x | {same}/{len(a_on)} |")
    print()
    print("| policy | states kept after the chats | their KV blocks (MiB) |")
    print("|---|---|---|")
    for r in results:
        kept = r["runs"]["on"][-1]["kept"]
        print(f"| {r['policy']} | {kept['states']:.0f} | {kept['bytes'] / 2**20:.1f} |")


if __name__ == "__main__":
    main()

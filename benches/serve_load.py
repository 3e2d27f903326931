"""A bounded load benchmark of `dms serve` on loopback (a benchmark, not a test).

Starts the server from --dms with --config on a free port, then for each policy and each
concurrency sends --requests streamed chat requests (distinct prompts, greedy, a fixed number of
tokens each with ignore_eos) keeping that many in flight, and measures per policy: requests/s,
generated tokens/s, time to first token and inter-token latency percentiles, and how many
sequences the scheduler ran at once (sampled from /metrics). Policies run one after another on
the same server, so they share one pool and one machine state. Writes JSON and prints a table.

    cargo build --release --bin dms
    python3 benches/serve_load.py --dms target/release/dms --config configs/serve-bench.toml \
        --out benches/results/serve-load.json

Python standard library only.
"""

import argparse
import concurrent.futures
import http.client
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

MODEL = "smollm2-135m"
TOPICS = ["rivers", "mountains", "the sea", "a city at night", "an old library", "winter", "a train journey",
          "a lighthouse", "bees", "the moon", "a market", "a storm", "a garden", "a violin", "a desert", "a forest"]


def start_server(dms, config, extra=()):
    """Starts `dms serve` on a free port (with `extra` flags, its log silenced); the process and
    its base URL."""
    proc = subprocess.Popen([dms, "serve", "--config", config, "--port", "0", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    base = next(w for w in line.split() if w.startswith("http://"))
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, base


def metric(base, name):
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def stream_chat(base, body):
    """POSTs a streamed chat request; yields each Server-Sent Events chunk, parsed, until
    `[DONE]` (raising on an error status or an error chunk)."""
    u = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:300]}")
    try:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            yield chunk
    finally:
        conn.close()


def one_request(base, prompt, policy, max_tokens):
    """(ttft, [inter-token gaps], tokens, total seconds, kv_cache) of one streamed chat."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "cache_policy": policy}
    t0 = time.perf_counter()
    times, kv = [], None
    for chunk in stream_chat(base, body):
        if chunk.get("kv_cache"):
            kv = chunk["kv_cache"]
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            times.append(time.perf_counter())
    total = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(times, times[1:])]
    return times[0] - t0 if times else total, gaps, kv, total


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def run_cell(base, policy, concurrency, requests, max_tokens):
    prompts = [f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} (request {i})." for i in range(requests)]
    running, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            running.append(metric(base, "dms_requests_running"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    preempt0 = metric(base, "dms_preemptions_total")
    t0 = time.perf_counter()
    sampler.start()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as ex:
        results = list(ex.map(lambda p: one_request(base, p, policy, max_tokens), prompts))
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    ttft = [r[0] for r in results]
    itl = [g for r in results for g in r[1]]
    busy = [x for x in running if x > 0]
    return {
        "policy": policy,
        "concurrency": concurrency,
        "requests": requests,
        "max_tokens": max_tokens,
        "wall_s": wall,
        "requests_per_s": requests / wall,
        "generated_tok_per_s": requests * max_tokens / wall,
        "ttft_s": {"p50": pct(ttft, 50), "p90": pct(ttft, 90), "p99": pct(ttft, 99)},
        "itl_s": {"p50": pct(itl, 50), "p90": pct(itl, 90), "p99": pct(itl, 99)},
        "running_max": max(running) if running else 0,
        "running_mean": statistics.mean(busy) if busy else 0,
        "preemptions": metric(base, "dms_preemptions_total") - preempt0,
        "compression_ratio_mean": statistics.mean(r[2]["compression_ratio"] for r in results),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dms", default="target/release/dms")
    ap.add_argument("--config", default="configs/serve-bench.toml")
    ap.add_argument("--policies", default="full,dms")
    ap.add_argument("--concurrency", default="8,32")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--out", default="serve-load.json")
    a = ap.parse_args()
    proc, base = start_server(a.dms, a.config)
    try:
        capacity = metric(base, "dms_kv_cache_bytes_capacity")
        cells = []
        for c in [int(x) for x in a.concurrency.split(",")]:
            for p in a.policies.split(","):
                cell = run_cell(base, p, c, a.requests, a.max_tokens)
                cells.append(cell)
                print(json.dumps(cell), file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {subprocess.getoutput('nproc')} cores".strip(),
        "pool_bytes": capacity,
        "cells": cells,
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    base_of = {(c["concurrency"]): c for c in cells if c["policy"] == "full"}
    print(f"pool {capacity / 2**20:.0f} MiB, {a.requests} requests x {a.max_tokens} tokens per cell")
    print("| policy | concurrency | req/s | tok/s | vs full | TTFT p50 / p90 (s) | ITL p50 / p90 (ms) | seqs at once max / mean | preemptions | CR |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        full = base_of.get(c["concurrency"])
        ratio = c["generated_tok_per_s"] / full["generated_tok_per_s"] if full else float("nan")
        print(f"| {c['policy']} | {c['concurrency']} | {c['requests_per_s']:.2f} | {c['generated_tok_per_s']:.1f} | "
              f"{ratio:.2f}x | {c['ttft_s']['p50']:.2f} / {c['ttft_s']['p90']:.2f} | "
              f"{1e3 * c['itl_s']['p50']:.0f} / {1e3 * c['itl_s']['p90']:.0f} | "
              f"{c['running_max']:.0f} / {c['running_mean']:.1f} | {c['preemptions']:.0f} | {c['compression_ratio_mean']:.2f} |")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

"""End-to-end checks of `dms serve`, driven by integration/tests/serve.rs.

usage: client_checks.py main BASE_URL EXPECTED_JSON
       client_checks.py tight BASE_URL API_KEY
       client_checks.py timeout BASE_URL -
       client_checks.py inflight BASE_URL API_KEY
       client_checks.py tools BASE_URL PATHS_JSON

`main` talks to a server with the default limits and no API key; EXPECTED_JSON holds
{"prompt": ..., "max_tokens": N, "text": what `dms run --chat` printed}. `tight` talks to one
with max_batch 1, max_waiting 1, a 4 KiB body limit and an API key; `timeout` to one whose
requests time out after 2 s. `inflight` starts a long
streamed request, prints "started" after its first chunk and reads to the end (the Rust side
sends SIGTERM meanwhile). `tools` talks to a server whose chat template reads tools (Qwen2.5's);
PATHS_JSON names {"conversation": tool_conversation.json, "prompt": its prompt as Python's jinja2
renders it}. Every check raises on failure; the exit code says which.
"""

import concurrent.futures
import http.client
import json
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import openai

MODEL = "smollm2-135m"
POLICIES = ["dms", "full", "sliding_window", "dms-long"]


def call(base, method, path, body=None, headers=None, raw=None):
    """(status, parsed JSON or text) of one request; raw bytes are sent as given."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def metric(base, name, headers=None):
    _, text = call(base, "GET", "/metrics", headers=headers)
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} missing")


def wait_pool_empty(base, headers=None, seconds=10.0):
    """Waits until nothing runs and no KV bytes are held but by the prefix cache's states (given
    back whenever blocks are needed); fails after `seconds`."""
    deadline = time.time() + seconds
    while True:
        live = metric(base, "dms_kv_cache_bytes_live", headers) - metric(base, "dms_prefix_cache_bytes_live", headers)
        alloc = metric(base, "dms_kv_cache_bytes_allocated", headers) - metric(
            base, "dms_prefix_cache_bytes_allocated", headers)
        running = metric(base, "dms_requests_running", headers)
        if live == 0 and alloc == 0 and running == 0:
            return
        if time.time() > deadline:
            raise AssertionError(f"pool not empty: live {live}, allocated {alloc}, running {running}")
        time.sleep(0.05)


def chat(client, prompt, policy=None, max_tokens=24, **kw):
    extra = {"cache_policy": policy} if policy else None
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body=extra,
        **kw,
    )


def streamed(client, prompt, policy=None, max_tokens=24):
    """(text, last chunk with a finish_reason, usage chunk) of a streamed chat."""
    extra = {"cache_policy": policy} if policy else None
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c for c in chunks if c.usage]
    assert len(finals) == 1 and len(usage) == 1, chunks
    return text, finals[0], usage[0]


def check_main(base, expected_path):
    expected = json.load(open(expected_path))
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)

    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL], ids

    status, pol = call(base, "GET", "/v1/cache_policies")
    assert status == 200 and pol["default"] == "dms", pol
    assert [p["name"] for p in pol["data"]] == POLICIES, pol

    # Greedy chat equals `dms run --chat` with the same prompt, policy and max tokens.
    whole = chat(client, expected["prompt"], max_tokens=expected["max_tokens"])
    text = whole.choices[0].message.content
    assert text == expected["text"], (text, expected["text"])
    kv = whole.model_extra["kv_cache"]
    assert kv["policy"] == "dms" and kv["compression_ratio"] > 1.0 and kv["bytes_live_peak"] > 0, kv
    u = whole.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens > 0, u
    assert whole.choices[0].finish_reason in ("stop", "length")

    # Streaming gives the same text, then finish_reason with kv_cache, then usage.
    s_text, final, usage = streamed(client, expected["prompt"], max_tokens=expected["max_tokens"])
    assert s_text == text, (s_text, text)
    assert final.choices[0].finish_reason == whole.choices[0].finish_reason
    assert final.model_extra["kv_cache"] == kv, (final.model_extra, kv)
    assert usage.usage.completion_tokens == u.completion_tokens, (usage.usage, u)

    # Completions, whole and streamed.
    c = client.completions.create(model=MODEL, prompt="The river", max_tokens=16, temperature=0)
    cs = client.completions.create(model=MODEL, prompt="The river", max_tokens=16, temperature=0, stream=True)
    assert "".join(x.choices[0].text for x in cs) == c.choices[0].text
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 16, c

    # A stop string ends the text before it.
    full_text = c.choices[0].text
    cut = full_text.split()[2]
    stopped = client.completions.create(model=MODEL, prompt="The river", max_tokens=16, temperature=0, stop=[cut])
    assert stopped.choices[0].text == full_text[: full_text.index(cut)], (stopped.choices[0].text, full_text, cut)
    assert stopped.choices[0].finish_reason == "stop"

    # Seeded sampling repeats.
    r1 = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                                        max_tokens=12, temperature=1.0, seed=7)
    r2 = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                                        max_tokens=12, temperature=1.0, seed=7)
    assert r1.choices[0].message.content == r2.choices[0].message.content

    # n choices through the client: choice i is the answer of seed 7 + i, its prompt counted once.
    rn = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                                        max_tokens=12, temperature=1.0, seed=7, n=2)
    assert [c.index for c in rn.choices] == [0, 1], rn
    assert rn.choices[0].message.content == r1.choices[0].message.content, (rn, r1)
    assert rn.usage.prompt_tokens == r1.usage.prompt_tokens, (rn.usage, r1.usage)

    # echo with logprobs (lm-eval's loglikelihood form): the prompt's tokens scored, the first null.
    e = client.completions.create(model=MODEL, prompt="The river", max_tokens=0, echo=True, logprobs=1)
    assert e.choices[0].text == "The river", e
    assert e.choices[0].logprobs.token_logprobs[0] is None, e
    assert all(x < 0 for x in e.choices[0].logprobs.token_logprobs[1:]), e

    # 24 concurrent requests with mixed policies (two of them reading different adapters): each
    # equals the same request alone.
    prompts = [f"Write one sentence about the number {i}." for i in range(6 * len(POLICIES))]
    jobs = [(p, POLICIES[i % len(POLICIES)]) for i, p in enumerate(prompts)]
    alone = [chat(client, p, pol) for p, pol in jobs]
    running_seen = []

    all_done = threading.Event()

    def watch():
        # Until every request is answered: on a busy machine a step can take seconds.
        while not all_done.is_set():
            running_seen.append(metric(base, "dms_requests_running"))
            time.sleep(0.05)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs) + 1) as ex:
        watcher = ex.submit(watch)
        together = list(ex.map(lambda j: chat(client, j[0], j[1]), jobs))
        all_done.set()
        watcher.result()
    for (p, pol), x, y in zip(jobs, alone, together):
        assert x.choices[0].message.content == y.choices[0].message.content, (p, pol, x, y)
        assert y.model_extra["kv_cache"]["policy"] == pol
        if pol == "full":
            assert y.model_extra["kv_cache"]["compression_ratio"] == 1.0
    assert max(running_seen) > 1, f"never more than one sequence at once: {running_seen}"
    wait_pool_empty(base)
    for pol in POLICIES:
        assert metric(base, f'dms_requests_total{{policy="{pol}"}}') >= 12
    assert metric(base, 'dms_evicted_tokens_total{policy="dms"}') > 0
    assert metric(base, 'dms_evicted_tokens_total{policy="dms-long"}') > 0
    assert metric(base, 'dms_evicted_tokens_total{policy="full"}') == 0

    # A client that goes away mid-stream: its sequence is cancelled and its blocks freed at once.
    before = metric(base, 'dms_requests_total{policy="full"}')
    u = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 1500, "stream": True, "cache_policy": "full"}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(6):
        resp.fp.readline()
    # The gauges are set after each engine step, so a scrape can come just before the first.
    deadline = time.time() + 10.0
    while metric(base, "dms_kv_cache_bytes_allocated") == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert metric(base, "dms_kv_cache_bytes_allocated") > 0
    conn.sock.close()
    conn.close()
    wait_pool_empty(base, seconds=5.0)
    assert metric(base, 'dms_requests_total{policy="full"}') == before + 1

    # Bad input: each gets its 4xx and an OpenAI error body; the server stays healthy.
    good = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ("malformed JSON", "/v1/chat/completions", None, b'{"model": ', 400),
        ("missing messages", "/v1/chat/completions", {"model": MODEL}, None, 400),
        ("ill-typed max_tokens", "/v1/chat/completions", {**good, "max_tokens": "ten"}, None, 400),
        ("negative max_tokens", "/v1/chat/completions", {**good, "max_tokens": -5}, None, 400),
        ("non-finite temperature", "/v1/chat/completions", None,
         json.dumps(good)[:-1].encode() + b', "temperature": 1e999}', 400),
        ("temperature out of range", "/v1/chat/completions", {**good, "temperature": 3}, None, 400),
        ("unknown cache_policy", "/v1/chat/completions", {**good, "cache_policy": "lru"}, None, 400),
        ("prompt too long for the pool", "/v1/completions",
         {"model": MODEL, "prompt": "word " * 1500, "max_tokens": 1000}, None, 400),
        ("token id outside the vocabulary", "/v1/completions",
         {"model": MODEL, "prompt": [1, 2, 99999999]}, None, 400),
        ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, None, 400),
        ("n above the limit", "/v1/chat/completions", {**good, "n": 17}, None, 400),
        ("unknown model", "/v1/chat/completions", {**good, "model": "gpt-9"}, None, 404),
        ("unknown route", "/v1/embeddings", good, None, 404),
        ("tools to a template that does not read them", "/v1/chat/completions",
         {**good, "tools": [{"type": "function", "function": {"name": "f"}}]}, None, 400),
    ]
    for name, path, body, raw, want in cases:
        status, err = call(base, "POST", path, body=body, raw=raw)
        assert status == want, (name, status, err)
        assert set(err["error"]) == {"message", "type", "param", "code"}, (name, err)
    _, err = call(base, "POST", "/v1/chat/completions", body={**good, "cache_policy": "lru"})
    assert all(p in err["error"]["message"] for p in POLICIES), err
    _, err = call(base, "POST", "/v1/completions", body={"model": MODEL, "prompt": "word " * 1500, "max_tokens": 1000})
    assert "at most" in err["error"]["message"] and err["error"]["code"] == "context_length_exceeded", err
    status, _ = call(base, "GET", "/v1/chat/completions")
    assert status == 405
    try:
        chat(client, "hi", policy="lru")
        raise AssertionError("the client accepted an unknown policy")
    except openai.BadRequestError as e:
        assert "lru" in str(e)
    assert call(base, "GET", "/health") == (200, {"status": "ok"})
    assert chat(client, expected["prompt"], max_tokens=expected["max_tokens"]).choices[0].message.content == text
    wait_pool_empty(base)
    print("main: all checks passed")


def check_tight(base, key):
    auth = {"Authorization": f"Bearer {key}"}
    good = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert call(base, "GET", "/health")[0] == 200, "health needs no key"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
        for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", good),
                                   ("GET", "/metrics", None)):
            status, err = call(base, method, path, body=body, headers=headers)
            assert status == 401 and err["error"]["code"] == "invalid_api_key", (headers, path, status, err)
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=300)
    assert client.chat.completions.create(model=MODEL, messages=good["messages"], max_tokens=4).usage.completion_tokens > 0
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError:
        pass

    # A body over the limit.
    big = {**good, "messages": [{"role": "user", "content": "x" * 10000}]}
    status, err = call(base, "POST", "/v1/chat/completions", body=big, headers=auth)
    assert status == 413 and err["error"]["code"] == "body_too_large", (status, err)

    # A full wait queue: one running plus one waiting, the rest refused with 429.
    long = {**good, "max_tokens": 120, "messages": [{"role": "user", "content": "Tell me a long story."}]}
    with concurrent.futures.ThreadPoolExecutor(max_workers=5) as ex:
        results = list(ex.map(lambda _: call(base, "POST", "/v1/chat/completions", body=long, headers=auth), range(5)))
    statuses = sorted(s for s, _ in results)
    assert statuses.count(429) >= 1 and statuses.count(200) >= 2, statuses
    assert set(statuses) <= {200, 429}, statuses
    for s, body in results:
        if s == 429:
            assert body["error"]["type"] == "rate_limit_error", body
    wait_pool_empty(base, headers=auth)
    assert call(base, "GET", "/health")[0] == 200
    print("tight: all checks passed")


def check_timeout(base, _):
    long = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 1500, "ignore_eos": True}
    t0 = time.time()
    status, err = call(base, "POST", "/v1/chat/completions", body=long)
    assert status == 504 and err["error"]["code"] == "timeout", (status, err)
    assert time.time() - t0 < 30, time.time() - t0
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        for _ in client.chat.completions.create(model=MODEL, messages=long["messages"], max_tokens=1500,
                                                stream=True, extra_body={"ignore_eos": True}):
            pass
        raise AssertionError("a stream past its timeout ended normally")
    except openai.APIError as e:
        assert "longer than" in str(e), e
    wait_pool_empty(base)
    assert call(base, "GET", "/health")[0] == 200
    print("timeout: all checks passed")


def inflight(base, key):
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a very long story."}],
        max_tokens=1500, stream=True)
    n = 0
    try:
        for _ in stream:
            n += 1
            if n == 2:
                print("started", flush=True)
    except openai.APIError as e:
        print(f"stream ended with an error event: {e}", flush=True)
    print(f"inflight: stream closed after {n} chunks", flush=True)


def hermes_calls(text):
    """(content, calls) of an answer as vLLM's hermes parser reads it: its regex, `json.loads`."""
    blocks = re.findall(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", text, re.DOTALL)
    calls = [json.loads(a or b) for a, b in blocks]
    content = text[: text.find("<tool_call>")].strip() if calls else text
    return content or None, [(c["name"], c.get("arguments", {})) for c in calls]


def check_tools(base, paths):
    paths = json.loads(paths)
    conversation = json.load(open(paths["conversation"]))
    prompt = open(paths["prompt"]).read()
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    request = dict(model=MODEL, messages=conversation["messages"], tools=conversation["tools"],
                   temperature=0, max_tokens=48)

    # The oracle: the prompt as jinja2 renders it, completed greedily, read by vLLM's parser.
    status, raw = call(base, "POST", "/v1/completions",
                       {"model": MODEL, "prompt": prompt, "max_tokens": 48, "temperature": 0})
    assert status == 200, raw
    want_content, want_calls = hermes_calls(raw["choices"][0]["text"])
    assert want_calls, f"the model wrote no tool call: {raw['choices'][0]['text']!r}"

    whole = client.chat.completions.create(**request)
    choice = whole.choices[0]
    assert whole.usage.prompt_tokens == raw["usage"]["prompt_tokens"], (whole.usage, raw["usage"])
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content == want_content, (choice.message.content, want_content)
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == want_calls, (calls, want_calls)
    assert all(c.type == "function" and c.id.startswith("call_") for c in calls), calls
    assert len({c.id for c in calls}) == len(calls), calls

    # Streamed: the client's accumulation of the deltas gives the same calls, with one id each.
    chunks = list(client.chat.completions.create(**request, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed = {}
    for chunk in chunks:
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = streamed.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
    assert [(e["name"], e["arguments"]) for e in streamed.values()] == \
        [(c.function.name, c.function.arguments) for c in calls], (streamed, calls)
    assert all(e["id"].startswith("call_") for e in streamed.values()), streamed
    assert content == (want_content or ""), content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["tool_calls"], finals

    # tool_choice "none": the tools are not shown and nothing is read as a call.
    plain = client.chat.completions.create(**request, tool_choice="none")
    assert plain.choices[0].message.tool_calls is None, plain
    assert plain.choices[0].finish_reason in ("stop", "length"), plain
    assert plain.usage.prompt_tokens < whole.usage.prompt_tokens, (plain.usage, whole.usage)
    one = client.chat.completions.create(**request, parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1, one

    # Forced by a grammar: a named function, or at least one call; and a JSON Schema answer.
    city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"], "additionalProperties": False}
    named = client.chat.completions.create(
        **request, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    forced = named.choices[0].message.tool_calls[0]
    assert forced.function.name == "get_weather" and "city" in json.loads(forced.function.arguments), named
    required = client.chat.completions.create(**request, tool_choice="required")
    calls = required.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_weather" for c in calls), required
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Which city is the capital of France?"}],
        temperature=0, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": city}})
    parsed = json.loads(answer.choices[0].message.content)
    assert set(parsed) == {"city"} and isinstance(parsed["city"], str), answer

    # Bad tool input: 400 naming the field.
    messages = conversation["messages"]
    bad_call = json.loads(json.dumps(messages))
    bad_call[1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    body = {"model": MODEL, "messages": messages, "tools": conversation["tools"]}
    cases = [
        ("a named tool_choice not among the tools",
         {**body, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ("a schema the grammar engine cannot use",
         {**body, "tool_choice": "none", "response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
         "response_format"),
        ("tool_choice without tools", {"model": MODEL, "messages": messages, "tool_choice": "auto"}, "tool_choice"),
        ("a tool without a name", {**body, "tools": [{"type": "function", "function": {}}]}, "tools"),
        ("a tool that is not a function", {**body, "tools": [{"type": "retrieval"}]}, "tools"),
        ("two tools with one name", {**body, "tools": conversation["tools"] * 2}, "tools"),
        ("arguments that are not JSON", {**body, "messages": bad_call}, "messages"),
        ("a user turn without content", {**body, "messages": [{"role": "user"}]}, "messages"),
        ("parallel_tool_calls not a boolean", {**body, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ]
    for name, request_body, param in cases:
        status, err = call(base, "POST", "/v1/chat/completions", body=request_body)
        assert status == 400 and err["error"]["param"] == param, (name, status, err)
    wait_pool_empty(base)
    print("tools: all checks passed")


if __name__ == "__main__":
    mode, base, arg = sys.argv[1], sys.argv[2], sys.argv[3]
    modes = {"main": check_main, "tight": check_tight, "timeout": check_timeout, "inflight": inflight, "tools": check_tools}
    modes[mode](base, arg)

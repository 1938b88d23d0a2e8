"""The OpenAI-compatible server against real clients: the `openai` package, the request the 0.x
client sends (recorded), raw HTTP for the errors; on 127.0.0.1, a free port, every loop
bounded, the server stopped at the end."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import openai
import pytest
import uvicorn

from gpt_jax import sample
from gpt_jax.data.tokenizers import ByteTokenizer
from gpt_jax.model import GPT, ModelConfig
from gpt_jax.serve import http
from gpt_jax.serve.chat import PROMPT_RESPONSE, ChatTemplate
from gpt_jax.serve.engine import Engine, EngineConfig

pytestmark = pytest.mark.e2e  # a server, its warm-up compiles and many requests

DATA = pathlib.Path(__file__).parent / "data"
ROOT = DATA.parent.parent
CFG = ModelConfig(vocab_size=259, block_size=128, n_layer=2, n_head=4, n_embd=32)
TOK = ByteTokenizer()
NAME = "tiny"
KEY = "sk-test"  # the key the recorded 0.x request carries


@contextlib.contextmanager
def running(engine: Engine, tokenizer=TOK, template=ChatTemplate.from_dict(PROMPT_RESPONSE),
            **config) -> str:
    """A warmed-up server over `engine` on a free 127.0.0.1 port; stopped on exit."""
    server = http.Server(engine, tokenizer, template,
                         http.ServerConfig(**{"model_name": NAME, **config}))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    front = http.Uvicorn(uvicorn.Config(http.create_app(server), log_level="warning"), server)
    thread = threading.Thread(target=front.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    http.warm_up_and_start(server)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        time.sleep(0.05)
    try:
        yield url
    finally:
        front.should_exit = True
        thread.join(30)
        engine.stop()
        sock.close()


@pytest.fixture(scope="module")
def params():
    return GPT(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


def make_engine(params, slots: int = 4, max_queue: int = 64) -> Engine:
    # batch_invariant: bitwise equal texts and log-probs whatever runs beside a request (and
    # fewer programs to warm up); the default row buckets are tested in test_sample.py.
    return Engine(CFG, params, TOK, EngineConfig(slots=slots, max_queue=max_queue,
                                                 batch_invariant=True))


@pytest.fixture(scope="module")
def served(params):
    engine = make_engine(params)
    with running(engine, api_key=KEY, aliases=("text-davinci-002",), max_tokens_cap=100) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(url: str, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=60, **kw)


def test_completions_are_generate_with_the_same_seed(client, params):
    r = client.completions.create(model=NAME, prompt="def main(", max_tokens=12, temperature=0.8,
                                  top_p=0.9, seed=5, n=3)
    assert r.object == "text_completion" and r.model == NAME and len(r.choices) == 3
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert {c.finish_reason for c in r.choices} <= {"length", "stop"}
    assert r.usage.prompt_tokens == 9 and r.usage.total_tokens == 9 + r.usage.completion_tokens
    ours = sample.generate(make_engine(params), [TOK.encode("def main(")], max_new_tokens=12,
                           temperature=0.8, top_p=0.9, seed=5, num_samples=3)
    assert [c.text for c in r.choices] == [TOK.decode(t) for t in ours.tokens]
    again = client.completions.create(model=NAME, prompt="def main(", max_tokens=12,
                                      temperature=0.8, top_p=0.9, seed=5, n=3)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]


def test_a_request_alone_equals_it_among_concurrent_others(client):
    kw = dict(model=NAME, prompt="import os", max_tokens=20, temperature=1.0, seed=11)
    alone = client.completions.create(**kw).choices[0].text
    results, errors = [], []

    def other(i: int):
        try:
            client.completions.create(model=NAME, prompt=f"x{i}" * (i + 1), max_tokens=30 - i,
                                      temperature=0.5, seed=i, extra_body={"top_k": 7 * i + 1})
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=other, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    results.append(client.completions.create(**kw).choices[0].text)
    for t in threads:
        t.join(60)
    assert not errors and results == [alone]


def test_stop_strings_cut_where_they_should(client):
    free = client.completions.create(model=NAME, prompt="a", max_tokens=40, temperature=0,
                                     seed=0).choices[0]
    stop = free.text[10:12]
    first = free.text.index(stop)
    cut = client.completions.create(model=NAME, prompt="a", max_tokens=40, temperature=0,
                                    stop=[stop, "never here"]).choices[0]
    assert cut.text == free.text[:first] and cut.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="a", max_tokens=40, temperature=0, stop=stop, stream=True))
    assert streamed == free.text[:first]


def test_streaming_gives_the_same_text_and_usage_last(client):
    whole = client.completions.create(model=NAME, prompt="héllo ☃ wörld", max_tokens=30,
                                      temperature=1.0, seed=3).choices[0].text
    chunks = list(client.completions.create(model=NAME, prompt="héllo ☃ wörld", max_tokens=30,
                                            temperature=1.0, seed=3, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole  # a character split between chunks would decode differently
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    echoed = list(client.completions.create(model=NAME, prompt="héllo ☃", max_tokens=3,
                                            echo=True, stream=True))
    assert echoed[0].choices[0].text == "héllo ☃"


def test_logprobs_and_echo_score_the_prompt_like_the_scorer(client, params):
    from gpt_jax.evals.scoring import Request, loglikelihoods

    prompt = "the cat sat"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and lp.tokens == list(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ids = TOK.encode(prompt)
    (score,) = loglikelihoods(CFG, params, [Request(ids[:1], ids[1:])])
    assert sum(lp.token_logprobs[1:]) == pytest.approx(score.logprob, abs=1e-4)
    assert all(len(t) <= 2 and lp.token_logprobs[i + 1] <= max(t.values()) + 1e-6
               for i, t in enumerate(lp.top_logprobs[1:]))
    g = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0,
                                  logprobs=1).choices[0].logprobs
    assert len(g.tokens) == 4 and all(list(t.values())[0] == x  # greedy: the top one
                                      for t, x in zip(g.top_logprobs, g.token_logprobs))


def test_token_id_prompts_and_several_prompts(client):
    r = client.completions.create(model=NAME, prompt=[[100, 101], [102]], max_tokens=3,
                                  temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both choices of a prompt
    texts = client.completions.create(model=NAME, prompt=["de", "im"], max_tokens=3,
                                      temperature=0)
    assert len(texts.choices) == 2


def test_chat_with_the_runs_template(client):
    r = client.chat.completions.create(model=NAME, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    template = ChatTemplate.from_dict(PROMPT_RESPONSE)
    ids = template.render([{"role": "system", "content": "be brief"},
                           {"role": "user", "content": "hi"}], TOK)
    assert ids == TOK.encode("be brief\nhi")
    assert r.usage.prompt_tokens == len(ids)
    parts = list(client.chat.completions.create(model=NAME, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=8, temperature=0, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == r.choices[0].message.content


def test_the_0x_clients_request_is_answered(served):
    url, _ = served
    recorded = json.loads((DATA / "openai_0_28_request.json").read_text())
    r = httpx.post(url + recorded["path"], json=recorded["body"], headers=recorded["headers"],
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)
    assert body["usage"]["completion_tokens"] <= 50


def test_models_health_metrics_and_the_api_key(served, client):
    url, engine = served
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(url + "/health").json()["status"] == "ready"  # no key needed
    for path in ("/v1/models", "/metrics"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = post(url, "/v1/completions", {"model": NAME, "prompt": "a"}, key="wrong")
    assert r.status_code == 401
    compiled = engine.compilations()
    client.completions.create(model=NAME, prompt="x" * 90, max_tokens=30, temperature=0.3)
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for series in ("gpt_jax_slots_in_use", "gpt_jax_requests_waiting",
                   "gpt_jax_time_to_first_token_seconds_bucket",
                   "gpt_jax_inter_token_latency_seconds_bucket", "gpt_jax_prompt_tokens_total",
                   "gpt_jax_generation_tokens_total"):
        assert series in text, series
    assert f"gpt_jax_compilations {float(compiled)}" in text  # nothing compiled after warm-up


@pytest.mark.parametrize("body, status, param, message", [
    ({"prompt": "a"}, 400, "model", "model is required"),
    ({"model": "gpt-9", "prompt": "a"}, 404, "model", "model 'gpt-9' does not exist"),
    ({"model": NAME, "prompt": "a", "temperature": -1}, 400, "temperature", "greater than"),
    ({"model": NAME, "prompt": "a", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"model": NAME, "prompt": "a", "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"model": NAME, "prompt": "a", "n": 5}, 400, None, "n=5 must be between 1 and"),
    ({"model": NAME, "prompt": "a", "max_tokens": -1}, 400, "max_tokens", "greater than"),
    ({"model": NAME, "prompt": "a", "max_tokens": 101}, 400, "max_tokens", "max_tokens=101"),
    ({"model": NAME, "prompt": "a", "logprobs": 6}, 400, "logprobs", "less than or equal to 5"),
    ({"model": NAME, "prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, 400, "stop", "at most 4"),
    ({"model": NAME, "prompt": "a", "frequency_penalty": 1}, 400, "frequency_penalty",
     "not supported"),
    ({"model": NAME, "prompt": "a", "bogus": 1}, 400, "bogus", "not a parameter"),
    ({"model": NAME, "prompt": []}, 400, "prompt", "prompt must be"),
    ({"model": NAME, "prompt": [[1, 999]]}, 400, None, "token id 999 outside"),
    ({"model": NAME, "prompt": "x" * 100, "max_tokens": 40}, 400, "max_tokens",
     "the prompt has 100 tokens and max_tokens=40: 140 exceed the model's context of 128"),
])
def test_each_bad_value_is_one_openai_error_naming_the_field(served, body, status, param,
                                                            message):
    r = post(served[0], "/v1/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"], error
    assert "Traceback" not in r.text


def test_bodies_that_are_not_requests(served):
    url, _ = served
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", content=b"x" * (2 << 20), headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = post(url, "/v1/chat/completions", {"model": NAME, "messages": []})
    assert r.status_code == 400 and "messages is empty" in r.json()["error"]["message"]
    r = post(url, "/v1/chat/completions", {"model": NAME, "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    assert r.status_code == 400 and "end with a user message" in r.json()["error"]["message"]
    assert httpx.get(url + "/health").status_code == 200  # still serving


@contextlib.contextmanager
def slow_decode(engine: Engine, seconds: float):
    """Each decode step takes at least `seconds` (so a test can act while one runs)."""
    real = engine._decode

    def slow():
        time.sleep(seconds)
        return real()

    engine._decode = slow
    try:
        yield
    finally:
        engine._decode = real


def test_a_disconnected_stream_frees_its_slot(served):
    url, engine = served
    with slow_decode(engine, 0.05):
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": NAME, "prompt": "a", "max_tokens": 100,
                                "stream": True}) as r:
            next(r.iter_lines())
            assert engine.active == 1
        deadline = time.monotonic() + 20
        while engine.active and time.monotonic() < deadline:
            time.sleep(0.02)
    assert engine.active == 0
    # The slot is freed on the engine's thread before the request's handler hears of it and
    # counts it, so the counter may trail `active` by a moment.
    cancelled = r'gpt_jax_requests_finished_total\{finish_reason="cancelled"\} [1-9]'
    deadline = time.monotonic() + 10
    while True:
        metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        if re.search(cancelled, metrics) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert re.search(cancelled, metrics)


def test_a_full_queue_answers_429_with_retry_after(params):
    engine = make_engine(params, slots=1, max_queue=1)
    with running(engine) as url, slow_decode(engine, 0.05):
        body = {"model": NAME, "prompt": "a", "max_tokens": 60}
        first = threading.Thread(target=post, args=(url, "/v1/completions", body, None))
        first.start()
        deadline = time.monotonic() + 20
        while not engine.active and time.monotonic() < deadline:
            time.sleep(0.01)
        second = threading.Thread(target=post, args=(url, "/v1/completions", body, None))
        second.start()
        while not engine.waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        r = post(url, "/v1/completions", body, key=None)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        for t in (first, second):
            t.join(60)


def test_gpt_jax_serve_starts_says_ready_and_exits_0_on_sigterm():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gpt_jax.cli", "serve",
                             f"--workdir={DATA / 'run_0077710'}", f"--port={port}", "--slots=2"],
                            cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            lines.append(proc.stdout.readline())
            if lines[-1].startswith("ready:") or proc.poll() is not None:
                break
        assert re.match(r"serving 'run_0077710' \(2 layers, width 32, context 32\) on \d+ x cpu",
                        lines[0]), lines
        assert "2 slots" in lines[0] and lines[-1].startswith("ready: warm-up compiled"), lines
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "run_0077710", "prompt": "def ", "max_tokens": 4})
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert proc.stdout.read().strip().endswith("stopped")
    finally:
        if proc.poll() is None:
            proc.kill()

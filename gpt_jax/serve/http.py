"""The OpenAI-compatible HTTP server over the serving engine (FastAPI on uvicorn).

    POST /v1/completions                     prompt(s) -> choices (streamed as server-sent events)
    POST /v1/chat/completions                messages -> choices, by the run's chat template
    POST /v1/engines/{model}/completions     the route the 0.x `openai` client posts to
    GET  /v1/models   GET /health   GET /metrics (Prometheus)

Requests are checked by pydantic models (an unknown field, a bad value, a malformed body: 400
naming the field), turned into engine requests, and answered when the engine's thread has run
them; streamed text comes from the engine's incremental detokenizer (whole characters, never a
stop string). A client that disconnects cancels its request: its slots are free at the next
engine step. Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}` and
never carry a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import signal
import threading
import time
from typing import Any, AsyncIterator, Callable, Literal

import prometheus_client as prom
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gpt_jax.errors import OverloadedError, SamplingError
from gpt_jax.serve.chat import ChatTemplate
from gpt_jax.serve.engine import TOP_LOGPROBS, Engine, Event, Handle, Request, Sampling

log = logging.getLogger("gpt_jax.serve")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_name: str = "gpt_jax"  # what /v1/models lists and requests must name
    aliases: tuple[str, ...] = ()  # other names requests may use (e.g. an old client's engine)
    api_key: str = ""  # "": no key needed; else every route but /health wants the Bearer key
    max_tokens_cap: int = 4096  # largest max_tokens a request may ask for
    max_n: int = 8  # largest n (it must also fit the engine's slots)
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1  # the Retry-After of a 429


# -- request bodies --------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # an extension: 0 is off
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted as OpenAI's clients send them, refused where they ask for what is not done here.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatBody(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status, headers=self.headers)


# -- metrics ---------------------------------------------------------------------------------

class Metrics:
    """The server's Prometheus series, in a registry of its own."""

    def __init__(self, engine: Engine):
        self.registry = r = prom.CollectorRegistry()
        self.running = prom.Gauge("gpt_jax_requests_running", "Requests with a slot", registry=r)
        self.waiting = prom.Gauge("gpt_jax_requests_waiting", "Requests queued", registry=r)
        self.slots = prom.Gauge("gpt_jax_slots_in_use", "Decode slots in use", registry=r)
        self.slots_total = prom.Gauge("gpt_jax_slots", "Decode slots", registry=r)
        self.slots_total.set(engine.config.slots)
        self.ttft = prom.Histogram("gpt_jax_time_to_first_token_seconds",
                                   "Time from arrival to the first token", registry=r,
                                   buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.itl = prom.Histogram("gpt_jax_inter_token_latency_seconds",
                                  "Time between two tokens of a choice", registry=r,
                                  buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5))
        self.prompt_tokens = prom.Counter("gpt_jax_prompt_tokens", "Prompt tokens", registry=r)
        self.generated_tokens = prom.Counter("gpt_jax_generation_tokens", "Generated tokens",
                                             registry=r)
        self.finished = prom.Counter("gpt_jax_requests_finished", "Choices by finish reason",
                                     ["finish_reason"], registry=r)
        self.compilations = prom.Gauge("gpt_jax_compilations", "Compiled engine programs",
                                       registry=r)
        self.steps = prom.Gauge("gpt_jax_engine_steps", "Decode steps run", registry=r)
        self.step_device = prom.Gauge(
            "gpt_jax_engine_decode_seconds", "Seconds in the compiled decode step (dispatch to "
            "result on the host)", registry=r)
        self.step_host = prom.Gauge(
            "gpt_jax_engine_host_seconds", "Seconds of host work in decode steps (everything "
            "but the compiled step and admissions)", registry=r)
        self.engine = engine

    def render(self) -> bytes:
        e = self.engine
        self.slots.set(e.active)
        self.running.set(len({id(s[0]) for s in e.slots if s is not None}))
        self.waiting.set(len(e.waiting))
        self.compilations.set(e.compilations())
        self.steps.set(e.steps)
        self.step_device.set(e.decode_seconds)
        self.step_host.set(e.host_seconds)
        return prom.generate_latest(self.registry)


# -- the app ---------------------------------------------------------------------------------

@dataclasses.dataclass
class _Job:
    """One HTTP request's engine requests, fed by the engine's thread into an asyncio queue."""
    handles: list[Handle]
    events: asyncio.Queue
    choices_per_prompt: int


class Server:
    """The state behind the routes: the engine, its tokenizer and template, readiness."""

    def __init__(self, engine: Engine, tokenizer, template: ChatTemplate | None,
                 config: ServerConfig = ServerConfig()):
        self.engine, self.tokenizer, self.template, self.config = (engine, tokenizer, template,
                                                                   config)
        self.metrics = Metrics(engine)
        self.ready = False
        self.draining = False
        self.warm_up_s: float | None = None

    # -- turning bodies into engine requests -------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.config.model_name,) + self.config.aliases:
            raise ApiError(404, f"model {model!r} does not exist; this server serves "
                           f"{self.config.model_name!r}", "not_found_error", "model",
                           "model_not_found")

    def _stops(self, stop) -> tuple[str, ...]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4:
            raise ApiError(400, f"stop has {len(stops)} sequences; at most 4", param="stop")
        return tuple(s for s in stops if s)

    def _common(self, body: _Common, max_tokens: int | None) -> dict:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(body, name):
                raise ApiError(400, f"{name}={getattr(body, name)} is not supported here; "
                               "allowed: 0", param=name)
        if body.logit_bias:
            raise ApiError(400, "logit_bias is not supported here", param="logit_bias")
        if body.n > self.config.max_n:
            raise ApiError(400, f"n={body.n} is more than this server's {self.config.max_n}",
                           param="n")
        max_tokens = 16 if max_tokens is None else max_tokens
        if max_tokens > self.config.max_tokens_cap:
            raise ApiError(400, f"max_tokens={max_tokens} is more than this server's "
                           f"{self.config.max_tokens_cap}", param="max_tokens")
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        return dict(max_tokens=max_tokens, n=body.n, stop=self._stops(body.stop),
                    sampling=Sampling(body.temperature, body.top_k, body.top_p, seed & 0x7FFFFFFF))

    def encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text)) if text else []
        return ids or [int(self.tokenizer.bos_id)]

    def completion_requests(self, body: CompletionBody) -> list[Request]:
        if body.best_of not in (None, 1) or body.suffix:
            raise ApiError(400, "best_of and suffix are not supported here",
                           param="best_of" if body.best_of not in (None, 1) else "suffix")
        common = self._common(body, body.max_tokens)
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [self.encode(prompt)]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.encode(p) for p in prompt]
        elif prompt and all(isinstance(p, list) for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            raise ApiError(400, "prompt must be a string, a list of strings, a list of token "
                           "ids or a list of such lists, and not empty", param="prompt")
        return [Request(p, logprobs=body.logprobs, echo=body.echo, **common) for p in prompts]

    def chat_request(self, body: ChatBody) -> Request:
        if self.template is None:
            raise ApiError(400, "this run has no chat template (tokenizer/chat.json, written "
                           "when a run is fine-tuned on SFT pairs); use /v1/completions",
                           param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content} for m in body.messages]
        try:
            prompt = self.template.render(messages, self.tokenizer)
        except SamplingError as e:
            raise ApiError(400, str(e), param="messages") from None
        common = self._common(body, body.max_completion_tokens or body.max_tokens)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return Request(prompt, logprobs=logprobs, **common)

    # -- running ------------------------------------------------------------------------

    def submit(self, requests: list[Request]) -> _Job:
        if not self.ready:
            raise ApiError(503, "the server is warming up; retry after GET /health says "
                           "ready", "server_error", code="not_ready", headers={"Retry-After": "5"})
        if self.draining:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutdown")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        handles: list[Handle] = []
        for r in requests:
            try:
                self.engine.check(r)
            except SamplingError as e:
                param = "max_tokens" if "max_tokens" in str(e) else None
                raise ApiError(400, str(e), param=param) from None
        try:
            for i, r in enumerate(requests):
                handles.append(self.engine.submit(
                    r, lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev))))
        except OverloadedError as e:
            for h in handles:
                h.cancel()
            raise ApiError(429, str(e), "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.config.retry_after_s)}) from None
        self.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in requests))
        return _Job(handles, events, requests[0].n)

    async def events(self, job: _Job, http: HttpRequest) -> AsyncIterator[tuple[int, Event]]:
        """The job's events in order until every choice has finished; a disconnected client
        cancels the job."""
        total = sum(h.request.n for h in job.handles)
        finished, last_token = 0, {}
        try:
            while finished < total:
                try:
                    i, event = await asyncio.wait_for(job.events.get(), 0.25)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        log.info("client disconnected; cancelling %d requests", len(job.handles))
                        self.cancel(job)
                    continue
                now, key = time.monotonic(), (i, event.index)
                if event.tokens:
                    self.metrics.generated_tokens.inc(len(event.tokens))
                    if key in last_token:
                        self.metrics.itl.observe(now - last_token[key])
                    else:
                        self.metrics.ttft.observe(now - job.handles[i].submitted)
                    last_token[key] = now
                if event.finish_reason is not None:
                    finished += 1
                    self.metrics.finished.labels(event.finish_reason).inc()
                yield i, event
        finally:
            if finished < total:  # the client went away (or the server stops)
                self.cancel(job)
                self.metrics.finished.labels("cancelled").inc(total - finished)

    @staticmethod
    def cancel(job: _Job) -> None:
        for h in job.handles:
            h.cancel()

    # -- response bodies ----------------------------------------------------------------

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def logprobs_object(self, tokens, logprobs, tops, offset: int = 0) -> dict:
        strings = [self.token_text(t) for t in tokens]
        offsets, at = [], offset
        for s in strings:
            offsets.append(at)
            at += len(s)
        return {"tokens": strings, "token_logprobs": list(logprobs),
                "top_logprobs": [None if top is None else
                                 {self.token_text(i): lp for i, lp in top} for top in tops],
                "text_offset": offsets}

    def completion_choice(self, handle: Handle, index: int, choice_index: int) -> dict:
        r, c = handle.request, handle.choices[index]
        text, logprobs = c.text, None
        if r.echo:
            text = self.tokenizer.decode(r.prompt) + text
        if r.logprobs is not None:
            tops = c.top_logprobs if r.logprobs else [[] for _ in c.tokens]
            if r.echo:
                prompt = self.logprobs_object(r.prompt, handle.prompt_logprobs,
                                              handle.prompt_top_logprobs)
                offset = len(self.tokenizer.decode(r.prompt))
                own = self.logprobs_object(c.tokens, c.logprobs, tops, offset)
                logprobs = {k: prompt[k] + own[k] for k in own}
            else:
                logprobs = self.logprobs_object(c.tokens, c.logprobs, tops)
        return {"index": choice_index, "text": text, "logprobs": logprobs,
                "finish_reason": _finish(c.finish_reason)}

    @staticmethod
    def usage(handles: list[Handle]) -> dict:
        prompt = sum(len(h.request.prompt) for h in handles)
        done = sum(len(c.tokens) for h in handles for c in h.choices)
        return {"prompt_tokens": prompt, "completion_tokens": done,
                "total_tokens": prompt + done}


def _finish(reason: str | None) -> str | None:
    return {"cancelled": "length"}.get(reason, reason)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="gpt_jax", docs_url=None, redoc_url=None, openapi_url=None)
    config = server.config

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def bad_body(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
        param = ".".join(where) or None
        if first.get("type") == "json_invalid":
            message, param = "the body is not valid JSON", None
        elif not where:
            message = "the body must be a JSON object (Content-Type: application/json)"
        elif first.get("type") == "extra_forbidden":
            message = f"{param} is not a parameter of this endpoint"
        elif first.get("type") == "missing":
            message = f"{param} is required"
        else:
            message = f"{param}: {first.get('msg', 'invalid value')}"
            if "input" in first and not isinstance(first["input"], (dict, list)):
                message += f" (got {first['input']!r})"
        return ApiError(400, message, param=param).response()

    @app.exception_handler(Exception)
    async def crash(_, e: Exception):  # a bug: logged here, never sent to the client
        log.exception("request failed")
        return ApiError(500, "internal error (see the server's log)", "server_error").response()

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next):
        if request.url.path != "/health" and config.api_key:
            if request.headers.get("authorization", "") != f"Bearer {config.api_key}":
                return ApiError(401, "missing or wrong API key: send Authorization: Bearer "
                                "<key>", "authentication_error", code="invalid_api_key").response()
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > config.max_body_bytes:
            return ApiError(413, f"the body has {size} bytes; at most {config.max_body_bytes}",
                            code="request_too_large").response()
        if size is None and request.method == "POST":
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > config.max_body_bytes:
                    return ApiError(413, f"the body is over {config.max_body_bytes} bytes",
                                    code="request_too_large").response()
            request._body = body
        return await call_next(request)

    @app.get("/health")
    async def health():
        if not server.ready or server.draining:
            return JSONResponse({"status": "draining" if server.draining else "warming_up"},
                                status_code=503)
        return {"status": "ready", "warm_up_s": server.warm_up_s}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=prom.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "gpt_jax"}]}

    async def completions(body: CompletionBody, http: HttpRequest, model: str | None):
        server._check_model(model)
        job = server.submit(server.completion_requests(body))
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created,
                "model": config.model_name}
        if body.stream:
            return StreamingResponse(_stream_completion(server, job, http, head, body),
                                     media_type="text/event-stream")
        async for _ in server.events(job, http):
            pass
        choices = [server.completion_choice(h, j, i * job.choices_per_prompt + j)
                   for i, h in enumerate(job.handles) for j in range(h.request.n)]
        return {**head, "choices": choices, "usage": server.usage(job.handles)}

    @app.post("/v1/completions")
    async def post_completions(body: CompletionBody, http: HttpRequest):
        if body.model is None:
            raise ApiError(400, "model is required", param="model")
        return await completions(body, http, body.model)

    @app.post("/v1/engines/{model}/completions")
    async def post_engine_completions(model: str, body: CompletionBody, http: HttpRequest):
        return await completions(body, http, model)

    @app.post("/v1/chat/completions")
    async def post_chat(body: ChatBody, http: HttpRequest):
        if body.model is None:
            raise ApiError(400, "model is required", param="model")
        server._check_model(body.model)
        job = server.submit([server.chat_request(body)])
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion",
                "created": int(time.time()), "model": config.model_name}
        if body.stream:
            return StreamingResponse(_stream_chat(server, job, http, head, body),
                                     media_type="text/event-stream")
        async for _ in server.events(job, http):
            pass
        h = job.handles[0]
        choices = []
        for j, c in enumerate(h.choices):
            logprobs = None
            if h.request.logprobs is not None:
                logprobs = {"content": [
                    {"token": server.token_text(t), "logprob": lp,
                     "top_logprobs": [{"token": server.token_text(i), "logprob": x}
                                      for i, x in (c.top_logprobs[k] if c.top_logprobs else [])]}
                    for k, (t, lp) in enumerate(zip(c.tokens, c.logprobs))]}
            choices.append({"index": j, "message": {"role": "assistant", "content": c.text},
                            "logprobs": logprobs, "finish_reason": _finish(c.finish_reason)})
        return {**head, "choices": choices, "usage": server.usage(job.handles)}

    return app


async def _stream_completion(server: Server, job: _Job, http: HttpRequest, head: dict,
                             body: CompletionBody) -> AsyncIterator[str]:
    chunk = {**head}
    if body.echo:
        for i, h in enumerate(job.handles):
            for j in range(h.request.n):
                yield _sse({**chunk, "choices": [{
                    "index": i * job.choices_per_prompt + j,
                    "text": server.tokenizer.decode(h.request.prompt), "logprobs": None,
                    "finish_reason": None}]})
    async for i, event in server.events(job, http):
        h = job.handles[i]
        index = i * job.choices_per_prompt + event.index
        if event.text or (event.tokens and h.request.logprobs is not None):
            logprobs = None
            if h.request.logprobs is not None:
                tops = ([list(t) for t in event.top] if h.request.logprobs
                        else [[] for _ in event.tokens])
                logprobs = server.logprobs_object(event.tokens, event.logprobs, tops)
            yield _sse({**chunk, "choices": [{"index": index, "text": event.text,
                                              "logprobs": logprobs, "finish_reason": None}]})
        if event.finish_reason is not None:
            yield _sse({**chunk, "choices": [{"index": index, "text": "", "logprobs": None,
                                              "finish_reason": _finish(event.finish_reason)}]})
    if body.stream_options is not None and body.stream_options.include_usage:
        yield _sse({**chunk, "choices": [], "usage": server.usage(job.handles)})
    yield "data: [DONE]\n\n"


async def _stream_chat(server: Server, job: _Job, http: HttpRequest, head: dict,
                       body: ChatBody) -> AsyncIterator[str]:
    chunk = {**head, "object": "chat.completion.chunk"}
    for j in range(job.choices_per_prompt):
        yield _sse({**chunk, "choices": [{"index": j, "delta": {"role": "assistant",
                                                                 "content": ""},
                                          "logprobs": None, "finish_reason": None}]})
    async for _, event in server.events(job, http):
        if event.text:
            yield _sse({**chunk, "choices": [{"index": event.index,
                                              "delta": {"content": event.text},
                                              "logprobs": None, "finish_reason": None}]})
        if event.finish_reason is not None:
            yield _sse({**chunk, "choices": [{"index": event.index, "delta": {},
                                              "logprobs": None,
                                              "finish_reason": _finish(event.finish_reason)}]})
    if body.stream_options is not None and body.stream_options.include_usage:
        yield _sse({**chunk, "choices": [], "usage": server.usage(job.handles)})
    yield "data: [DONE]\n\n"


class Uvicorn(uvicorn.Server):
    """uvicorn's server, draining ours first on SIGTERM/SIGINT (new requests get 503 at once)
    and exiting 0 after a clean drain (uvicorn would re-raise the signal once it has stopped)."""

    def __init__(self, config: uvicorn.Config, server: Server):
        super().__init__(config)
        self.gpt_jax = server

    def handle_exit(self, sig, frame) -> None:
        self.gpt_jax.draining = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for in-flight requests
        self.should_exit = True


def warm_up_and_start(server: Server, on_ready: Callable[[str], None] | None = None) -> None:
    """Compile every shape, start the engine's loop, then say ready (what /health reports)."""
    server.warm_up_s = server.engine.warm_up()
    server.engine.start()
    server.ready = True
    if on_ready is not None:
        on_ready(f"ready: warm-up compiled {server.engine.compilations()} programs in "
                 f"{server.warm_up_s:.1f} s")


def run(server: Server, host: str, port: int, *, shutdown_deadline_s: float = 30.0,
        on_ready: Callable[[str], None] | None = None) -> Uvicorn:
    """Serve until SIGTERM/SIGINT (or `should_exit` of the returned server): warm-up runs
    beside the listening socket (503 until ready); on a signal, new requests get 503, in-flight
    ones get `shutdown_deadline_s` to finish, then the rest are cancelled."""
    app = create_app(server)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=int(max(1, shutdown_deadline_s)))
    front = Uvicorn(config, server)
    threading.Thread(target=warm_up_and_start, args=(server, on_ready), daemon=True,
                     name="gpt_jax-warm-up").start()
    try:
        front.run()
    finally:
        server.draining = True
        server.engine.stop(deadline_s=shutdown_deadline_s if server.ready else 0.0)
    return front

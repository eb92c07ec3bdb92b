"""
Serve a TinyGPT checkpoint: a chat page for the browser and an OpenAI-compatible API for every client that
already speaks it.

    python serve.py                                   # http://127.0.0.1:8000, the chat's checkpoint and flags
    python serve.py --ckpt ckpt/release --port 8080 --api_key secret

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model="tinygpt", messages=[{"role": "user", "content": "Hi!"}])

Endpoints: GET / (serve.html, self-contained: no CDN), POST /v1/chat/completions (OpenAI's Chat Completions
schema, streamed as server-sent events with "stream": true), GET /v1/models and GET /health.

The model is loaded once. Each request is answered by the engine (engine.py: history truncation, sampling,
UTF-8 safe streaming) as the terminal chat's turns are, with nothing kept between requests, on one worker
thread that takes requests in order of arrival: a small CPU has no spare cores for a second generation, so
running two at once would only make both slower. A client that
disconnects stops its generation at the next token; Ctrl-C or SIGTERM ends the answers in flight whole
before the server exits. Bodies, message counts, max_tokens and the queue are bounded; every error is an
OpenAI-style error object, never a 500 with a traceback.

With --knowledge (as in the chat), each answer is looked up first: the response keeps OpenAI's shape and adds
the passages in an extension field, "sources" (on the last chunk when streamed), which clients ignore; a
request's "retrieval": false skips the lookup.
"""

import argparse
import asyncio
import dataclasses
import json
import os
import queue
import re
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from engine import ContextLengthExceeded, SamplingConfig, add_model_arguments, check_sampling, load_engine
from runtime import UserError

PAGE = Path(__file__).resolve().parent / "serve.html"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Limits:
    max_body_bytes: int = 1_000_000  # a long history is a few tens of kB; the window holds far fewer tokens
    max_messages: int = 256
    max_tokens: int = 2048
    max_stops: int = 4  # as OpenAI's API
    max_waiting: int = 64  # requests queued behind the one generating; more get a 503


# -----------------------------------------------------------------------------
# The request schema: OpenAI's Chat Completions parameters that this server honours, with OpenAI's meaning,
# and our sampler's extensions. Anything else, and any value of the wrong type, NaN or infinite, is a 400
# that names the parameter: a client is never answered as if a setting it sent had been applied.

EXTENSIONS = ("top_k", "min_p", "repetition_penalty", "repetition_window", "dry_multiplier", "dry_base",
              "dry_allowed_length", "no_repeat_ngram_size", "context_weight")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self):
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class ChatRequest(Strict):
    messages: list[Message]
    model: str | None = None
    user: str | None = None  # the caller's id for its end user: recorded nowhere, changes nothing
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    top_k: int | None = None  # the extensions: our sampler's own settings (chat_with_model.py --help)
    min_p: float | None = None
    repetition_penalty: float | None = None
    repetition_window: int | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    no_repeat_ngram_size: int | None = None
    context_weight: float | None = None
    retrieval: bool | None = None  # extension: look things up first (default: on where the server has --knowledge)


class ApiError(Exception):
    """An error answered as OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, kind="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def payload(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self):
        return JSONResponse(self.payload(), status_code=self.status)


UNION_MEMBER = re.compile(r"str|int|float|bool|(list|dict)\[.*\]")  # pydantic's name for a union's alternative


def field_path(loc):
    """A validation error's location as the request names it: messages[0].content, not messages.0.content.str
    (the index in brackets, a logit_bias key quoted, a union's alternatives left out)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif path == "logit_bias":
            path += f"[{json.dumps(part)}]"
        elif not UNION_MEMBER.fullmatch(part):
            path += f".{part}" if path else part
    return path or None


def first_problem(error):
    """A pydantic ValidationError's first problem, as (message, field)."""
    problem = error.errors()[0]
    field = field_path(problem["loc"])
    if problem["type"] == "extra_forbidden":
        return f"{field}: this server does not support this parameter", field
    return f"{field}: {problem['msg']}" if field else problem["msg"], field


def sampling_for(request, defaults, limits):
    """The server's sampling flags, overridden by the request's fields; ApiError names a bad one."""
    if request.n != 1:
        raise ApiError(400, "n must be 1: this server generates one choice per request", "n")
    if request.temperature is not None and not 0 <= request.temperature <= 2:
        raise ApiError(400, "temperature must be between 0 and 2", "temperature")
    if request.top_logprobs is not None and not (request.logprobs and 0 <= request.top_logprobs <= 20):
        raise ApiError(400, "top_logprobs must be between 0 and 20, with logprobs true", "top_logprobs")
    max_tokens = next((n for n in (request.max_completion_tokens, request.max_tokens) if n is not None),
                      defaults.max_new_tokens)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"max_tokens must be between 1 and {limits.max_tokens}", "max_tokens")
    names = ("temperature", "top_p", "frequency_penalty", "presence_penalty", "seed", *EXTENSIONS)
    given = {name: getattr(request, name) for name in names if getattr(request, name) is not None}
    sampling = dataclasses.replace(defaults, max_new_tokens=max_tokens, **given)
    if request.seed is None:
        sampling.seed = secrets.randbits(63)  # OpenAI's behaviour: no seed, a new answer every time
    problems = check_sampling(sampling)
    if problems:
        raise ApiError(400, "; ".join(problems), problems[0].split()[0])
    return sampling


def logit_bias_of(request, vocab_size):
    """{token id: bias} from OpenAI's logit_bias, whose keys are token ids as strings and values -100 to 100."""
    bias = {}
    for key, value in (request.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= vocab_size or not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias maps token ids (0 to {vocab_size - 1}) to values from -100 to 100; "
                                f"got {key!r}: {value}", "logit_bias")
        bias[int(key)] = value
    return bias


def stops_of(request, limits):
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > limits.max_stops or any(not s for s in stops):
        raise ApiError(400, f"stop must be at most {limits.max_stops} non-empty strings", "stop")
    return stops


def conversation_of(messages, limits):
    """(system prompt, earlier turns, the user's newest message) from OpenAI-style messages."""
    if not messages:
        raise ApiError(400, "messages must hold at least one message", "messages")
    if len(messages) > limits.max_messages:
        raise ApiError(400, f"at most {limits.max_messages} messages per request", "messages")
    system = "\n\n".join(m.text() for m in messages if m.role in ("system", "developer"))
    turns = [(m.role, m.text()) for m in messages if m.role in ("user", "assistant")]
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be the user's", "messages")
    return system, turns[:-1], turns[-1][1]


# -----------------------------------------------------------------------------
# Stop sequences: text is held back while it could still be the start of one


class StopScanner:
    def __init__(self, stops):
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, piece):
        """The part of the text so far that can be sent: all of it up to a stop sequence, or all but
        the last characters that might begin one."""
        self.text += piece
        found = [i for i in (self.text.find(s, max(0, self.sent - self.hold)) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            end = min(found)
        else:
            end = max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def flush(self):
        out, self.sent = ("" if self.stopped else self.text[self.sent:]), len(self.text)
        return out


# -----------------------------------------------------------------------------
# The worker: one thread, one Chat, one generation at a time


@dataclass
class Job:
    system: str
    history: list
    user_text: str
    sampling: SamplingConfig
    logit_bias: dict  # {token id: bias}
    top_logprobs: int | None  # None: no logprobs asked for
    retrieval: bool
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: threading.Event


@dataclass
class Piece:
    text: str
    logprobs: list  # OpenAI's logprob entries of the tokens behind this text; empty unless asked for


@dataclass
class Finished:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop sequence) or "length"
    sources: list  # the passages the answer was given ({"title", "text", "source"}), an extension field


class Worker:
    def __init__(self, engine, limits):
        self.engine, self.limits, self.jobs = engine, limits, queue.Queue()
        self.current, self.cancelled = None, 0  # cancelled: generations whose client left, or hit a stop sequence
        self.stopping = False
        threading.Thread(target=self.run, daemon=True, name="generation").start()

    @property
    def busy(self):
        return self.current is not None

    def submit(self, job):
        if self.jobs.qsize() >= self.limits.max_waiting:
            raise ApiError(503, "the server is busy; try again shortly", kind="server_error", code="busy")
        self.jobs.put(job)

    def stop_all(self):
        """The server is stopping: the answer being generated ends at its next token, and the waiting
        requests get a 503, so that every client gets a whole response before the connections close."""
        self.stopping = True
        for job in [self.current, *list(self.jobs.queue)]:
            if job is not None:
                job.cancelled.set()

    def run(self):
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                self.cancelled += 1  # its client left while it waited, or the server is stopping
                if self.stopping:
                    job.loop.call_soon_threadsafe(job.out.put_nowait, ApiError(
                        503, "the server is shutting down", kind="server_error", code="shutting_down"))
                continue
            self.current = job
            if self.stopping:  # stop_all ran just as this job was taken
                job.cancelled.set()
            try:
                result = self.generate(job)
            except ContextLengthExceeded as e:
                result = ApiError(400, str(e), "messages", code="context_length_exceeded")
            except UserError as e:  # e.g. a system prompt that leaves no room in the window
                result = ApiError(400, str(e), "messages")
            except Exception as e:  # noqa: BLE001  anything else still answers, and the worker lives on
                result = ApiError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")
            finally:
                self.current = None
            job.loop.call_soon_threadsafe(job.out.put_nowait, result)

    def generate(self, job):
        """Send each text piece to the job's queue; return Finished with the token counts."""
        engine = self.engine
        turn = engine.prepare(job.system, job.history, job.user_text, job.sampling.max_new_tokens, job.retrieval,
                              cut_to_fit=False)
        entries = []

        def record_logprobs(token_id, logits):
            entries.append(logprob_entry(engine, logits, token_id, job.top_logprobs))
        on_token = record_logprobs if job.top_logprobs is not None else None
        reply = engine.reply(turn, job.sampling, engine.generator(job.sampling.seed), job.logit_bias, on_token)
        for text in reply:
            if job.cancelled.is_set():
                self.cancelled += 1
                break
            job.loop.call_soon_threadsafe(job.out.put_nowait, Piece(text, entries[:]))
            entries.clear()
        finish_reason = reply.finish_reason or "stop"  # stopped early: by a stop sequence, or its client left
        sources = [{"title": p.title, "text": p.text, "source": p.source} for p in turn.passages]
        return Finished(len(turn.prompt.ids), reply.tokens + (finish_reason == "stop"), finish_reason, sources)


def logprob_entry(engine, logits, token_id, top):
    """OpenAI's logprobs entry of one token: its log-probability under the model (log_softmax of the model's
    logits, before any penalty or temperature), its text and bytes, and the `top` likeliest tokens'. A special
    token's text is its name, such as <|user|>."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)

    def entry(i, logprob):
        raw = engine.token_table[i] or engine.tokenizer.id_to_token(i).encode()
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}
    values, ids = logprobs.topk(top) if top else (torch.empty(0), torch.empty(0, dtype=torch.long))
    top_entries = [entry(i, v) for i, v in zip(ids.tolist(), values.tolist())]
    return entry(token_id, logprobs[token_id].item()) | {"top_logprobs": top_entries}


# -----------------------------------------------------------------------------
# The app


def log_failure(request, error):
    """One line on stderr for each request answered with an error."""
    print(f"failed: {request.method} {request.url.path}: {error.status} {error.message}", file=sys.stderr,
          flush=True)


def resident_mb():
    """The server's resident memory in MB, for /health (Linux; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20, 1)


def completion_id():
    return f"chatcmpl-{secrets.token_hex(12)}"


def chunk(cid, created, model_id, delta, finish_reason=None, usage=None, logprobs=None, sources=None):
    """One server-sent event; the last content chunk carries the answer's sources (an extension field)."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]}
    if usage is not None:
        body |= {"choices": [], "usage": usage}
    if sources is not None:
        body["sources"] = sources
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def cancel_on_disconnect(request, job, every_s=0.5):
    """A non-streaming client that leaves frees the worker too."""
    while not job.cancelled.is_set():
        if await request.is_disconnected():
            job.cancelled.set()
        await asyncio.sleep(every_s)


def usage_of(finished):
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


async def read_json(request, limits):
    """The body as JSON, refusing one over the size limit before reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise ApiError(413, f"request body over {limits.max_body_bytes:,} bytes", code="body_too_large")
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > limits.max_body_bytes:
            raise ApiError(413, f"request body over {limits.max_body_bytes:,} bytes", code="body_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})")


def create_app(engine, model_id, defaults, api_key="", limits=None):
    """The FastAPI app around one Engine (its model, tokenizer and index), answering with `defaults` (a
    SamplingConfig) where a request does not say."""
    limits = limits or Limits()
    worker = Worker(engine, limits)
    app = FastAPI(title="TinyGPT", docs_url=None, redoc_url=None, openapi_url=None)
    page = PAGE.read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def api_error(request, error):
        log_failure(request, error)
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, error):  # 404, 405: the same error object as everything else
        error = ApiError(error.status_code, str(error.detail), kind="invalid_request_error")
        log_failure(request, error)
        return error.response()

    def authorize(request):
        sent = request.headers.get("authorization", "")
        if api_key and not secrets.compare_digest(sent, f"Bearer {api_key}"):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           kind="authentication_error", code="invalid_api_key")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        sampling = dataclasses.asdict(defaults) | {"max_tokens": defaults.max_new_tokens}
        knowledge = {"passages": engine.index.n_passages} if engine.index else None
        return {"status": "ok", "model": model_id, "generating": worker.busy, "waiting": worker.jobs.qsize(),
                "cancelled": worker.cancelled, "threads": threading.active_count(), "memory_mb": resident_mb(),
                "sampling": sampling, "knowledge": knowledge}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        model = {"id": model_id, "object": "model", "created": 0, "owned_by": "tinygpt"}
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        data = await read_json(request, limits)
        try:
            body = ChatRequest.model_validate(data)
        except ValidationError as e:
            raise ApiError(400, *first_problem(e))
        sampling = sampling_for(body, defaults, limits)
        stops = stops_of(body, limits)
        system, history, user_text = conversation_of(body.messages, limits)
        top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.retrieval and engine.index is None:
            raise ApiError(400, "retrieval: this server has no knowledge index (start it with --knowledge PATH)",
                           "retrieval")
        retrieval = engine.index is not None and body.retrieval is not False
        job = Job(system, history, user_text, sampling, logit_bias_of(body, engine.model.config.vocab_size),
                  top_logprobs, retrieval, asyncio.get_running_loop(), asyncio.Queue(), threading.Event())
        worker.submit(job)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_events(job, stops, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(request, job, stops)

    async def pieces(job, stops):
        """Pieces as they are generated, their text cut at a stop sequence (the logprobs run up to the token
        where it begins); ends with the Finished record. Leaving early (a stop sequence, a disconnect) cancels
        the job."""
        scanner = StopScanner(stops)
        try:
            while True:
                item = await job.out.get()
                if isinstance(item, ApiError):
                    raise item
                if isinstance(item, Finished):
                    yield Piece(scanner.flush(), [])
                    yield item
                    return
                yield Piece(scanner.push(item.text), item.logprobs)
                if scanner.stopped:
                    job.cancelled.set()
                    while not isinstance(item := await job.out.get(), (Finished, ApiError)):
                        pass  # the worker notices the cancel at its next token
                    if isinstance(item, ApiError):
                        raise item
                    yield dataclasses.replace(item, finish_reason="stop")
                    return
        finally:
            job.cancelled.set()

    async def stream_events(job, stops, include_usage):
        cid, created = completion_id(), int(time.time())
        yield chunk(cid, created, model_id, {"role": "assistant", "content": ""})
        try:
            async for item in pieces(job, stops):
                if isinstance(item, Finished):
                    yield chunk(cid, created, model_id, {}, item.finish_reason, sources=item.sources)
                    if include_usage:
                        yield chunk(cid, created, model_id, {}, usage=usage_of(item))
                elif item.text or item.logprobs:
                    logprobs = {"content": item.logprobs, "refusal": None} if job.top_logprobs is not None else None
                    yield chunk(cid, created, model_id, {"content": item.text}, logprobs=logprobs)
        except ApiError as e:  # the status line is already sent: the error goes in the stream, as OpenAI's does
            print(f"failed: streamed /v1/chat/completions: {e.status} {e.message}", file=sys.stderr, flush=True)
            yield f"data: {json.dumps(e.payload())}\n\n"
        finally:
            job.cancelled.set()  # however the stream ends, a client that left frees the worker
        yield "data: [DONE]\n\n"

    async def complete(request, job, stops):
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        text, entries, finished = [], [], None
        try:
            async for item in pieces(job, stops):
                if isinstance(item, Finished):
                    finished = item
                else:
                    text.append(item.text)
                    entries += item.logprobs
        finally:
            watcher.cancel()
        message = {"role": "assistant", "content": "".join(text)}
        logprobs = {"content": entries, "refusal": None} if job.top_logprobs is not None else None
        choice = {"index": 0, "message": message, "finish_reason": finished.finish_reason, "logprobs": logprobs}
        return {"id": completion_id(), "object": "chat.completion", "created": int(time.time()),
                "model": model_id, "choices": [choice], "usage": usage_of(finished), "sources": finished.sources}

    app.state.worker = worker
    return app


# -----------------------------------------------------------------------------
# Command line: the chat's checkpoint and sampling flags, plus where to listen


def listen(host, port):
    """A bound socket, so that a taken port is a one-line error before the model loads."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # clients that connect before uvicorn starts wait in the backlog, not refused
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}")
    return sock


class Server(uvicorn.Server):
    """uvicorn, which on Ctrl-C or SIGTERM first ends the answers in flight (at their next token), so that no
    client is cut off mid-stream when the grace period ends."""

    def __init__(self, config, worker):
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig, frame):
        self.worker.stop_all()
        super().handle_exit(sig, frame)


def model_name(path, ckpt):
    """A model id for the API: the run's folder and the step, such as 'release-step16373'."""
    folder = Path(path).resolve()
    folder = folder.parent if folder.is_file() else folder
    return f"{folder.name}-step{ckpt['step']}"


def port_number(text):
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port: use 1 to 65535 (0: any free one)")
    return port


def build_parser():
    parser = argparse.ArgumentParser(description="Serve a TinyGPT checkpoint: a chat page and an "
                                                 "OpenAI-compatible API.")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every network)")
    parser.add_argument("--port", type=port_number, default=8000, help="port to listen on (0: any free one)")
    parser.add_argument("--api_key", default="", help="require 'Authorization: Bearer KEY' on /v1/ requests")
    return parser


def main(argv=None):
    """Listen, load the model, and serve until Ctrl-C or SIGTERM."""
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the server as Ctrl-C does
    try:
        sock = listen(args.host, args.port)
        engine, defaults, path, ckpt = load_engine(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    model_id = model_name(path, ckpt)
    where = "loopback only: other machines cannot connect; --host 0.0.0.0 opens it to the network" \
        if args.host in LOOPBACK else f"open to the network on {args.host}" + ("" if args.api_key else ", with no --api_key")
    print(f"serving {model_id} on http://{args.host}:{sock.getsockname()[1]} ({where}); Ctrl-C stops", flush=True)
    app = create_app(engine, model_id, defaults, args.api_key)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
    try:
        Server(config, app.state.worker).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn, having shut down, raises the signal that stopped it again
        pass
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

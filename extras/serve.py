"""
The student as an OpenAI-compatible HTTP server (standard library only: http.server, a thread per connection).

    python -m extras serve --adapter runs/toy_default                  # http://127.0.0.1:8000/v1
    python -m extras serve --port 8001 --api-key-env FIREACT_SERVE_KEY # clients must send that key
    python fireact.py eval --task toy --teacher-model toy_default --base-url http://127.0.0.1:8000/v1 --zero-shot
    (`python model.py serve ...` hands the same command line over to this module)

Owns: ServeConfig, the Engine (one worker thread, batching), the Prompter (request -> token ids), the App (the
OpenAI API: GET /v1/models, POST /v1/completions and /v1/chat/completions with max_tokens, temperature, top_p,
stop, n, seed and stream as server-sent events, usage, errors in OpenAI's JSON shape), the Handler and serve().

Requests that arrive together with the same sampling settings become ONE call of the generate function that
fast.for_inference returns (batched, with its prefix cache), so an eval or a teacher pointed here is not served
one by one. Chat prompts: "template" renders the messages with the model's chat template (tokenizer_config.json);
"trajectory" reads FireAct's gpt format (fireact.chat_messages) and renders it exactly as the student was trained
(fireact.render), so `fireact.py eval --zero-shot --teacher-model NAME --base-url ...` runs the fine-tuned student
as `fireact.py eval --adapter` does. The default: trajectory with --adapter, template without. A trajectory chat
is one agent turn: it ends at its first complete Action line (fireact.cut_after_action), as the agent loop does.

Under load and hostile clients (issue 34): the work of one request is bounded (--max-choices prompts x n,
--max-request-tokens of completion) and scheduled fairly: the Engine serves jobs in turn, a batch at most
--batch-size rows, and a generate call yields to waiting requests after --slice-tokens steps (the rows go on in a
later call; the prefix cache keeps what they had). A client that goes away cancels its work. Sockets have read and
idle timeouts (--timeout-s), at most --max-connections are served at once (more get a 503 at once), the listen
backlog is 1024, a body's Content-Length is checked before it is read, a prompt longer than the context can hold
is refused before it is tokenized, and every malformed field is a 400 in OpenAI's shape.
"""
import collections
import dataclasses
import hmac
import json
import os
import queue
import re
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

from common import cli, files
import fast
import fast.cpu
import fast.decode
import fireact
import model as M
import tasks

MAX_BODY = 16 << 20  # bytes of one request body
BACKLOG = 1024       # the listen queue: a burst of clients waits to be accepted instead of being reset


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class ServeConfig:
    model: str = ""               # local dir, .gguf or org/name; "" = the embedded SmolLM2-135M-Instruct
    adapter: str = ""             # LoRA adapter dir (train.py's --out): serve the fine-tuned student
    host: str = "127.0.0.1"       # the address to bind (loopback: only this machine can connect)
    port: int = 8000              # 0 = any free port (printed)
    name: str = ""                # the model id clients send; "" = the adapter dir's name, else the model's
    api_key_env: str = ""         # the NAME of an environment variable: clients must send its value as their key
    chat_format: Literal["", "template", "trajectory"] = ""  # "" = trajectory with --adapter, else template
    template: Literal["", "react", "alpaca"] = ""  # the trajectory layout; "" = what the adapter was trained with
    max_tokens: int = 1000        # a request's max_tokens when it gives none (FireAct's turn cap)
    batch_size: int = 32          # at most this many sequences in one generate call
    batch_wait_ms: int = 5        # wait this long for more requests before a generate call
    prefix_cache_mb: int = 2048   # K/V kept between requests: an agent's next turn prefills only its new tokens
    device: str = ""              # cpu | cuda | cuda:N | mps; "" = the best available
    dtype: Literal["", "float32", "bfloat16", "float16"] = ""  # "" = bf16 on GPU and CPUs with native bf16, else float32
    quant: Literal["", "int4"] = ""  # int4: decode through 4-bit layer weights (CPU)
    compile: bool | None = None   # torch.compile the decode step; auto = on for CPU with a C++ compiler (compiled before serving)
    slice_tokens: int = 32        # a generate call yields to waiting requests after this many steps
    max_choices: int = 128        # at most this many completions (prompts x n) in one request
    max_request_tokens: int = 1 << 18  # at most this many completion tokens (prompts x n x max_tokens) per request
    max_connections: int = 256    # connections served at once (a thread each); more get a 503
    timeout_s: float = 10.0       # a connection that sends nothing for this long (idle, or mid-request) is closed

    def check(self):
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port}: must be in [0, 65535]")
        for name, lo in (("max_tokens", 1), ("batch_size", 1), ("batch_wait_ms", 0), ("prefix_cache_mb", 0),
                         ("slice_tokens", 1), ("max_choices", 1), ("max_request_tokens", 1), ("max_connections", 1),
                         ("timeout_s", 0.001)):
            if getattr(self, name) < lo:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= {lo}")
        try:   # before the model loads: a host that cannot be bound fails in a second, not after a minute
            socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (socket.gaierror, UnicodeError) as e:
            raise ValueError(f"--host {self.host}: {getattr(e, 'strerror', None) or e}") from None
        if self.adapter and not Path(self.adapter).is_dir():
            raise ValueError(f"--adapter {self.adapter}: no such directory")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise ValueError(f"--api-key-env {self.api_key_env}: that environment variable is not set (export it "
                             f"with the key clients must send)")


# ------------------------------------------------------------------------------------------------------ errors
class RequestError(Exception):
    """An error the client gets in OpenAI's shape: {"error": {"message", "type", "param", "code"}} (the server's
    side; common.net.APIError is the client's)."""
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def _get(body, key, types, default, check=None, want=""):
    """body[key] of one of `types` (a bool is not a number here), passing check; else a 400 naming it."""
    v = body.get(key)
    if v is None:
        return default
    types = types if isinstance(types, tuple) else (types,)
    if (isinstance(v, bool) and bool not in types) or not isinstance(v, types) or (check and not check(v)):
        raise RequestError(400, f"Invalid value for '{key}': {_short(v)}; expected {want}", param=key)
    return v


def _short(v):
    try:
        return json.dumps(v)[:80]
    except ValueError:   # an int of more digits than Python prints
        return type(v).__name__


class ClientGone(Exception):
    """The client closed its connection: its work is cancelled and nothing is answered."""


# ------------------------------------------------------------------------------------------------------ engine
@dataclass(eq=False)
class Row:
    job: "Job"
    k: int                        # the choice index in its job
    prompt: list                  # token ids
    ids: list = dataclasses.field(default_factory=list)   # generated so far (over all generate calls)
    done: bool = False


@dataclass(eq=False)
class Job:
    prompts: list                 # token ids per choice (n per prompt)
    max_tokens: int
    key: tuple                    # sampling settings (temperature, top_p, stop, seed, agent_turn): equal keys batch
    stream: bool
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    cancelled: bool = False       # the client went away: the Engine drops the job's rows

    def __post_init__(self):
        self.rows = [Row(self, k, p) for k, p in enumerate(self.prompts)]

    def cancel(self):
        self.cancelled = True

    def pending(self):
        return [r for r in self.rows if not r.done]


class _Yield(Exception):
    """Raised from on_token to end a generate call early (others wait, or its clients went away)."""


class Engine:
    """One worker thread owns the model (generate is not thread-safe, and one batch beats many small calls).
    Request threads submit Jobs; the worker serves them in turn: it takes the job that waited longest, fills a
    batch of at most batch_size rows with the pending rows of jobs of its sampling settings, and makes one call of
    `generate` (model.generate's signature: fast.for_inference's, with its prefix cache, or the plain one). A call
    yields when other jobs wait and it has run slice_tokens steps, or when all its jobs are cancelled: its rows
    keep their tokens and go on in a later call (prompt + tokens so far; the prefix cache holds their K/V). So
    one large request cannot starve small ones, and a client that goes away costs at most a step. A job gets
    ("token", choice, id) events (when streaming), then ("done", choice, text, n_tokens, finish_reason) per
    choice, or ("error", exception)."""

    def __init__(self, model, tok, generate=M.generate, batch_size=32, batch_wait_ms=5, slice_tokens=32):
        self.model, self.tok, self.generate = model, tok, generate
        self.batch_size, self.wait, self.slice = batch_size, batch_wait_ms / 1000, slice_tokens
        self.queue, self.cv = collections.deque(), threading.Condition()   # jobs with rows left, in turn order
        self.calls = 0   # generate calls made (tests see the batching)
        threading.Thread(target=self._loop, daemon=True, name="generate").start()

    def submit(self, job: Job) -> Job:
        with self.cv:
            self.queue.append(job)
            self.cv.notify()
        return job

    def _loop(self):
        idle = True
        while True:
            with self.cv:
                while not self.queue:
                    idle = True
                    self.cv.wait()
            if idle:
                time.sleep(self.wait)   # requests sent together arrive a moment apart
                idle = False
            rows = self._pick()
            if rows:
                self._run(rows)
                with self.cv:   # its jobs' turn is over: those that waited meanwhile go first
                    for j in {id(r.job): r.job for r in rows}.values():
                        if j in self.queue:
                            self.queue.remove(j)
                            self.queue.append(j)

    def _pick(self):
        """The next batch: rows of the settings of the job first in turn, least advanced rows first."""
        with self.cv:
            live = [j for j in self.queue if not j.cancelled and j.pending()]
            self.queue = collections.deque(live)
            if not live:
                return []
            key, rows = live[0].key, []
            for j in live:
                if j.key == key and len(rows) < self.batch_size:
                    rows += sorted(j.pending(), key=lambda r: len(r.ids))[:self.batch_size - len(rows)]
            return rows

    def _others_wait(self, jobs):
        with self.cv:
            return any(j not in jobs and not j.cancelled for j in self.queue)

    def _finish(self, r, stop, agent_turn, reason):
        """Row r is done: its text, cut at its first stop string (or after its first complete Action line)."""
        text = self.tok.decode(r.ids)
        cut = min((k for k in (text.find(s) for s in stop) if k >= 0), default=None)
        cut = fireact.cut_after_action(text) if cut is None and agent_turn else cut
        if reason == "cut" and cut is None:
            return False
        r.done = True
        r.job.events.put(("done", r.k, text if cut is None else text[:cut], len(r.ids),
                          "length" if reason == "length" and cut is None else "stop"))
        return True

    def _run(self, rows):
        temperature, top_p, stop, seed, agent_turn = rows[0].job.key
        jobs = list({id(r.job): r.job for r in rows}.values())
        start = [len(r.ids) for r in rows]
        n = max(r.job.max_tokens - len(r.ids) for r in rows)   # rows that need fewer are finished in on_token
        steps = [0]

        def on_token(i, t):
            r = rows[i]
            if r.done:   # finished here, not in generate (max_tokens, a stop spanning two calls): drop the rest
                return
            r.ids.append(t)
            # generate cuts its own text at stops; a continued row's stop may span the two calls' texts
            if not ((stop or agent_turn) and start[i] and self._finish(r, stop, agent_turn, "cut")):
                if r.job.stream:
                    r.job.events.put(("token", r.k, t))
                if len(r.ids) >= r.job.max_tokens:
                    self._finish(r, stop, agent_turn, "length")
            if len(r.ids) - start[i] > steps[0]:   # the first token of a new step: yield?
                steps[0] = len(r.ids) - start[i]
                if steps[0] < n and (any(j.cancelled and j.pending() for j in jobs) or
                                     (steps[0] >= self.slice and self._others_wait(jobs))):
                    raise _Yield
        # a continued row samples with its own offset of the seed: one draw sequence per call, not the same again
        call_seed = None if seed is None else (seed + 7919 * max(start)) % (1 << 64)
        try:
            self.calls += 1
            self.generate(self.model, self.tok, [r.prompt + r.ids for r in rows], n, temperature, top_p,
                          stop=list(stop), stop_at=fireact.cut_after_action if agent_turn else None, seed=call_seed,
                          on_token=on_token)
            ended = n   # a row with fewer new tokens than the call made ended in it (eos, or a stop)
        except _Yield:
            ended = steps[0] - 1   # at the first token of step steps[0]: rows short of the step before ended
        except Exception as e:  # a bug or out of memory: every waiting request gets a 500, the server lives on
            for j in jobs:
                for r in j.rows:
                    r.done = True
                j.events.put(("error", e))
            return
        for r, s0 in zip(rows, start):
            if not r.done and not self._finish(r, stop, agent_turn, "cut") and len(r.ids) - s0 < ended:
                self._finish(r, stop, agent_turn, "stop")


def safe_prefix(text: str, stop) -> int:
    """How much of a growing text can be streamed: not a tail that may still become a stop string (it is cut
    then) or one that is (a stop ends inside the last token), nor a half-decoded UTF-8 character (U+FFFD until
    its last byte arrives)."""
    n = min([len(text.rstrip("\ufffd"))] + [k for k in (text.find(s) for s in stop) if k >= 0])  # a token may
    for s in stop:                                                        # complete a stop: generate cuts there
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[:n].endswith(s[:k]):
                n -= k
                break
    return n


# ------------------------------------------------------------------------------------------------------ prompts
def chat_template(tok):
    """The model's Jinja chat template (tokenizer_config.json), compiled as transformers does (sandboxed)."""
    path = Path(tok.dir) / "tokenizer_config.json"
    src = files.read_json(path, want=dict).get("chat_template") if path.exists() else None
    if isinstance(src, list):  # [{"name": "default", "template": ...}, ...]
        src = next((t["template"] for t in src if t.get("name") == "default"), None)
    if not src:
        return None
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def fail(msg):
        raise RequestError(400, f"chat template: {msg}", param="messages")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = fail
    return env.from_string(src)


def trajectory_of(messages):
    """FireAct's gpt format (fireact.chat_messages) -> (question, steps): the question is the first user message,
    then assistant Thought/Action turns and user `Observation: ...` turns (parsed by tasks.parse_react)."""
    msgs = [m for m in messages if m["role"] != "system"]
    if not msgs or msgs[0]["role"] != "user":
        raise RequestError(400, "chat format trajectory: the first message must be the user's question (FireAct's "
                                "gpt format); start the server with --chat-format template for other chats",
                           param="messages")
    preamble, steps = tasks.parse_react("\n".join(m["content"] for m in msgs[1:]))
    if preamble:
        raise RequestError(400, "chat format trajectory: expected Thought/Action/Observation turns after the "
                                f"question, got {preamble[0][:60]!r}", param="messages")
    return msgs[0]["content"], [dict(thought=s["thought"], action=s["action"] or "", observation=s["observation"])
                                for s in steps]


def max_token_chars(tok) -> int:
    """The most characters one token can stand for (its longest vocabulary entry, in UTF-8 bytes, an upper
    bound): a text longer than context x this has more tokens than the context holds, without tokenizing it."""
    try:
        if tok.hf is not None:
            return max(len(t.encode()) for t in tok.hf.get_vocab(with_added_tokens=True))
        return max(len(tok.sp.id_to_piece(i).encode()) for i in range(tok.sp.get_piece_size()))
    except Exception:   # an unusual tokenizer: a generous bound
        return 256


class Prompter:
    """Request -> token ids, the way model.generate and the agent loop would build them. Texts are measured before
    they are tokenized: one over `max_chars` cannot fit the context (a 15 MB prompt took 40 s to tokenize)."""
    def __init__(self, tok, chat_format, template, context=None):
        self.tok, self.chat_format, self.template = tok, chat_format, template
        self.jinja = chat_template(tok) if chat_format == "template" else None
        self.context = context
        self.max_chars = context * max_token_chars(tok) if context else None

    def too_long(self, size, param, unit="characters"):
        if self.max_chars is not None and size > (self.max_chars if unit == "characters" else self.context):
            raise RequestError(400, f"This model's maximum context length is {self.context} tokens. However, your "
                                    f"{param} of {size} {unit} holds more tokens than that. Please reduce the "
                                    f"length of the {param}.", param=param, code="context_length_exceeded")

    def completion(self, prompt: str) -> list:
        self.too_long(len(prompt), "prompt")
        return self.tok.encode(prompt, bos=self.tok.add_bos)   # as model.generate encodes a text prompt

    def chat(self, messages) -> list:
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
        self.too_long(len(messages), "messages", "messages")   # each one is a token at least
        msgs = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]: text parts only
                if not content or not all(isinstance(p, dict) and p.get("type") == "text" and
                                          isinstance(p.get("text"), str) for p in content):
                    raise RequestError(400, f"messages[{i}].content: expected a string or a non-empty list of "
                                            "{type: text, text: string} parts (this server reads text only)",
                                       param=f"messages[{i}].content")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str) or m.get("role") not in ("system", "user", "assistant"):
                raise RequestError(400, f"messages[{i}]: expected {{role: system|user|assistant, content: text}}",
                                   param=f"messages[{i}]")
            msgs.append({"role": m["role"], "content": content})
        self.too_long(sum(len(m["content"]) for m in msgs), "messages")
        if self.chat_format == "trajectory":
            question, steps = trajectory_of(msgs)
            return fireact.render(question, steps, self.tok, for_inference=True, template=self.template)[0]
        if self.jinja is None:
            raise RequestError(400, "this model has no chat template (tokenizer_config.json has no chat_template); "
                                    "use /v1/completions, or serve it with --chat-format trajectory", param="messages")
        text = self.jinja.render(messages=msgs, add_generation_prompt=True, bos_token=self._name(self.tok.bos_id),
                                 eos_token=self._name(self.tok.eos_id))
        self.too_long(len(text), "messages")   # many short messages render long: measured before tokenizing
        return self.tok.encode(text)   # the template writes bos itself where the model wants one

    def _name(self, i):
        return self.tok.decode([i]) if i is not None else ""


# ------------------------------------------------------------------------------------------------------ server
class Handler(BaseHTTPRequestHandler):
    server_version = "fireact-serve/" + cli.VERSION
    app = None       # set by make_server: the App
    timeout = 10.0   # set by make_server (--timeout-s): socket reads and writes wait at most this long

    def log_message(self, fmt, *args):   # the request line and status only: never headers (the key is there)
        print(f"{self.address_string()} {fmt % args}", file=sys.stderr)

    def do_GET(self):
        self._call(lambda: self.app.get(self.path))

    def do_POST(self):
        self._call(lambda: self.app.post(self.path, self._body(), self))

    def _not_allowed(self):
        self.close_connection = True
        self.send_json(405, RequestError(405, f"method {self.command} is not allowed on {self.path[:200]}; this "
                                              "server has GET /v1/models and POST /v1/completions, "
                                              "/v1/chat/completions", code="method_not_allowed").body(),
                       {"Allow": "GET, POST"})
    do_PUT = do_DELETE = do_OPTIONS = do_PATCH = do_HEAD = do_TRACE = do_CONNECT = _not_allowed

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a bad request line, headers too long, an unknown method) in OpenAI's JSON
        shape, not as an HTML page; the connection then closes."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        try:
            self.send_json(code, RequestError(code, message or phrase, kind="invalid_request_error" if code < 500
                                              else "server_error").body())
        except OSError:
            pass

    def _body(self):
        """The JSON object sent, its Content-Length checked before a byte is read, read within a deadline."""
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "send the body with a Content-Length (chunked transfer encoding is not supported)")
        values = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if not values:
            raise RequestError(411, "a POST needs a Content-Length header")
        if len(values) > 1 or not re.fullmatch(r"[0-9]{1,20}", next(iter(values))):
            raise RequestError(400, f"invalid Content-Length {', '.join(sorted(values))[:60]!r}: expected one "
                                    "number of bytes")
        n = int(next(iter(values)))
        if n > MAX_BODY:
            raise RequestError(413, f"request body of {n} bytes is over the {MAX_BODY} byte limit")
        data, deadline = bytearray(), time.monotonic() + self.timeout + n / 65536   # at least 64 KB/s
        while len(data) < n:
            try:
                chunk = self.rfile.read1(min(n - len(data), 1 << 16)) if time.monotonic() < deadline else b""
            except (TimeoutError, OSError):
                chunk = b""
            if not chunk:
                raise RequestError(400, f"the request body ended after {len(data)} of the {n} bytes its "
                                        "Content-Length announced")
            data += chunk
        try:
            body = json.loads(data or b"null")
        except (ValueError, RecursionError) as e:   # bad JSON or UTF-8, an int of 5,000 digits, [[[[...]]]]
            raise RequestError(400, f"the request body is not valid JSON ({cli.one_line(e)[:200]})") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def _call(self, fn):
        try:
            self.app.authorize(self.headers.get("Authorization", ""))
            out = fn()
            if out is not None:
                self.send_json(200, out)
        except (ClientGone, ConnectionError, TimeoutError):   # the client went away, or stopped reading
            self.close_connection = True
        except Exception as e:
            if not isinstance(e, RequestError):   # a bug: a 500 in OpenAI's shape; the server keeps its traceback
                import traceback
                traceback.print_exc()
                e = RequestError(500, f"internal error: {type(e).__name__}", kind="server_error")
            self.close_connection = True   # the body may be unread: nothing after it can be trusted
            try:
                self.send_json(e.status, e.body())
            except OSError:   # the client is gone too
                pass

    def client_gone(self) -> bool:
        """Has the client closed its connection? (readable with nothing to read: end of file)"""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def send_json(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def start_events(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def event(self, obj):
        self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")
        self.wfile.flush()


class App:
    """The OpenAI API over an Engine: parse and check a request, queue it, answer or stream the result."""
    def __init__(self, engine, prompter, name, context, default_max_tokens, api_key="", max_choices=128,
                 max_request_tokens=1 << 18):
        self.engine, self.prompter, self.name, self.context = engine, prompter, name, context
        self.default_max_tokens, self.api_key, self.created = default_max_tokens, api_key, int(time.time())
        self.max_choices, self.max_request_tokens = max_choices, max_request_tokens

    def authorize(self, header):
        scheme, _, key = header.strip().partition(" ")   # the scheme is case-insensitive (RFC 9110): bearer too
        if self.api_key and not (scheme.lower() == "bearer" and
                                 hmac.compare_digest(key.strip().encode(), self.api_key.encode())):
            raise RequestError(401, "Incorrect API key provided (send it as 'Authorization: Bearer KEY').",
                               code="invalid_api_key")

    def get(self, path):
        if path.rstrip("/") == "/v1/models":
            return {"object": "list", "data": [self._model()]}
        if path.rstrip("/") == f"/v1/models/{self.name}":
            return self._model()
        raise RequestError(404, f"no route GET {path}; this server has GET /v1/models", code="not_found")

    def _model(self):
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "fireact"}

    def post(self, path, body, handler):
        chat = path.rstrip("/") == "/v1/chat/completions"
        if not chat and path.rstrip("/") != "/v1/completions":
            raise RequestError(404, f"no route POST {path}; this server has /v1/completions and /v1/chat/completions",
                               code="not_found")
        model = _get(body, "model", str, None, want="a model id")
        if model is None:
            raise RequestError(400, "you must provide a model parameter", param="model")
        if model != self.name:
            raise RequestError(404, f"The model '{model}' does not exist; this server serves '{self.name}'",
                               param="model", code="model_not_found")
        best_of = _get(body, "best_of", int, 1, lambda v: v >= 1, "an integer >= 1")
        if body.get("logprobs") or body.get("top_logprobs") or body.get("echo") or best_of > 1:
            raise RequestError(400, "logprobs, echo and best_of are not supported by this server",
                               param="best_of" if best_of > 1 else "logprobs" if body.get("logprobs") else "echo")
        # every field is checked before any work: a malformed one is a 400, never a 500 halfway
        temperature = float(_get(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]"))
        top_p = float(_get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"))
        n = _get(body, "n", int, 1, lambda v: 1 <= v <= 128, "an integer in [1, 128]")
        seed = _get(body, "seed", int, None, lambda v: -(1 << 63) <= v < 1 << 63, "an integer in [-2**63, 2**63)")
        stream = _get(body, "stream", bool, False, want="true or false")
        include_usage = _get(_get(body, "stream_options", dict, {}, want="an object"), "include_usage", bool, False,
                             want="true or false")
        stop = _get(body, "stop", (str, list), [], lambda v: isinstance(v, str) or (
            len(v) <= 4 and all(isinstance(s, str) for s in v)), "a string or a list of up to 4 strings")
        stop = tuple(s for s in ([stop] if isinstance(stop, str) else stop) if s)
        mt_key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        max_tokens = _get(body, mt_key, int, None, lambda v: v >= 1, "an integer >= 1")
        if chat:
            prompts = [self.prompter.chat(body.get("messages"))]
        else:
            p = body.get("prompt")
            if isinstance(p, str):
                p = [p]
            if not isinstance(p, list) or not p or not all(isinstance(x, str) for x in p):
                raise RequestError(400, "'prompt' must be a string or a list of strings", param="prompt")
            if len(p) * n > self.max_choices:   # counted before anything is tokenized
                raise RequestError(400, f"{len(p)} prompts x n {n} = {len(p) * n} completions; this server makes at "
                                        f"most {self.max_choices} per request (--max-choices)",
                                   param="prompt" if len(p) > 1 else "n")
            prompts = [self.prompter.completion(x) for x in p]
        if any(not ids for ids in prompts):
            raise RequestError(400, "the prompt is empty (no tokens)", param="messages" if chat else "prompt")
        if max_tokens is None:
            max_tokens = 16 if not chat else min(self.default_max_tokens, max(1, self.context - max(map(len, prompts))))
        for ids in prompts:
            if len(ids) + max_tokens > self.context:
                raise RequestError(400, f"This model's maximum context length is {self.context} tokens. However, "
                                        f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in the "
                                        f"{'messages' if chat else 'prompt'}, {max_tokens} in the completion). "
                                        "Please reduce the length of the messages or completion.",
                                   param="messages" if chat else "prompt", code="context_length_exceeded")
        if len(prompts) * n * max_tokens > self.max_request_tokens:
            raise RequestError(400, f"{len(prompts)} prompts x n {n} x max_tokens {max_tokens} = "
                                    f"{len(prompts) * n * max_tokens} tokens; this server makes at most "
                                    f"{self.max_request_tokens} per request (--max-request-tokens)", param=mt_key)
        # a trajectory chat asks for one agent turn: it ends at its first complete Action line, as in the agent
        # loop (the student never learned to write `Observation:`, so that stop alone would let it run on)
        agent_turn = chat and self.prompter.chat_format == "trajectory"
        job = self.engine.submit(Job([ids for ids in prompts for _ in range(n)], max_tokens,
                                     (temperature, top_p, stop, seed, agent_turn), stream))
        try:
            return self._answer(job, chat, stop, stream, include_usage, prompts, handler)
        finally:
            if job.pending():
                job.cancel()   # failed or abandoned: nothing of it is left to run

    def _answer(self, job, chat, stop, stream, include_usage, prompts, handler):
        meta = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                    object="chat.completion" if chat else "text_completion", created=int(time.time()), model=self.name)
        usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0}   # as OpenAI: once, whatever n
        if stream:
            self._stream(job, chat, stop, meta, usage, handler, include_usage)
            return None
        choices = [None] * len(job.prompts)
        for _ in choices:
            ev = self._next(job, handler)
            if ev[0] == "error":
                raise ev[1]
            _, k, text, ntok, reason = ev
            usage["completion_tokens"] += ntok
            choices[k] = {"index": k, "finish_reason": reason, "logprobs": None,
                          **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
        return dict(meta, choices=choices, usage=dict(usage, total_tokens=sum(usage.values())))

    @staticmethod
    def _next(job, handler, poll=0.25):
        """The job's next event; meanwhile, every `poll` seconds, whether its client is still there."""
        while True:
            try:
                return job.events.get(timeout=poll)
            except queue.Empty:
                if handler is not None and handler.client_gone():
                    raise ClientGone from None

    def _stream(self, job, chat, stop, meta, usage, h, include_usage):
        meta = dict(meta, object="chat.completion.chunk" if chat else "text_completion")
        toks, sent, left = [[] for _ in job.prompts], [""] * len(job.prompts), len(job.prompts)

        def chunk(k, text, reason=None, first=False):
            delta = ({"role": "assistant", "content": text} if first else {"content": text}) if chat else None
            c = {"index": k, "finish_reason": reason, "logprobs": None,
                 **({"delta": delta} if chat else {"text": text})}
            h.event(dict(meta, choices=[c]))
        ev = self._next(job, h)   # the first event, before the 200: a failed generate can still be a 500
        if ev[0] == "error":
            raise ev[1]
        h.start_events()
        if chat:
            for k in range(len(job.prompts)):
                chunk(k, "", first=True)
        while True:
            if ev[0] == "error":    # mid-stream: no status code left to send; end the stream with the error
                h.event(RequestError(500, f"internal error: {type(ev[1]).__name__}", kind="server_error").body())
                break
            if ev[0] == "token":
                _, k, t = ev
                toks[k].append(t)
                text = self.prompter.tok.decode(toks[k])
                safe = text[:safe_prefix(text, stop)]
                if len(safe) > len(sent[k]) and safe.startswith(sent[k]):
                    chunk(k, safe[len(sent[k]):])
                    sent[k] = safe
            else:
                _, k, text, ntok, reason = ev
                usage["completion_tokens"] += ntok
                chunk(k, text[len(sent[k]):] if text.startswith(sent[k]) else "", reason)
                left -= 1
                if not left:
                    break
            ev = self._next(job, h)
        if include_usage:
            h.event(dict(meta, choices=[], usage=dict(usage, total_tokens=sum(usage.values()))))
        h.event(b"[DONE]")


class Server(ThreadingHTTPServer):
    """http.server with the limits a public server needs: a listen backlog of BACKLOG, at most max_connections
    served at once (a thread each; more get a 503 at once, no thread), IPv4 or IPv6 as --host says."""
    request_queue_size = BACKLOG
    daemon_threads = True

    def __init__(self, host, port, max_connections=256):
        self.address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0][0]
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__((host, port), Handler)   # binds and listens now: before any model loads

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


_busy = json.dumps(RequestError(503, "the server is at its connection limit (--max-connections); retry shortly",
                                kind="server_error").body()).encode()
BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        b"Content-Length: " + str(len(_busy)).encode() + b"\r\nConnection: close\r\n\r\n" + _busy)


def warm_up(generate, model, tok, fall_back: bool):
    """Compile before the first request waits for it, for every batch size: dynamo compiles the first batch's shape,
    and a second batch size makes it compile the graph that serves all sizes (measured: after batches of 2 and 3,
    batches of 5, 8 and 16 compile nothing). fall_back: the compile was the policy's choice, so a failure serves
    eager with one line instead of stopping the server."""
    t = time.perf_counter()
    prompts = [tok.encode("warm up"), tok.encode("warm up the decode step"), tok.encode("and once more")]
    try:
        for n in (2, 3):
            generate(model, tok, prompts[:n], max_new_tokens=3, prefix_cache=None)
    except Exception as e:  # inductor's failures are many kinds; with fall_back the eager path still serves
        if not fall_back:
            raise
        generate.compiled.compile(on=False)
        print(f"compile: failed ({cli.one_line(e)[:200]}); serving eager", file=sys.stderr)
        return
    print(f"compile: decode step compiled before serving in {time.perf_counter() - t:.0f} s (--no-compile skips it)",
          file=sys.stderr)


def make_server(cfg: ServeConfig, model=None, tok=None, generate=None):
    """-> (Server bound to cfg.host:cfg.port, App). The socket is bound first: a host or port that cannot be had
    fails before a model loads. model/tok: already loaded (tests), served through `generate` (default:
    fast.decode.Generator, the prefix cache without other swaps); else loaded from cfg.model and cfg.adapter with
    every inference swap of fast.for_inference (--quant, --compile)."""
    httpd = Server(cfg.host, cfg.port, cfg.max_connections)
    try:
        if model is None:
            device = M.pick_device(cfg.device)
            model, tok = M.load_model(cfg.model or None, device, fast.cpu.best_dtype(cfg.dtype, device))
            if cfg.adapter:
                M.load_adapter(model, cfg.adapter, merge=not cfg.quant)  # (int4 weights would round a merged LoRA off)
            compile = cfg.compile if cfg.compile is not None else fast.cpu.compile_by_default(  # a server runs
                device, "a server", lambda m: print(m, file=sys.stderr))           # for hours: it repays the compile
            generate = fast.for_inference(model, cfg.quant, compile, cfg.prefix_cache_mb)
            if compile:
                warm_up(generate, model, tok, fall_back=cfg.compile is None)
        elif generate is None:
            generate = fast.decode.Generator(prefix_cache_mb=cfg.prefix_cache_mb)
        chat_format = cfg.chat_format or ("trajectory" if cfg.adapter else "template")
        template = cfg.template or fireact.adapter_training(cfg.adapter).get("template", "react")
        name = cfg.name or (Path(cfg.adapter).resolve().name if cfg.adapter else
                            Path(cfg.model).name if cfg.model else "SmolLM2-135M-Instruct")
        context = model.config.max_position_embeddings
        engine = Engine(model, tok, generate, cfg.batch_size, cfg.batch_wait_ms, cfg.slice_tokens)
        app = App(engine, Prompter(tok, chat_format, template, context), name, context, cfg.max_tokens,
                  os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else "", cfg.max_choices,
                  cfg.max_request_tokens)
    except BaseException:
        httpd.server_close()
        raise
    httpd.RequestHandlerClass = type("BoundHandler", (Handler,), {"app": app, "timeout": cfg.timeout_s})
    return httpd, app


def serve(cfg: ServeConfig):
    httpd, app = make_server(cfg)
    host, port = httpd.server_address[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"   # an IPv6 address is bracketed in a URL
    print(f"serving {app.name!r} on {url} (chat format: {app.prompter.chat_format}"
          f"{', key required' if app.api_key else ''}); Ctrl-C stops", file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1") and not app.api_key:
        print(f"warning: bound to {host} with no --api-key-env: anyone who can reach it can use it", file=sys.stderr)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()


COMMANDS = {"serve": (ServeConfig, serve, "an OpenAI-compatible HTTP server for the model (and adapter)")}

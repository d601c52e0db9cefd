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
"""
import dataclasses
import hmac
import json
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass
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
    dtype: Literal["", "float32", "bfloat16", "float16"] = ""  # "" = float32 on CPU, bfloat16 on GPU
    quant: Literal["", "int4"] = ""  # int4: decode through 4-bit layer weights (CPU)
    compile: bool = False         # torch.compile the decode step (minutes at the first request; C++ compiler on CPU)

    def check(self):
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port}: must be in [0, 65535]")
        for name, lo in (("max_tokens", 1), ("batch_size", 1), ("batch_wait_ms", 0), ("prefix_cache_mb", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= {lo}")
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
        raise RequestError(400, f"Invalid value for '{key}': {json.dumps(v)[:80]}; expected {want}", param=key)
    return v


# ------------------------------------------------------------------------------------------------------ engine
@dataclass
class Job:
    prompts: list                 # token ids per choice (n per prompt)
    max_tokens: int
    key: tuple                    # sampling settings: jobs with equal keys share a generate call
    stream: bool
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)


class Engine:
    """One worker thread owns the model (generate is not thread-safe, and one batch beats many small calls).
    Request threads submit Jobs; the worker takes every queued job, groups them by sampling settings and runs
    each group as one call of `generate` (model.generate's signature: fast.for_inference's, with its prefix
    cache, or the plain one). A job gets ("token", choice, id) events (when streaming) and then
    ("done", choice, text, n_tokens, finish_reason) per choice, or ("error", exception)."""

    def __init__(self, model, tok, generate=M.generate, batch_size=32, batch_wait_ms=5):
        self.model, self.tok, self.generate = model, tok, generate
        self.batch_size, self.wait = batch_size, batch_wait_ms / 1000
        self.jobs, self.calls = queue.Queue(), 0   # calls: generate calls made (tests see the batching)
        threading.Thread(target=self._loop, daemon=True, name="generate").start()

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    def _loop(self):
        while True:
            jobs = [self.jobs.get()]
            time.sleep(self.wait)   # requests sent together arrive a moment apart
            while not self.jobs.empty():
                jobs.append(self.jobs.get_nowait())
            groups = {}
            for j in jobs:
                groups.setdefault(j.key, []).append(j)
            for group in groups.values():
                batch = []
                for j in group:     # fill batches up to batch_size sequences (a job is never split)
                    if batch and sum(len(b.prompts) for b in batch) + len(j.prompts) > self.batch_size:
                        self._run(batch)
                        batch = []
                    batch.append(j)
                self._run(batch)

    def _run(self, jobs):
        rows = [(j, k) for j in jobs for k in range(len(j.prompts))]
        toks = [[] for _ in rows]

        def on_token(i, t):
            toks[i].append(t)
            if rows[i][0].stream:
                rows[i][0].events.put(("token", rows[i][1], t))
        max_tokens, temperature, top_p, stop, seed, agent_turn = jobs[0].key
        try:
            self.calls += 1
            texts = self.generate(self.model, self.tok, [p for j in jobs for p in j.prompts], max_tokens, temperature,
                                  top_p, stop=list(stop), stop_at=fireact.cut_after_action if agent_turn else None,
                                  seed=seed, on_token=on_token)
        except Exception as e:  # a bug or out of memory: every waiting request gets a 500, the server lives on
            for j in jobs:
                j.events.put(("error", e))
            return
        for (j, k), text, ids in zip(rows, texts, toks):
            cut = len(text) < len(self.tok.decode(ids))  # a stop string ended it
            reason = "length" if len(ids) >= max_tokens and not cut else "stop"
            j.events.put(("done", k, text, len(ids), reason))


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


class Prompter:
    """Request -> token ids, the way model.generate and the agent loop would build them."""
    def __init__(self, tok, chat_format, template):
        self.tok, self.chat_format, self.template = tok, chat_format, template
        self.jinja = chat_template(tok) if chat_format == "template" else None

    def completion(self, prompt: str) -> list:
        return self.tok.encode(prompt, bos=self.tok.add_bos)   # as model.generate encodes a text prompt

    def chat(self, messages) -> list:
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
        msgs = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str) or m.get("role") not in ("system", "user", "assistant"):
                raise RequestError(400, f"messages[{i}]: expected {{role: system|user|assistant, content: text}}",
                                   param=f"messages[{i}]")
            msgs.append({"role": m["role"], "content": content})
        if self.chat_format == "trajectory":
            question, steps = trajectory_of(msgs)
            return fireact.render(question, steps, self.tok, for_inference=True, template=self.template)[0]
        if self.jinja is None:
            raise RequestError(400, "this model has no chat template (tokenizer_config.json has no chat_template); "
                                    "use /v1/completions, or serve it with --chat-format trajectory", param="messages")
        text = self.jinja.render(messages=msgs, add_generation_prompt=True, bos_token=self._name(self.tok.bos_id),
                                 eos_token=self._name(self.tok.eos_id))
        return self.tok.encode(text)   # the template writes bos itself where the model wants one

    def _name(self, i):
        return self.tok.decode([i]) if i is not None else ""


# ------------------------------------------------------------------------------------------------------ server
class Handler(BaseHTTPRequestHandler):
    server_version = "fireact-serve/" + cli.VERSION
    app = None   # set by make_server: the App

    def log_message(self, fmt, *args):   # the request line and status only: never headers (the key is there)
        print(f"{self.address_string()} {fmt % args}", file=sys.stderr)

    def do_GET(self):
        self._call(lambda: self.app.get(self.path))

    def do_POST(self):
        self._call(lambda: self.app.post(self.path, self._body(), self))

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise RequestError(413, f"request body of {n} bytes is over the {MAX_BODY} byte limit")
        try:
            body = json.loads(self.rfile.read(n) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def _call(self, fn):
        try:
            self.app.authorize(self.headers.get("Authorization", ""))
            out = fn()
            if out is not None:
                self.send_json(200, out)
        except RequestError as e:
            self.send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):  # the client went away mid-stream
            pass
        except Exception as e:  # a bug: the client gets a 500 in OpenAI's shape, the server keeps its traceback
            import traceback
            traceback.print_exc()
            self.send_json(500, RequestError(500, f"internal error: {type(e).__name__}", kind="server_error").body())

    def send_json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
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
    def __init__(self, engine, prompter, name, context, default_max_tokens, api_key=""):
        self.engine, self.prompter, self.name, self.context = engine, prompter, name, context
        self.default_max_tokens, self.api_key, self.created = default_max_tokens, api_key, int(time.time())

    def authorize(self, header):
        if self.api_key and not hmac.compare_digest(header.encode(), f"Bearer {self.api_key}".encode()):
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
        if body.get("logprobs") or body.get("echo") or (body.get("best_of") or 1) > 1:
            raise RequestError(400, "logprobs, echo and best_of are not supported by this server")
        if chat:
            prompts = [self.prompter.chat(body.get("messages"))]
        else:
            p = body.get("prompt")
            if isinstance(p, str):
                p = [p]
            if not isinstance(p, list) or not p or not all(isinstance(x, str) for x in p):
                raise RequestError(400, "'prompt' must be a string or a list of strings", param="prompt")
            prompts = [self.prompter.completion(x) for x in p]
        if any(not ids for ids in prompts):
            raise RequestError(400, "the prompt is empty (no tokens)", param="messages" if chat else "prompt")
        default = 16 if not chat else min(self.default_max_tokens, max(1, self.context - max(map(len, prompts))))
        max_tokens = _get(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                          int, default, lambda v: v >= 1, "an integer >= 1")
        temperature = float(_get(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]"))
        top_p = float(_get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"))
        n = _get(body, "n", int, 1, lambda v: 1 <= v <= 128, "an integer in [1, 128]")
        seed = _get(body, "seed", int, None, want="an integer")
        stream = _get(body, "stream", bool, False, want="true or false")
        stop = _get(body, "stop", (str, list), [], lambda v: isinstance(v, str) or (
            len(v) <= 4 and all(isinstance(s, str) for s in v)), "a string or a list of up to 4 strings")
        stop = tuple(s for s in ([stop] if isinstance(stop, str) else stop) if s)
        for ids in prompts:
            if len(ids) + max_tokens > self.context:
                raise RequestError(400, f"This model's maximum context length is {self.context} tokens. However, "
                                        f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in the "
                                        f"{'messages' if chat else 'prompt'}, {max_tokens} in the completion). "
                                        "Please reduce the length of the messages or completion.",
                                   param="messages" if chat else "prompt", code="context_length_exceeded")
        # a trajectory chat asks for one agent turn: it ends at its first complete Action line, as in the agent
        # loop (the student never learned to write `Observation:`, so that stop alone would let it run on)
        agent_turn = chat and self.prompter.chat_format == "trajectory"
        job = self.engine.submit(Job([ids for ids in prompts for _ in range(n)], max_tokens,
                                     (max_tokens, temperature, top_p, stop, seed, agent_turn), stream))
        meta = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                    object="chat.completion" if chat else "text_completion", created=int(time.time()), model=self.name)
        usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0}   # as OpenAI: once, whatever n
        if stream:
            self._stream(job, chat, stop, meta, usage, handler, (body.get("stream_options") or {}).get("include_usage"))
            return None
        choices = [None] * len(job.prompts)
        for _ in choices:
            ev = job.events.get()
            if ev[0] == "error":
                raise ev[1]
            _, k, text, ntok, reason = ev
            usage["completion_tokens"] += ntok
            choices[k] = {"index": k, "finish_reason": reason, "logprobs": None,
                          **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
        return dict(meta, choices=choices, usage=dict(usage, total_tokens=sum(usage.values())))

    def _stream(self, job, chat, stop, meta, usage, h, include_usage):
        meta = dict(meta, object="chat.completion.chunk" if chat else "text_completion")
        toks, sent, left = [[] for _ in job.prompts], [""] * len(job.prompts), len(job.prompts)

        def chunk(k, text, reason=None, first=False):
            delta = ({"role": "assistant", "content": text} if first else {"content": text}) if chat else None
            c = {"index": k, "finish_reason": reason, "logprobs": None,
                 **({"delta": delta} if chat else {"text": text})}
            h.event(dict(meta, choices=[c]))
        ev = job.events.get()   # the first event, before the 200: a failed generate can still be a 500
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
            ev = job.events.get()
        if include_usage:
            h.event(dict(meta, choices=[], usage=dict(usage, total_tokens=sum(usage.values()))))
        h.event(b"[DONE]")


def make_server(cfg: ServeConfig, model=None, tok=None, generate=None):
    """-> (ThreadingHTTPServer bound to cfg.host:cfg.port, App). model/tok: already loaded (tests), served through
    `generate` (default: fast.decode.Generator, the prefix cache without other swaps); else loaded from cfg.model
    and cfg.adapter with every inference swap of fast.for_inference (--quant, --compile)."""
    if model is None:
        device = M.pick_device(cfg.device)
        model, tok = M.load_model(cfg.model or None, device, fast.cpu.best_dtype(cfg.dtype, device))
        if cfg.adapter:
            M.load_adapter(model, cfg.adapter, merge=not cfg.quant)  # (4-bit weights would round a merged LoRA away)
        generate = fast.for_inference(model, cfg.quant, cfg.compile, cfg.prefix_cache_mb)
    elif generate is None:
        generate = fast.decode.Generator(prefix_cache_mb=cfg.prefix_cache_mb)
    chat_format = cfg.chat_format or ("trajectory" if cfg.adapter else "template")
    template = cfg.template or fireact.adapter_training(cfg.adapter).get("template", "react")
    name = cfg.name or (Path(cfg.adapter).resolve().name if cfg.adapter else
                        Path(cfg.model).name if cfg.model else "SmolLM2-135M-Instruct")
    engine = Engine(model, tok, generate, cfg.batch_size, cfg.batch_wait_ms)
    app = App(engine, Prompter(tok, chat_format, template), name, model.config.max_position_embeddings,
              cfg.max_tokens, os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else "")
    handler = type("BoundHandler", (Handler,), {"app": app})
    httpd = ThreadingHTTPServer((cfg.host, cfg.port), handler)
    httpd.daemon_threads = True
    return httpd, app


def serve(cfg: ServeConfig):
    httpd, app = make_server(cfg)
    host, port = httpd.server_address[:2]
    print(f"serving {app.name!r} on http://{host}:{port}/v1 (chat format: {app.prompter.chat_format}"
          f"{', key required' if app.api_key else ''}); Ctrl-C stops", file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1") and not app.api_key:
        print(f"warning: bound to {host} with no --api-key-env: anyone who can reach it can use it", file=sys.stderr)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()


COMMANDS = {"serve": (ServeConfig, serve, "an OpenAI-compatible HTTP server for the model (and adapter)")}

"""
Using the student outside this repository: an OpenAI-compatible HTTP server, and export to a merged Hugging Face
checkpoint or a GGUF file for llama.cpp / Ollama. Run through model.py:

    python model.py serve --adapter runs/toy_default                  # http://127.0.0.1:8000/v1
    python model.py serve --port 8001 --api-key-env FIREACT_SERVE_KEY # clients must send that key
    python fireact.py eval --task toy --teacher-model toy_default --base-url http://127.0.0.1:8000/v1 --zero-shot
    python model.py export --adapter runs/toy_default --out runs/student_hf                       # merged HF
    python model.py export --adapter runs/toy_default --out runs/student.gguf --format gguf --outtype q8_0

The server (standard library only: http.server, one thread per connection) answers GET /v1/models, POST
/v1/completions and POST /v1/chat/completions with max_tokens, temperature, top_p, stop, n, seed and stream
(server-sent events), counts usage, and answers errors in OpenAI's JSON shape. One worker thread owns the model:
requests that arrive together, with the same sampling settings, become ONE model.generate call (the batching of
the eval loop, and its prefix cache), so an eval or a teacher pointed at it is not served one by one.

Chat prompts: "template" renders the messages with the model's chat template (tokenizer_config.json);
"trajectory" reads them as FireAct's gpt format (question, Thought/Action, Observation: fireact.chat_messages)
and renders them exactly as the student was trained (fireact.render), so `fireact.py eval --zero-shot
--teacher-model NAME --base-url ...` runs the fine-tuned student as `fireact.py eval --adapter` does. The default:
trajectory with --adapter, template without. A trajectory chat is one agent turn: it ends at its first complete
Action line (fireact.cut_after_action), as the agent loop ends it.

Why a file of its own: serving (HTTP, threads, SSE) and exporting (GGUF writing) are deployment concerns of
~500 lines that would make model.py (the model) unreadable; model.py's CLI hands `serve` and `export` to it.
"""
import dataclasses
import hmac
import json
import os
import queue
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

from common import cli, files
import fireact
import model as M

MAX_BODY = 16 << 20  # bytes of one request body


# ----------------------------------------------------------------------------------------------------- configs
@dataclass
class ServeConfig:
    model: str = ""               # local dir, .gguf or org/name; "" = the embedded SmolLM2-135M-Instruct
    adapter: str = ""             # LoRA adapter dir (train.py's --out): serve the fine-tuned student
    host: str = "127.0.0.1"       # the address to bind (loopback: only this machine can connect)
    port: int = 8000              # 0 = any free port (printed)
    name: str = ""                # the model id clients send; "" = the adapter dir's name, else the model's
    api_key_env: str = ""         # the NAME of an environment variable: clients must send its value as their key
    chat_format: Literal["", "template", "trajectory"] = ""  # how chat messages become a prompt (see the docstring); "" = trajectory with --adapter, else template
    template: Literal["", "react", "alpaca"] = ""  # the trajectory layout; "" = what the adapter was trained with
    max_tokens: int = 1000        # a request's max_tokens when it gives none (FireAct's turn cap)
    batch_size: int = 32          # at most this many sequences in one generate call
    batch_wait_ms: int = 5        # wait this long for more requests before a generate call
    prefix_cache_mb: int = 2048   # K/V kept between requests: an agent's next turn prefills only its new tokens
    device: str = ""              # cpu | cuda | cuda:N | mps; "" = the best available
    dtype: Literal["", "float32", "bfloat16", "float16"] = ""  # "" = float32 on CPU, bfloat16 on GPU
    quant: Literal["", "int4"] = ""  # int4: decode through 4-bit layer weights (CPU; one client at a time is where it wins, README §5)
    compile: bool = False         # torch.compile the decode step (fp32 CPU: any batch; --quant int4: one stream): minutes at the first request; C++ compiler on CPU (README §5)

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


@dataclass
class ExportConfig:
    out: str                      # hf: the checkpoint folder; gguf: the .gguf file (a Modelfile is written beside it)
    adapter: str = ""             # LoRA adapter dir to merge in; "" = export the base model
    model: str = ""               # the base; "" = the embedded SmolLM2-135M-Instruct
    format: Literal["hf", "gguf"] = "hf"  # hf: merged safetensors checkpoint (as train.py --merge) | gguf: llama.cpp / Ollama
    outtype: Literal["f16", "q8_0", "f32"] = "f16"  # gguf: the type of the 2-D weights (norms stay f32)

    def check(self):
        if self.adapter and not Path(self.adapter).is_dir():
            raise ValueError(f"--adapter {self.adapter}: no such directory")
        if self.format == "gguf" and not self.out.endswith(".gguf"):
            raise ValueError(f"--out {self.out}: a GGUF export is one file; name it *.gguf")
        fireact.check_out_path(self.out)


# ------------------------------------------------------------------------------------------------------ errors
class APIError(Exception):
    """An error the client gets in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
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
        raise APIError(400, f"Invalid value for '{key}': {json.dumps(v)[:80]}; expected {want}", param=key)
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
    each group as one generate call. A job gets ("token", choice, id) events (when streaming) and then
    ("done", choice, text, n_tokens, finish_reason) per choice, or ("error", exception)."""

    def __init__(self, model, tok, batch_size=32, batch_wait_ms=5, prefix_cache_mb=2048):
        self.model, self.tok, self.batch_size, self.wait = model, tok, batch_size, batch_wait_ms / 1000
        self.pc = M.PrefixCache(prefix_cache_mb << 20) if prefix_cache_mb > 0 else None
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
            texts = M.generate(self.model, self.tok, [p for j in jobs for p in j.prompts], max_tokens, temperature,
                               top_p, stop=list(stop), stop_at=fireact.cut_after_action if agent_turn else None,
                               seed=seed, prefix_cache=self.pc, on_token=on_token)
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
    src = M.read_json(path).get("chat_template") if path.exists() else None
    if isinstance(src, list):  # [{"name": "default", "template": ...}, ...]
        src = next((t["template"] for t in src if t.get("name") == "default"), None)
    if not src:
        return None
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def fail(msg):
        raise APIError(400, f"chat template: {msg}", param="messages")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = fail
    return env.from_string(src)


def trajectory_of(messages):
    """FireAct's gpt format (fireact.chat_messages) -> (question, steps): the question is the first user message,
    then assistant Thought/Action turns and user `Observation: ...` turns (parsed as fireact parses ReAct text)."""
    msgs = [m for m in messages if m["role"] != "system"]
    if not msgs or msgs[0]["role"] != "user":
        raise APIError(400, "chat format trajectory: the first message must be the user's question (FireAct's gpt "
                            "format); start the server with --chat-format template for other chats", param="messages")
    preamble, steps = fireact.parse_react("\n".join(m["content"] for m in msgs[1:]))
    if preamble:
        raise APIError(400, f"chat format trajectory: expected Thought/Action/Observation turns after the question, "
                            f"got {preamble[0][:60]!r}", param="messages")
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
            raise APIError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
        msgs = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str) or m.get("role") not in ("system", "user", "assistant"):
                raise APIError(400, f"messages[{i}]: expected {{role: system|user|assistant, content: text}}",
                               param=f"messages[{i}]")
            msgs.append({"role": m["role"], "content": content})
        if self.chat_format == "trajectory":
            question, steps = trajectory_of(msgs)
            return fireact.render(question, steps, self.tok, for_inference=True, template=self.template)[0]
        if self.jinja is None:
            raise APIError(400, "this model has no chat template (tokenizer_config.json has no chat_template); use "
                                "/v1/completions, or serve it with --chat-format trajectory", param="messages")
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
            raise APIError(413, f"request body of {n} bytes is over the {MAX_BODY} byte limit")
        try:
            body = json.loads(self.rfile.read(n) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def _call(self, fn):
        try:
            self.app.authorize(self.headers.get("Authorization", ""))
            out = fn()
            if out is not None:
                self.send_json(200, out)
        except APIError as e:
            self.send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):  # the client went away mid-stream
            pass
        except Exception as e:  # a bug: the client gets a 500 in OpenAI's shape, the server keeps its traceback
            import traceback
            traceback.print_exc()
            self.send_json(500, APIError(500, f"internal error: {type(e).__name__}", kind="server_error").body())

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
            raise APIError(401, "Incorrect API key provided (send it as 'Authorization: Bearer KEY').",
                           code="invalid_api_key")

    def get(self, path):
        if path.rstrip("/") == "/v1/models":
            return {"object": "list", "data": [self._model()]}
        if path.rstrip("/") == f"/v1/models/{self.name}":
            return self._model()
        raise APIError(404, f"no route GET {path}; this server has GET /v1/models", code="not_found")

    def _model(self):
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "fireact"}

    def post(self, path, body, handler):
        chat = path.rstrip("/") == "/v1/chat/completions"
        if not chat and path.rstrip("/") != "/v1/completions":
            raise APIError(404, f"no route POST {path}; this server has /v1/completions and /v1/chat/completions",
                           code="not_found")
        model = _get(body, "model", str, None, want="a model id")
        if model is None:
            raise APIError(400, "you must provide a model parameter", param="model")
        if model != self.name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.name}'",
                           param="model", code="model_not_found")
        if body.get("logprobs") or body.get("echo") or (body.get("best_of") or 1) > 1:
            raise APIError(400, "logprobs, echo and best_of are not supported by this server")
        if chat:
            prompts = [self.prompter.chat(body.get("messages"))]
        else:
            p = body.get("prompt")
            if isinstance(p, str):
                p = [p]
            if not isinstance(p, list) or not p or not all(isinstance(x, str) for x in p):
                raise APIError(400, "'prompt' must be a string or a list of strings", param="prompt")
            prompts = [self.prompter.completion(x) for x in p]
        if any(not ids for ids in prompts):
            raise APIError(400, "the prompt is empty (no tokens)", param="messages" if chat else "prompt")
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
                raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                    f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the "
                                    f"{'messages' if chat else 'prompt'}, {max_tokens} in the completion). Please "
                                    "reduce the length of the messages or completion.",
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
            c = {"index": k, "finish_reason": reason, "logprobs": None, **({"delta": delta} if chat else {"text": text})}
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
                h.event(APIError(500, f"internal error: {type(ev[1]).__name__}", kind="server_error").body())
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


def make_server(cfg: ServeConfig, model=None, tok=None):
    """-> (ThreadingHTTPServer bound to cfg.host:cfg.port, App). model/tok: already loaded (tests); else loaded
    from cfg.model and cfg.adapter."""
    if model is None:
        device = M.pick_device(cfg.device)
        model, tok = M.load_model(cfg.model or None, device, M.pick_dtype(cfg.dtype, device))
        if cfg.adapter:
            M.load_adapter(model, cfg.adapter, merge=not cfg.quant)  # (4-bit weights would round a merged LoRA away)
        M.setup_inference(model, cfg.quant, cfg.compile)
    chat_format = cfg.chat_format or ("trajectory" if cfg.adapter else "template")
    template = cfg.template or fireact.adapter_training(cfg.adapter).get("template", "react")
    name = cfg.name or (Path(cfg.adapter).resolve().name if cfg.adapter else
                        Path(cfg.model).name if cfg.model else "SmolLM2-135M-Instruct")
    engine = Engine(model, tok, cfg.batch_size, cfg.batch_wait_ms, cfg.prefix_cache_mb)
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


# ------------------------------------------------------------------------------------------------------ export
def merged_model(cfg: ExportConfig):
    model, tok = M.load_model(cfg.model or None, "cpu", M.torch.float32)
    if cfg.adapter:
        M.load_adapter(model, cfg.adapter, merge=True)
    return model, tok


def gguf_vocab(tok, vocab_size):
    """tokenizer.json (byte-level BPE) -> GGUF's tokens, token types, merges and pre-tokenizer name; what
    model.convert_gguf reads back."""
    path = Path(tok.dir) / "tokenizer.json"
    if tok.hf is None or not path.exists():
        raise ValueError(f"{tok.dir}: GGUF export needs a byte-level BPE tokenizer.json (sentencepiece is not supported)")
    tj = json.loads(path.read_text(encoding="utf-8"))
    if tj["model"].get("type") != "BPE":
        raise ValueError(f"{path}: GGUF export supports BPE tokenizers, not {tj['model'].get('type')}")
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(p.get("type"), p.get("individual_digits")) for p in parts]
    if kinds == [("Digits", True), ("ByteLevel", None)]:
        pre_name = "smollm"   # llama.cpp's name for SmolLM2's: single digits, then GPT-2's regex
    elif kinds == [("ByteLevel", None)]:
        pre_name = "gpt-2"
    else:
        raise ValueError(f"{path}: pre-tokenizer {kinds} has no llama.cpp equivalent we know; GGUF export supports "
                         "SmolLM2's and GPT-2's")
    tokens = [None] * vocab_size
    for t, i in tj["model"]["vocab"].items():
        tokens[i] = t
    special = {a["id"]: a.get("special", False) for a in tj.get("added_tokens", [])}
    for a in tj.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
    types = [1] * vocab_size   # llama.cpp: 1 normal, 3 control, 4 user defined, 5 unused
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", 5
        elif i in special:
            types[i] = 3 if special[i] else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    return tokens, types, merges, pre_name


def permute_qk(w, n_head):
    """llama.cpp's convert_hf_to_gguf permute (model.unpermute_qk undoes it): each head's rotary halves are
    interleaved, as llama.cpp's rope expects."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_gguf(model, tok, path, outtype="f16", name="fireact-student"):
    """The merged model as one GGUF file (llama arch), written to a tmp name and renamed when complete."""
    import gguf
    import numpy as np
    c = model.config
    if (c.rope_scaling or {}).get("rope_type", (c.rope_scaling or {}).get("type")) == "llama3":
        raise ValueError("GGUF export of llama3 rope scaling (rope_freqs) is not supported")
    inv = {hf: g for g, hf in M.GGUF_NAMES.items()}
    Q = gguf.GGMLQuantizationType
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    try:
        w.add_name(name)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_rope_dimension_count(c.head_dim)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_freq_base(c.rope_theta)
        if c.rope_scaling:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(c.rope_scaling["factor"])
        w.add_vocab_size(c.vocab_size)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokens, types, merges, pre = gguf_vocab(tok, c.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        for key, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
            if i is not None:
                getattr(w, f"add_{key}_token_id")(i)
        w.add_add_bos_token(bool(tok.add_bos))
        tc = M.read_json(Path(tok.dir) / "tokenizer_config.json") if (Path(tok.dir) / "tokenizer_config.json").exists() else {}
        if isinstance(tc.get("chat_template"), str):
            w.add_chat_template(tc["chat_template"])
        for n, t in model.state_dict().items():
            if ".lora_" in n or (n == "lm_head.weight" and c.tie_word_embeddings):
                continue
            parts = n.split(".")   # model.layers.3.self_attn.q_proj.weight | model.embed_tokens.weight
            gname = f"blk.{parts[2]}.{inv['.'.join(parts[3:-1])]}.{parts[-1]}" if parts[1:2] == ["layers"] \
                else f"{inv['.'.join(parts[:-1])]}.{parts[-1]}"
            t = t.detach().float().cpu()
            if gname.split(".")[-2] in ("attn_q", "attn_k"):
                t = permute_qk(t, c.num_attention_heads if "attn_q" in gname else c.num_key_value_heads)
            a = t.numpy()
            if a.ndim == 1 or outtype == "f32":
                w.add_tensor(gname, a.astype(np.float32))
            elif outtype == "q8_0" and a.shape[-1] % 32 == 0:
                w.add_tensor(gname, gguf.quants.quantize(a, Q.Q8_0), raw_dtype=Q.Q8_0)
            else:   # f16, or a row length q8_0's blocks of 32 do not divide
                w.add_tensor(gname, a.astype(np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        M.fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        w.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def modelfile(gguf_name, tok, adapter_template):
    """Ollama's Modelfile: the student's trajectory layout (adapter_template, react or alpaca) or ChatML as a Go
    template, and the stops: `\\nObservation:` (the tool answers, not the model), for the student `\\nThought:`
    (its next turn: it never learned to write Observation lines) and eos."""
    if adapter_template:
        head = fireact.segments("{{ $m.Content }}", [], for_inference=True, template=adapter_template)[0][0]
        tpl = ("{{- range $i, $m := .Messages }}{{ if eq $i 0 }}" + head +
               "{{ else }}{{ $m.Content }}\n{{ end }}{{ end }}")
    else:
        tpl = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n")
    stops = ["\\nObservation:"] + ["\\nThought:"] * bool(adapter_template) + \
        ([tok.decode([tok.eos_id])] if tok.eos_id is not None else [])   # \nThought: one turn, as `serve` ends it
    return (f"# ollama create student -f Modelfile && ollama run student\nFROM ./{gguf_name}\n"
            f'TEMPLATE """{tpl}"""\n' + "".join(f'PARAMETER stop "{s}"\n' for s in stops) +
            "PARAMETER temperature 0\n")


def export(cfg: ExportConfig) -> Path:
    model, tok = merged_model(cfg)
    if cfg.format == "hf":
        out = M.save_checkpoint(model, tok, cfg.out)   # the mechanism train.py --merge uses
    else:
        out = write_gguf(model, tok, cfg.out, cfg.outtype, Path(cfg.adapter or cfg.model or "SmolLM2-135M-Instruct").name)
        template = (fireact.adapter_training(cfg.adapter).get("template", "react") if cfg.adapter else "")
        chatml = "<|im_start|>" in (M.read_json(Path(tok.dir) / "tokenizer_config.json").get("chat_template") or "") \
            if (Path(tok.dir) / "tokenizer_config.json").exists() else False
        if template or chatml:
            files.atomic_write(out.parent / "Modelfile", modelfile(out.name, tok, template))
    print(f"{out}: {cfg.format}{' ' + cfg.outtype if cfg.format == 'gguf' else ''}"
          f"{', LoRA merged from ' + cfg.adapter if cfg.adapter else ''}")
    return Path(out)


COMMANDS = {"serve": (ServeConfig, serve, "an OpenAI-compatible HTTP server for the model (and adapter)"),
            "export": (ExportConfig, export, "the merged model as an HF checkpoint or a GGUF file")}


def main(argv):
    cls, fn, doc = COMMANDS[argv[0]]
    cfg = cli.parse_config(cls, argv[1:], prog=f"model.py {argv[0]}", description=doc)
    return cli.run(lambda: fn(cfg), prog=f"model.py {argv[0]}")

"""
The agent's world: the teacher LLM client and the tools the agent acts with. No torch here.

    python tools.py build-corpus OUT.jsonl ../shared/data/hotpotqa/dev_distractor.jsonl   # HotpotQA context -> corpus
    python tools.py search OUT.jsonl "Scott Derrickson" "lookup[horror]"                  # try the offline tool
    python tools.py search OUT.jsonl "who directed Sinister?" --tool snippet             # one Google-like snippet

In code:
    teacher = Teacher("gpt-4", cache_dir=".cache/teacher", rpm=500)      # key from $OPENAI_API_KEY
    teacher.chat([{"role": "user", "content": "hi"}]); teacher.usage
    tool = LocalWiki("corpus.jsonl").fork()                               # one fork per episode
    tool.step("Action 1: Search[Paris]"); tool.step("lookup[Eiffel]"); tool.step("finish[France]")
    SnippetSearch("corpus.jsonl").fork().step("search[what river flows through Paris?]")   # FireAct-style
    check_chat_file("train.jsonl", "gpt-3.5-turbo")                      # the API's rules, file:line errors
    finetune(FineTuneAPI(), "train.jsonl", "gpt-3.5-turbo")               # -> "ft:gpt-3.5-turbo:...", resumable

One HTTP mechanism (`Client`: a per-attempt and an overall wall-clock deadline, retries with backoff + jitter,
Retry-After, fail-fast 4xx, malformed-body handling, secret redaction, an on-disk cache) serves the teacher,
Wikipedia, the Google-snippet search and OpenAI's fine-tuning API (FireAct's GPT-3.5 student). One episode
mechanism (`Tool`: search / lookup / finish with ReAct's semantics) serves every tool; `tool.name` says which
("wikipedia", "local", "snippet", "google"). One ranking mechanism (`BM25`, deterministic ties) serves both
offline tools.
"""
import copy
import email.utils
import hashlib
import http
import itertools
import json
import logging
import os
import random
import re
import socket
import sys
import threading
import time
import unicodedata
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import requests
import urllib3

from common import cli, files  # atomic writes (torch-free, HTTP-free)

log = logging.getLogger("fireact.tools")
USER_AGENT = "fireact-from-scratch/0.1 (research agent; https://github.com/anchen1011/FireAct) python-requests"
WIKI_API = "https://en.wikipedia.org/w/api.php"
RETRY_STATUS = {429, 500, 502, 503, 504}

# ----------------------------------------------------------------------------------------------------------------
# Action parsing

_LABEL = re.compile(r"^\s*action\s*\d*\s*:\s*", re.I)
_CALL = re.compile(r"^\s*([a-z_]+)\s*\[", re.I)
ACTIONS = ("search", "lookup", "finish")


def parse_action(text):
    """'Action 2: Search[Paris] trailing' -> ('search', 'Paris'); None when malformed.

    Multi-line text: the first line labelled 'Action...:' is used (so a full 'Thought: ...\\nAction: ...' works).
    The argument ends at the ']' that balances the opening '[' (arguments may contain brackets)."""
    if not isinstance(text, str):
        return None
    lines = [ln for ln in text.splitlines() if _LABEL.match(ln)]
    line = _LABEL.sub("", lines[0] if lines else text.strip(), count=1)
    m = _CALL.match(line)
    if not m or m.group(1).lower() not in ACTIONS:
        return None
    depth = 0
    for i in range(m.end() - 1, len(line)):
        depth += {"[": 1, "]": -1}.get(line[i], 0)
        if depth == 0:
            return m.group(1).lower(), line[m.end():i].strip()
    return None  # no closing bracket


# ----------------------------------------------------------------------------------------------------------------
# HTTP: errors, redaction, rate limiting, the response cache, and the retrying client


class APIError(RuntimeError):
    """A request that failed for good: a 4xx, or transient failures past the retry budget. One line."""


class _Transient(Exception):
    def __init__(self, desc, retry_after=None):
        super().__init__(desc)
        self.retry_after = retry_after


class _Redact(logging.Filter):
    """Scrubs a secret from log records (urllib3 logs request URLs, where SerpAPI's key travels)."""

    def __init__(self, secret):
        super().__init__()
        self.secret = secret

    def __eq__(self, other):  # so Logger.addFilter does not stack duplicates
        return isinstance(other, _Redact) and other.secret == self.secret

    __hash__ = logging.Filter.__hash__

    def filter(self, record):
        msg = record.getMessage()
        if self.secret in msg:
            record.msg, record.args = msg.replace(self.secret, "***"), ()
        return True


class RateLimiter:
    """At most `rpm` starts per minute across threads, spaced evenly (no bursts to trip a server's limiter)."""

    def __init__(self, rpm, sleep=time.sleep, clock=time.monotonic):
        if not rpm or rpm <= 0:
            raise ValueError(f"rpm must be > 0, got {rpm}")
        self.interval, self.sleep, self.clock = 60.0 / rpm, sleep, clock
        self.next, self.lock = 0.0, threading.Lock()

    def wait(self):
        with self.lock:  # reserve a slot under the lock, sleep outside it
            now = self.clock()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            self.sleep(start - now)


def cache_key(request):
    """sha256 of the canonical JSON of a request description (which never holds a secret)."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Cache:
    """JSON values by key: an optional memory dict in front of an optional directory.

    On disk it is one file per key, written to a unique temp file, fsynced, then os.replace'd into place. The
    rename is atomic, so concurrent writers (threads or processes) and crashes can never leave a torn or a
    duplicate entry: a reader sees the old file, the new file, or none. A crash leaves at most a '.tmp' file,
    which is never read (and is swept when older than an hour). An unreadable entry counts as a miss."""

    def __init__(self, root=None, memory=False):
        self.root = Path(root) if root else None
        self.mem = {} if memory else None
        if self.root:
            self.root.mkdir(parents=True, exist_ok=True)
            for tmp in self.root.glob("*/.*.tmp"):
                try:
                    if time.time() - tmp.stat().st_mtime > 3600:
                        tmp.unlink()
                except OSError:
                    pass  # another process swept it first

    def _path(self, key):
        return self.root / key[:2] / f"{key}.json"

    def get(self, key):
        if self.mem is not None and key in self.mem:
            return self.mem[key]
        if self.root is None:
            return None
        try:
            value = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if self.mem is not None:
            self.mem[key] = value
        return value

    def put(self, key, value):
        if self.mem is not None:
            self.mem[key] = value
        if self.root is None:
            return
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def __len__(self):
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root else len(self.mem or {})


def _one_line(text, n=300):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "..."


def _server_message(body, reason=""):
    """The human part of an error body: OpenAI {'error': {'message'}}, MediaWiki {'error': {'info'}}, or text."""
    try:
        data = json.loads(body)
    except ValueError:
        return _one_line(body.decode("utf-8", "replace") or reason)
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        err = err.get("message") or err.get("info") or err.get("detail") or err
    return _one_line(err if isinstance(err, str) else json.dumps(err))


def _retry_after(headers):
    """Retry-After in seconds (delta-seconds or an HTTP date), or None."""
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _connection_error(e):
    """A short cause for a requests connection error: its innermost OS error ('connection refused'), if any."""
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, ConnectionRefusedError):
            return "connection refused"
        if isinstance(x, socket.gaierror):
            return f"cannot resolve host ({x.strerror})"
        stack += [a for a in getattr(x, "args", ()) if isinstance(a, BaseException)]
        stack += [a for a in (getattr(x, "reason", None), x.__cause__, x.__context__) if isinstance(a, BaseException)]
    msg = e.args[0] if e.args and isinstance(e.args[0], str) else e  # urllib3 repeats its cause in args[1]
    return f"connection error: {type(e).__name__}: {_one_line(msg, 160)}"


def _phrase(status):
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


class _Deadline(Exception):
    pass


class Client:
    """requests.Session + deadlines + retries. Retries 429/5xx, timeouts, dropped connections and malformed bodies
    with exponential backoff and jitter (or the server's Retry-After); fails at once on any other 4xx.

    Two wall-clock limits, because a socket timeout alone bounds only each read (a server trickling a byte every
    half second would hold a request forever, and a hanging one cost timeout x attempts):
      `timeout`  : one attempt, start to last body byte (the body is streamed and the clock checked per chunk);
      `deadline` : the whole request, all attempts and the waits between them.
    Errors are `APIError`s of one line: '{name}: 401 Unauthorized from URL: <the server's message> (hint)'.
    `check(data)` validates a decoded body and may raise KeyError/IndexError/TypeError/ValueError, which count as
    a malformed (transient) reply. `secrets` are scrubbed from every error message and from urllib3's logs.
    `auth_hint` is appended to 401/403 errors (e.g. 'check OPENAI_API_KEY')."""

    def __init__(self, headers=None, timeout=30.0, max_retries=6, backoff=1.0, max_wait=120.0, rpm=None,
                 secrets=(), sleep=time.sleep, seed=None, deadline=300.0, name="http", auth_hint=""):
        self.session = requests.Session()
        self.session.headers.update(headers or {})
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=64)  # >= worker threads
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        for what, v in (("timeout", timeout), ("deadline", deadline)):
            if not v or v <= 0:
                raise ValueError(f"{name}: {what} must be > 0 seconds, got {v!r}")
        if max_retries < 0:
            raise ValueError(f"{name}: max_retries must be >= 0, got {max_retries!r}")
        self.timeout, self.max_retries, self.backoff, self.max_wait = timeout, max_retries, backoff, max_wait
        self.deadline, self.name, self.auth_hint = deadline, name, auth_hint
        self.sleep, self.rng = sleep, random.Random(seed)
        self.limiter = RateLimiter(rpm, sleep) if rpm else None
        self.secrets = [s for s in secrets if s]
        for s in self.secrets:
            for logger in ("urllib3.connectionpool", "urllib3", "requests"):
                logging.getLogger(logger).addFilter(_Redact(s))
        self.stats, self.lock = Counter(), threading.Lock()

    def redact(self, text):
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    def _count(self, **kw):
        with self.lock:
            self.stats.update(kw)

    def _attempt(self, method, url, params, json_body, limit, files=None):
        """One HTTP exchange within `limit` seconds of wall clock -> (status, reason, headers, body bytes)."""
        end = time.monotonic() + limit
        r = self.session.request(method, url, params=params, json=json_body, files=files, timeout=limit, stream=True)
        try:
            read = getattr(r.raw, "read1", None) or r.raw.read  # read1: whatever one recv() gives (urllib3 >= 2.3)
            sock = getattr(getattr(r.raw, "connection", None), "sock", None)
            chunks = []
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    raise _Deadline()
                if sock is not None:
                    sock.settimeout(left)  # so no single read outlives the attempt either
                chunk = read(65536)
                if not chunk:
                    return r.status_code, r.reason, r.headers, b"".join(chunks)
                chunks.append(chunk)
        finally:
            r.close()

    def request(self, method, url, *, params=None, json_body=None, check=None, cache=None, files=None):
        """-> (data, from_cache). The cache key is the whole request minus secret-valued params. `files`: a
        multipart body as requests takes it ({field: (filename, bytes, type)}; bytes, so a retry can resend it)."""
        key = None
        if cache is not None:
            clean = {k: v for k, v in (params or {}).items() if v not in self.secrets}
            key = cache_key({"method": method, "url": url, "params": clean, "json": json_body})
            hit = cache.get(key)
            if hit is not None:
                try:
                    if check:
                        check(hit["response"])
                    return hit["response"], True
                except (KeyError, IndexError, TypeError, ValueError):
                    pass  # an entry from an older format: fetch again
        start = time.monotonic()
        last, retry_after, attempts = "", None, 0
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = retry_after if retry_after is not None else \
                    self.backoff * 2 ** (attempt - 1) * self.rng.uniform(0.5, 1.0)  # jitter de-synchronises threads
                delay = min(delay, self.max_wait)
                if time.monotonic() + delay >= start + self.deadline:
                    break  # the next attempt could not start before the deadline
                log.warning("%s: retry %d/%d in %.2fs after: %s", self.name, attempt, self.max_retries, delay, last)
                self._count(retries=1)
                self.sleep(delay)
            if self.limiter:
                self.limiter.wait()
            limit = min(self.timeout, start + self.deadline - time.monotonic())
            if limit <= 0:
                break
            retry_after, attempts = None, attempts + 1
            try:
                status, reason, headers, body = self._attempt(method, url, params, json_body, limit, files)
                if status in RETRY_STATUS:
                    raise _Transient(f"HTTP {status}: {_server_message(body, reason)}", _retry_after(headers))
                if status >= 400:
                    reason = reason or _phrase(status)
                    hint = f" ({self.auth_hint})" if status in (401, 403) and self.auth_hint else ""
                    self._count(failures=1)
                    raise APIError(self.redact(f"{self.name}: {status} {reason} from {url}: "
                                               f"{_server_message(body, reason)}{hint}"))
                try:
                    data = json.loads(body)
                    if check:
                        check(data)
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    raise _Transient(f"malformed response body ({type(e).__name__}: {_one_line(e, 80)}): "
                                     f"{_one_line(repr(body.decode('utf-8', 'replace')), 80)}") from None
                self._count(requests=1)
                if cache is not None:
                    cache.put(key, {"request": {"method": method, "url": url, "json": json_body}, "response": data})
                return data, False
            except _Transient as e:
                last, retry_after = self.redact(_one_line(e)), e.retry_after
            except (requests.Timeout, _Deadline):
                last = f"no complete reply within {limit:.3g}s"
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError, urllib3.exceptions.HTTPError, OSError) as e:
                # refused, reset, dropped mid-body; a socket timeout inside the streamed body read is an OSError too
                timed_out = isinstance(e, (socket.timeout, urllib3.exceptions.ReadTimeoutError))
                last = f"no complete reply within {limit:.3g}s" if timed_out else self.redact(_connection_error(e))
        self._count(failures=1)
        spent = time.monotonic() - start
        why = f"deadline of {self.deadline:g}s reached" if attempts < self.max_retries + 1 else "gave up"
        raise APIError(f"{self.name}: {method} {url}: {why} after {attempts} attempts in {spent:.1f}s; "
                       f"last error: {last}")


def fetch_file(url, path, timeout=60.0):
    """GET url into path, streamed: a .part file, then an atomic rename, so a half download never looks finished
    (data sets for `fireact.py download`; one-shot, an HTTP error raises with its status)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with requests.get(url, stream=True, timeout=timeout, headers={"User-Agent": USER_AGENT}) as r:
        r.raise_for_status()
        with open(tmp, "wb") as f:
            for chunk in r.iter_content(1 << 20):
                f.write(chunk)
    os.replace(tmp, path)


def run_concurrently(fn, items, workers=8, rpm=None, sleep=time.sleep):
    """Yields (item, fn(item) or the exception it raised) as calls complete. At most `workers` calls run at once
    and at most 2*workers are queued (items may be a long lazy iterator); `rpm` caps starts per minute."""
    limiter = RateLimiter(rpm, sleep) if rpm else None

    def call(item):
        if limiter:
            limiter.wait()
        return fn(item)

    items, pending = enumerate(items), {}
    ex = ThreadPoolExecutor(max_workers=workers)
    try:
        for i, item in itertools.islice(items, 2 * workers):
            pending[ex.submit(call, item)] = (i, item)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            # Calls that ended together come out in submission order (a set's order is arbitrary): a consumer that
            # stops at a failure has then seen every earlier call that had already ended, on every run.
            for fut in sorted(done, key=lambda f: pending[f][0]):
                _, item = pending.pop(fut)
                exc = fut.exception()
                yield item, (exc if exc is not None else fut.result())
                for nxt in itertools.islice(items, 1):
                    pending[ex.submit(call, nxt[1])] = nxt
    finally:  # also when the consumer stops early: drop queued work, let running calls finish
        ex.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------------------
# The teacher: any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, Ollama's /v1)


def _choice_texts(data):
    """OpenAI reply -> texts in choice order: chat choices hold message.content, completion choices hold text."""
    choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
    if not choices:
        raise ValueError("no choices")
    return [(c["message"]["content"] if "message" in c else c["text"]) or "" for c in choices]


def openai_client(name, base_url=None, api_key_env="OPENAI_API_KEY", **client_kw):
    """-> (base_url, Client) for an OpenAI-compatible API: the teacher's and the fine-tuning API's. The key comes
    from the environment variable `api_key_env` and lives only in the session's Authorization header (and the
    Client's redaction list): never logged, cached or written. A server other than OpenAI may need no key."""
    base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
    key = os.environ.get(api_key_env, "") if api_key_env else ""
    if not key and "api.openai.com" in base_url:
        raise ValueError(f"{name}: set the environment variable {api_key_env} (or pass base_url= for a local server)")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    hint = (f"check {api_key_env}" if key else f"{api_key_env} is not set") if api_key_env else ""
    return base_url, Client(headers, secrets=[key], name=name, auth_hint=hint, **client_kw)


class Teacher:
    """Client for `{base_url}/chat/completions` and `{base_url}/completions`. The key comes from the environment
    variable `api_key_env` and lives only in the session's Authorization header: never logged, cached or written.
    With `cache_dir`, responses are cached by the whole request, so a rerun costs nothing (note: a cached sampled
    reply is returned again; vary the request, e.g. `seed=`, to get a fresh sample)."""

    def __init__(self, model, base_url=None, api_key_env="OPENAI_API_KEY", timeout=60.0, max_retries=6,
                 cache_dir=None, rpm=None, backoff=1.0, max_wait=120.0, sleep=time.sleep, seed=None, deadline=300.0):
        self.model = model
        self.base_url, self.client = openai_client("teacher", base_url, api_key_env, timeout=timeout,
                                                   max_retries=max_retries, backoff=backoff, max_wait=max_wait,
                                                   rpm=rpm, sleep=sleep, seed=seed, deadline=deadline)
        self.cache = Cache(cache_dir) if cache_dir else None
        self._tokens, self._lock = Counter(), threading.Lock()

    @property
    def usage(self):
        s = self.client.stats
        return {"prompt_tokens": self._tokens["prompt_tokens"], "completion_tokens": self._tokens["completion_tokens"],
                "requests": s["requests"], "cached": self._tokens["cached"], "retries": s["retries"],
                "failures": s["failures"]}

    def _post(self, path, params, temperature, max_tokens, stop, n, extra):
        body = {"model": self.model, **params, "temperature": temperature, "max_tokens": max_tokens, **extra,
                **({"n": n} if n != 1 else {}), **({"stop": stop} if stop else {})}
        data, cached = self.client.request("POST", f"{self.base_url}/{path}", json_body=body, check=_choice_texts,
                                           cache=self.cache)
        with self._lock:
            if cached:
                self._tokens["cached"] += 1
            else:  # tokens cost money only when actually requested
                u = data.get("usage") or {}
                self._tokens.update(prompt_tokens=u.get("prompt_tokens") or 0,
                                    completion_tokens=u.get("completion_tokens") or 0)
        texts = _choice_texts(data)
        return texts if n > 1 else texts[0]

    def chat(self, messages, temperature=0.0, max_tokens=256, stop=None, n=1, **extra):
        """-> the reply text (a list of n texts when n > 1)."""
        return self._post("chat/completions", {"messages": messages}, temperature, max_tokens, stop, n, extra)

    def complete(self, prompt, temperature=0.0, max_tokens=256, stop=None, n=1, **extra):
        """Legacy `/completions` (vLLM, llama.cpp): raw prompt in, continuation out."""
        return self._post("completions", {"prompt": prompt}, temperature, max_tokens, stop, n, extra)


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning through the API (FireAct's GPT-3.5 student): OpenAI's /files and /fine_tuning/jobs endpoints, the
# local check of a chat training file against the API's documented rules, and the cost estimate.

# USD per 1M trained tokens (tokens in the file x epochs), from OpenAI's pricing page as of 2025 (estimates: check
# the page before spending). FireAct fine-tuned gpt-3.5-turbo-0613 in September 2023 at the same $8 (0.008 / 1K).
FT_PRICES = {"gpt-3.5-turbo": 8.0, "gpt-4o-mini": 3.0, "gpt-4o": 25.0}
# the longest training example each base model takes, in tokens (longer ones the API cuts, and a cut trajectory
# would teach whatever came before its finish): gpt-3.5-turbo-0613 had 4,096; later snapshots 16,385
FT_CONTEXT = {"gpt-3.5-turbo": 16385, "gpt-3.5-turbo-0613": 4096, "gpt-4o-mini": 65536, "gpt-4o": 65536}
FT_MIN_EXAMPLES, FT_MAX_BYTES = 10, 512 << 20  # the API's floor on examples; its cap on one uploaded file
FT_ROLES = ("system", "user", "assistant")
FT_DONE = ("succeeded", "failed", "cancelled")


def _by_prefix(table, model):
    """The entry of the longest key that `model` starts with (gpt-4o-mini-2024-07-18 -> gpt-4o-mini), or None."""
    keys = [k for k in table if model.startswith(k)]
    return table[max(keys, key=len)] if keys else None


def auto_epochs(n_examples):
    """The API's n_epochs="auto", as OpenAI's cookbook documents it: 3 epochs, raised so that small files make at
    least 100 example passes (at most 25 epochs), lowered so large ones make at most 25,000 (at least 1)."""
    if n_examples * 3 < 100:
        return min(25, -(-100 // n_examples))
    if n_examples * 3 > 25000:
        return max(1, 25000 // n_examples)
    return 3


def token_counter(model):
    """-> (count(text) -> tokens, how). Exact with a tiktoken-compatible package (tiktoken, or bpe-openai, which
    ships its vocabularies and so works offline); else an estimate of 4 characters a token (OpenAI's rule of
    thumb; on FireAct's data cl100k_base gives 4.4, so the estimate runs ~10% high, on the safe side)."""
    name = "o200k_base" if model.startswith(("gpt-4o", "gpt-4.1", "o")) else "cl100k_base"  # gpt-3.5, gpt-4
    for package in ("tiktoken", "bpe_openai"):
        try:
            enc = __import__(package).get_encoding(name)
            enc.encode_ordinary("probe")  # tiktoken fetches its vocabulary on first use: offline that fails here
        except Exception:  # not installed, or no vocabulary: try the next, then estimate
            continue
        return (lambda text: len(enc.encode_ordinary(text))), f"{name} via {package}"  # special tokens as text
    return (lambda text: -(-len(text) // 4)), "estimated at 4 characters a token (pip install tiktoken for exact counts)"


def check_chat_file(path, model="gpt-3.5-turbo"):
    """Check a chat fine-tuning file (JSONL of {"messages": [{role, content}, ...]}) against the API's rules before
    paying for an upload: JSON per line, roles system/user/assistant with string content, system only first, at
    least one non-empty assistant message, `weight` 0/1 on assistant messages only, each example within the base
    model's token limit, at least 10 examples. A broken rule is a ValueError naming file:line.
    -> dict(examples, tokens: per example (counted as OpenAI's cookbook counts chat tokens: 3 per message + role +
    content, 3 per example), tokenizer, warnings: [one line each]). Warnings: examples that end with a user message
    (FireAct's layout: the API trains on assistant messages only, so that tail is billed but not learned) or open
    with the assistant (two rows of FireAct's multitask_multimethod data)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: " + ("is a directory, not a training file" if path.is_dir() else "no such file"))
    if path.stat().st_size > FT_MAX_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size / 2**20:.0f} MiB, over the API's 512 MiB per file; split it")
    count, how = token_counter(model)
    limit = _by_prefix(FT_CONTEXT, model)
    tokens, tail_user, head_assistant = [], [], []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); the API reads UTF-8 JSONL") from None
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    for n, line in enumerate(lines, 1):
        where = f"{path}:{n}"
        if not line.strip():
            raise ValueError(f"{where}: blank line; the API reads one example per line (delete it)")
        try:
            ex = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: invalid JSON ({_one_line(e, 100)})") from None
        msgs = ex.get("messages") if isinstance(ex, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: expected {{\"messages\": [...]}} with at least one message (export our "
                             f"trajectories with `fireact.py export-data --format openai`)")
        total = 3
        for j, m in enumerate(msgs):
            at = f"{where}: messages[{j}]"
            if not isinstance(m, dict):
                raise ValueError(f"{at}: expected an object {{role, content}}, got {type(m).__name__}")
            extra = set(m) - {"role", "content", "name", "weight"}
            if extra:
                raise ValueError(f"{at}: unknown key {sorted(extra)[0]!r}; a message has role, content (name, weight)")
            if m.get("role") not in FT_ROLES:
                raise ValueError(f"{at}: role {m.get('role')!r} is not one of {', '.join(FT_ROLES)}")
            if m["role"] == "system" and j > 0:
                raise ValueError(f"{at}: a system message must come first")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"{at}: 'content' must be a string, got {m.get('content')!r:.40}")
            if "weight" in m and (m["role"] != "assistant" or m["weight"] not in (0, 1)):
                raise ValueError(f"{at}: 'weight' must be 0 or 1, and only on an assistant message")
            total += 3 + count(m["role"]) + count(m["content"]) + (1 if "name" in m else 0)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            raise ValueError(f"{where}: no non-empty assistant message; the API learns only from assistant messages")
        bad = next((j for j, m in enumerate(msgs) if m["role"] == "assistant" and not m["content"].strip()), None)
        if bad is not None:
            raise ValueError(f"{where}: messages[{bad}]: an empty assistant message; the API refuses it")
        if limit and total > limit:
            raise ValueError(f"{where}: {total:,} tokens, over {model}'s {limit:,} a training example; the API "
                             f"would cut it before its end: shorten it or leave it out")
        tokens.append(total)
        (tail_user if msgs[-1]["role"] != "assistant" else []).append(n)
        (head_assistant if next(m for m in msgs if m["role"] != "system")["role"] == "assistant" else []).append(n)
    if len(tokens) < FT_MIN_EXAMPLES:
        raise ValueError(f"{path}: {len(tokens)} examples; the API needs at least {FT_MIN_EXAMPLES}")
    warnings = []
    if tail_user:
        warnings.append(f"{len(tail_user)} of {len(tokens)} examples end with a user message (first: {path}:"
                        f"{tail_user[0]}): billed, not trained on (FireAct's layout; --no-final-observation drops it)")
    if head_assistant:
        warnings.append(f"{len(head_assistant)} examples open with an assistant message, not the question (first: "
                        f"{path}:{head_assistant[0]})")
    return dict(examples=len(tokens), tokens=tokens, tokenizer=how, warnings=warnings)


def estimate(check, model, epochs=0):
    """What a job will cost: -> dict(examples, file_tokens, epochs, trained_tokens, usd or None, price)."""
    n_epochs = epochs or auto_epochs(check["examples"])
    trained = sum(check["tokens"]) * n_epochs
    price = _by_prefix(FT_PRICES, model)
    return dict(examples=check["examples"], file_tokens=sum(check["tokens"]), epochs=n_epochs,
                trained_tokens=trained, price=price, usd=None if price is None else trained * price / 1e6)


def _check_id(data):
    if not isinstance(data.get("id"), str):
        raise ValueError("no 'id' in the reply")


def _check_list(data):
    if not isinstance(data.get("data"), list):
        raise ValueError("no 'data' list in the reply")


class FineTuneAPI:
    """OpenAI's files and fine-tuning endpoints (any server that speaks them), over the teacher's Client: retries,
    deadlines, one-line APIErrors with the server's message, the key from the environment and never written."""

    def __init__(self, base_url=None, api_key_env="OPENAI_API_KEY", timeout=300.0, max_retries=6,
                 sleep=time.sleep, deadline=900.0):
        self.base_url, self.client = openai_client("fine-tune", base_url, api_key_env, timeout=timeout,
                                                   max_retries=max_retries, sleep=sleep, deadline=deadline)

    def _call(self, method, path, check=_check_id, **kw):
        return self.client.request(method, f"{self.base_url}/{path}", check=check, **kw)[0]

    def upload(self, path, purpose="fine-tune"):
        """POST /files (multipart) -> the file object {id, status, ...}."""
        path = Path(path)
        return self._call("POST", "files", files={"purpose": (None, purpose),
                                                  "file": (path.name, path.read_bytes(), "application/jsonl")})

    def file(self, file_id):
        return self._call("GET", f"files/{file_id}")

    def create_job(self, training_file, model, validation_file=None, epochs=0, suffix=""):
        """POST /fine_tuning/jobs -> the job {id, status, ...}; epochs 0 = the API's "auto"."""
        body = {"training_file": training_file, "model": model,
                **({"validation_file": validation_file} if validation_file else {}),
                **({"hyperparameters": {"n_epochs": epochs}} if epochs else {}), **({"suffix": suffix} if suffix else {})}
        return self._call("POST", "fine_tuning/jobs", json_body=body)

    def job(self, job_id):
        return self._call("GET", f"fine_tuning/jobs/{job_id}")

    def jobs(self, limit=100):
        return self._call("GET", "fine_tuning/jobs", check=_check_list, params={"limit": limit})["data"]

    def events(self, job_id, limit=100):
        """The job's latest events, oldest first."""
        data = self._call("GET", f"fine_tuning/jobs/{job_id}/events", check=_check_list, params={"limit": limit})
        return sorted(data["data"], key=lambda e: (e.get("created_at", 0), str(e.get("id", ""))))


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def finetune_state_path(train_path):
    return Path(f"{train_path}.finetune.json")


def finetune(api, train_path, model, validation_path="", epochs=0, suffix="", poll=30.0, sleep=time.sleep,
             log=print):
    """Fine-tune `model` on a checked chat file through `api` (a FineTuneAPI) -> the fine-tuned model's name.

    Resumable, so a rerun never pays twice: the run is keyed by the file's sha256, the validation file's, the base
    model, the epochs and the server, and its state (file ids, job id, status, model name; never the key) lives
    next to the training file in TRAIN.finetune.json, rewritten atomically after each step. A rerun follows the
    job it finds there (or prints the finished model's name at once); a job that failed is reported and a new one
    started on the uploaded files. Before creating a job, the server's job list is searched for one already made
    on the same uploaded file (a crash between creating it and writing the state).
    Follows the job with one line per change: status, trained tokens, the latest event. A failed or cancelled job
    is a ValueError of one line with the server's message."""
    state_path = finetune_state_path(train_path)
    key = "|".join([_sha256(train_path), _sha256(validation_path) if validation_path else "-", model,
                    f"epochs={epochs or 'auto'}", api.base_url])
    try:
        state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else {}
    except ValueError:
        raise ValueError(f"{state_path}: not valid JSON; delete it to start over (a job made from it is then "
                         f"found again by its uploaded file only if that file is uploaded again)") from None
    run = state.setdefault(key, dict(base_model=model, epochs=epochs or "auto", base_url=api.base_url,
                                     train=str(train_path), validation=str(validation_path) or None))

    def save(**kw):
        run.update(kw)
        files.atomic_write(state_path, json.dumps(state, indent=1))

    if run.get("fine_tuned_model"):
        log(f"already fine-tuned (job {run['job']}, {state_path}): {run['fine_tuned_model']}")
        return run["fine_tuned_model"]
    for role, path in (("training_file", train_path), ("validation_file", validation_path)):
        if path and not run.get(role):
            f = api.upload(path)
            log(f"uploaded {path} -> {f['id']}")
            save(**{role: f["id"]})
        while path:  # the API takes a file once it has processed it
            f = api.file(run[role])
            if f.get("status") in ("error", "deleted"):
                save(**{role: None})
                raise ValueError(f"{path}: the API refused the file: {_one_line(f.get('status_details') or f['status'])}")
            if f.get("status") in (None, "processed"):
                break
            sleep(min(poll, 5.0))
    if run.get("job") and run.get("status") in ("failed", "cancelled"):
        log(f"job {run['job']} {run['status']} before ({run.get('error') or 'no message'}); starting a new one")
        save(job=None, status=None, error=None)
    if not run.get("job"):
        found = [j for j in api.jobs() if j.get("status") not in ("failed", "cancelled") and
                 (j.get("training_file"), j.get("validation_file")) == (run["training_file"], run.get("validation_file"))]
        job = found[0] if found else api.create_job(run["training_file"], model, run.get("validation_file"),
                                                     epochs, suffix)
        log(("found job " if found else "created job ") + job["id"])
        save(job=job["id"], status=job.get("status"))
    seen, last = set(), None
    while True:
        job = api.job(run["job"])
        new = [e for e in api.events(run["job"]) if e.get("id") not in seen]
        seen.update(e.get("id") for e in new)
        status = job.get("status", "?")
        line = (f"{run['job']}: {status} | {job.get('trained_tokens') or 0:,} trained tokens" +
                (f" | {_one_line(new[-1].get('message', ''), 160)}" if new else ""))
        if new or status != last:
            log(line)
        if status != last:
            save(status=status)
        last = status
        if status == "succeeded":
            name = job.get("fine_tuned_model")
            if not name:
                raise ValueError(f"job {run['job']} succeeded but named no fine_tuned_model: {json.dumps(job)[:200]}")
            save(fine_tuned_model=name, trained_tokens=job.get("trained_tokens"))
            return name
        if status in FT_DONE:
            err = job.get("error") or {}
            msg = _one_line(err.get("message") or (new[-1].get("message") if new else "") or "no message", 300)
            save(error=msg)
            raise ValueError(f"fine-tuning job {run['job']} {status}: {msg}" +
                             (f" ({err['param']})" if err.get("param") else "") + "; fix it and rerun")
        sleep(poll)


# ----------------------------------------------------------------------------------------------------------------
# Tools: one episode mechanism (ReAct's search / lookup / finish), several search backends


def _fold(text):
    """Lower case, diacritics stripped: 'Béyoncé' -> 'beyonce'."""
    if text.isascii():  # most text: skip the per-character pass (it dominates index build time)
        return text.lower()
    text = unicodedata.normalize("NFKD", text)
    return "".join(c for c in text if not unicodedata.combining(c)).lower()


def normalize_title(title):
    """Title key insensitive to case, punctuation, diacritics and a leading 'The': 'The Beatles!' -> 'beatles'."""
    words = re.sub(r"[\W_]+", " ", _fold(title).replace("&", " and ")).split()
    return " ".join(words[1:] if len(words) > 1 and words[0] == "the" else words)


def _tokens(text):
    return re.findall(r"[a-z0-9]+", _fold(text))


def split_sentences(text):
    """Plain-text page -> sentences; '== Heading ==' lines dropped."""
    out = []
    for para in text.splitlines():
        para = para.strip()
        if para and not para.startswith("=="):
            out += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", para) if s]
    return out


class Tool:
    """ReAct's episode: search[entity] shows a page's first 5 sentences and makes it the current page;
    lookup[keyword] walks the current page's sentences that contain keyword, '(Result i / n) sentence', then
    'No more results.'; finish[answer] ends the episode (done, answer). Subclasses implement
    `_search(query) -> (observation, sentences of the page found or None)`.

    `name` says which tool made an observation (recorded in trajectories and results); `noise` is (p, mode) for
    a NoisyTool and None otherwise. Snippet tools (has_lookup = False) answer lookup with NO_LOOKUP, as FireAct's
    Google search had no lookup."""

    name = "tool"
    noise = None
    has_lookup = True

    def __init__(self):
        self.reset()

    def reset(self):
        self.done, self.answer, self.page = False, None, None
        self._keyword, self._hits, self._next = None, [], 0

    def fork(self):
        """A fresh episode sharing this tool's backend (index, HTTP session, caches)."""
        t = copy.copy(self)
        t.reset()
        return t

    def step(self, action):
        parsed = parse_action(action)
        if parsed is None:
            return f"Invalid action: {_one_line(action, 200)}"
        name, arg = parsed
        if name == "finish":
            self.done, self.answer = True, arg
            return "Episode finished."
        if not arg:
            return f"Invalid action: {name}[] needs an argument."
        if name == "search":
            obs, self.page = self._search(arg)
            self._keyword = None
            return obs
        if not self.has_lookup:
            return NO_LOOKUP
        if arg != self._keyword:  # a new keyword restarts the walk (ReAct)
            kw = arg.lower()
            self._keyword, self._next = arg, 0
            self._hits = [s for s in (self.page or []) if kw in s.lower()]
        if self._next >= len(self._hits):
            return "No more results."
        self._next += 1
        return f"(Result {self._next} / {len(self._hits)}) {self._hits[self._next - 1]}"

    def _search(self, query):
        raise NotImplementedError


NO_LOOKUP = "lookup is not available with this search tool. Use search[...] with a question or a phrase instead."


def _not_found(query, similar):
    return f"Could not find [{query}]. Similar: {list(similar)}."


class Wikipedia(Tool):
    """Live Wikipedia through the MediaWiki Action API. One request per search fetches the page's plain text
    (following redirects), its disambiguation flag and the top-5 search hits (used as 'Similar' when there is no
    such page, or it is a disambiguation page). Responses are cached in memory (shared by forks) and, with
    `cache_dir`, on disk."""

    name = "wikipedia"

    def __init__(self, endpoint=WIKI_API, user_agent=USER_AGENT, timeout=10.0, retries=3, cache_dir=None,
                 sleep=time.sleep, deadline=60.0):
        super().__init__()
        self.endpoint = endpoint
        self.client = Client({"User-Agent": user_agent}, timeout, retries, sleep=sleep, deadline=deadline,
                             name="wikipedia")
        self.cache = Cache(cache_dir, memory=True)

    def _search(self, query, follow=True):
        params = {"action": "query", "format": "json", "formatversion": "2", "redirects": "1", "titles": query,
                  "prop": "extracts|pageprops", "explaintext": "1", "ppprop": "disambiguation",
                  "list": "search", "srsearch": query, "srlimit": "5", "srprop": ""}
        data, _ = self.client.request("GET", self.endpoint, params=params, check=_check_mediawiki, cache=self.cache)
        q = data.get("query", {})
        pages = q.get("pages") or [{"missing": True}]
        page = pages[0]
        sentences = split_sentences(page.get("extract") or "")
        if page.get("missing") or page.get("invalid") or "disambiguation" in (page.get("pageprops") or {}) \
                or not sentences:
            similar = [h["title"] for h in q.get("search", []) if h.get("title") != page.get("title")]
            if follow and page.get("missing") and similar and normalize_title(similar[0]) == normalize_title(query):
                return self._search(similar[0], follow=False)  # titles are case-sensitive: 'ed wood' -> 'Ed Wood'
            return _not_found(query, similar[:5]), None
        return " ".join(sentences[:5]), sentences


def _check_dict(data):
    if not isinstance(data, dict):
        raise TypeError("expected a JSON object")


def _check_mediawiki(data):
    """MediaWiki reports errors with HTTP 200: lag / rate limits are transient, anything else is final."""
    _check_dict(data)
    err = data.get("error")
    if err:
        if err.get("code") in ("maxlag", "ratelimited", "internal_api_error_DBQueryError"):
            raise ValueError(f"MediaWiki {err.get('code')}")
        raise APIError(f"MediaWiki error {err.get('code')}: {_one_line(err.get('info', ''))}")


def read_corpus(path):
    """Corpus JSONL ({"title": str, "sentences": [str]} per line) -> (titles, pages as lists of sentences).
    Errors are one line naming the file (and line) and what to do."""
    path = Path(path)
    make = "make one with: python tools.py build-corpus OUT.jsonl HOTPOT.jsonl"
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, expected a corpus JSONL file ({make})")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such corpus file ({make})")
    titles, pages, lineno = [], [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    title, sents = rec["title"], rec["sentences"]
                    if not isinstance(title, str) or not isinstance(sents, list) or \
                            not all(isinstance(s, str) for s in sents):
                        raise TypeError("title must be a string and sentences a list of strings")
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: bad corpus line ({_one_line(e, 120)}); "
                                     'expected {"title": str, "sentences": [str]}') from None
                titles.append(title)
                pages.append([s.strip() for s in sents if s.strip()])
    except UnicodeDecodeError:
        raise ValueError(f"{path}:{lineno + 1}: not UTF-8 text; expected a corpus JSONL file ({make})") from None
    if not titles:
        raise ValueError(f"{path}: empty corpus ({make})")
    return titles, pages


class TitleIndex:
    """Exact title lookup, tried in order: case-folded title, then normalize_title(), then the normalised title
    without a '(...)' qualifier when that is unambiguous ('Ed Wood' -> 'Ed Wood (film)' only if no other 'Ed
    Wood (...)'). The first page with a key keeps it."""

    def __init__(self, titles):
        self.keys = [{}, {}, {}]
        base_count = Counter()
        for i, t in enumerate(titles):
            self.keys[0].setdefault(" ".join(_fold(t).split()), i)
            self.keys[1].setdefault(normalize_title(t), i)
            base_count[normalize_title(re.sub(r"\s*\([^)]*\)\s*$", "", t))] += 1
        for i, t in enumerate(titles):
            base = normalize_title(re.sub(r"\s*\([^)]*\)\s*$", "", t))
            if base_count[base] == 1 and base not in self.keys[1]:
                self.keys[2][base] = i

    def find(self, query):
        """-> page index or None."""
        wanted = (" ".join(_fold(query).split()), normalize_title(query), normalize_title(query))
        for index, key in zip(self.keys, wanted):
            if key in index:
                return index[key]
        return None


class BM25:
    """Okapi BM25 over documents given as token lists (the one ranking mechanism of LocalWiki and SnippetSearch).

    Speed: an inverted index in CSR form whose postings already hold each (term, doc) BM25 weight (IDF and
    document-length norm folded in), so a query is a few numpy scatter-adds over its terms' postings.
    Determinism: query terms are added in first-occurrence order (not set order, which varies with Python's hash
    seed, and float sums depend on order) and ties rank the lower document index first (numpy's argpartition
    orders ties differently on different CPUs)."""

    def __init__(self, docs, k1=1.2, b=0.75):
        vocab = {}
        ids = [[vocab.setdefault(t, len(vocab)) for t in d] for d in docs]
        n = len(ids)
        lengths = np.array([len(d) for d in ids], np.int64)  # [N]
        doc = np.repeat(np.arange(n, dtype=np.int64), lengths)  # [T] doc of each token
        term = np.fromiter(itertools.chain.from_iterable(ids), np.int64, count=int(lengths.sum()))  # [T]
        key, tf = np.unique(term * n + doc, return_counts=True)  # sorted by (term, doc): CSR postings at once
        term, self.post_doc, tf = key // n, (key % n).astype(np.int32), tf.astype(np.float32)  # [nnz]
        df = np.bincount(term, minlength=len(vocab))  # [V]
        self.offsets = np.concatenate([[0], np.cumsum(df)])  # postings of term j are [offsets[j], offsets[j+1])
        idf = np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)  # [V]
        lengths = lengths.astype(np.float32)
        norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1.0))  # [N] precomputed length norms
        self.post_w = idf[term] * tf * (k1 + 1) / (tf + norm[self.post_doc])  # [nnz] per-posting BM25 weight
        self.vocab, self.n = vocab, n

    def scores(self, query):
        """Free text -> BM25 score of every document [N]."""
        scores = np.zeros(self.n, np.float32)  # [N]
        for t in dict.fromkeys(_tokens(query)):  # unique terms, first-occurrence order
            j = self.vocab.get(t)
            if j is not None:
                s, e = self.offsets[j], self.offsets[j + 1]
                scores[self.post_doc[s:e]] += self.post_w[s:e]  # doc ids are unique within a term's postings
        return scores

    def rank(self, query, k=5):
        """Top-k (doc index, score), best first, ties by lower index; only docs sharing a term with the query."""
        scores = self.scores(query)
        cand = np.flatnonzero(scores > 0)  # ascending doc index
        if len(cand) > k:
            kth = -np.partition(-scores[cand], k - 1)[k - 1]  # the k-th best score
            cand = cand[scores[cand] >= kth]  # keeps every doc tied at the cut
        top = cand[np.argsort(-scores[cand], kind="stable")[:k]]  # stable on ascending ids: ties -> lower index
        return [(int(i), float(scores[i])) for i in top]


class LocalWiki(Tool):
    """Offline Wikipedia over a JSONL corpus of {"title", "sentences"} (see build_corpus).

    search[x]: an exact title match wins (TitleIndex). Otherwise, with retrieve=True (the default, for agents that
    search with free text as FireAct's teacher did), BM25 over title + sentences picks the best page and the
    observation says so: 'No page titled [x]; best text match [Title]: ...'. With retrieve=False (pure ReAct):
    'Could not find [x]. Similar: [...]' with BM25-ranked titles.
    `last_search` records how the last search was answered: 'title', 'bm25' or 'none'."""

    name = "local"

    def __init__(self, corpus_path, retrieve=True, k1=1.2, b=0.75):
        super().__init__()
        self.retrieve, self.last_search = retrieve, None
        self.titles, self.pages = read_corpus(corpus_path)
        self.title_index = TitleIndex(self.titles)
        # a page is its title (counted twice: title words matter most) followed by its sentences
        self.bm25 = BM25([_tokens(t) * 2 + _tokens(" ".join(p)) for t, p in zip(self.titles, self.pages)], k1, b)

    def rank(self, query, k=5):
        """Top-k (page index, BM25 score) for free text, best first (ties: the earlier page)."""
        return self.bm25.rank(query, k)

    def find_title(self, query):
        return self.title_index.find(query)

    def _search(self, query):
        i = self.find_title(query)
        if i is not None:
            self.last_search = {"query": query, "how": "title", "title": self.titles[i]}
            return " ".join(self.pages[i][:5]), self.pages[i]
        hits = self.rank(query, k=5)
        if self.retrieve and hits:
            i = hits[0][0]
            self.last_search = {"query": query, "how": "bm25", "title": self.titles[i]}
            return f"No page titled [{query}]; best text match [{self.titles[i]}]: " + " ".join(self.pages[i][:5]), \
                self.pages[i]
        self.last_search = {"query": query, "how": "none", "title": None}
        return _not_found(query, [self.titles[i] for i, _ in hits]), None


def clip(text, max_chars):
    """Cut text to at most max_chars at a word boundary, marked ' ...' as Google marks a cut snippet."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars - 3)
    return text[:cut if cut > 0 else max_chars - 4].rstrip(" ,;:") + " ..."


class SnippetSearch(Tool):
    """Offline stand-in for FireAct's Google search: a free-text query returns ONE short passage of the corpus
    (no page, no lookup), as SerpAPI returned one snippet (median 155 characters over FireAct's 2,250 searches).

    The passages ('windows') are each sentence of a page, joined with the next one when both fit in window_chars,
    so a snippet is shown whole as it was scored (clipped at max_chars, ' ...', only for a very long sentence).
    Title-aware: each window is indexed with its page title's tokens, so 'when did the band Velvet Foxes split'
    finds the window of page 'Velvet Foxes' that says 'The band split ...'; the page's lead (first window) gets
    the title tokens twice, as Google favours a page's lead. A query that is exactly a page title (TitleIndex) gets
    that lead. Nothing found: 'None', as FireAct's tool said.
    `last_search` records how the last search was answered: 'title', 'bm25' or 'none', and from which page.

    Measured (searching each question as it is) on the 9,366-page HotpotQA corpus (957 questions) and the toy
    corpus (each hop's goal of the 100 dev questions): window_chars 250 keeps the median snippet at 167 characters
    (Google's 155; 300 gives 188). The top snippet holds a supporting sentence for 66.8% of HotpotQA questions and
    comes from a supporting page for 77.8% (LocalWiki's best page: 77.6%; no title tokens: 63.5%); it holds the
    hop's fact for 178/200 toy goals (title tokens once everywhere: 166, twice everywhere: 165).
    No 'Title: ' prefix: it would put the answer in 30% of snippets instead of 27% (titles answer comparison
    questions), but FireAct's snippets carry no title (under 5% start with any 'Xxx: ' label), and a student
    trained on them must meet the same kind of text at evaluation."""

    name = "snippet"
    has_lookup = False

    def __init__(self, corpus_path, max_chars=300, window_chars=250, k1=1.2, b=0.75):
        super().__init__()
        self.max_chars, self.last_search = max_chars, None
        self.titles, pages = read_corpus(corpus_path)
        self.title_index = TitleIndex(self.titles)
        self.texts, page_of, self.first = [], [], []  # window text, its page, each page's first window (or -1)
        docs = []
        for i, (title, sents) in enumerate(zip(self.titles, pages)):
            head, toks = _tokens(title), [_tokens(s) for s in sents]
            self.first.append(len(self.texts) if sents else -1)
            for j, s in enumerate(sents):
                pair = j + 1 < len(sents) and len(s) + 1 + len(sents[j + 1]) <= window_chars
                self.texts.append(f"{s} {sents[j + 1]}" if pair else s)
                page_of.append(i)
                docs.append(head * (2 if j == 0 else 1) + toks[j] + (toks[j + 1] if pair else []))
        if not docs:
            raise ValueError(f"{corpus_path}: no page has a sentence; nothing to search")
        self.page_of = np.array(page_of, np.int32)  # [W]
        self.bm25 = BM25(docs, k1, b)

    def _search(self, query):
        i = self.title_index.find(query)
        if i is not None and self.first[i] >= 0:
            w, how = self.first[i], "title"
        else:
            hits = self.bm25.rank(query, 1)
            if not hits:
                self.last_search = {"query": query, "how": "none", "title": None}
                return "None", None
            w, how = hits[0][0], "bm25"
        self.last_search = {"query": query, "how": how, "title": self.titles[self.page_of[w]]}
        return clip(self.texts[w], self.max_chars), None


class GoogleSearch(Tool):
    """FireAct's own tool: a SerpAPI-style Google search returning one snippet (the answer box's answer, else its
    snippet, else its highlighted words, else the first organic result's snippet, else 'None', as FireAct did).
    No pages, so no lookup (NO_LOOKUP). The key (from `api_key_env`) travels as a query parameter, so it is scrubbed
    from errors and urllib3's logs and left out of cache keys."""

    name = "google"
    has_lookup = False

    def __init__(self, api_key_env="SERPAPI_API_KEY", endpoint="https://serpapi.com/search", timeout=20.0,
                 retries=3, cache_dir=None, sleep=time.sleep, deadline=60.0):
        super().__init__()
        key = os.environ.get(api_key_env, "")
        if not key:
            raise ValueError(f"google: set the environment variable {api_key_env} (a SerpAPI key)")
        self.endpoint, self._params = endpoint, {"engine": "google", "hl": "en", "gl": "us", "api_key": key}
        self.client = Client({"User-Agent": USER_AGENT}, timeout, retries, secrets=[key], sleep=sleep,
                             deadline=deadline, name="google", auth_hint=f"check {api_key_env}")
        self.cache = Cache(cache_dir, memory=True)

    def _search(self, query):
        data, _ = self.client.request("GET", self.endpoint, params={**self._params, "q": query},
                                      check=_check_dict, cache=self.cache)
        box, organic = data.get("answer_box") or {}, data.get("organic_results") or [{}]
        for text in (box.get("answer"), box.get("snippet"), (box.get("snippet_highlighted_words") or [None])[0],
                     organic[0].get("snippet")):
            if text:
                return str(text), None
        return "None", None


class NoisyTool:
    """FireAct's robustness study: with probability p a search/lookup observation becomes 'None' (mode='none') or
    a random observation from other calls (mode='random'). Seeded: fork k draws from Random(f'{seed}:{k}'), so a
    run is reproducible given the order of forks. Forks share the pool of past observations."""

    def __init__(self, tool, p, mode="none", seed=0, _shared=None):
        if mode not in ("none", "random"):
            raise ValueError(f"NoisyTool: mode must be 'none' or 'random', got {mode!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"NoisyTool: p must be in [0, 1], got {p}")
        self.tool, self.p, self.mode, self.seed = tool, p, mode, seed
        self._shared = _shared or {"pool": [], "forks": itertools.count(1), "lock": threading.Lock()}
        self.rng = random.Random(f"{seed}:0" if _shared is None else f"{seed}:{next(self._shared['forks'])}")
        self.replaced = 0

    done = property(lambda self: self.tool.done)
    answer = property(lambda self: self.tool.answer)
    name = property(lambda self: self.tool.name)  # the wrapped tool's name; the noise setting is separate:
    noise = property(lambda self: (self.p, self.mode))

    def fork(self):
        return NoisyTool(self.tool.fork(), self.p, self.mode, self.seed, self._shared)

    def step(self, action):
        obs = self.tool.step(action)
        parsed = parse_action(action)
        if parsed is None or parsed[0] == "finish" or obs.startswith("Invalid action") or obs == NO_LOOKUP:
            return obs
        noisy = self.rng.random() < self.p  # drawn on every call, so the noise pattern depends only on the seed
        with self._shared["lock"]:
            pool = self._shared["pool"]
            others = [o for o in pool if o != obs] if noisy and self.mode == "random" else []
            if len(pool) < 1000:
                pool.append(obs)
            else:  # bounded pool: overwrite a random slot
                pool[self.rng.randrange(len(pool))] = obs
        if not noisy:
            return obs
        self.replaced += 1
        return self.rng.choice(others) if others else "None"


# ----------------------------------------------------------------------------------------------------------------
# Offline corpus builder + CLI


def _read_records(path):
    """A JSON array (HotpotQA's original files) or JSONL (one record per line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            return json.loads(text)
    except ValueError as e:  # bad JSON or not UTF-8
        raise ValueError(f"{path}: not a HotpotQA JSON/JSONL file ({_one_line(e, 120)})") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: bad JSON line ({e})") from None
    return out


def build_corpus(hotpot_paths, out_path):
    """HotpotQA-format files (records with context = [[title, [sentences]]]) -> JSONL {"title", "sentences"},
    one line per distinct title (first occurrence wins), written atomically. Returns the number of pages."""
    if isinstance(hotpot_paths, (str, Path)):
        hotpot_paths = [hotpot_paths]
    pages = {}
    for path in hotpot_paths:
        for n, rec in enumerate(_read_records(path)):
            if not isinstance(rec, dict) or "context" not in rec:
                raise ValueError(f"{path}: record {n} has no 'context' (is this a HotpotQA file with context?)")
            try:
                for title, sents in rec["context"]:
                    pages.setdefault(title, [s.strip() for s in sents if s.strip()])
            except (ValueError, TypeError, AttributeError):
                raise ValueError(f"{path}: record {n}: context must be [[title, [sentences]], ...]") from None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + f".{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for title, sents in pages.items():
            f.write(json.dumps({"title": title, "sentences": sents}, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    return len(pages)


TOOLS = {"local": LocalWiki, "snippet": SnippetSearch}  # the offline tools, by `name`


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="tools.py: offline corpus builder and search")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-corpus", help="HotpotQA context files -> corpus JSONL")
    b.add_argument("out")
    b.add_argument("files", nargs="+")
    s = sub.add_parser("search", help="search a corpus; further arguments are more actions (lookup[...])")
    s.add_argument("corpus")
    s.add_argument("query")
    s.add_argument("actions", nargs="*")
    s.add_argument("--tool", choices=sorted(TOOLS), default="local",
                   help="local: a page's first sentences (title, else BM25 page); snippet: one Google-like snippet")
    s.add_argument("--no-retrieve", action="store_true", help="local only, pure ReAct: no BM25 fallback page")
    args = ap.parse_args(argv)
    if args.cmd == "build-corpus":  # user errors are one line through cli.run
        for f in args.files:
            if not Path(f).is_file():
                raise ValueError(f"build-corpus: {f}: " + ("is a directory, expected a HotpotQA file"
                                                           if Path(f).is_dir() else "no such file"))
        print(f"wrote {build_corpus(args.files, args.out)} pages to {args.out}")
        return
    tool = (LocalWiki(args.corpus, retrieve=not args.no_retrieve) if args.tool == "local"
            else SnippetSearch(args.corpus)).fork()
    for action in [f"search[{args.query}]"] + args.actions:
        print(f"Action: {action}\nObservation: {tool.step(action)}")


if __name__ == "__main__":
    cli.run(lambda: main(sys.argv[1:]), prog="tools.py")

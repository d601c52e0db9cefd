"""
The HTTP client, one owner for every request the project makes: the teacher, Wikipedia, the Google-snippet search,
OpenAI's fine-tuning API and the data downloads. Plumbing: torch-free; imports only common/* and requests.

    base_url, client = net.openai_client("teacher")                    # key from $OPENAI_API_KEY, never written
    data, cached = client.request("POST", base_url + "/chat/completions", json_body=body, cache=net.Cache(".c"))
    for item, result in net.run_concurrently(fn, items, workers=8, rpm=500): ...   # result may be an exception

`Client`: a per-attempt and an overall wall-clock deadline, retries with backoff + jitter, Retry-After, fail-fast
4xx, malformed-body handling, secret redaction (errors and urllib3's logs), an on-disk `Cache`. Errors are
`APIError`s of one line.
"""
import email.utils
import hashlib
import http
import itertools
import json
import logging
import os
import random
import socket
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import requests
import urllib3

from common.files import atomic_write  # the one atomic write (temp file, fsync, rename)

log = logging.getLogger("fireact.net")
USER_AGENT = "fireact-from-scratch/0.1 (research agent; https://github.com/anchen1011/FireAct) python-requests"
RETRY_STATUS = {429, 500, 502, 503, 504}


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

    On disk it is one file per key, written with atomic_write (a unique temp file, fsync, os.replace), so
    concurrent writers (threads or processes) and crashes never leave a torn or a duplicate entry: a reader sees
    the old file, the new file, or none. A crash leaves at most a '.tmp' file, which is never read (and is swept
    when older than an hour). An unreadable entry counts as a miss."""

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
        if self.root is not None:
            atomic_write(self._path(key), json.dumps(value, ensure_ascii=False))

    def __len__(self):
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root else len(self.mem or {})


def shorten(text, n=300):
    """Any text on one line, white space collapsed, cut at n characters ('...')."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "..."


def _server_message(body, reason=""):
    """The human part of an error body: OpenAI {'error': {'message'}}, MediaWiki {'error': {'info'}}, or text."""
    try:
        data = json.loads(body)
    except ValueError:
        return shorten(body.decode("utf-8", "replace") or reason)
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        err = err.get("message") or err.get("info") or err.get("detail") or err
    return shorten(err if isinstance(err, str) else json.dumps(err))


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
    return f"connection error: {type(e).__name__}: {shorten(msg, 160)}"


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
                    raise _Transient(f"malformed response body ({type(e).__name__}: {shorten(e, 80)}): "
                                     f"{shorten(repr(body.decode('utf-8', 'replace')), 80)}") from None
                self._count(requests=1)
                if cache is not None:
                    cache.put(key, {"request": {"method": method, "url": url, "json": json_body}, "response": data})
                return data, False
            except _Transient as e:
                last, retry_after = self.redact(shorten(e)), e.retry_after
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


def fetch_file(url, path, timeout=60.0):
    """GET url into path, streamed through atomic_write, so a half download never looks finished
    (data sets for `fireact.py download`; one-shot, an HTTP error raises with its status)."""
    with requests.get(url, stream=True, timeout=timeout, headers={"User-Agent": USER_AGENT}) as r:
        r.raise_for_status()

        def write(f):
            for chunk in r.iter_content(1 << 20):
                f.write(chunk)
        atomic_write(path, write)


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

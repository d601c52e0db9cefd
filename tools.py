"""
The agent's world: the teacher LLM client and the tools the agent acts with. No torch here.

    python tools.py build-corpus OUT.jsonl ../shared/data/hotpotqa/dev_distractor.jsonl   # HotpotQA context -> corpus
    python tools.py search OUT.jsonl "Scott Derrickson" "lookup[horror]"                  # try the offline tool

In code:
    teacher = Teacher("gpt-4", cache_dir=".cache/teacher", rpm=500)      # key from $OPENAI_API_KEY
    teacher.chat([{"role": "user", "content": "hi"}]); teacher.usage
    tool = LocalWiki("corpus.jsonl").fork()                               # one fork per episode
    tool.step("Action 1: Search[Paris]"); tool.step("lookup[Eiffel]"); tool.step("finish[France]")

One HTTP mechanism (`Client`: timeouts, retries with backoff + jitter, Retry-After, fail-fast 4xx, malformed-body
handling, secret redaction, an on-disk cache) serves the teacher, Wikipedia and the Google-snippet search.
One episode mechanism (`Tool`: search / lookup / finish with ReAct's semantics) serves every tool.
"""
import copy
import email.utils
import hashlib
import itertools
import json
import logging
import os
import random
import re
import sys
import threading
import time
import unicodedata
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import requests

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


def _server_message(resp):
    """The human part of an error body: OpenAI {'error': {'message'}}, MediaWiki {'error': {'info'}}, or text."""
    try:
        data = resp.json()
    except ValueError:
        return _one_line(resp.text or resp.reason or "")
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        err = err.get("message") or err.get("info") or err.get("detail") or err
    return _one_line(err if isinstance(err, str) else json.dumps(err))


def _retry_after(resp):
    """Retry-After in seconds (delta-seconds or an HTTP date), or None."""
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class Client:
    """requests.Session + timeouts + retries. Retries 429/5xx, timeouts, dropped connections and malformed bodies
    with exponential backoff and jitter (or the server's Retry-After); fails at once on any other 4xx.

    `check(data)` validates a decoded body and may raise KeyError/IndexError/TypeError/ValueError, which count as
    a malformed (transient) reply. `secrets` are scrubbed from every error message and from urllib3's logs."""

    def __init__(self, headers=None, timeout=30.0, max_retries=6, backoff=1.0, max_wait=120.0, rpm=None,
                 secrets=(), sleep=time.sleep, seed=None):
        self.session = requests.Session()
        self.session.headers.update(headers or {})
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=64)  # >= worker threads
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.timeout, self.max_retries, self.backoff, self.max_wait = timeout, max_retries, backoff, max_wait
        self.sleep, self.rng = sleep, random.Random(seed)
        self.limiter = RateLimiter(rpm, sleep) if rpm else None
        self.secrets = [s for s in secrets if s]
        for s in self.secrets:
            for name in ("urllib3.connectionpool", "urllib3", "requests"):
                logging.getLogger(name).addFilter(_Redact(s))
        self.stats, self.lock = Counter(), threading.Lock()

    def redact(self, text):
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    def _count(self, **kw):
        with self.lock:
            self.stats.update(kw)

    def request(self, method, url, *, params=None, json_body=None, check=None, cache=None):
        """-> (data, from_cache). The cache key is the whole request minus secret-valued params."""
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
        last, retry_after = "", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = retry_after if retry_after is not None else \
                    self.backoff * 2 ** (attempt - 1) * self.rng.uniform(0.5, 1.0)  # jitter de-synchronises threads
                delay = min(delay, self.max_wait)
                log.warning("retry %d/%d in %.2fs after: %s", attempt, self.max_retries, delay, last)
                self._count(retries=1)
                self.sleep(delay)
            if self.limiter:
                self.limiter.wait()
            retry_after = None
            try:
                r = self.session.request(method, url, params=params, json=json_body, timeout=self.timeout)
                if r.status_code in RETRY_STATUS:
                    raise _Transient(f"HTTP {r.status_code}: {_server_message(r)}", _retry_after(r))
                if r.status_code >= 400:
                    raise APIError(self.redact(f"{method} {url} -> HTTP {r.status_code}: {_server_message(r)}"))
                try:
                    data = r.json()
                    if check:
                        check(data)
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    raise _Transient(f"malformed response body ({type(e).__name__}: {_one_line(e, 80)}): "
                                     f"{_one_line(repr(r.text), 80)}") from None
                self._count(requests=1)
                if cache is not None:
                    cache.put(key, {"request": {"method": method, "url": url, "json": json_body}, "response": data})
                return data, False
            except _Transient as e:
                last, retry_after = self.redact(_one_line(e)), e.retry_after
            except requests.Timeout:
                last = f"timeout after {self.timeout}s"
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as e:  # refused, reset, or dropped mid-body
                last = self.redact(f"connection error: {type(e).__name__}: {_one_line(e, 160)}")
        self._count(failures=1)
        raise APIError(f"{method} {url}: gave up after {self.max_retries + 1} attempts; last error: {last}")


def run_concurrently(fn, items, workers=8, rpm=None, sleep=time.sleep):
    """Yields (item, fn(item) or the exception it raised) as calls complete. At most `workers` calls run at once
    and at most 2*workers are queued (items may be a long lazy iterator); `rpm` caps starts per minute."""
    limiter = RateLimiter(rpm, sleep) if rpm else None

    def call(item):
        if limiter:
            limiter.wait()
        return fn(item)

    items, pending = iter(items), {}
    ex = ThreadPoolExecutor(max_workers=workers)
    try:
        for item in itertools.islice(items, 2 * workers):
            pending[ex.submit(call, item)] = item
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                item = pending.pop(fut)
                exc = fut.exception()
                yield item, (exc if exc is not None else fut.result())
                for nxt in itertools.islice(items, 1):
                    pending[ex.submit(call, nxt)] = nxt
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


class Teacher:
    """Client for `{base_url}/chat/completions` and `{base_url}/completions`. The key comes from the environment
    variable `api_key_env` and lives only in the session's Authorization header: never logged, cached or written.
    With `cache_dir`, responses are cached by the whole request, so a rerun costs nothing (note: a cached sampled
    reply is returned again; vary the request, e.g. `seed=`, to get a fresh sample)."""

    def __init__(self, model, base_url=None, api_key_env="OPENAI_API_KEY", timeout=60, max_retries=6,
                 cache_dir=None, rpm=None, backoff=1.0, max_wait=120.0, sleep=time.sleep, seed=None):
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        if not key and "api.openai.com" in self.base_url:
            raise ValueError(f"Teacher: set the environment variable {api_key_env} (or pass base_url= for a local server)")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = Client(headers, timeout, max_retries, backoff, max_wait, rpm, [key], sleep, seed)
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
# Tools: one episode mechanism (ReAct's search / lookup / finish), several search backends


def _fold(text):
    """Lower case, diacritics stripped: 'Béyoncé' -> 'beyonce'."""
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
    `_search(query) -> (observation, sentences of the page found or None)`."""

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


def _not_found(query, similar):
    return f"Could not find [{query}]. Similar: {list(similar)}."


class Wikipedia(Tool):
    """Live Wikipedia through the MediaWiki Action API. One request per search fetches the page's plain text
    (following redirects), its disambiguation flag and the top-5 search hits (used as 'Similar' when there is no
    such page, or it is a disambiguation page). Responses are cached in memory (shared by forks) and, with
    `cache_dir`, on disk."""

    def __init__(self, endpoint=WIKI_API, user_agent=USER_AGENT, timeout=10.0, retries=3, cache_dir=None,
                 sleep=time.sleep):
        super().__init__()
        self.endpoint = endpoint
        self.client = Client({"User-Agent": user_agent}, timeout, retries, sleep=sleep)
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


class LocalWiki(Tool):
    """Offline Wikipedia over a JSONL corpus of {"title", "sentences"} (see build_corpus).

    search[x]: an exact title match wins, tried in order: case-folded title, then normalize_title(), then the
    normalised title without a '(...)' qualifier when that is unambiguous. Otherwise, with retrieve=True (the
    default, for agents that search with free text as FireAct's teacher did), BM25 over title + sentences picks the
    best page and the observation says so: 'No page titled [x]; best text match [Title]: ...'. With
    retrieve=False (pure ReAct): 'Could not find [x]. Similar: [...]' with BM25-ranked titles.
    `last_search` records how the last search was answered: 'title', 'bm25' or 'none'.

    Speed: an inverted index in CSR form whose postings already hold each (term, doc) BM25 weight (IDF and
    document-length norm folded in), so a query is a few numpy scatter-adds over its terms' postings."""

    def __init__(self, corpus_path, retrieve=True, k1=1.2, b=0.75):
        super().__init__()
        self.retrieve, self.last_search = retrieve, None
        self.titles, self.pages = [], []
        with open(corpus_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    title, sents = rec["title"], rec["sentences"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{corpus_path}:{lineno}: bad corpus line ({e}); "
                                     'expected {"title": str, "sentences": [str]}') from None
                self.titles.append(title)
                self.pages.append([s.strip() for s in sents if s.strip()])
        if not self.titles:
            raise ValueError(f"{corpus_path}: empty corpus")
        self._build_title_index()
        self._build_bm25(k1, b)

    def _build_title_index(self):
        self.by_title = [{}, {}, {}]  # tried in order; the first page with a key keeps it
        base_count = Counter()
        for i, t in enumerate(self.titles):
            self.by_title[0].setdefault(" ".join(_fold(t).split()), i)
            self.by_title[1].setdefault(normalize_title(t), i)
            base_count[normalize_title(re.sub(r"\s*\([^)]*\)\s*$", "", t))] += 1
        for i, t in enumerate(self.titles):  # 'Ed Wood (film)' answers 'Ed Wood' only if no other 'Ed Wood (...)'
            base = normalize_title(re.sub(r"\s*\([^)]*\)\s*$", "", t))
            if base_count[base] == 1 and base not in self.by_title[1]:
                self.by_title[2][base] = i

    def _build_bm25(self, k1, b):
        vocab, term, doc, tf, lengths = {}, [], [], [], []
        for i, (title, sents) in enumerate(zip(self.titles, self.pages)):
            toks = _tokens(title) * 2 + _tokens(" ".join(sents))  # title words count twice
            lengths.append(len(toks))
            for t, c in Counter(toks).items():
                term.append(vocab.setdefault(t, len(vocab)))
                doc.append(i)
                tf.append(c)
        term, doc, tf = np.array(term), np.array(doc, np.int32), np.array(tf, np.float32)
        order = np.argsort(term, kind="stable")  # CSR: postings of term j are [offsets[j], offsets[j+1])
        term, self.post_doc, tf = term[order], doc[order], tf[order]
        n, df = len(self.titles), np.bincount(term, minlength=len(vocab))
        self.offsets = np.concatenate([[0], np.cumsum(df)])
        idf = np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)  # [V]
        lengths = np.array(lengths, np.float32)  # [N]
        norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1.0))  # [N] precomputed length norms
        self.post_w = idf[term] * tf * (k1 + 1) / (tf + norm[self.post_doc])  # [nnz] per-posting BM25 weight
        self.vocab = vocab

    def rank(self, query, k=5):
        """Top-k (doc index, BM25 score) for free text, best first; only docs sharing a term with the query."""
        scores = np.zeros(len(self.titles), np.float32)  # [N]
        for t in set(_tokens(query)):
            j = self.vocab.get(t)
            if j is not None:
                s, e = self.offsets[j], self.offsets[j + 1]
                scores[self.post_doc[s:e]] += self.post_w[s:e]  # doc ids are unique within a term's postings
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(i), float(scores[i])) for i in top if scores[i] > 0]

    def find_title(self, query):
        keys = (" ".join(_fold(query).split()), normalize_title(query), normalize_title(query))
        for index, key in zip(self.by_title, keys):
            if key in index:
                return index[key]
        return None

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


class GoogleSearch(Tool):
    """FireAct's own tool: a SerpAPI-style Google search returning one snippet (the answer box's answer, else its
    snippet, else its highlighted words, else the first organic result's snippet, else 'None', as FireAct did).
    No pages, so lookup finds nothing. The key (from `api_key_env`) travels as a query parameter, so it is scrubbed
    from errors and urllib3's logs and left out of cache keys."""

    def __init__(self, api_key_env="SERPAPI_API_KEY", endpoint="https://serpapi.com/search", timeout=20.0,
                 retries=3, cache_dir=None, sleep=time.sleep):
        super().__init__()
        key = os.environ.get(api_key_env, "")
        if not key:
            raise ValueError(f"GoogleSearch: set the environment variable {api_key_env}")
        self.endpoint, self._params = endpoint, {"engine": "google", "hl": "en", "gl": "us", "api_key": key}
        self.client = Client({"User-Agent": USER_AGENT}, timeout, retries, secrets=[key], sleep=sleep)
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

    def fork(self):
        return NoisyTool(self.tool.fork(), self.p, self.mode, self.seed, self._shared)

    def step(self, action):
        obs = self.tool.step(action)
        parsed = parse_action(action)
        if parsed is None or parsed[0] == "finish" or obs.startswith("Invalid action"):
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
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
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
            for title, sents in rec["context"]:
                pages.setdefault(title, [s.strip() for s in sents if s.strip()])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + f".{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for title, sents in pages.items():
            f.write(json.dumps({"title": title, "sentences": sents}, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    return len(pages)


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
    s.add_argument("--no-retrieve", action="store_true", help="pure ReAct: no BM25 fallback page")
    args = ap.parse_args(argv)
    if args.cmd == "build-corpus":
        for f in args.files:
            if not Path(f).exists():
                raise SystemExit(f"build-corpus: no such file: {f}")
        print(f"wrote {build_corpus(args.files, args.out)} pages to {args.out}")
        return
    if not Path(args.corpus).exists():
        raise SystemExit(f"search: no such corpus: {args.corpus}")
    tool = LocalWiki(args.corpus, retrieve=not args.no_retrieve).fork()
    for action in [f"search[{args.query}]"] + args.actions:
        print(f"Action: {action}\nObservation: {tool.step(action)}")


if __name__ == "__main__":
    main(sys.argv[1:])

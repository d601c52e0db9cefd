"""
The agent's world: action parsing, the teacher (any OpenAI-compatible LLM endpoint) and the tools the agent acts
with: live Wikipedia, an offline corpus (title index + BM25), a Google-like snippet search, Google itself, and the
noisy wrapper of FireAct's robustness study. No torch here.

    python tools.py build-corpus OUT.jsonl ../shared/data/hotpotqa/dev_distractor.jsonl   # HotpotQA context -> corpus
    python tools.py search OUT.jsonl "Scott Derrickson" "lookup[horror]"                  # try the offline tool
    python tools.py search OUT.jsonl "who directed Sinister?" --tool snippet             # one Google-like snippet

In code:
    teacher = Teacher("gpt-4", cache_dir=".cache/teacher", rpm=500)      # key from $OPENAI_API_KEY
    teacher.chat([{"role": "user", "content": "hi"}]); teacher.usage
    tool = LocalWiki("corpus.jsonl").fork()                               # one fork per episode
    tool.step("Action 1: Search[Paris]"); tool.step("lookup[Eiffel]"); tool.step("finish[France]")
    SnippetSearch("corpus.jsonl").fork().step("search[what river flows through Paris?]")   # FireAct-style

One episode mechanism (`Tool`: search / lookup / finish with ReAct's semantics) serves every tool; `tool.name` says
which. One ranking mechanism (`BM25`, deterministic ties) serves both offline tools. The HTTP underneath (deadlines,
retries, redaction, the response cache) is common/net.py; fine-tuning through OpenAI's API is extras/finetune_api.py.
"""
import copy
import itertools
import json
import os
import random
import re
import sys
import threading
import time
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np

from common import cli, files
from common.net import USER_AGENT, APIError, Cache, Client, openai_client, shorten  # APIError: tools.APIError too


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
# Tools: one episode mechanism (ReAct's search / lookup / finish), several search backends


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
            return f"Invalid action: {shorten(action, 200)}"
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


WIKI_API = "https://en.wikipedia.org/w/api.php"


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
        raise APIError(f"MediaWiki error {err.get('code')}: {shorten(err.get('info', ''))}")


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
                    raise ValueError(f"{path}:{lineno}: bad corpus line ({shorten(e, 120)}); "
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

    window_chars=250 keeps the median snippet near Google's 155 characters; no 'Title: ' prefix, as FireAct's
    snippets had none (docs: the measurements behind both choices)."""

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
    with open(path, "rb") as f:
        is_array = f.read(4096).lstrip().startswith(b"[")
    if is_array:
        return files.read_json(path, want=list, hint="expected a HotpotQA JSON/JSONL file")
    return files.read_jsonl(path)


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
    files.write_jsonl(out_path, ({"title": t, "sentences": sents} for t, sents in pages.items()))
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

"""Tests for tools.py against real HTTP servers on 127.0.0.1 (an OpenAI-style API and a MediaWiki API) with
injected faults. Run: python -m pytest -q tests/test_tools.py

The servers (`serve`, `openai_app`, `mediawiki_app`) are reused by bench/tools.py."""
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tools  # noqa: E402
from tools import APIError, Cache, LocalWiki, NoisyTool, Teacher, Wikipedia, parse_action  # noqa: E402

HOTPOT = ROOT.parent / "shared" / "data" / "hotpotqa" / "dev_distractor.jsonl"
KEY = "sk-test-DO-NOT-LEAK-93f1c2"

# ---------------------------------------------------------------------------------------------------------------
# A loopback HTTP server whose replies can be faulted, one scripted fault per request (or a random failure rate).


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status, obj, headers=None, raw=None):
        body = raw if raw is not None else json.dumps(obj).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self):
        srv = self.server
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with srv.lock:
            srv.log.append({"method": self.command, "path": self.path, "headers": dict(self.headers), "body": raw})
            fault = srv.faults.pop(0) if srv.faults else None
            if fault is None and srv.fail_rate and srv.rng.random() < srv.fail_rate:
                fault = srv.rng.choice([("status", 500), ("status", 503), ("status", 429, {"Retry-After": "0"}),
                                        ("drop",), ("malformed",)])
        kind = fault[0] if fault else None
        if kind == "status":
            code, headers = fault[1], (fault[2] if len(fault) > 2 else {})
            body = fault[3] if len(fault) > 3 else {"error": {"message": f"injected {code}"}}
            return self._reply(code, body, headers)
        if kind == "drop":  # promise 500 bytes, send 20, hang up
            self.send_response(200)
            self.send_header("Content-Length", "500")
            self.end_headers()
            self.wfile.write(b'{"choices": [{"mess')
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        if kind == "malformed":
            return self._reply(200, None, raw=b'{"choices": [ this is not json')
        if kind == "slow":
            time.sleep(fault[1])
        status, obj = srv.app(self.command, self.path, raw)
        try:
            self._reply(status, obj)
        except OSError:
            pass  # the client gave up (timeout)

    do_GET = do_POST = _handle


@contextmanager
def serve(app, faults=(), fail_rate=0.0, seed=0):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.handle_error = lambda *a: None
    srv.app, srv.faults, srv.fail_rate, srv.rng = app, list(faults), fail_rate, random.Random(seed)
    srv.lock, srv.log = threading.Lock(), []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def openai_app(method, path, raw):
    """Chat: 'echo: <last message>'; completions: 'done: <prompt>'. n choices, usage = word counts."""
    body = json.loads(raw)
    if path.endswith("/chat/completions"):
        text = "echo: " + body["messages"][-1]["content"]
        choice = lambda i: {"index": i, "message": {"role": "assistant", "content": text + f" #{i}" * (i > 0)}}
    elif path.endswith("/completions"):
        text = "done: " + body["prompt"]
        choice = lambda i: {"index": i, "text": text + f" #{i}" * (i > 0)}
    else:
        return 404, {"error": {"message": f"no route {path}"}}
    n = body.get("n", 1)
    return 200, {"choices": [choice(i) for i in reversed(range(n))],  # out of order on purpose
                 "usage": {"prompt_tokens": len(raw.split()), "completion_tokens": 3 * n}}


WIKI = {
    "Paris": "Paris is the capital of France. It has about two million residents. It lies on the Seine. "
             "The Louvre is in Paris. Paris hosted the Olympics. The Eiffel Tower opened in 1889.\n\n"
             "== History ==\nThe Eiffel Tower was built for a world's fair. Paris was founded by the Parisii.",
    "Mercury": "Mercury may refer to:\nMercury (planet)\nMercury (element)",
    "Mercury (planet)": "Mercury is the smallest planet. It is closest to the Sun.",
    "Mercury (element)": "Mercury is a chemical element. Its symbol is Hg.",
    "Seine": "The Seine is a river in France. It flows through Paris.",
}
REDIRECTS = {"Paris, France": "Paris"}


def mediawiki_app(method, path, raw):
    q = {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(path).query).items()}
    if q.get("titles") == "ERR":
        return 200, {"error": {"code": "badvalue", "info": "Unrecognized value for parameter"}}
    title = q["titles"][:1].upper() + q["titles"][1:]  # MediaWiki capitalises the first letter
    title = REDIRECTS.get(title, title)
    if title in WIKI:
        page = {"pageid": 1, "title": title, "extract": WIKI[title]}
        if title == "Mercury":
            page["pageprops"] = {"disambiguation": ""}
    else:
        page = {"title": title, "missing": True}
    words = set(q["srsearch"].lower().split())
    hits = sorted(WIKI, key=lambda t: -len(words & set((t + " " + WIKI[t]).lower().replace(".", "").split()))
                  - 10 * len(words & set(t.lower().split())))  # title words count most, as in CirrusSearch
    hits = [t for t in hits if words & set((t + " " + WIKI[t]).lower().replace(".", "").split())]
    return 200, {"batchcomplete": True, "query": {"pages": [page], "search": [{"title": t} for t in hits[:5]]}}


def make_teacher(srv, **kw):
    kw = {"timeout": 2.0, "max_retries": 3, "backoff": 1.0, "seed": 0, **kw}
    return Teacher("test-model", base_url=srv.url + "/v1", **kw)


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("SERPAPI_API_KEY", KEY)


# ---------------------------------------------------------------------------------------------------------------
# Action parsing


@pytest.mark.parametrize("text,want", [
    ("Action: search[Paris]", ("search", "Paris")),
    ("Action 2: Search[Paris, France]", ("search", "Paris, France")),
    ("  action  12 :  LOOKUP [ Eiffel Tower ]  ", ("lookup", "Eiffel Tower")),
    ("search[x] and then more text]", ("search", "x")),
    ("finish[]", ("finish", "")),
    ("Finish[Foo [band]] trailing", ("finish", "Foo [band]")),
    ("Thought: I should look.\nAction 3: search[Seine]\nObservation: fake", ("search", "Seine")),
    ("Action: search[unclosed", None),
    ("Action: fly[Paris]", None),
    ("Action: search Paris", None),
    ("", None),
    (None, None),
])
def test_parse_action(text, want):
    assert parse_action(text) == want


# ---------------------------------------------------------------------------------------------------------------
# LocalWiki + build_corpus

PAGES = [
    ("The Beatles", ["The Beatles were an English rock band formed in Liverpool in 1960.",
                     "The band members were Lennon, McCartney, Harrison and Starr.", "Lennon wrote songs.",
                     "Lennon was shot in 1980.", "The band split in 1970.", "Sixth sentence is hidden."]),
    ("Beyoncé", ["Beyoncé Giselle Knowles-Carter is an American singer.", "She was born in Houston."]),
    ("Ed Wood (film)", ["Ed Wood is a 1994 American film directed by Tim Burton."]),
    ("Mercury (planet)", ["Mercury is the smallest planet."]),
    ("Mercury (element)", ["Mercury is a chemical element with symbol Hg."]),
    ("Houston", ["Houston is the most populous city in Texas.", "It is home to NASA's space center."]),
]


@pytest.fixture
def corpus(tmp_path):
    hotpot = tmp_path / "hotpot.json"  # HotpotQA's original format: a JSON array; the duplicate title is dropped
    recs = [{"context": [[t, [(" " if i else "") + s for i, s in enumerate(sents)]] for t, sents in PAGES[:4]]},
            {"context": [[t, s] for t, s in PAGES[3:]] + [["Houston", ["A different duplicate."]]]}]
    hotpot.write_text(json.dumps(recs))
    out = tmp_path / "corpus.jsonl"
    assert tools.build_corpus([hotpot], out) == len(PAGES)
    return out


def test_build_corpus_jsonl_and_errors(tmp_path, corpus):
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert [r["title"] for r in rows] == [t for t, _ in PAGES]
    assert rows[0]["sentences"][1] == PAGES[0][1][1]  # HotpotQA's leading spaces are stripped
    jsonl = tmp_path / "h.jsonl"
    jsonl.write_text(json.dumps({"context": [["A", ["a."]]]}) + "\n\n" + json.dumps({"context": [["B", ["b."]]]}))
    assert tools.build_corpus(jsonl, tmp_path / "c2.jsonl") == 2
    jsonl.write_text('{"context": []}\n{oops\n')
    with pytest.raises(ValueError, match=r"h.jsonl:2: bad JSON"):
        tools.build_corpus(jsonl, tmp_path / "c3.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "A", "sentences": ["a"]}\n{"title": "B"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: bad corpus line"):
        LocalWiki(bad)


def test_localwiki_title_matching_and_react_semantics(corpus):
    base = LocalWiki(corpus)
    tool = base.fork()
    obs = tool.step("Action 1: Search[the  BEATLES!]")  # case, punctuation, leading 'The'
    assert obs == " ".join(PAGES[0][1][:5]) and tool.last_search["how"] == "title"
    assert tool.step("lookup[lennon]") == "(Result 1 / 3) The band members were Lennon, McCartney, Harrison and Starr."
    assert tool.step("lookup[lennon]") == "(Result 2 / 3) Lennon wrote songs."
    assert tool.step("lookup[1970]") == "(Result 1 / 1) The band split in 1970."  # a new keyword restarts
    assert tool.step("lookup[1970]") == "No more results."
    assert tool.step("search[Beyonce]").startswith("Beyoncé Giselle")  # diacritics
    assert tool.step("search[beatles]").startswith("The Beatles were")  # the leading 'The' is optional ...
    assert tool.step("search[The Houston]").startswith("Houston is")  # ... on either side
    assert tool.step("search[ed wood]").startswith("Ed Wood is a 1994")  # unambiguous '(film)' qualifier
    assert tool.step("search[Mercury]").startswith("No page titled [Mercury]; best text match [Mercury (")
    assert tool.last_search["how"] == "bm25"
    obs = tool.step("search[which city hosts NASA space center]")
    assert obs.startswith("No page titled [which city hosts NASA space center]; best text match [Houston]: Houston is")
    assert tool.step("lookup[NASA]") == "(Result 1 / 1) It is home to NASA's space center."  # retrieved page is current
    assert tool.step("search[zzzz qqqq]") == "Could not find [zzzz qqqq]. Similar: []."
    assert tool.step("fly[x]") == "Invalid action: fly[x]" and tool.step("search[ ]").startswith("Invalid action:")
    assert not tool.done
    assert tool.step("Action 9: finish[ Liverpool ]") == "Episode finished." and tool.done and tool.answer == "Liverpool"
    fresh = base.fork()  # fresh episode state, shared index
    assert not fresh.done and fresh.page is None and fresh.step("lookup[Lennon]") == "No more results."
    assert fresh.post_w is base.post_w and fresh.titles is base.titles


def test_localwiki_similar_is_ranked_without_retrieval(corpus):
    tool = LocalWiki(corpus, retrieve=False).fork()
    obs = tool.step("search[Mercury element Hg]")
    assert obs == "Could not find [Mercury element Hg]. Similar: ['Mercury (element)', 'Mercury (planet)']."
    assert tool.last_search["how"] == "none" and tool.page is None


def test_localwiki_real_corpus(tmp_path):
    if not HOTPOT.exists():
        pytest.skip(f"{HOTPOT} absent")
    out = tmp_path / "dev.jsonl"
    assert tools.build_corpus([HOTPOT], out) == 9366
    wiki = LocalWiki(out)
    recs = [json.loads(line) for line in HOTPOT.open()][:50]
    for r in recs:  # every context page is reachable by its title (a few supporting facts name absent pages)
        for title, _ in r["context"]:
            tool = wiki.fork()
            tool.step(f"search[{title}]")
            assert tool.last_search == {"query": title, "how": "title", "title": title}
    hits = sum(wiki.titles[wiki.rank(r["question"], 1)[0][0]] in {t for t, _ in r["supporting_facts"]} for r in recs)
    assert hits >= 25, hits  # BM25 over questions finds a supporting page for most of them
    t0 = time.perf_counter()
    for r in recs:
        wiki.fork().step(f"search[{r['question']}]")
    assert (time.perf_counter() - t0) / len(recs) < 0.05  # generous here; bench/tools.py measures properly


def test_cli(tmp_path, corpus):
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "tools.py"), *a], capture_output=True, text=True)
    hotpot = tmp_path / "h.jsonl"
    hotpot.write_text(json.dumps({"context": [[t, s] for t, s in PAGES]}) + "\n")
    r = run("build-corpus", str(tmp_path / "cli.jsonl"), str(hotpot))
    assert r.returncode == 0 and f"wrote {len(PAGES)} pages" in r.stdout
    r = run("search", str(tmp_path / "cli.jsonl"), "Houston", "lookup[NASA]")
    assert r.returncode == 0 and "Observation: Houston is the most" in r.stdout and "(Result 1 / 1)" in r.stdout
    r = run("search", str(tmp_path / "missing.jsonl"), "x")
    assert r.returncode != 0 and "no such corpus" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import tools, sys; assert 'torch' not in sys.modules"], cwd=ROOT)
    assert r.returncode == 0


# ---------------------------------------------------------------------------------------------------------------
# Teacher: happy path, usage, cache


def test_teacher_chat_complete_usage_and_cache(tmp_path):
    with serve(openai_app) as srv:
        t = make_teacher(srv, cache_dir=tmp_path / "cache")
        msgs = [{"role": "user", "content": "hi there"}]
        assert t.chat(msgs, stop=["\nObservation:"]) == "echo: hi there"
        assert t.chat(msgs, n=3, temperature=0.7) == ["echo: hi there", "echo: hi there #1", "echo: hi there #2"]
        assert t.complete("Question: x", max_tokens=5) == "done: Question: x"
        assert len(srv.log) == 3
        sent = json.loads(srv.log[0]["body"])
        assert sent == {"model": "test-model", "messages": msgs, "temperature": 0.0, "max_tokens": 256,
                        "stop": ["\nObservation:"]}
        assert srv.log[0]["headers"]["Authorization"] == f"Bearer {KEY}" and srv.log[2]["path"] == "/v1/completions"
        u = t.usage
        assert u["requests"] == 3 and u["cached"] == 0 and u["completion_tokens"] == 3 + 9 + 3 and u["prompt_tokens"] > 0
        # a rerun (a new Teacher on the same cache) costs no request; a different request is a miss
        t2 = make_teacher(srv, cache_dir=tmp_path / "cache")
        assert t2.chat(msgs, stop=["\nObservation:"]) == "echo: hi there"
        assert t2.complete("Question: x", max_tokens=5) == "done: Question: x"
        assert len(srv.log) == 3 and t2.usage["cached"] == 2 and t2.usage["prompt_tokens"] == 0
        t2.chat(msgs, temperature=0.5)
        assert len(srv.log) == 4
    assert len(Cache(tmp_path / "cache")) == 4
    for f in (tmp_path / "cache").rglob("*"):  # the key is in no file
        assert f.is_dir() or KEY not in f.read_text()


def test_teacher_without_key_or_base_url(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        Teacher("gpt-4")
    with serve(openai_app) as srv:  # a local server needs no key: no Authorization header at all
        assert make_teacher(srv).chat([{"role": "user", "content": "a"}]) == "echo: a"
        assert "Authorization" not in srv.log[0]["headers"]


# ---------------------------------------------------------------------------------------------------------------
# Teacher: injected faults, retries, waits, error texts


def test_retry_after_is_honoured():
    waits = []
    with serve(openai_app, faults=[("status", 429, {"Retry-After": "2"}),
                                   ("status", 429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})]) as srv:
        t = make_teacher(srv, sleep=waits.append)
        assert t.chat([{"role": "user", "content": "x"}]) == "echo: x"
    assert waits == [2.0, 0.0] and len(srv.log) == 3 and t.usage["retries"] == 2  # a past date means now


def test_backoff_with_jitter_on_5xx_then_give_up():
    waits = []
    faults = [("status", 500), ("status", 503), ("status", 502), ("status", 504)]
    with serve(openai_app, faults=faults) as srv:
        t = make_teacher(srv, sleep=waits.append, backoff=0.5, max_retries=3)
        with pytest.raises(APIError) as e:
            t.chat([{"role": "user", "content": "x"}])
    assert len(srv.log) == 4 and len(waits) == 3
    for i, w in enumerate(waits):  # exponential, jittered in [0.5, 1] x base
        assert 0.5 * 0.5 * 2 ** i <= w <= 0.5 * 2 ** i
    assert any(w < 0.5 * 2 ** i for i, w in enumerate(waits))  # jittered, not the bare exponential
    msg = str(e.value)
    assert msg == f"POST {srv.url}/v1/chat/completions: gave up after 4 attempts; last error: HTTP 504: injected 504"
    assert t.usage["failures"] == 1 and t.usage["requests"] == 0


def test_max_wait_caps_backoff_and_retry_after():
    waits = []
    with serve(openai_app, faults=[("status", 503, {"Retry-After": "3600"}), ("status", 500)]) as srv:
        t = make_teacher(srv, sleep=waits.append, backoff=100.0, max_wait=7.0)
        t.chat([{"role": "user", "content": "x"}])
    assert waits == [7.0, 7.0]


def test_timeout_drop_and_malformed_are_transient():
    waits = []
    faults = [("slow", 1.0), ("drop",), ("malformed",), ("status", 200, {}, {"choices": []}),
              ("status", 200, {}, {"no_choices": 1})]
    with serve(openai_app, faults=faults) as srv:
        t = make_teacher(srv, timeout=0.25, max_retries=5, sleep=waits.append)
        assert t.chat([{"role": "user", "content": "ok"}]) == "echo: ok"
    assert len(srv.log) == 6 and len(waits) == 5 and t.usage["retries"] == 5


@pytest.mark.parametrize("fault,expect", [
    (("slow", 1.0), "last error: timeout after 0.25s"),
    (("drop",), "last error: connection error: ChunkedEncodingError"),
    (("malformed",), "last error: malformed response body (JSONDecodeError: Expecting value: line 1 column 15"),
    (("status", 200, {}, {"choices": [{"text_missing": 1}]}), "last error: malformed response body (KeyError: 'text'"),
])
def test_persistent_faults_are_reported_clearly(fault, expect):
    with serve(openai_app, faults=[fault] * 3) as srv:
        t = make_teacher(srv, timeout=0.25, max_retries=2, sleep=lambda s: None)
        with pytest.raises(APIError, match="gave up after 3 attempts") as e:
            t.chat([{"role": "user", "content": "x"}])
    assert expect in str(e.value) and "\n" not in str(e.value) and len(srv.log) == 3


@pytest.mark.parametrize("code", [400, 401, 403, 404, 422])
def test_client_errors_fail_fast_with_server_message(code):
    waits = []
    body = {"error": {"message": f"Incorrect API key provided: {KEY}. You can find your key at ..."}}
    with serve(openai_app, faults=[("status", code, {}, body)]) as srv:
        t = make_teacher(srv, sleep=waits.append)
        with pytest.raises(APIError) as e:
            t.chat([{"role": "user", "content": "x"}])
    assert str(e.value) == (f"POST {srv.url}/v1/chat/completions -> HTTP {code}: "
                            "Incorrect API key provided: ***. You can find your key at ...")
    assert waits == [] and len(srv.log) == 1
    assert e.value.__cause__ is None and e.value.__context__ is None or KEY not in repr(e.value.__context__)


def test_key_in_no_log_line_and_no_file(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # urllib3 logs every request line at DEBUG
    faults = [("status", 429, {"Retry-After": "0"}), ("drop",), None, ("status", 401, {}, {"error": {"message": KEY}})]
    with serve(openai_app, faults=faults) as srv:
        t = make_teacher(srv, cache_dir=tmp_path / "c", sleep=lambda s: None)
        t.chat([{"role": "user", "content": "a"}])
        with pytest.raises(APIError) as e:
            t.chat([{"role": "user", "content": "b"}])
        assert KEY not in str(e.value)
    with serve(lambda m, p, r: (200, {"organic_results": [{"snippet": "s"}]}), faults=[("status", 500)]) as srv:
        g = tools.GoogleSearch(endpoint=srv.url + "/search", cache_dir=tmp_path / "g", sleep=lambda s: None)
        assert g.step("search[q]") == "s"
        assert f"api_key={KEY}" in srv.log[0]["path"]  # it really was sent in the URL ...
    with serve(lambda m, p, r: (500, {}), faults=[]) as srv:
        g = tools.GoogleSearch(endpoint=srv.url + "/search", retries=1, sleep=lambda s: None)
        with pytest.raises(APIError) as e:
            g.step("search[q]")
        assert KEY not in str(e.value)
    lines = [r.getMessage() for r in caplog.records]
    assert any("api_key=***" in ln for ln in lines) and any("retry 1/3" in ln for ln in lines)  # ... and redacted
    assert not [ln for ln in lines if KEY in ln]
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert len(files) == 2 and not [f for f in files if KEY in f.read_text()]  # one teacher + one search entry


# ---------------------------------------------------------------------------------------------------------------
# Cache integrity: concurrent writers (threads, processes) and crashes

WRITER = """
import sys, tools
cache, wid = tools.Cache(sys.argv[1]), int(sys.argv[2])
for i in range(60):
    k = (i * 7 + wid) % 30  # writers overlap on the same keys; a key's value depends only on the key
    cache.put(tools.cache_key({"k": k}), {"k": k, "pad": str(k) * 20000})
    got = cache.get(tools.cache_key({"k": (k + 1) % 30}))
    assert got is None or got == {"k": (k + 1) % 30, "pad": str((k + 1) % 30) * 20000}, "torn read"
"""


def _check_cache(root, keys):
    cache = Cache(root)
    entries = list(Path(root).rglob("*.json"))
    assert len(entries) == len(set(e.name for e in entries)) == len(cache)  # one file per key: no duplicates
    for e in entries:
        json.loads(e.read_text())  # no torn entry
    return {k: cache.get(tools.cache_key({"k": k})) for k in keys}


def test_cache_concurrent_threads(tmp_path):
    cache = Cache(tmp_path / "c")
    errors = []

    def work(wid):
        for i in range(40):
            k = (i + wid) % 10
            cache.put(tools.cache_key({"k": k}), {"k": k, "pad": "x" * 50000})
            got = cache.get(tools.cache_key({"k": (k + 3) % 10}))
            if got is not None and got["k"] != (k + 3) % 10 or got is not None and len(got["pad"]) != 50000:
                errors.append(got)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    got = _check_cache(tmp_path / "c", range(10))
    assert all(got[k]["k"] == k for k in range(10))
    assert not list((tmp_path / "c").rglob("*.tmp"))


def test_cache_concurrent_processes_and_sigkill(tmp_path):
    root = tmp_path / "c"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(w)], cwd=ROOT) for w in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    got = _check_cache(root, range(30))
    assert all(got[k] == {"k": k, "pad": str(k) * 20000} for k in range(30))
    # kill -9 writers mid-stream, repeatedly: whatever is there is whole, and a later writer can proceed
    root2 = tmp_path / "c2"
    for delay in (0.3, 0.45, 0.6):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(root2), "1"], cwd=ROOT)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        _check_cache(root2, range(30))
    assert subprocess.run([sys.executable, "-c", WRITER, str(root2), "2"], cwd=ROOT).returncode == 0
    assert len(Cache(root2)) == 30


def test_cache_crash_between_write_and_rename(tmp_path):
    crash = ("import os, sys, tools\nos.replace = lambda a, b: os._exit(9)\n"
             "tools.Cache(sys.argv[1]).put(tools.cache_key({'k': 1}), {'k': 1})")
    assert subprocess.run([sys.executable, "-c", crash, str(tmp_path)], cwd=ROOT).returncode == 9
    assert len(list(tmp_path.rglob("*.tmp"))) == 1  # the crash left a temp file ...
    cache = Cache(tmp_path)
    assert len(cache) == 0 and cache.get(tools.cache_key({"k": 1})) is None  # ... which is never read
    cache.put(tools.cache_key({"k": 1}), {"k": 1})
    assert cache.get(tools.cache_key({"k": 1})) == {"k": 1}
    for tmp in tmp_path.rglob("*.tmp"):  # stale temp files are swept by the next Cache()
        os.utime(tmp, (time.time() - 7200,) * 2)
    Cache(tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))
    (next(tmp_path.rglob("*.json"))).write_text('{"request": 1, "respo')  # a foreign torn file is a miss
    assert cache.get(tools.cache_key({"k": 1})) is None


# ---------------------------------------------------------------------------------------------------------------
# Concurrency: run_concurrently, the rpm limiter, and a flaky server under load


def test_run_concurrently_bounds_and_errors():
    live, peak, lock = [0], [0], threading.Lock()

    def fn(x):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.01)
        with lock:
            live[0] -= 1
        if x % 7 == 0:
            raise ValueError(f"bad {x}")
        return x * x

    out = dict(tools.run_concurrently(fn, iter(range(50)), workers=4))
    assert sorted(out) == list(range(50)) and peak[0] <= 4
    assert all(isinstance(out[x], ValueError) if x % 7 == 0 else out[x] == x * x for x in out)
    gen = tools.run_concurrently(fn, range(10 ** 9), workers=2)  # lazy: an endless input is fine
    assert len([next(gen) for _ in range(5)]) == 5
    gen.close()


def test_rate_limiter_spacing():
    now, sleeps = [100.0], []
    clock = lambda: now[0]

    def sleep(s):
        sleeps.append(s)
        now[0] += s

    lim = tools.RateLimiter(120, sleep=sleep, clock=clock)  # one start per 0.5 s
    for _ in range(4):
        lim.wait()
    assert sleeps == [0.5, 0.5, 0.5]
    now[0] += 10  # idle time is not banked into a burst beyond the next slot
    lim.wait()
    assert sleeps == [0.5, 0.5, 0.5]
    t0 = time.monotonic()
    list(tools.run_concurrently(lambda x: x, range(4), workers=4, rpm=1200))  # real clock: 3 gaps of 50 ms
    assert time.monotonic() - t0 >= 0.14


def test_flaky_server_under_load(tmp_path):
    """100 requests (10 duplicated), 30% of attempts fail transiently: all answered, one cache entry each."""
    prompts = [f"q{i}" for i in range(90)] + [f"q{i}" for i in range(10)]
    with serve(openai_app, fail_rate=0.3, seed=1) as srv:
        t = make_teacher(srv, cache_dir=tmp_path / "c", max_retries=10, backoff=0.01)
        ask = lambda p: t.chat([{"role": "user", "content": p}])
        out = list(tools.run_concurrently(ask, prompts, workers=8))
        assert len(out) == 100 and all(r == f"echo: {p}" for p, r in out)
        assert t.usage["retries"] > 10 and t.usage["failures"] == 0
        _check_cache(tmp_path / "c", [])
        assert len(Cache(tmp_path / "c")) == 90
        n = len(srv.log)
        t2 = make_teacher(srv, cache_dir=tmp_path / "c")  # a rerun: everything from the cache, nothing sent
        ask2 = lambda p: t2.chat([{"role": "user", "content": p}])
        assert all(r == f"echo: {p}" for p, r in tools.run_concurrently(ask2, prompts, workers=8))
        assert len(srv.log) == n
        assert t2.usage["cached"] == 100 and t2.usage["requests"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Wikipedia over a MediaWiki API server


def test_wikipedia_react_semantics(tmp_path):
    with serve(mediawiki_app, faults=[("status", 503, {"Retry-After": "0"})]) as srv:
        wiki = Wikipedia(endpoint=srv.url + "/w/api.php", user_agent="test-agent/1.0 (me@example.org)",
                         cache_dir=tmp_path / "wc", sleep=lambda s: None)
        tool = wiki.fork()
        obs = tool.step("Action 1: Search[paris]")
        assert obs == ("Paris is the capital of France. It has about two million residents. It lies on the Seine. "
                       "The Louvre is in Paris. Paris hosted the Olympics.")
        assert len(srv.log) == 2 and srv.log[1]["headers"]["User-Agent"] == "test-agent/1.0 (me@example.org)"
        assert tool.step("lookup[eiffel]") == "(Result 1 / 2) The Eiffel Tower opened in 1889."
        assert tool.step("lookup[eiffel]") == "(Result 2 / 2) The Eiffel Tower was built for a world's fair."
        assert tool.step("lookup[eiffel]") == "No more results."
        assert tool.step("search[Paris, France]").startswith("Paris is the capital")  # redirect
        assert tool.step("search[Mercury]") == \
            "Could not find [Mercury]. Similar: ['Mercury (planet)', 'Mercury (element)']."  # disambiguation
        assert tool.page is None and tool.step("lookup[planet]") == "No more results."
        assert tool.step("search[the SEINE]").startswith("The Seine is a river")  # top hit, same normalised title
        assert tool.step("search[Atlantis river]") == "Could not find [Atlantis river]. Similar: ['Seine']."
        n = len(srv.log)
        other = wiki.fork()  # forks share the page cache: no new request
        assert other.step("search[paris]").startswith("Paris is") and len(srv.log) == n
        with pytest.raises(APIError, match="MediaWiki error badvalue: Unrecognized value"):
            other.step("search[ERR]")
        assert other.step("finish[Paris]") == "Episode finished." and other.done and not tool.done
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(srv.log[1]["path"]).query)
    assert q["action"] == ["query"] and q["format"] == ["json"] and q["titles"] == ["paris"]


def test_wikipedia_disk_cache_and_maxlag(tmp_path):
    lag = ("status", 200, {"Retry-After": "1"}, {"error": {"code": "maxlag", "info": "Waiting for a replica"}})
    waits = []
    with serve(mediawiki_app, faults=[lag]) as srv:
        wiki = Wikipedia(endpoint=srv.url + "/w/api.php", cache_dir=tmp_path / "wc", sleep=waits.append)
        assert wiki.fork().step("search[Seine]").startswith("The Seine is a river")
        assert len(srv.log) == 2 and len(waits) == 1  # maxlag is transient
        again = Wikipedia(endpoint=srv.url + "/w/api.php", cache_dir=tmp_path / "wc")  # a rerun: from disk
        assert again.fork().step("search[Seine]").startswith("The Seine is a river") and len(srv.log) == 2
        assert tools.USER_AGENT in srv.log[0]["headers"]["User-Agent"]


# ---------------------------------------------------------------------------------------------------------------
# Google-snippet search and the noisy wrapper


@pytest.mark.parametrize("reply,want", [
    ({"answer_box": {"answer": "42", "snippet": "s"}, "organic_results": [{"snippet": "o"}]}, "42"),
    ({"answer_box": {"snippet": "box snippet"}, "organic_results": [{"snippet": "o"}]}, "box snippet"),
    ({"answer_box": {"snippet_highlighted_words": ["hl"]}}, "hl"),
    ({"organic_results": [{"snippet": "first organic"}, {"snippet": "second"}]}, "first organic"),
    ({"organic_results": []}, "None"),
])
def test_google_search_snippets(reply, want):
    with serve(lambda m, p, r: (200, reply)) as srv:
        tool = tools.GoogleSearch(endpoint=srv.url + "/search").fork()
        assert tool.step("Action 1: Search[meaning of life]") == want
        assert tool.step("lookup[x]") == "No more results."
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(srv.log[0]["path"]).query)
    assert q["q"] == ["meaning of life"] and q["engine"] == ["google"]


def test_google_search_needs_key(monkeypatch):
    monkeypatch.delenv("SERPAPI_API_KEY")
    with pytest.raises(ValueError, match="SERPAPI_API_KEY"):
        tools.GoogleSearch()


def test_noisy_tool_rate_seed_and_modes(corpus):
    base = LocalWiki(corpus)
    titles = [t for t, _ in PAGES]

    def run(p, mode, seed, n=1000):
        noisy = NoisyTool(base, p, mode=mode, seed=seed)
        out = []
        for i in range(n):
            ep = noisy.fork()
            t = titles[i % len(titles)]
            out.append((t, ep.step(f"search[{t}]")))
            assert ep.step("finish[x]") == "Episode finished." and ep.done and ep.answer == "x"
        return out

    clean = {t: base.fork().step(f"search[{t}]") for t in titles}
    a, b, c = run(0.5, "none", 0), run(0.5, "none", 0), run(0.5, "none", 1)
    assert a == b and a != c  # seeded
    rate = sum(o == "None" for _, o in a) / len(a)
    assert 0.45 < rate < 0.55, rate
    assert all(o in ("None", clean[t]) for t, o in a)
    r = run(0.3, "random", 0)
    wrong = [(t, o) for t, o in r if o != clean[t]]
    assert 0.25 < len(wrong) / len(r) < 0.35
    assert all(o in clean.values() for _, o in wrong[1:])  # another call's observation, never its own
    assert wrong[0][1] in clean.values() or r.index(wrong[0]) == 0  # only an empty pool falls back to 'None'
    assert all(o == clean[t] for t, o in run(0.0, "random", 0, n=50))
    noisy = NoisyTool(base, 1.0).fork()
    assert noisy.step("fly[x]") == "Invalid action: fly[x]"  # invalid actions are not masked
    with pytest.raises(ValueError, match="mode"):
        NoisyTool(base, 0.5, mode="typo")
    with pytest.raises(ValueError, match="p must be"):
        NoisyTool(base, 1.5)

"""Tests for tools.py and its HTTP client common/net.py against real HTTP servers on 127.0.0.1 (an OpenAI-style API
and a MediaWiki API) with injected faults. Run: python -m pytest -q tests/test_tools.py

The servers (`serve`, `openai_app`, `mediawiki_app`) are reused by bench/tools.py and tests/test_finetune_api.py."""
import concurrent.futures
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tools  # noqa: E402
from common import net  # noqa: E402
from common.net import APIError, Cache  # noqa: E402
from tools import LocalWiki, NoisyTool, Teacher, Wikipedia, parse_action  # noqa: E402

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
    with pytest.raises(ValueError, match=r"h.jsonl:2: invalid JSON"):
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
    assert fresh.bm25 is base.bm25 and fresh.titles is base.titles
    assert (base.name, base.noise, fresh.name) == ("local", None, "local")


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
    t0 = time.perf_counter()
    snip = tools.SnippetSearch(out)
    assert time.perf_counter() - t0 < 10  # ~1-2 s; generous on a busy machine
    hits, t0 = 0, time.perf_counter()
    for r in recs:
        tool = snip.fork()
        obs = tool.step(f"search[{r['question']}]")
        ctx = dict((t, s) for t, s in r["context"])
        hits += any(ctx[t][i].strip() in obs for t, i in r["supporting_facts"] if t in ctx and i < len(ctx[t]))
        assert len(obs) <= 300 and tool.last_search["how"] == "bm25"
    assert (time.perf_counter() - t0) / len(recs) < 0.05
    assert hits >= 25, hits  # the snippet holds a supporting sentence for most questions (66.8% over all 957)


# ---------------------------------------------------------------------------------------------------------------
# BM25 ties, SnippetSearch (FireAct-style offline search)

TOY = ROOT / "data" / "toy"


def write_corpus(path, pages):
    path.write_text("".join(json.dumps({"title": t, "sentences": s}) + "\n" for t, s in pages))
    return path


def test_bm25_ties_break_by_lower_index():
    bm = tools.BM25([["fox", "red"]] * 10 + [["fox"]] * 3 + [["owl"]])
    assert [i for i, _ in bm.rank("fox red", k=3)] == [0, 1, 2]  # ten tied docs, a cut inside the tie
    assert [i for i, _ in bm.rank("red fox", k=12)] == list(range(12))  # the single-term docs come after, in order
    assert bm.rank("owl", k=5) == [(13, bm.rank("owl", 1)[0][1])] and bm.rank("zebra") == []
    assert bm.rank("fox red")[0][1] == bm.rank("red fox fox")[0][1]  # repeated query terms count once
    big = tools.BM25([["fox"] if i % 3 == 0 else ["owl"] for i in range(3000)])  # argpartition scrambles these ties
    assert [i for i, _ in big.rank("fox", k=5)] == [0, 3, 6, 9, 12]


HASHSEED_RUN = """
import sys, tools
wiki = tools.LocalWiki(sys.argv[1])
print(wiki.fork().step("search[Foxes]")[:80], wiki.rank("Foxes band punk rock formed", 3))
"""


def test_localwiki_ties_are_deterministic_across_processes():
    """'search[Foxes]' ties 'Velvet Foxes' and 'Wandering Foxes' (same BM25 score): the earlier page wins, whatever
    the hash seed (query-term order) or the CPU (numpy's argpartition orders ties differently across machines)."""
    outs = [subprocess.run([sys.executable, "-c", HASHSEED_RUN, str(TOY / "corpus.jsonl")], cwd=ROOT, text=True,
                           capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in "12"]
    wiki = LocalWiki(TOY / "corpus.jsonl")
    scores = wiki.bm25.scores("Foxes")
    tied = [wiki.titles[i] for i in np.flatnonzero(scores == scores.max())]
    assert {"Velvet Foxes", "Wandering Foxes"} <= set(tied) and len(tied) >= 3  # really a tie ...
    assert outs[0] == outs[1] and outs[0].startswith(f"No page titled [Foxes]; best text match [{tied[0]}]:")  # ... first page wins


SNIPPET_PAGES = PAGES + [
    ("Velvet Foxes", ["Velvet Foxes is a punk band from Leeds.", "The band split in 1975."]),
    ("Crimson Owls", ["Crimson Owls is a rock band from York.", "The band split in 1988."]),
    ("Long Page", ["Long Page is a test page. " + " ".join(f"word{i}" for i in range(80)) + " ends here."]),
]


@pytest.fixture
def snippet(tmp_path):
    return tools.SnippetSearch(write_corpus(tmp_path / "c.jsonl", SNIPPET_PAGES), window_chars=60)


def test_snippet_search_returns_one_relevant_snippet(snippet):
    tool = snippet.fork()
    assert tool.name == "snippet" and tool.noise is None
    obs = tool.step("Action 1: Search[which city is home to NASA's space center?]")
    assert obs == "It is home to NASA's space center." and tool.last_search["title"] == "Houston"
    assert tool.last_search["how"] == "bm25" and tool.page is None  # no page state
    assert tool.step("search[What chemical element has the symbol Hg?]") == "Mercury is a chemical element with symbol Hg."
    assert tool.step("search[when did the Beatles split up]") == "The band split in 1970. Sixth sentence is hidden."
    assert tool.step("search[zzzz qqqq]") == "None" and tool.last_search["how"] == "none"


def test_snippet_search_is_title_aware(snippet):
    """'The band split in 19xx.' appears on two pages; only the page title tells them apart."""
    tool = snippet.fork()
    assert tool.step("search[when did Velvet Foxes split]") == "The band split in 1975."
    assert tool.step("search[Crimson Owls split year]") == "The band split in 1988."
    # an exact (normalised) title gets that page's lead, even when a later window matches the words as well
    assert tool.step("search[the beatles]") == "The Beatles were an English rock band formed in Liverpool in 1960."
    assert tool.last_search == {"query": "the beatles", "how": "title", "title": "The Beatles"}
    assert tool.step("search[Beyonce]").startswith("Beyoncé Giselle") and tool.last_search["how"] == "title"


def test_snippet_search_windows_and_clipping(tmp_path, snippet):
    wide = tools.SnippetSearch(write_corpus(tmp_path / "w.jsonl", SNIPPET_PAGES))  # default window_chars 250
    assert wide.fork().step("search[Houston]") == "Houston is the most populous city in Texas. It is home to NASA's space center."
    obs = snippet.fork().step("search[Long Page]")
    full = SNIPPET_PAGES[-1][1][0]
    assert len(obs) <= 300 and obs.endswith(" ...") and full.startswith(obs[:-4]) and full[len(obs) - 4] == " "
    assert tools.clip("short", 300) == "short" and tools.clip("a" * 400, 300) == "a" * 296 + " ..."


def test_snippet_search_lookup_finish_and_fork(snippet):
    a, b = snippet.fork(), snippet.fork()
    a.step("search[Houston]")
    assert a.step("lookup[NASA]") == tools.NO_LOOKUP == \
        "lookup is not available with this search tool. Use search[...] with a question or a phrase instead."
    assert a.step("fly[x]") == "Invalid action: fly[x]" and a.step("search[]").startswith("Invalid action")
    assert a.step("Action 3: finish[ Houston ]") == "Episode finished." and a.done and a.answer == "Houston"
    assert not b.done and b.answer is None and b.last_search is None  # episodes are independent ...
    assert b.bm25 is a.bm25 is snippet.bm25 and b.texts is snippet.texts  # ... and share the index
    noisy = NoisyTool(snippet, 1.0, seed=0)
    assert (noisy.name, noisy.noise) == ("snippet", (1.0, "none"))
    ep = noisy.fork()
    assert ep.step("search[Houston]") == "None" and ep.step("lookup[x]") == tools.NO_LOOKUP  # a refusal is not noise


def test_snippet_search_on_the_toy_corpus():
    tool = tools.SnippetSearch(TOY / "corpus.jsonl")
    dev = [json.loads(line) for line in (TOY / "dev.jsonl").open()]
    q = dev[0]  # In which town was the director of the film Last Voyage born? -> Lirino
    assert tool.fork().step(f"search[{q['question']}]").startswith("Last Voyage is a 1980 western film directed by Amara Orrby.")
    assert "born in Lirino" in tool.fork().step("search[where was Amara Orrby born?]") and q["answer"] == "Lirino"
    # each hop's goal, asked as free text, brings that hop's fact for most steps (the toy world plants namesakes)
    goals = [(f["goal"], f["sentence"]) for q in dev for f in q["chain"]]
    found = sum(sent in tool.fork().step(f"search[{goal}?]") for goal, sent in goals)
    assert found >= 0.75 * len(goals), (found, len(goals))


@pytest.mark.parametrize("method", ["react", "reflexion"])
@pytest.mark.parametrize("family", ["hotpotqa", "strategyqa", "mmlu"])
def test_snippet_prompts(method, family):
    """data/prompts/{method}_{family}_snippet.txt: the existing prompt's layout, with search as one snippet, no lookup."""
    text = (ROOT / "data" / "prompts" / f"{method}_{family}_snippet.txt").read_text()
    twin = (ROOT / "data" / "prompts" / f"{method}_{family}.txt").read_text()
    head, *examples = text.strip().split("\n\nQuestion: ")
    assert "search returns one short snippet from a search engine" in " ".join(head.split()).replace("[query]:", "")
    assert "lookup" not in text.lower()
    assert len(examples) == twin.count("\nQuestion: ")  # as many examples as the page-tool prompt
    for ex in examples:
        lines = ex.splitlines()
        actions = [parse_action(ln) for ln in lines if ln.startswith("Action: ")]
        assert actions and all(a is not None and a[0] in ("search", "finish") for a in actions), ex
        obs = [ln[len("Observation: "):] for ln in lines if ln.startswith("Observation: ")]
        assert all(80 <= len(o) <= 250 for o in obs if o != "Answer is incorrect."), obs
        labels = "".join(ln[0] for ln in lines if re.match(r"(Thought|Action|Observation|Reflection): ", ln))
        assert re.fullmatch(r"(TAO)*TA(OR)?|(TAO)+R", labels), (labels, ex)  # Thought, Action, Observation, ...
        if method == "reflexion":
            assert lines[-1].startswith("Reflection: ") and lines[-2].startswith("Observation: ")
        else:
            assert lines[-1].startswith("Action: finish[") and len(obs) == len(actions) - 1
    if method == "react" and family == "mmlu":
        assert re.search(r"^A\. .*\nB\. .*\nC\. .*\nD\. ", text, re.M)


def test_cli(tmp_path, corpus):
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "tools.py"), *a], capture_output=True, text=True)
    hotpot = tmp_path / "h.jsonl"
    hotpot.write_text(json.dumps({"context": [[t, s] for t, s in PAGES]}) + "\n")
    r = run("build-corpus", str(tmp_path / "cli.jsonl"), str(hotpot))
    assert r.returncode == 0 and f"wrote {len(PAGES)} pages" in r.stdout
    r = run("search", str(tmp_path / "cli.jsonl"), "Houston", "lookup[NASA]")
    assert r.returncode == 0 and "Observation: Houston is the most" in r.stdout and "(Result 1 / 1)" in r.stdout
    r = run("search", str(tmp_path / "cli.jsonl"), "which city is home to NASA?", "lookup[NASA]", "--tool", "snippet")
    assert r.returncode == 0 and r.stdout == (
        "Action: search[which city is home to NASA?]\nObservation: Houston is the most populous city in Texas. It is home "
        "to NASA's space center.\n"
        f"Action: lookup[NASA]\nObservation: {tools.NO_LOOKUP}\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "A", "sentences": ["a."]}\n{"title": "B", "sentences": "not a list"}\n')
    for args, err in [((str(tmp_path / "missing.jsonl"), "x"), "missing.jsonl: no such corpus file"),
                      ((str(tmp_path), "x"), f"{tmp_path}: is a directory, expected a corpus JSONL file"),
                      ((str(bad), "x", "--tool", "snippet"), "bad.jsonl:2: bad corpus line (title must be a string"),
                      ((str(bad), "x"), "bad.jsonl:2: bad corpus line")]:
        r = run("search", *args)
        assert r.returncode != 0 and err in r.stderr and r.stderr.count("\n") == 1 and not r.stdout, r.stderr
    r = run("build-corpus", str(tmp_path / "o.jsonl"), str(tmp_path))
    assert r.returncode != 0 and "is a directory" in r.stderr and r.stderr.count("\n") == 1
    r = run("build-corpus", str(tmp_path / "o.jsonl"), str(bad))
    assert r.returncode != 0 and "bad.jsonl: record 0 has no 'context'" in r.stderr and r.stderr.count("\n") == 1
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
    assert re.fullmatch(rf"teacher: POST {srv.url}/v1/chat/completions: gave up after 4 attempts in \d+\.\ds; "
                        "last error: HTTP 504: injected 504", msg), msg
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
    (("slow", 1.0), "last error: no complete reply within 0.25s"),
    (("drop",), "last error: connection error: ProtocolError: Connection broken: IncompleteRead(19 bytes read, 481 more"),
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
    reason = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 422: "Unprocessable Entity"}
    hint = " (check OPENAI_API_KEY)" if code in (401, 403) else ""
    assert str(e.value) == (f"teacher: {code} {reason[code]} from {srv.url}/v1/chat/completions: "
                            f"Incorrect API key provided: ***. You can find your key at ...{hint}")
    assert waits == [] and len(srv.log) == 1
    assert e.value.__cause__ is None and e.value.__context__ is None or KEY not in repr(e.value.__context__)


# ---------------------------------------------------------------------------------------------------------------
# Deadlines and one-line errors against misbehaving loopback servers


@contextmanager
def raw_server(behave):
    """A TCP server on 127.0.0.1 whose connection handler is `behave(conn, stop)`; yields its URL."""
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(0.05)
    stop, threads = threading.Event(), []

    def accept():
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except OSError:
                continue
            t = threading.Thread(target=behave, args=(conn, stop), daemon=True)
            t.start()
            threads.append(t)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{lsock.getsockname()[1]}"
    finally:
        stop.set()
        acceptor.join()
        lsock.close()
        for t in threads:
            t.join(timeout=2)


def hang(conn, stop):  # accepts, reads the request, never answers
    with conn:
        stop.wait()


def trickle(conn, stop):  # headers at once, then a 1,000-byte body at 1 byte every 0.2 s
    with conn:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        try:
            while not stop.wait(0.2):
                conn.sendall(b" ")
        except OSError:
            pass  # the client hung up


def timed(fn):
    t0 = time.monotonic()
    with pytest.raises(APIError) as e:
        fn()
    return str(e.value), time.monotonic() - t0


def test_401_is_one_line_with_status_server_message_and_hint(monkeypatch):
    body = {"error": {"message": f"Incorrect API key provided: {KEY[:8]}...", "type": "invalid_request_error"}}
    with serve(openai_app, faults=[("status", 401, {}, body)] * 2) as srv:
        msg, _ = timed(lambda: make_teacher(srv).chat([{"role": "user", "content": "x"}]))
        assert msg == (f"teacher: 401 Unauthorized from {srv.url}/v1/chat/completions: Incorrect API key provided: "
                       f"{KEY[:8]}... (check OPENAI_API_KEY)")
        monkeypatch.delenv("OPENAI_API_KEY")  # a local server with no key set: the hint says so
        msg, _ = timed(lambda: make_teacher(srv).chat([{"role": "user", "content": "x"}]))
        assert msg.endswith("(OPENAI_API_KEY is not set)") and len(srv.log) == 2 and "\n" not in msg


def test_hanging_server_hits_the_attempt_deadline():
    with raw_server(hang) as url:
        t = Teacher("m", base_url=url + "/v1", timeout=0.6, max_retries=1, backoff=0.01, seed=0)
        msg, took = timed(lambda: t.chat([{"role": "user", "content": "x"}]))
    assert re.fullmatch(rf"teacher: POST {url}/v1/chat/completions: gave up after 2 attempts in 1\.\ds; "
                        r"last error: no complete reply within 0\.6s", msg), msg
    assert 1.1 < took < 2.0, took


def test_trickling_server_hits_the_attempt_deadline():
    """A byte every 0.2 s never trips a per-read timeout of 1 s; the per-attempt wall clock stops it."""
    with raw_server(trickle) as url:
        t = Teacher("m", base_url=url + "/v1", timeout=1.0, max_retries=0, seed=0)
        msg, took = timed(lambda: t.chat([{"role": "user", "content": "x"}]))
    assert msg.endswith("gave up after 1 attempts in 1.0s; last error: no complete reply within 1s"), msg
    assert 0.95 < took < 1.6, took


def test_overall_deadline_across_retries():
    with raw_server(hang) as url:
        t = Teacher("m", base_url=url + "/v1", timeout=0.5, max_retries=50, backoff=0.01, seed=0, deadline=1.3)
        msg, took = timed(lambda: t.chat([{"role": "user", "content": "x"}]))
    assert re.fullmatch(rf"teacher: POST {url}/v1/chat/completions: deadline of 1.3s reached after 3 attempts "
                        r"in 1\.\ds; last error: no complete reply within 0\.\d+s", msg), msg
    assert 1.2 < took < 1.9, took
    with raw_server(hang) as url:  # the Wikipedia and Google clients have the same deadlines
        w = Wikipedia(endpoint=url + "/w/api.php", timeout=0.3, retries=0)
        msg, took = timed(lambda: w.fork().step("search[Paris]"))
    assert msg.startswith(f"wikipedia: GET {url}/w/api.php: gave up after 1 attempts") and took < 1.0


def test_refused_connection_and_missing_keys_are_one_line(monkeypatch):
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t = Teacher("m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff=0.01)
    msg, took = timed(lambda: t.chat([{"role": "user", "content": "x"}]))
    assert msg == (f"teacher: POST http://127.0.0.1:{port}/v1/chat/completions: gave up after 2 attempts in "
                   f"{msg.split(' in ')[1].split(';')[0]}; last error: connection refused") and took < 1.0
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("SERPAPI_API_KEY")
    for make, var in ((lambda: Teacher("gpt-4"), "OPENAI_API_KEY"), (tools.GoogleSearch, "SERPAPI_API_KEY")):
        with pytest.raises(ValueError) as e:
            make()
        assert var in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        Teacher("m", base_url="http://127.0.0.1:1/v1", timeout=0)


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
import sys
from common import net
cache, wid = net.Cache(sys.argv[1]), int(sys.argv[2])
for i in range(60):
    k = (i * 7 + wid) % 30  # writers overlap on the same keys; a key's value depends only on the key
    cache.put(net.cache_key({"k": k}), {"k": k, "pad": str(k) * 20000})
    got = cache.get(net.cache_key({"k": (k + 1) % 30}))
    assert got is None or got == {"k": (k + 1) % 30, "pad": str((k + 1) % 30) * 20000}, "torn read"
"""


def _check_cache(root, keys):
    cache = Cache(root)
    entries = list(Path(root).rglob("*.json"))
    assert len(entries) == len(set(e.name for e in entries)) == len(cache)  # one file per key: no duplicates
    for e in entries:
        json.loads(e.read_text())  # no torn entry
    return {k: cache.get(net.cache_key({"k": k})) for k in keys}


def test_cache_concurrent_threads(tmp_path):
    cache = Cache(tmp_path / "c")
    errors = []

    def work(wid):
        for i in range(40):
            k = (i + wid) % 10
            cache.put(net.cache_key({"k": k}), {"k": k, "pad": "x" * 50000})
            got = cache.get(net.cache_key({"k": (k + 3) % 10}))
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
    crash = ("import os, sys\nfrom common import net\nos.replace = lambda a, b: os._exit(9)\n"
             "net.Cache(sys.argv[1]).put(net.cache_key({'k': 1}), {'k': 1})")
    assert subprocess.run([sys.executable, "-c", crash, str(tmp_path)], cwd=ROOT).returncode == 9
    assert len(list(tmp_path.rglob("*.tmp"))) == 1  # the crash left a temp file ...
    cache = Cache(tmp_path)
    assert len(cache) == 0 and cache.get(net.cache_key({"k": 1})) is None  # ... which is never read
    cache.put(net.cache_key({"k": 1}), {"k": 1})
    assert cache.get(net.cache_key({"k": 1})) == {"k": 1}
    for tmp in tmp_path.rglob("*.tmp"):  # stale temp files are swept by the next Cache()
        os.utime(tmp, (time.time() - 7200,) * 2)
    Cache(tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))
    (next(tmp_path.rglob("*.json"))).write_text('{"request": 1, "respo')  # a foreign torn file is a miss
    assert cache.get(net.cache_key({"k": 1})) is None


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

    out = dict(net.run_concurrently(fn, iter(range(50)), workers=4))
    assert sorted(out) == list(range(50)) and peak[0] <= 4
    assert all(isinstance(out[x], ValueError) if x % 7 == 0 else out[x] == x * x for x in out)
    gen = net.run_concurrently(fn, range(10 ** 9), workers=2)  # lazy: an endless input is fine
    assert len([next(gen) for _ in range(5)]) == 5
    gen.close()


def test_run_concurrently_yields_calls_that_ended_together_in_submission_order(monkeypatch):
    """Calls that ended together come out in input order, so a consumer that stops at a failure (generate on
    Ctrl-C) has handled every earlier call, on every run. `wait` returns a set, whose order is arbitrary: here it
    reports every finished call, newest first."""
    real_wait = net.wait

    def wait_all_newest_first(fs, return_when):
        done, _ = real_wait(fs, return_when=concurrent.futures.ALL_COMPLETED)
        return sorted(done, key=list(fs).index, reverse=True), set()

    monkeypatch.setattr(net, "wait", wait_all_newest_first)
    seen = [x for x, _ in net.run_concurrently(lambda x: x, range(30), workers=3)]
    assert seen == list(range(30))


def test_rate_limiter_spacing():
    now, sleeps = [100.0], []
    clock = lambda: now[0]

    def sleep(s):
        sleeps.append(s)
        now[0] += s

    lim = net.RateLimiter(120, sleep=sleep, clock=clock)  # one start per 0.5 s
    for _ in range(4):
        lim.wait()
    assert sleeps == [0.5, 0.5, 0.5]
    now[0] += 10  # idle time is not banked into a burst beyond the next slot
    lim.wait()
    assert sleeps == [0.5, 0.5, 0.5]
    t0 = time.monotonic()
    list(net.run_concurrently(lambda x: x, range(4), workers=4, rpm=1200))  # real clock: 3 gaps of 50 ms
    assert time.monotonic() - t0 >= 0.14


def test_flaky_server_under_load(tmp_path):
    """100 requests (10 duplicated), 30% of attempts fail transiently: all answered, one cache entry each."""
    prompts = [f"q{i}" for i in range(90)] + [f"q{i}" for i in range(10)]
    with serve(openai_app, fail_rate=0.3, seed=1) as srv:
        t = make_teacher(srv, cache_dir=tmp_path / "c", max_retries=10, backoff=0.01)
        ask = lambda p: t.chat([{"role": "user", "content": p}])
        out = list(net.run_concurrently(ask, prompts, workers=8))
        assert len(out) == 100 and all(r == f"echo: {p}" for p, r in out)
        assert t.usage["retries"] > 10 and t.usage["failures"] == 0
        _check_cache(tmp_path / "c", [])
        assert len(Cache(tmp_path / "c")) == 90
        n = len(srv.log)
        t2 = make_teacher(srv, cache_dir=tmp_path / "c")  # a rerun: everything from the cache, nothing sent
        ask2 = lambda p: t2.chat([{"role": "user", "content": p}])
        assert all(r == f"echo: {p}" for p, r in net.run_concurrently(ask2, prompts, workers=8))
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
        assert net.USER_AGENT in srv.log[0]["headers"]["User-Agent"]


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
        assert tool.step("lookup[x]") == tools.NO_LOOKUP and tool.name == "google"  # Google has no lookup
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

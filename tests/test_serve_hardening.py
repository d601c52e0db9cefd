"""Issue 34: `python -m extras serve` under load and hostile clients, and `export`'s folder handling.

Every server here listens on 127.0.0.1 (or ::1) on a free port and serves a tiny random Llama. A "slow" server
sleeps SLOW_S before each model step (a forward pre-hook on the first block, the GIL released as a real model's
kernels release it): a tiny model is too fast to show one request starving the others, a 135M one too slow for
the suite. Every wait is bounded; the whole file runs in well under a minute.
"""
import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import model as M
from conftest import make_tiny_chat_llama

S = pytest.importorskip("extras.serve")
E = pytest.importorskip("extras.export")
openai = pytest.importorskip("openai")   # test-only requirement (requirements-test.txt)

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Question: What is the capital of France? Thought:"
SLOW_S = 0.025          # seconds per model step of the slow server: 480 steps ~ 12 s
ERROR_KEYS = {"message", "type", "param", "code"}


# ------------------------------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_chat_llama(tmp_path_factory.mktemp("harden_model"))


@pytest.fixture(scope="module")
def loaded(tiny):
    return M.load_model(tiny)


class Server:
    def __init__(self, cfg, model, tok):
        self.httpd, self.app = S.make_server(cfg, model, tok)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def serving(model, tok, **kw):
    return Server(S.ServeConfig(**dict(dict(port=0, name="tiny"), **kw)), model, tok)


@pytest.fixture(scope="module")
def server(loaded):
    s = serving(*loaded)
    yield s
    s.close()


@pytest.fixture(scope="module")
def strict(loaded):
    """Read and idle timeouts of 1 s: a client that stops sending is let go within a second."""
    s = serving(*loaded, timeout_s=1)
    yield s
    s.close()


@pytest.fixture(scope="module")
def slow(tiny):
    """A server whose model takes SLOW_S a step, whatever the batch (as a big model on a busy CPU)."""
    model, tok = M.load_model(tiny)
    block = next(m for m in model.modules() if isinstance(m, M.Block))
    block.register_forward_pre_hook(lambda *_: time.sleep(SLOW_S))
    s = serving(model, tok, batch_size=32)
    yield s
    s.close()


# ------------------------------------------------------------------------------------------------- clients
def request(port, method, path, body=None, headers=None, timeout=10, host="127.0.0.1"):
    """-> (status, headers, JSON body or text); raises on a reset or a timeout."""
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        c.request(method, "/v1" + path, body=data,
                  headers=dict({"Content-Type": "application/json"}, **(headers or {})))
        r = c.getresponse()
        raw = r.read()
        try:
            return r.status, dict(r.getheaders()), json.loads(raw)
        except ValueError:
            return r.status, dict(r.getheaders()), raw.decode(errors="replace")
    finally:
        c.close()


def small(port, timeout=10):
    """A 4-token completion; -> seconds taken."""
    t = time.time()
    status, _, out = request(port, "POST", "/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 4,
                                                            "temperature": 0}, timeout=timeout)
    assert status == 200, out
    return time.time() - t


def exchange(port, data: bytes, timeout=5.0, send_timeout=None):
    """Raw bytes to the server -> (status or None, JSON body or None, seconds, how it ended: "response",
    "closed", "reset" or "timeout"). Reads one response (by its Content-Length) or until the server closes."""
    t = time.time()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    buf, how = b"", "timeout"
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass   # refused before it read everything: what it answered may still be readable
        while True:
            head, sep, rest = buf.partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                if m and len(rest) >= int(m[1]):
                    how = "response"
                    break
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                how = "reset"
                break
            if not chunk:
                how = "response" if buf else "closed"
                break
            buf += chunk
    finally:
        s.close()
    status = int(buf.split(b" ", 2)[1]) if buf.startswith(b"HTTP/") else None
    body = buf.partition(b"\r\n\r\n")[2]
    try:
        body = json.loads(body) if body else None
    except ValueError:
        body = body[:200]
    return status, body, time.time() - t, how


def post_bytes(path, body: bytes, extra=b"", length=None):
    n = str(len(body)).encode() if length is None else length
    return (b"POST /v1" + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra +
            (b"Content-Length: " + n + b"\r\n" if n is not False else b"") + b"\r\n" + body)


def openai_shape(body):
    return isinstance(body, dict) and set(body) == {"error"} and set(body["error"]) == ERROR_KEYS


def in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:   # noqa: BLE001 (the test reads it)
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def p(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# ------------------------------------------------------------------------------------------------- load
def test_32_concurrent_chats_all_answered(server):
    """The listen backlog was the standard library's 5: a burst of 32 clients got connections reset."""
    barrier = threading.Barrier(32)

    def one(i):
        barrier.wait(5)
        return request(server.port, "POST", "/chat/completions",
                       {"model": "tiny", "messages": [{"role": "user", "content": f"Hello {i}"}], "max_tokens": 16,
                        "temperature": 0}, timeout=30)[0]
    with ThreadPoolExecutor(32) as ex:
        assert list(ex.map(one, range(32))) == [200] * 32
    ss = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True, text=True) \
        if os.path.exists("/usr/bin/ss") or os.path.exists("/bin/ss") else None
    if ss and ss.returncode == 0 and ss.stdout.split():
        assert int(ss.stdout.split()[2]) >= 128, ss.stdout   # LISTEN: Send-Q is the backlog


def test_many_prompts_are_refused_or_bounded(slow):
    """20,000 one-token prompts in one /v1/completions (a 0.1 MB body) pinned the server for minutes."""
    big, out = in_thread(lambda: (time.time(), request(slow.port, "POST", "/completions",
                                                       {"model": "tiny", "prompt": ["a"] * 20000, "max_tokens": 64},
                                                       timeout=30), time.time()))
    time.sleep(0.3)
    took = small(slow.port, timeout=30)
    big.join(30)
    if "value" in out and out["value"][1][0] == 400:
        t0, (status, _, body), t1 = out["value"]
        assert t1 - t0 < 5 and openai_shape(body) and body["error"]["param"] in ("prompt", "n"), body
    else:   # accepted: then it must not hold the others up
        assert took < 2.0, f"a 4-token request waited {took:.1f} s behind 20,000 prompts"
    assert small(slow.port) < 2.0


def test_the_caps_on_one_request_are_400s_naming_the_field(loaded):
    """--max-choices (prompts x n) and --max-request-tokens (prompts x n x max_tokens), counted before any work."""
    s = serving(*loaded, max_choices=4, max_request_tokens=100)
    try:
        for body, param in (({"prompt": ["a"] * 5}, "prompt"), ({"prompt": "a", "n": 5}, "n"),
                            ({"prompt": ["a", "b"], "max_tokens": 60}, "max_tokens")):
            status, _, err = request(s.port, "POST", "/completions", dict(body, model="tiny"))
            assert status == 400 and openai_shape(err) and err["error"]["param"] == param, (body, err)
        status, _, out = request(s.port, "POST", "/completions", {"model": "tiny", "prompt": "a", "n": 2,
                                                                   "max_tokens": 50, "temperature": 0})
        assert status == 200 and len(out["choices"]) == 2
    finally:
        s.close()


def test_n_times_max_tokens_is_refused_or_bounded(slow):
    """n 128 x max_tokens 480 was one generate call (never split to --batch-size) that blocked every client."""
    c = http.client.HTTPConnection("127.0.0.1", slow.port, timeout=30)
    c.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": PROMPT, "n": 128, "max_tokens": 480,
                                                      "temperature": 1.0}), {"Content-Type": "application/json"})
    try:
        time.sleep(0.3)
        c.sock.settimeout(0.01)
        try:
            r = c.getresponse()   # refused at once?
            body = json.loads(r.read())
            assert r.status == 400 and openai_shape(body) and body["error"]["param"] in ("n", "max_tokens"), body
        except (socket.timeout, TimeoutError):
            took = small(slow.port, timeout=30)
            assert took < 3.0, f"a 4-token request waited {took:.1f} s behind n=128 x 480 tokens"
    finally:
        c.close()   # the client gives up: the rest of its work is cancelled
    assert small(slow.port, timeout=30) < 2.0


def test_client_disconnect_cancels_its_work(slow):
    # streaming: read the first event, then go away
    s = socket.create_connection(("127.0.0.1", slow.port), timeout=30)
    s.sendall(post_bytes("/completions", json.dumps({"model": "tiny", "prompt": PROMPT, "n": 4, "max_tokens": 480,
                                                      "temperature": 1.0, "stream": True}).encode()))
    buf = b""
    while b"data: " not in buf:
        chunk = s.recv(4096)
        assert chunk, buf
        buf += chunk
    assert buf.startswith(b"HTTP/1.") and b" 200 " in buf.split(b"\r\n")[0]
    s.close()
    time.sleep(0.2)
    took = small(slow.port, timeout=30)
    assert took < 2.0, f"the next 4-token request took {took:.1f} s: the stream's work went on"
    # not streaming: send, wait a moment, go away
    s = socket.create_connection(("127.0.0.1", slow.port), timeout=30)
    s.sendall(post_bytes("/completions", json.dumps({"model": "tiny", "prompt": PROMPT, "n": 4, "max_tokens": 480,
                                                      "temperature": 1.0}).encode()))
    time.sleep(0.5)
    s.close()
    time.sleep(0.2)
    took = small(slow.port, timeout=30)
    assert took < 2.0, f"the next 4-token request took {took:.1f} s: the abandoned request's work went on"


def test_a_request_split_over_many_calls_answers_as_one(loaded):
    """Fair scheduling splits a request over generate calls (--slice-tokens steps each while others wait): the
    text, a stop string that spans two calls, the finish reason and the stream are those of one call."""
    model, tok = loaded
    s = serving(model, tok, slice_tokens=3, batch_wait_ms=50)
    try:
        prompts = [PROMPT, "Question: Who wrote Hamlet? Thought:", "Hello world, hello there!"]
        full = [M.generate(model, tok, [p], 24)[0] for p in prompts]
        stops = [[f[10:13]] if len(f) > 13 else [] for f in full]   # stops that end a row in a later call
        want = [M.generate(model, tok, [p], 24, stop=st)[0] for p, st in zip(prompts, stops)]

        def one(i):   # different stops: different sampling settings, so the three take turns every 3 steps
            body = {"model": "tiny", "prompt": prompts[i], "max_tokens": 24, "temperature": 0, "stop": stops[i]}
            if i == 2:
                c = openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0, timeout=30)
                return "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **body)), None
            status, _, out = request(s.port, "POST", "/completions", body, timeout=30)
            assert status == 200, out
            return out["choices"][0]["text"], out["choices"][0]["finish_reason"]
        calls = s.app.engine.calls
        with ThreadPoolExecutor(3) as ex:
            got = list(ex.map(one, range(3)))
        assert [g[0] for g in got] == want and all(want)
        assert [g[1] for g in got[:2]] == ["stop" if st and st[0] in f else "length" for f, st in
                                          zip(full[:2], stops[:2])]
        assert s.app.engine.calls - calls > 3   # it was split
    finally:
        s.close()


def test_a_15mb_body_is_refused_fast_and_stalls_no_one(server):
    """Three 15.6 MB chats were refused as over the context only after 33-48 s of tokenizing each."""
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x " * 7_500_000}]}).encode()
    big, out = in_thread(lambda: exchange(server.port, post_bytes("/chat/completions", body), timeout=15))
    time.sleep(0.2)
    t = time.time()
    status, _, models = request(server.port, "GET", "/models", timeout=15)
    assert status == 200 and models["data"][0]["id"] == "tiny" and time.time() - t < 2.0
    big.join(20)
    status, err, took, how = out["value"]
    assert took < 5.0 and how != "timeout", (status, how, took)
    assert status in (400, 413, None) and (status is None or openai_shape(err)), (status, err)
    # many short messages render to a long prompt: measured before it is tokenized too
    t = time.time()
    status, _, err = request(server.port, "POST", "/chat/completions", {"model": "tiny", "messages": [
        {"role": "user", "content": "a b"}] * 200_000}, timeout=30)
    assert status == 400 and err["error"]["code"] == "context_length_exceeded" and time.time() - t < 3.0, err


def test_idle_and_slow_sockets_time_out_and_are_limited(loaded):
    """Idle sockets held a thread each, forever (0 of 203 closed after 20 s)."""
    s = serving(*loaded, timeout_s=1, max_connections=16)
    socks = []
    try:
        threads = threading.active_count()
        for i in range(40):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=8)
            if i % 2:   # a slowloris: half a request, then nothing
                c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            socks.append(c)
        time.sleep(0.5)
        assert threading.active_count() - threads <= 16 + 4   # the connection limit bounds the threads
        t, ended = time.time(), 0
        for c in socks:
            try:
                while c.recv(4096):   # a 503/408 is fine: what matters is that the server lets go
                    pass
                ended += 1
            except ConnectionResetError:
                ended += 1
            except socket.timeout:
                break
        assert ended == 40 and time.time() - t < 8, f"{ended} of 40 idle sockets closed"
        assert request(s.port, "GET", "/models", timeout=5)[0] == 200
    finally:
        for c in socks:
            c.close()
        s.close()


CONTENT_LENGTHS = [   # (what, the raw request, the statuses allowed)
    ("missing", post_bytes("/completions", b'{"model": "tiny", "prompt": "hi"}', length=False), (400, 411)),
    ("chunked", post_bytes("/completions", b"5\r\n{} \r\n0\r\n\r\n", b"Transfer-Encoding: chunked\r\n", False),
     (400, 411)),
    ("larger than the body", post_bytes("/completions", b'{"model": "tiny"}', length=b"100"), (400, 408, 411)),
    ("-1", post_bytes("/completions", b'{"model": "tiny"}', length=b"-1"), (400,)),
    ("abc", post_bytes("/completions", b'{"model": "tiny"}', length=b"abc"), (400,)),
    ("2**70", post_bytes("/completions", b'{"model": "tiny"}', length=str(2 ** 70).encode()), (400, 413)),
    ("two values", post_bytes("/completions", b"{}", b"Content-Length: 7\r\n"), (400,)),
]


@pytest.mark.parametrize("what,data,allowed", CONTENT_LENGTHS, ids=[c[0] for c in CONTENT_LENGTHS])
def test_content_length_is_checked_before_reading(strict, what, data, allowed):
    status, body, took, how = exchange(strict.port, data, timeout=6)
    assert status in allowed and openai_shape(body), (what, status, body, how)
    assert took < 4.0, (what, took)
    assert request(strict.port, "GET", "/models", timeout=5)[0] == 200


BAD = [   # (what, path, raw JSON body, the param the error names or None)
    ("seed >= 2**63", "/completions", '{"model": "tiny", "prompt": "hi", "max_tokens": 2, "seed": %d}' % 2 ** 63,
     "seed"),
    ("seed < -2**63", "/completions", '{"model": "tiny", "prompt": "hi", "max_tokens": 2, "seed": %d}' % (-2 ** 63 - 1),
     "seed"),
    ("seed of 5000 digits", "/completions", '{"model": "tiny", "prompt": "hi", "seed": %s}' % ("9" * 5000), None),
    ("best_of x", "/completions", '{"model": "tiny", "prompt": "hi", "best_of": "x"}', "best_of"),
    ("stream_options a string", "/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": "yes"}',
     "stream_options"),
    ("stream_options a list", "/completions",
     '{"model": "tiny", "prompt": "hi", "stream": true, "stream_options": [1]}', "stream_options"),
    ("a text part's text a number", "/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', None),
    ("a content list of non-parts", "/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": [1, 2]}]}', None),
    ("a content list without text", "/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}',
     None),
    ("a message not an object", "/chat/completions", '{"model": "tiny", "messages": ["hi"]}', None),
    ("temperature NaN", "/completions", '{"model": "tiny", "prompt": "hi", "temperature": NaN}', "temperature"),
    ("max_tokens Infinity", "/completions", '{"model": "tiny", "prompt": "hi", "max_tokens": Infinity}', "max_tokens"),
    ("n a string", "/completions", '{"model": "tiny", "prompt": "hi", "n": "2"}', "n"),
    ("deep nesting", "/completions", "[" * 100000 + "]" * 100000, None),
    ("a JSON list", "/completions", "[1, 2]", None),
    ("not UTF-8", "/completions", '{"model": "tiny", "prompt": "\xff\xfe"}', None),
]


@pytest.mark.parametrize("what,path,raw,param", BAD, ids=[b[0] for b in BAD])
def test_malformed_fields_are_400_in_openai_shape(server, what, path, raw, param):
    data = raw.encode("latin-1") if what == "not UTF-8" else raw.encode()
    status, _, body = request(server.port, "POST", path, data, timeout=10)
    assert status == 400 and openai_shape(body), (what, status, body)
    assert body["error"]["type"] == "invalid_request_error"
    if param:
        assert body["error"]["param"] == param, (what, body)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "OPTIONS", "PATCH"])
def test_other_methods_are_json_errors(server, method):
    for path in ("/chat/completions", "/models"):
        status, headers, body = request(server.port, method, path, b"{}", timeout=5)
        assert status in (404, 405) and openai_shape(body), (method, path, status, body)
        assert headers.get("Content-Type", "").startswith("application/json")


def test_authorization_scheme_is_case_insensitive(loaded, monkeypatch):
    monkeypatch.setenv("HARDEN_SERVE_KEY", "s3cret")
    s = serving(*loaded, api_key_env="HARDEN_SERVE_KEY")
    try:
        for header in ("Bearer s3cret", "bearer s3cret", "BEARER s3cret"):
            assert request(s.port, "GET", "/models", headers={"Authorization": header})[0] == 200, header
        for header in ("Bearer wrong", "s3cret", "Basic s3cret", ""):
            status, _, body = request(s.port, "GET", "/models", headers={"Authorization": header} if header else {})
            assert status == 401 and openai_shape(body) and "s3cret" not in json.dumps(body), header
    finally:
        s.close()


# ------------------------------------------------------------------------------------------------- processes
def run_extras(*argv, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "extras", *map(str, argv)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_host_ipv6_works_and_a_bad_host_fails_before_the_model_loads(tiny, tmp_path):
    try:   # can this machine bind IPv6 at all? (CI containers may have it off)
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        v6 = True
    except OSError:
        v6 = False
    proc = run_extras("serve", "--model", tiny, "--host", "::", "--port", 0, "--name", "tiny", "--no-compile")
    try:
        lines, port, t = [], None, time.time()
        while time.time() - t < 90 and port is None:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"serving .* on http://\S*:(\d+)/v1", line)
            port = int(m[1]) if m else None
        if v6:
            assert port, "".join(lines)
            assert "http://[::]:" in "".join(lines)   # an IPv6 address in a URL is bracketed
            status, _, out = request(port, "GET", "/models", host="::1", timeout=10)
            assert status == 200 and out["data"][0]["id"] == "tiny"
        else:
            proc.wait(30)
            assert proc.returncode != 0 and "Traceback" not in "".join(lines)
    finally:
        proc.kill()
        proc.wait(10)
    # a host that cannot be bound is a one-line error before the model loads (here: one that does not exist)
    bad = run_extras("serve", "--model", tmp_path / "no_such_model", "--host", "256.0.0.1", "--port", 0)
    out, err = bad.communicate(timeout=90)
    assert bad.returncode not in (0, None) and "256.0.0.1" in err and "no_such_model" not in err, err
    assert "Traceback" not in err


def test_load_with_the_openai_client_and_one_hostile_request(slow):
    """N clients with the official `openai` client, mixed sizes, with and without one hostile request (n 32 x 4
    prompts x 480 tokens, legal but as long as 480 model steps): every ordinary request is answered, none with a
    5xx, and their latency stays bounded while the hostile one runs. (Requests share a seed per kind: one generate
    call samples with one seed, so distinct seeds cannot share a batch.)"""
    N = 16
    client = openai.OpenAI(base_url=slow.url, api_key="unused", max_retries=0, timeout=60)

    def ordinary(i):
        t = time.time()
        try:
            kind = i % 4
            if kind == 0:
                text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=16, temperature=0,
                    stream=True) if ch.choices)
            elif kind == 1:
                text = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                                      max_tokens=24, temperature=0.7, seed=7).choices[0].message.content
            elif kind == 2:
                text = client.completions.create(model="tiny", prompt=PROMPT + " " * (i % 3), max_tokens=8,
                                                 temperature=0).choices[0].text
            else:
                text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=32, n=2, temperature=1.0,
                                                 seed=11).choices[1].text
            return time.time() - t, 200, isinstance(text, str)
        except openai.APIStatusError as e:
            return time.time() - t, e.status_code, False
        except openai.APIError as e:   # connection errors, timeouts
            return time.time() - t, type(e).__name__, False

    def burst():
        with ThreadPoolExecutor(N) as ex:
            return list(ex.map(ordinary, range(N)))
    calm = burst()
    hostile = http.client.HTTPConnection("127.0.0.1", slow.port, timeout=60)
    hostile.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": [PROMPT] * 4, "n": 32,
                                                            "max_tokens": 480, "temperature": 1.0}),
                    {"Content-Type": "application/json"})
    try:
        time.sleep(0.3)
        loaded = burst()
    finally:
        hostile.close()
    figures = {name: dict(N=N, answered=sum(r[1] == 200 and r[2] for r in rs),
                          p50=round(p([r[0] for r in rs], 0.5), 2), p99=round(p([r[0] for r in rs], 0.99), 2))
               for name, rs in (("without", calm), ("with_hostile", loaded))}
    print("load figures:", json.dumps(figures))
    for name, rs in (("without", calm), ("with hostile", loaded)):
        assert [r[1] for r in rs] == [200] * N and all(r[2] for r in rs), (name, rs)
    assert figures["with_hostile"]["p99"] < 8.0, figures
    assert small(slow.port, timeout=30) < 2.0   # the hostile client went away: its work went with it


# ------------------------------------------------------------------------------------------------- export
def export(tiny, out, **kw):
    cfg = E.ExportConfig(out=str(out), model=str(tiny), **kw)
    cfg.check()
    return E.export(cfg)


def test_export_hf_into_an_existing_folder_says_what_to_do(tiny, tmp_path):
    out = tmp_path / "student_hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises((ValueError, FileExistsError, SystemExit)) as e:
        export(tiny, out)
    assert "--force" in str(e.value) and "give a file path" not in str(e.value)
    assert (out / "notes.txt").read_text() == "mine"   # nothing touched
    export(tiny, out, force=True)
    assert (out / "config.json").exists() and not (out / "notes.txt").exists()
    M.load_model(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student_hf"]   # no temporary siblings
    # the command line: a one-line error, not a traceback
    proc = run_extras("export", "--model", tiny, "--out", out)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode not in (0, None) and "--force" in err and "Traceback" not in err, err


def test_a_failed_export_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    def disk_full(model, tok, out_dir, *a, **k):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "model.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as mp:
        mp.setattr(M, "save_checkpoint", disk_full)
        with pytest.raises(OSError):
            export(tiny, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
    import gguf
    with monkeypatch.context() as mp:
        mp.setattr(gguf.GGUFWriter, "write_tensors_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
        with pytest.raises(OSError):
            export(tiny, tmp_path / "g" / "student.gguf", format="gguf")
    assert [p.name for p in (tmp_path / "g").iterdir()] == [] if (tmp_path / "g").exists() else True
    export(tiny, tmp_path / "hf")   # the retry needs no --force
    M.load_model(tmp_path / "hf")


def test_a_killed_export_does_not_block_the_retry(tiny, tmp_path):
    out = tmp_path / "hf"
    code = (f"import os, signal, sys; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path\n"
            "import model as M, extras.export as E\n"
            "def killed(model, tok, out_dir, *a, **k):\n"
            "    Path(out_dir).mkdir(parents=True, exist_ok=True)\n"
            "    (Path(out_dir) / 'model.safetensors').write_bytes(b'half')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "M.save_checkpoint = killed\n"
            f"cfg = E.ExportConfig(out={str(out)!r}, model={str(tiny)!r}); cfg.check(); E.export(cfg)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=90)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists() or not any(out.iterdir()), "a killed export left a partial folder at --out"
    export(tiny, out)   # no --force, no error
    M.load_model(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], list(tmp_path.iterdir())   # stale temps removed


def test_exports_are_readable_by_others(tiny, tmp_path):
    old = os.umask(0o022)
    try:
        hf = export(tiny, tmp_path / "hf")
        g = export(tiny, tmp_path / "g" / "student.gguf", format="gguf")
    finally:
        os.umask(old)
    paths = [p for p in Path(hf).iterdir()] + [Path(g), Path(g).parent / "Modelfile"]
    assert (Path(g).parent / "Modelfile").exists()
    for f in paths:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, (f, oct(f.stat().st_mode))
    assert stat.S_IMODE(Path(hf).stat().st_mode) == 0o755


def test_two_ggufs_in_one_folder_keep_their_own_modelfiles(tiny, tmp_path):
    export(tiny, tmp_path / "a.gguf", format="gguf")
    assert "FROM ./a.gguf" in (tmp_path / "Modelfile").read_text()
    try:
        export(tiny, tmp_path / "b.gguf", format="gguf")
        b_ok = True
    except (ValueError, FileExistsError) as e:   # refusing, with a message, is fine too
        assert "Modelfile" in str(e)
        b_ok = False
    assert "FROM ./a.gguf" in (tmp_path / "Modelfile").read_text()   # a's Modelfile is still a's
    if b_ok:
        assert any("FROM ./b.gguf" in p.read_text() for p in tmp_path.iterdir() if "Modelfile" in p.name)
    export(tiny, tmp_path / "a.gguf", format="gguf")   # re-exporting a keeps (rewrites) its own
    assert "FROM ./a.gguf" in (tmp_path / "Modelfile").read_text()
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]

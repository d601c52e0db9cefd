"""Load figures for the OpenAI-compatible server (issue 34): N concurrent clients of the official `openai` package,
mixed sizes, first alone, then with one hostile request among them.

    python bench/serve_load.py                              # starts `python -m extras serve` (embedded model)
    python bench/serve_load.py --clients 32 --hostile prompts
    python bench/serve_load.py --url http://127.0.0.1:8000/v1 --model-id NAME   # any running OpenAI-compatible server

Hostile requests (each legal to send; what a careless or hostile client does):
  n        one completion of 4 prompts x n 32 x max_tokens 1000 (128 long rows), abandoned at the end
  prompts  one completion whose prompt is a list of 20,000 one-token strings
  body     one 15 MB chat message
  drop     a streaming n 8 x 1000-token request whose client goes away after the first event
Prints one JSON line per phase: N, answered (200 with text), errors by kind, p50/p99/max latency in seconds.
Bench, not test: the suite's bounded version is tests/test_serve_hardening.py::test_load_with_the_openai_client...
"""
import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Question: What is the capital of France? Thought:"


def start_server(args):
    cmd = [sys.executable, "-m", "extras", "serve", "--port", "0", "--name", "bench"] + \
        (["--model", args.model] if args.model else []) + args.serve_args
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    t = time.time()
    while time.time() - t < 300:
        line = proc.stderr.readline()
        if not line:
            break
        print(line.rstrip(), file=sys.stderr)
        m = re.search(r"serving .* on http://\S*:(\d+)/v1", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()   # keep draining
            return proc, f"http://127.0.0.1:{m[1]}/v1"
    proc.kill()
    raise SystemExit(f"the server did not start: {' '.join(cmd)}")


def ordinary(client, model, i):
    import openai
    t = time.time()
    try:
        kind = i % 4
        if kind == 0:
            text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Say hello to {i}."}], max_tokens=16,
                temperature=0, stream=True) if ch.choices)
        elif kind == 1:
            text = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a city."}],
                                                  max_tokens=24, temperature=0.7, seed=i).choices[0].message.content
        elif kind == 2:
            text = client.completions.create(model=model, prompt=PROMPT + " " * (i % 3), max_tokens=8,
                                             temperature=0).choices[0].text
        else:
            text = client.completions.create(model=model, prompt=PROMPT, max_tokens=32, n=2, temperature=1.0,
                                             seed=i).choices[1].text
        return time.time() - t, 200 if isinstance(text, str) else "no text"
    except openai.APIStatusError as e:
        return time.time() - t, e.status_code
    except openai.APIError as e:
        return time.time() - t, type(e).__name__


def hostile(kind, url, model):
    """Start the hostile request; -> a function that abandons it (closes its socket)."""
    u = urlparse(url)
    s = socket.create_connection((u.hostname, u.port), timeout=600)
    body = {"n": {"model": model, "prompt": [PROMPT] * 4, "n": 32, "max_tokens": 1000, "temperature": 1.0},
            "prompts": {"model": model, "prompt": ["a"] * 20000, "max_tokens": 16},
            "body": {"model": model, "messages": [{"role": "user", "content": "x " * 7_500_000}]},
            "drop": {"model": model, "prompt": PROMPT, "n": 8, "max_tokens": 1000, "temperature": 1.0,
                     "stream": True}}[kind]
    path = "/chat/completions" if kind == "body" else "/completions"
    data = json.dumps(body).encode()
    head = (f"POST {u.path}{path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer unused\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    threading.Thread(target=lambda: _send(s, head + data, kind == "drop"), daemon=True).start()
    return s.close


def _send(s, data, drop):
    try:
        s.sendall(data)
        if drop:
            s.recv(1)   # the first bytes of the stream, then go away
            s.close()
    except OSError:
        pass


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


def phase(name, client, model, n):
    t = time.time()
    with ThreadPoolExecutor(n) as ex:
        rs = list(ex.map(lambda i: ordinary(client, model, i), range(n)))
    lat = [r[0] for r in rs]
    errors = {}
    for r in rs:
        if r[1] != 200:
            errors[str(r[1])] = errors.get(str(r[1]), 0) + 1
    out = dict(phase=name, N=n, answered=sum(r[1] == 200 for r in rs), errors=errors, p50=round(pct(lat, .5), 2),
               p99=round(pct(lat, .99), 2), max=round(max(lat), 2), wall=round(time.time() - t, 2))
    print(json.dumps(out), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="", help="a running server's /v1 URL; default: start `python -m extras serve`")
    ap.add_argument("--model-id", default="bench", help="the model id to send (with --url)")
    ap.add_argument("--model", default="", help="the model to serve when starting one; '' = the embedded model")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--hostile", nargs="+", default=["n"], choices=["n", "prompts", "body", "drop"])
    ap.add_argument("--timeout", type=float, default=300, help="per ordinary request, seconds")
    ap.add_argument("serve_args", nargs="*", help="extra flags for `extras serve` (after --)")
    args = ap.parse_args()
    import openai
    proc = None
    url, model = args.url, args.model_id
    if not url:
        proc, url = start_server(args)
        model = "bench"
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=args.timeout)
        phase("warm-up", client, model, 4)
        phase("without", client, model, args.clients)
        for kind in args.hostile:
            abandon = hostile(kind, url, model)
            time.sleep(0.5)
            phase(f"with hostile {kind}", client, model, args.clients)
            abandon()
            time.sleep(0.5)
            phase(f"after hostile {kind} went away", client, model, 4)
    finally:
        if proc:
            proc.kill()


if __name__ == "__main__":
    main()

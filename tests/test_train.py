"""Tests for train.py on tiny random Llamas (dim 64, 2 layers): data readers, masks, loss, accumulation,
overfitting, resume, DDP, PEFT/transformers interop, errors.

    python -m pytest -q -x tests/test_train.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_llama, make_tokenizer

import model as M
import train as T

REPO = Path(__file__).resolve().parent.parent
FT = REPO.parent / "shared" / "data" / "fireact" / "finetune"

QUESTION = "Which band did the founder of Acme join?"
OPTIONS = "A. The Beatles\nB. Queen\nC. Abba\nD. Toto"
STEPS = [{"thought": "I need to search Acme.", "action": "search[Acme]",
          "observation": "Acme was founded by Jo Smith.\nJo Smith is a drummer."},
         {"thought": "", "action": "lookup[band]", "observation": "(Result 1 / 1) Jo Smith joined Toto."},
         {"thought": "Jo Smith joined Toto, option D.", "action": "finish[D]", "observation": "Episode finished"}]


def react_text(steps):
    return "\n".join((f"Thought: {s['thought']}\n" if s["thought"] else "") + f"Action: {s['action']}\n"
                     f"Observation: {s['observation']}" for s in steps) + "\n"


def write_three_formats(tmp, question, steps, options=""):
    """The same trajectory as our JSONL, FireAct alpaca JSON (options at the start of output: the MMLU quirk)
    and FireAct gpt JSONL (options inside the question message)."""
    q_full = question + ("\n" + options if options else "")
    ours = {"id": "x", "task": "t", "method": "react", "question": q_full, "answer": "D", "steps": steps}
    (tmp / "ours.jsonl").write_text(json.dumps(ours) + "\n")
    alpaca = {"instruction": "Question: " + question, "input": "",
              "output": (options + "\n" if options else "") + react_text(steps)}
    (tmp / "alpaca.json").write_text(json.dumps([alpaca], indent=2))
    msgs = [{"role": "user", "content": "Question: " + q_full}]
    for s in steps:
        msgs.append({"role": "assistant", "content": (f"Thought: {s['thought']}\n" if s["thought"] else "")
                     + f"Action: {s['action']}"})
        msgs.append({"role": "user", "content": f"Observation: {s['observation']}"})
    (tmp / "gpt.jsonl").write_text(json.dumps({"messages": msgs}) + "\n")
    return [tmp / "ours.jsonl", tmp / "alpaca.json", tmp / "gpt.jsonl"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from 2 threads, and on a shared busy CPU OpenMP threads waiting on each other
    make them tens of times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return M.load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint and a JSONL of 6 short trajectories over it."""
    d = tmp_path_factory.mktemp("tiny")
    ckpt = make_tiny_llama(d / "model", std=0.02)
    recs = [{"id": str(i), "question": f"Who founded company {i}?", "answer": f"P{i}", "steps": [
        {"thought": "I need to search the company.", "action": f"search[Company {i}]",
         "observation": f"Company {i} was founded by P{i} in 19{i}0."},
        {"thought": f"The founder is P{i}.", "action": f"finish[P{i}]", "observation": ""}]} for i in range(6)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return ckpt, d / "data.jsonl"


def cfg_for(tiny, out, **kw):
    base = dict(model=str(tiny[0]), data=[str(tiny[1])], out=str(out), val_frac=0.0, batch_size=4, micro_batch=2,
                epochs=2, lr=5e-3, warmup=2, lora_r=4, lora_alpha=8, eval_every=1000, save_every=1000,
                progress=False)
    return T.TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------------ data + masks
@pytest.mark.skipif(not FT.exists(), reason="shared FireAct data absent")
def test_all_fireact_files_load_with_counts():
    expect = {"alpaca_format/hotpotqa.json": 500, "alpaca_format/hotpotqa_multimethod.json": 734,
              "alpaca_format/multitask.json": 1344, "alpaca_format/multitask_multimethod.json": 2063,
              "gpt_format/hotpotqa.jsonl": 500, "gpt_format/hotpotqa_multimethod.jsonl": 733,
              "gpt_format/multitask.jsonl": 1344, "gpt_format/multitask_multimethod.jsonl": 2063}
    recs = {}
    for f, n in expect.items():
        recs[f] = T.read_records(FT / f)
        assert len(recs[f]) == n, f
        assert all(r["question"] and r["steps"] and any(s["action"] for s in r["steps"]) for r in recs[f])
    # the two encodings of the same data (in another order) agree (MMLU options end up in the question)
    a, g = recs["alpaca_format/multitask.json"], recs["gpt_format/multitask.jsonl"]
    key = lambda r: (r["question"], json.dumps(r["steps"]))
    assert len({key(r) for r in a} & {key(r) for r in g}) >= 0.95 * len(a)
    mmlu = [r for r in a if r["question"].endswith(r["question"].split("\n")[-1]) and "\nA. " in r["question"]]
    assert len(mmlu) > 400 and all(not r["question"].startswith("Question:") for r in mmlu)
    assert all(not s["thought"].startswith(("A. ", "B. ")) for r in mmlu for s in r["steps"])


@pytest.mark.parametrize("options", ["", OPTIONS])
def test_masks_cover_exactly_thought_action_for_each_format(tmp_path, tok, options):
    files = write_three_formats(tmp_path, QUESTION, STEPS, options)
    rendered = []
    for f in files:
        (rec,) = T.read_records(f)
        assert rec["question"] == QUESTION + ("\n" + options if options else ""), f
        ids, mask = T.render(rec["question"], rec["steps"], tok)
        rendered.append((ids, mask))
        trained = [i for i, m in zip(ids, mask) if m]
        masked = [i for i, m in zip(ids, mask) if not m]
        # trained = Thought/Action spans (the second step has no thought) + the final eos, nothing else
        want = ("Thought: I need to search Acme.\nAction: search[Acme]\n" "Action: lookup[band]\n"
                "Thought: Jo Smith joined Toto, option D.\nAction: finish[D]")
        assert tok.decode(trained[:-1]) == want and trained[-1] == tok.eos_id
        assert tok.decode(masked) == (f"Question: {QUESTION}\n" + (options + "\n" if options else "")
                                      + "Observation: Acme was founded by Jo Smith.\nJo Smith is a drummer.\n"
                                      "Observation: (Result 1 / 1) Jo Smith joined Toto.\n")
    assert rendered[0] == rendered[1] == rendered[2]     # all three formats give the same tokens and mask
    ids, mask = T.render(rec["question"], rec["steps"], tok, train_on="all")
    assert ids == rendered[0][0] and all(mask)


def test_render_for_inference_is_a_prefix_of_training(tmp_path, tok):
    ids, _ = T.render(QUESTION, STEPS, tok)
    prompt, _ = T.render(QUESTION, STEPS[:2], tok, for_inference=True)
    assert ids[:len(prompt)] == prompt and tok.decode(prompt).endswith("joined Toto.\n")
    d = make_tokenizer(tmp_path / "bos", add_bos=True)
    tb = M.load_tokenizer(d)
    ids, mask = T.render(QUESTION, STEPS, tb)
    assert ids[0] == tb.bos_id and mask[0] == 0


def test_show_mask_visualiser(tmp_path, capsys):
    files = write_three_formats(tmp_path, QUESTION, STEPS, OPTIONS)
    ckpt = make_tiny_llama(tmp_path / "m")
    T.main(["--model", str(ckpt), "--data", str(files[1]), "--show-mask", "0"])
    out = capsys.readouterr().out
    assert "[[Thought: I need to search Acme.\nAction: search[Acme]\n]]Observation: Acme" in out
    assert f"Question: {QUESTION}\n{OPTIONS}\n[[" in out and "1 records" in out


@pytest.mark.parametrize("content,err", [
    ('{"question": "q", "steps": [{"thought": "t", "action": "search[x]"}]}\n{"question": "q", "steps": [}\n',
     ":2: invalid JSON"),
    ('{"question": "q", "steps": []}\n', ":1: 'question' must be a string and 'steps' a non-empty list"),
    ('\n\n{"question": "q", "steps": [{"thought": "t"}]}\n', ":3: steps[0] has no 'action'"),
    ('{"id": "1", "question": "q", "answer": "a", "chain": []}\n', ":1: this is a question file"),
    ('{"instruction": "q", "input": "", "output": "no actions here"}\n', ":1: expected 'Thought: ...'"),
    ('{"foo": 1}\n', ":1: unknown record format"),
    ('[\n {"instruction": "q", "input": "", "output": "Action: finish[x]"},\n {"instruction": "q"\n]', ":4: invalid JSON"),
    ('[\n {"instruction": "q", "input": "", "output": "Action: finish[x]"},\n\n {"instruction": "", "output": "Action: finish[x]"}]',
     ":4: record has no question"),
])
def test_bad_data_errors_name_file_and_line(tmp_path, content, err):
    f = tmp_path / ("bad.json" if content.startswith("[") else "bad.jsonl")
    f.write_text(content)
    with pytest.raises(ValueError) as e:
        T.read_records(f)
    assert str(e.value).startswith(str(f) + ":") and err in str(e.value), str(e.value)
    with pytest.raises(ValueError) as e:                      # cli.run prints it as one line (test below)
        T.train(T.TrainConfig(data=[str(f)], progress=False))
    assert err in str(e.value)


def test_missing_default_data_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "REPO", tmp_path)
    with pytest.raises(ValueError, match="python toyworld.py"):
        T.train(T.TrainConfig(progress=False))


@pytest.mark.skipif(not FT.exists(), reason="shared FireAct data absent")
def test_length_grouped_batches_waste_and_coverage(tok):
    recs = T.read_records(FT / "gpt_format/multitask_multimethod.jsonl")
    cfg = T.TrainConfig(micro_batch=4, batch_size=16, max_len=100_000)
    ex, _, _ = T.encode_records(recs, tok, cfg)
    lengths = [len(i) for i, _ in ex]
    plan = T.plan_epoch(lengths, cfg, 0)
    flat = sorted(i for st in plan for mb in st for i in mb)
    assert flat == list(range(len(ex)))                        # every example exactly once per epoch
    assert T.padding_waste(lengths, plan) < 0.15
    assert T.plan_epoch(lengths, cfg, 1) != plan and T.plan_epoch(lengths, cfg, 0) == plan
    naive = [[list(range(i, min(i + 4, len(ex)))) for i in range(j, j + 16, 4)] for j in range(0, len(ex), 16)]
    assert T.padding_waste(lengths, plan) < T.padding_waste(lengths, naive) / 2


def test_overlong_truncate_or_skip(tok):
    recs = [{"question": "y", "steps": STEPS}, {"question": "x", "steps": STEPS[2:]},
            {"question": "q" * 80, "steps": STEPS}]               # truncation leaves nothing trained: skipped
    n = len(T.render(recs[1]["question"], recs[1]["steps"], tok)[0])
    ex, trunc, skip = T.encode_records(recs, tok, T.TrainConfig(max_len=n, overlong="truncate"))
    assert (len(ex), trunc, skip) == (2, 2, 1) and [len(i) for i, _ in ex] == [n, n]
    ex, trunc, skip = T.encode_records(recs, tok, T.TrainConfig(max_len=n, overlong="skip"))
    assert (len(ex), trunc, skip) == (1, 0, 2)


def test_cli_flags_come_from_the_dataclass(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    a.write_text(""), b.write_text("")
    cfg = T.parse_args(["--lora-r", "4", "--data", str(a), f"{b}:10", "--merge", "--no-progress",
                        "--lr", "1e-4", "--train-on", "all"])
    assert (cfg.lora_r, cfg.data, cfg.merge, cfg.progress, cfg.lr, cfg.train_on) == \
        (4, [str(a), f"{b}:10"], True, False, 1e-4, "all")
    assert T.split_spec("b.json:10") == ("b.json", 10) and T.split_spec("c:/x.json") == ("c:/x.json", None)


# ------------------------------------------------------------------------------------------------------ loss
def tiny_model(tiny):
    model, tok = M.load_model(str(tiny[0]))
    M.apply_lora(model, ("q_proj", "v_proj", "down_proj"), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():                                      # non-zero B so LoRA changes the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.train(), tok


def batch_of(tok, n=4):
    recs = [{"question": f"Question number {i}", "steps": STEPS[:1 + i % 3]} for i in range(n)]
    return T.encode_records(recs, tok, T.TrainConfig())[0]


def test_loss_equals_hand_computed_masked_ce(tiny):
    model, tok = tiny_model(tiny)
    ex = batch_of(tok)
    x, y = T.collate(ex, tok.pad_id, "cpu")
    got = T.loss_sum(model, x, y)
    logp = torch.log_softmax(model(x).float(), -1)             # full logits [B, T, V]
    want = 0.0
    for b, (ids, mask) in enumerate(ex):
        for t in range(1, len(ids)):
            if mask[t]:
                want -= logp[b, t - 1, ids[t]]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_accumulated_micro_batches_equal_one_big_batch(tiny):
    model, tok = tiny_model(tiny)
    ex = batch_of(tok, 6)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    n_sup = sum(sum(m[1:]) for _, m in ex)

    def grads(chunks):
        model.zero_grad()
        for c in chunks:
            (T.loss_sum(model, *T.collate(c, tok.pad_id, "cpu")) / n_sup).backward()
        return [p.grad.clone() for p in lora]

    big = grads([ex])
    for g1, g2 in zip(big, grads([ex[:2], ex[2:3], ex[3:]])):  # unequal micro-batches, different padding
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    model.grad_checkpointing = True                             # recompute instead of store: same gradient
    for g1, g2 in zip(big, grads([ex])):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- the loop
def test_tiny_model_overfits_a_few_trajectories(tiny, tmp_path):
    # weights with std 0.3: with std 0.02 the frozen head after RMSNorm cannot reach confident logits at all
    ckpt = make_tiny_llama(tmp_path / "m", std=0.3)
    cfg = cfg_for(tiny, tmp_path / "o", model=str(ckpt), data=[f"{tiny[1]}:3"], epochs=60, batch_size=3,
                  micro_batch=3, lr=2e-2, lora_r=16, lora_alpha=16, lora_dropout=0.0, warmup=5)
    out = T.train(cfg)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 60 and losses[0] > 5 and losses[-1] < 0.1, losses[::10]
    assert {"lr", "tok_s", "sup_tok_s", "tokens", "sup_tokens", "grad_norm"} <= set(rows[0])
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()


def test_resume_equals_uninterrupted(tiny, tmp_path):
    full = T.train(cfg_for(tiny, tmp_path / "full", save_every=2))
    part = cfg_for(tiny, tmp_path / "part", stop_after=3, save_every=2)
    T.train(part)
    assert json.loads((tmp_path / "part/metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    T.train(cfg_for(tiny, tmp_path / "part", resume=True, save_every=2))
    a = load_file(full / "adapter_model.safetensors")
    b = load_file(tmp_path / "part/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(l)["loss"] for l in (full / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "part/metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 4
    assert (tmp_path / "part/checkpoints/step_000002/adapter_model.safetensors").exists()


def test_ddp_two_gloo_processes_equal_one(tiny, tmp_path):
    args = ["--model", str(tiny[0]), "--data", str(tiny[1]), "--val-frac", "0", "--batch-size", "4",
            "--micro-batch", "2", "--epochs", "2", "--lr", "5e-3", "--lora-r", "4", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "train.py", *args, "--out", str(tmp_path / "one")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *args, "--out", str(tmp_path / "two")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 process(es)" in two.stdout and two.stdout.count("adapter:") == 1   # only rank 0 logs and saves
    la = [json.loads(l)["loss"] for l in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-4, atol=1e-5)
    a = load_file(tmp_path / "one/adapter_model.safetensors")
    b = load_file(tmp_path / "two/adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_peft_and_transformers_load_adapter_and_merged_checkpoint(tiny, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    out = T.train(cfg_for(tiny, tmp_path / "o", merge=True, lora_targets="q_proj,v_proj,gate_proj"))
    ours, tok = M.load_model(str(tiny[0]))
    M.load_adapter(ours, out)
    assert any(p.abs().sum() > 0 for n, p in ours.named_parameters() if "lora_B" in n)
    x = torch.tensor([tok.encode("Question: Who founded company 3?\nThought: I need to search")])
    with torch.no_grad():
        want = ours.eval()(x)
        peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny[0]), str(out)).eval()
        torch.testing.assert_close(peft(x).logits, want, rtol=1e-4, atol=1e-4)
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        torch.testing.assert_close(merged(x).logits, want, rtol=1e-4, atol=1e-4)
        base = LlamaForCausalLM.from_pretrained(tiny[0]).eval()
        assert not torch.allclose(base(x).logits, want, atol=1e-4)    # the adapter did change the model

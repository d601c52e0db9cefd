"""Tests for train.py on tiny random Llamas (dim 64, 2 layers): data readers, masks, loss, accumulation,
overfitting, resume, DDP, PEFT/transformers interop, errors.

    python -m pytest -q -x tests/test_train.py
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import make_tiny_llama, make_tokenizer

from common import cli
from fast import cpu as FC
import model as M
import tasks
import train as T
from fireact import is_finish

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


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


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
        recs[f] = tasks.read_records(FT / f)
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
        (rec,) = tasks.read_records(f)
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
        tasks.read_records(f)
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
    recs = tasks.read_records(FT / "gpt_format/multitask_multimethod.jsonl")
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


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_loss_compiles_by_region_and_matches_eager(tiny):
    """--compile: each block one graph that serves every layer (two: the first block's input needs no grad), the
    head + cross-entropy one more; no graph break (SDPA's is_causal once broke every block at a symbolic T > 1),
    and no recompile when the batch shape changes. Same loss and LoRA gradients as eager."""
    from torch._dynamo.utils import counters
    model, tok = tiny_model(tiny)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    batches = [T.collate(batch_of(tok, n), tok.pad_id, "cpu") for n in (4, 3, 2)]  # three batch shapes

    def run(loss):
        model.zero_grad()
        loss(model, *batches[0]).backward()
        return loss(model, *batches[0]).detach(), [p.grad.clone() for p in lora]

    want = run(T.loss_sum)
    torch._dynamo.reset()
    counters.clear()
    from fast import training as FT
    loss = FT.compile_loss(model, T.loss_sum, T.head_loss)              # what train.py --compile steps with
    got = run(loss)
    for x, y in batches[1:]:
        loss(model, x, y).backward()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-4)
    for g1, g2 in zip(got[1], want[1]):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 3 and not counters["graph_break"], (dict(counters["stats"]), dict(counters["graph_break"]))
    torch._dynamo.reset()


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
    meta = json.loads((out / "adapter_config.json").read_text())["fireact"]  # what eval follows (template, tool)
    tools = tasks.read_records(tiny[1])[:3]
    assert meta["template"] == "react" and sum(meta["data_tools"].values()) == 3
    assert set(meta["data_tools"]) == {r.get("tool", "?") for r in tools}


def test_bf16_base_on_cpu_trains_fp32_lora_and_follows_fp32(tiny, tmp_path, capsys, monkeypatch):
    """--dtype bfloat16 (an option on CPU: fast where it is native): the frozen base in bf16 under autocast, the
    LoRA weights and their updates fp32; the losses follow the fp32 run's within bf16 rounding."""
    kw = dict(epochs=3, lr=2e-2, lora_dropout=0.0, save_every=1)
    ref = T.train(cfg_for(tiny, tmp_path / "fp32", dtype="float32", **kw))
    out = T.train(cfg_for(tiny, tmp_path / "bf16", dtype="bfloat16", **kw))
    log = capsys.readouterr().out
    assert "training path: bf16" in log and ("EMULATED" in log) != FC.native_bf16()
    losses = [[json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines() if "loss" in l]
              for d in (ref, out)]
    assert len(losses[1]) == len(losses[0]) == 6 and losses[1][-1] < losses[1][0] - 0.2
    assert all(abs(a - b) < 0.05 * a for a, b in zip(*losses)), losses
    lora = load_file(out / "adapter_model.safetensors")
    assert lora and all(t.dtype == torch.float32 for t in lora.values())
    want = load_file(ref / "adapter_model.safetensors")
    cos = [F.cosine_similarity(lora[k].flatten(), want[k].flatten(), 0) for k in want if "lora_B" in k]
    assert min(cos) > 0.9, cos
    monkeypatch.setattr(FC, "native_bf16", lambda info=None: True)      # training on a CPU with native bf16:
    assert FC.best_dtype("", "cpu", train=True) == torch.bfloat16        # a bf16 base (dev chose it, docs)
    assert FC.best_dtype("", "cpu") == torch.bfloat16                    # and eval/ask/serve decode in bf16 (gate, docs)
    assert M.pick_dtype("", "cpu") == torch.float32                      # and so does --plain (model.pick_dtype)
    assert FC.best_dtype("float32", "cpu", train=True) == torch.float32  # a named dtype wins
    monkeypatch.setattr(FC, "native_bf16", lambda info=None: False)     # emulated bf16: fp32 trains
    assert FC.best_dtype("", "cpu", train=True) == FC.best_dtype("", "cpu") == torch.float32
    assert M.pick_dtype("", "cuda") == torch.bfloat16 and M.pick_dtype("float32", "cuda") == torch.float32
    with pytest.raises(ValueError, match="--dtype 'half'"):
        M.pick_dtype("half", "cpu")


@pytest.mark.skipif(not (FC.native_bf16() and FC.cpu_info()["vnni"]), reason="--quant int8 needs VNNI and native bf16")
def test_int8_frozen_matmuls_train_and_follow_the_bf16_run(tiny, tmp_path, capsys):
    """--quant int8: the frozen linears' GEMMs in int8 after calibrating the smoothing on the first micro-batches;
    the losses follow the bf16 run's (the same base) within quantization noise, and the adapter is a plain one."""
    kw = dict(epochs=3, lr=2e-2, lora_dropout=0.0, dtype="bfloat16", device="cpu")
    ref = T.train(cfg_for(tiny, tmp_path / "bf16", **kw))
    out = T.train(cfg_for(tiny, tmp_path / "int8", quant="int8", calib_batches=2, **kw))
    log = capsys.readouterr().out
    assert "frozen matmuls as int8 GEMMs" in log and "smoothed on 2 micro-batches" in log
    losses = [[json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines() if "loss" in l]
              for d in (ref, out)]
    assert len(losses[1]) == 6 and losses[1][-1] < losses[1][0] - 0.2
    assert all(abs(a - b) < 0.05 * a for a, b in zip(*losses)), losses
    assert losses[0] != losses[1]                                        # the int8 path did run
    assert json.loads((out / "config.json").read_text())["quant"] == "int8"
    assert set(load_file(out / "adapter_model.safetensors")) == set(load_file(ref / "adapter_model.safetensors"))


def test_int8_is_refused_where_it_cannot_run(tiny, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--quant int8 quantizes the frozen weights: it goes with LoRA, not --full"):
        T.train(cfg_for(tiny, tmp_path / "full", quant="int8", full=True))
    with pytest.raises(ValueError, match=r"--quant int8: for a CPU with VNNI and native bf16.*base torch.float32"):
        T.train(cfg_for(tiny, tmp_path / "fp32", quant="int8", dtype="float32", device="cpu"))
    info = FC.cpu_info()
    monkeypatch.setattr(FC, "native_bf16", lambda info=None: True)
    monkeypatch.setattr(FC, "cpu_info", lambda: {**info, "vnni": False})
    with pytest.raises(ValueError, match="--quant int8: for a CPU with VNNI"):
        T.train(cfg_for(tiny, tmp_path / "novnni", quant="int8", dtype="bfloat16", device="cpu"))
    assert not any((tmp_path / d).exists() for d in ("full", "fp32", "novnni"))


def test_plain_path_agrees_with_the_fast_path_and_imports_no_fast_module(tiny, tmp_path):
    """--plain is the teaching path end to end (model.pick_dtype: fp32 on CPU; eager; no fast/* module imported).
    Stated tolerances, per-step training loss: in fp32 (--dtype float32, dropout off) the fast path computes the
    same thing (its attention kernel and int8 are bf16-only): equal to rtol 1e-5 (bitwise here), and the adapters
    too. The default path (a bf16 frozen base where the CPU has native bf16, else fp32 = plain) follows the plain
    fp32 run within bf16 rounding: 5% of the loss per step, the --dtype bfloat16 test's tolerance."""
    args = ["--model", str(tiny[0]), "--data", str(tiny[1]), "--val-frac", "0", "--batch-size", "4",
            "--micro-batch", "2", "--epochs", "2", "--lr", "5e-3", "--lora-r", "4", "--lora-alpha", "8", "--warmup",
            "2", "--no-progress"]
    code = ("import sys, train; train.main(sys.argv[1:]); "
            "print('fast modules:', sorted(m for m in sys.modules if m.split('.')[0] == 'fast'))")
    r = subprocess.run([sys.executable, "-c", code, *args, "--plain", "--out", str(tmp_path / "plain")], cwd=REPO,
                       capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fast modules: []" in r.stdout and "(--plain)" in r.stdout and "cpu fp32" in r.stdout, r.stdout[-2000:]
    T.main([*args, "--dtype", "float32", "--out", str(tmp_path / "fast32")])
    T.main([*args, "--out", str(tmp_path / "default")])
    losses = {d: [json.loads(l)["loss"] for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("plain", "fast32", "default")}
    assert len(losses["plain"]) == 4 and losses["plain"][-1] < losses["plain"][0]
    torch.testing.assert_close(torch.tensor(losses["fast32"]), torch.tensor(losses["plain"]), rtol=1e-5, atol=0)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "fast32"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    assert all(abs(x - y) < 0.05 * y for x, y in zip(losses["default"], losses["plain"])), losses


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
    for attempt in range(2):
        # one retry, only when a rank died by a signal: in two full suites (sessions apart) a gloo rank aborted
        # (SIGABRT) on this busy 2-core machine and passed on every rerun; a wrong result or a Python error in
        # train.py (a traceback through it) fails the first time
        shutil.rmtree(tmp_path / "two", ignore_errors=True)
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "train.py", *args, "--out", str(tmp_path / "two")], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
        if two.returncode == 0 or "Signal " not in two.stderr or 'train.py", line' in two.stderr:
            break
        print(f"DDP attempt {attempt + 1}: a rank died by a signal; retrying once:\n{two.stderr[-1500:]}")
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
    out = T.train(cfg_for(tiny, tmp_path / "o", merge=True, lora_targets="q_proj,v_proj,gate_proj",
                          dtype="float32"))  # the merged checkpoint keeps the base's dtype: fp32 compares at 1e-4
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


# ------------------------------------------------------------------- CLI: settings, errors, resume checks, records
def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_one_line_error(code, err, got_code, *words):
    """Exit code `code`, exactly one line on stderr (`train.py: error: ...`), no traceback, the key words in it."""
    lines = [l for l in err.splitlines() if l.strip()]
    assert got_code == code and "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert lines[0].split(": error: ")[0].endswith(".py") and all(w in lines[0] for w in words), lines[0]


def test_help_shows_every_setting_with_help_default_and_choices(capsys):
    with pytest.raises(SystemExit) as e:
        T.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    helps = cli.field_help(T.TrainConfig)
    for f in dataclasses.fields(T.TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert f.name in helps and flag in out, f.name                   # every setting says what it is for
        assert " ".join(helps[f.name].split()[:4]) in out, f.name
    assert out.count("(default: ") == len(dataclasses.fields(T.TrainConfig))
    for choices in ("{actions,all}", "{truncate,skip}", "{default,fireact}", "{react,alpaca}"):
        assert choices in out
    assert "0 = by model size: 2e-3 up to 1B parameters" in out


@pytest.mark.parametrize("args,words", [
    (["--max-steps", "-3"], ["--max-steps -3: must be >= 0"]),
    (["--save-every", "0"], ["--save-every 0"]), (["--eval-every", "0"], ["--eval-every 0"]),
    (["--lora-r", "0"], ["--lora-r 0"]), (["--lora-alpha", "0"], ["--lora-alpha 0"]),
    (["--lora-dropout", "1"], ["--lora-dropout 1.0", "[0, 1)"]), (["--lr", "-0.001"], ["--lr -0.001"]),
    (["--epochs", "-1"], ["--epochs -1"]), (["--batch-size", "-4"], ["--batch-size -4"]),
    (["--micro-batch", "-1"], ["--micro-batch -1"]), (["--val-frac", "1"], ["--val-frac 1.0"]),
    (["--max-len", "8"], ["--max-len 8", ">= 16"]), (["--warmup", "-1"], ["--warmup -1"]),
    (["--batch-size", "6", "--micro-batch", "4"], ["multiple of --micro-batch 4"]),
    (["--train-on", "observations"], ["invalid choice: 'observations'", "'actions', 'all'"]),
    (["--overlong", "cut"], ["'truncate', 'skip'"]), (["--recipe", "alpaca"], ["'default', 'fireact'"]),
    (["--template", "chatml"], ["'react', 'alpaca'"]), (["--lora-targets", "q_proj,wq"], ["--lora-targets", "k_proj"]),
    (["--device", "tpu"], ["--device tpu"]), (["--data", "{tmp}"], ["not a file"]),
    (["--data", "{tmp}/none.jsonl"], ["none.jsonl: no such file"]),
    (["--val-data", "{tmp}/v.jsonl"], ["--val-data", "v.jsonl: no such file"]),
    (["--data", "{data}:0"], ["N >= 1"]), (["--out", "{data}"], ["is a file"]),
    (["--resume", "--out", "{tmp}/o"], ["--resume: no", "state.pt"]),
    (["--plain", "--compile"], ["--plain", "no --compile"]), (["--plain", "--quant", "int8"], ["--plain", "no --quant"]),
])
def test_bad_settings_are_one_line_errors_before_anything_loads(tiny, tmp_path, capsys, args, words):
    args = [a.format(tmp=tmp_path, data=tiny[1]) for a in args]
    with pytest.raises(SystemExit) as e:
        T.parse_args(["--data", str(tiny[1]), *args])
    assert_one_line_error(2, capsys.readouterr().err, e.value.code, *words)


def test_compile_without_a_cxx_compiler_is_one_line_before_anything_loads(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    cfg = T.parse_args(["--model", str(tiny[0]), "--data", str(tiny[1]), "--out", str(tmp_path / "o"), "--compile",
                        "--device", "cpu"])
    with pytest.raises(ValueError, match=r"^--compile: torch.compile on CPU needs a C\+\+ compiler "
                                         r"\(no-such-c\+\+-compiler not found"):
        T.train(cfg)
    assert not (tmp_path / "o").exists()


def test_negative_max_steps_writes_nothing_and_help_exits_0(tiny, tmp_path):
    r = run_cli("--model", tiny[0], "--data", tiny[1], "--out", tmp_path / "o", "--max-steps", "-3")
    assert_one_line_error(2, r.stderr, r.returncode, "--max-steps -3: must be >= 0")
    assert not (tmp_path / "o").exists()                     # no untrained adapter
    r = run_cli("--help")
    assert r.returncode == 0 and "--recipe {default,fireact}" in r.stdout and not r.stderr


@pytest.mark.parametrize("case", ["not-utf8", "model-dir-without-weights"])
def test_load_errors_are_one_line_via_the_cli(tiny, tmp_path, case):
    data, model = tiny[1], tiny[0]
    if case == "not-utf8":
        data = tmp_path / "latin1.jsonl"
        data.write_bytes(json.dumps({"question": "café?", "steps": [{"action": "finish[x]"}]}).encode("latin-1")
                         .replace(b"\\u00e9", b"\xe9") + b"\n")
        words = ["latin1.jsonl: not UTF-8"]
    else:
        model = tmp_path / "m"
        model.mkdir()
        words = [f"--model {model}: cannot load it", "config.json"]
    r = run_cli("--model", model, "--data", data, "--out", tmp_path / "o", "--no-progress")
    assert_one_line_error(1, r.stderr, r.returncode, *words)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content,words", [
    ('{"question": "q", "steps": [{"thought": 5, "action": "finish[x]"}]}\n', [":1: steps[0].thought", "5"]),
    ('{"question": "q", "steps": [{"action": "finish[x]", "observation": ["a"]}]}\n', ["steps[0].observation"]),
    ('{"instruction": 7, "output": "Action: finish[x]"}\n', ["wrong type"]),
    ("\n\n", ["no records"]),
])
def test_bad_records_name_the_file(tmp_path, content, words):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError) as e:
        T.main(["--data", str(f), "--out", str(tmp_path / "o"), "--no-progress"])
    assert str(e.value).startswith(str(f)) and all(w in str(e.value) for w in words), str(e.value)


@pytest.fixture(scope="module")
def partial(tiny, tmp_path_factory):
    """A run interrupted after 3 of its 4 steps (state saved at step 2 and 3). Copy it before changing it."""
    out = tmp_path_factory.mktemp("partial") / "run"
    T.train(cfg_for(tiny, out, stop_after=3, save_every=2))
    return out


def copy_run(partial, tmp_path):
    return Path(shutil.copytree(partial, tmp_path / "run"))


def test_run_dir_records_config_and_provenance(partial, tmp_path, capsys):
    run = copy_run(partial, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    assert set(cfg) == {f.name for f in dataclasses.fields(T.TrainConfig)}
    assert (cfg["lr"], cfg["micro_batch"], cfg["template"], cfg["recipe"], cfg["resume"]) == \
        (5e-3, 2, "react", "default", False)
    T.main(["--config", str(run / "config.json"), "--out", str(run), "--resume"])   # the saved settings resume
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    sessions = json.loads((run / "run.json").read_text())["sessions"]
    assert [s["start_step"] for s in sessions] == [0, 3] and sessions[1]["torch"] == torch.__version__
    assert sessions[0]["device"] == "cpu" and "git_commit" in sessions[0] and "python" in sessions[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert sessions[0]["git_commit"] == head.stdout.strip()
    assert "settings: --recipe default: lr 0.005, LoRA r=4 alpha 8" in capsys.readouterr().out


def test_resume_refuses_changed_settings_and_keeps_the_run(partial, tmp_path):
    run = copy_run(partial, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    r = run_cli("--config", run / "config.json", "--resume", "--lr", "0.001", "--lora-r", "8", "--no-progress")
    assert_one_line_error(1, r.stderr, r.returncode, "config.json has other settings", "lr 0.005 -> 0.001",
                          "lora_r 4 -> 8", "new --out")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before   # nothing rewritten


def test_resume_from_another_lora_shape_says_so(partial, tmp_path, tiny):
    run = copy_run(partial, tmp_path)
    (run / "config.json").unlink()                            # a run from before config.json: state.pt decides
    with pytest.raises(ValueError, match=r"state.pt: made for another model or LoRA shape \(.*lora_A: saved "
                                         r"\(4, 64\), now \(8, 64\)\)"):
        T.train(cfg_for(tiny, run, resume=True, lora_r=8))


def test_corrupt_metrics_line_torn_tail_cut_middle_refused(partial, tmp_path, tiny, capsys):
    run = copy_run(partial, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n{\"step\": 2, \"lo\n" + lines[2] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: corrupt metrics line"):
        T.train(cfg_for(tiny, run, resume=True))
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "loss": 0.1')   # a crash mid-append
    T.train(cfg_for(tiny, run, resume=True))
    assert "metrics.jsonl:4: cut off a torn last line" in capsys.readouterr().err
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_state_is_flushed_before_it_replaces_the_old_one(tiny, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def crashing_save(obj, f, *a, **k):                       # the second save dies half-way through writing
        calls.append(obj["step"])
        if len(calls) == 2:
            f.write(b"PK\x03\x04 half a zip")
            raise OSError("No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="No space left"):
        T.train(cfg_for(tiny, tmp_path / "o", max_steps=3, save_every=1))
    st = torch.load(tmp_path / "o/state.pt", weights_only=True)
    assert calls == [1, 2] and st["step"] == 1                # the old state survives, complete
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.endswith(".tmp")]


def test_recipes_and_lr_by_model_size(tiny, tmp_path, monkeypatch, capsys):
    cfg = T.apply_recipe(T.parse_args(["--data", str(tiny[1]), "--recipe", "fireact", "--lora-r", "4"]))
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.lr, cfg.max_len, cfg.train_on,
            cfg.template) == (4, 16, 0.05, "q_proj,v_proj", 3e-4, 512, "all", "alpaca")   # explicit flags win
    cfg = T.apply_recipe(T.parse_args(["--data", str(tiny[1]), "--recipe", "fireact", "--lora-r", "16"]))
    assert cfg.lora_r == 16                                   # explicit even when equal to the default
    assert T.apply_recipe(T.TrainConfig(recipe="fireact", max_len=300)).max_len == 300   # in code: non-defaults win
    assert T.apply_recipe(T.parse_args(["--data", str(tiny[1])])) == T.TrainConfig(data=[str(tiny[1])])
    assert (T.default_lr(135e6), T.default_lr(1e9), T.default_lr(7e9)) == (2e-3, 2e-3, 3e-4)

    templates, render = [], T.render
    monkeypatch.setattr(T, "render", lambda *a, template="react", **k: templates.append(template) or render(*a, **k))
    T.main(["--model", str(tiny[0]), "--data", str(tiny[1]), "--out", str(tmp_path / "f"), "--recipe", "fireact",
            "--max-steps", "1", "--micro-batch", "2", "--no-progress"])
    saved = json.loads((tmp_path / "f/config.json").read_text())
    assert (saved["template"], saved["train_on"], saved["lr"], saved["lora_r"]) == ("alpaca", "all", 3e-4, 8)
    assert set(templates) == {"alpaca"}                       # the renderer was asked for FireAct's template
    T.main(["--model", str(tiny[0]), "--data", str(tiny[1]), "--out", str(tmp_path / "d"), "--max-steps", "1",
            "--micro-batch", "2", "--no-progress"])
    assert "lr 0.002 (by model size: 0.1M parameters)" in capsys.readouterr().out
    assert json.loads((tmp_path / "d/config.json").read_text())["lr"] == 2e-3


def test_full_fine_tuning_trains_every_weight_saves_a_loadable_model_and_resumes(tiny, tmp_path):
    """--full: no LoRA, every weight moves; OUT/model is a checkpoint load_model reads back (same logits as the
    trained model), with the adapter card's record of what made it; and resume is exact here too."""
    ckpt = make_tiny_llama(tmp_path / "m", std=0.3)
    cfg = cfg_for(tiny, tmp_path / "o", model=str(ckpt), data=[f"{tiny[1]}:3"], epochs=20, batch_size=3,
                  micro_batch=3, lr=3e-3, full=True, warmup=2)
    out = T.train(cfg)
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] / 4, losses
    assert not (out / "adapter_config.json").exists() and (out / "model" / "model.safetensors").exists()
    before, _ = M.load_model(str(ckpt))
    after, tok = M.load_model(str(out / "model"))
    assert not any("lora_" in n for n, _ in after.named_parameters())
    moved = [n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()) if not torch.equal(a, b)]
    assert len(moved) == len(list(before.parameters()))  # norms, embeddings and every projection
    meta = json.loads((out / "model" / "fireact.json").read_text())
    assert meta["config"]["full"] and meta["template"] == "react" and meta["step"] == 20
    # the saved model is the trained one: a training record's loss is far below the base model's
    (ids, mask), = T.encode_records(tasks.read_records(tiny[1])[:1], tok, cfg)[0]
    x, y = T.collate([(ids, mask)], tok.pad_id, torch.device("cpu"))
    with torch.no_grad():
        l_after, l_before = T.loss_sum(after, x, y), T.loss_sum(before, x, y)
    assert l_after < l_before / 4, (l_after, l_before)
    part = cfg_for(tiny, tmp_path / "p", model=str(ckpt), data=[f"{tiny[1]}:3"], epochs=4, batch_size=3,
                   micro_batch=3, lr=3e-3, full=True, warmup=2, save_every=2)
    T.train(dataclasses.replace(part, stop_after=2))
    T.train(dataclasses.replace(part, resume=True))
    whole = T.train(dataclasses.replace(part, out=str(tmp_path / "w")))
    a, b = load_file(tmp_path / "p/model/model.safetensors"), load_file(whole / "model/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_refused_finish_is_an_ordinary_step_for_the_prompt_and_for_training(tok):
    """The tool refuses "finish[a [b]" (unbalanced: not a finish to it), so the episode goes on; the next turn's
    prompt must render that history (an eval died on it), and so must training data (a filtered teacher episode
    that recovered from it stopped train.py), while a step after a real finish is still refused."""
    steps = [dict(thought="I know it.", action="finish[Paris [France]", observation="Invalid action: finish[Paris [France]"),
             dict(thought="Look.", action="search[Paris]", observation="Paris is the capital of France."),
             dict(thought="Again.", action="finish[Paris]", observation="Episode finished.")]
    prompt, _ = T.render(QUESTION, steps[:2], tok, for_inference=True)  # the third turn's prompt
    text = tok.decode(prompt)
    assert "Action: finish[Paris [France]\nObservation: Invalid action" in text and text.endswith("of France.\n")
    ids, mask = T.render(QUESTION, steps, tok)                           # the whole episode, as the agent saw it
    assert tok.decode(ids).startswith(text) and ids[-1] == tok.eos_id and mask[-1] == 1
    assert is_finish("Finish[Paris] ") and not is_finish(steps[0]["action"]) and not is_finish("finish Paris")
    with pytest.raises(ValueError, match="step 1 of 2 is a finish"):
        T.render(QUESTION, [dict(steps[2]), steps[1]], tok)

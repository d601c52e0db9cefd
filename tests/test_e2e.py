"""The whole pipeline, offline: a loopback OpenAI-style server with canned teacher replies and the offline corpus
tool -> generate (ReAct + CoT) -> filter -> mix -> train a tiny model a few steps -> eval (+ --compare) -> score.
Also: batched local evaluation gives the same episodes as one at a time (with and without the prefix cache); the
toy demo's path with the oracle teacher on a tiny model.

    python -m pytest -q tests/test_e2e.py
"""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import fireact
from conftest import send_json

REPO = Path(__file__).resolve().parent.parent

# Four HotpotQA-format questions with their context paragraphs (the offline subset's layout).
CONTEXT = [["Atacama Desert", ["The Atacama Desert is a desert plateau in the north of Chile."]],
           ["Santiago", ["Santiago is the capital of Chile.", "The Mapocho River crosses the city."]],
           ["Gustav Holst", ["Gustav Holst (born 1874) was an English composer of The Planets."]],
           ["Estadio Centenario", ["The Estadio Centenario is a stadium in Montevideo.", "It seats 60,235."]]]
QUESTIONS = [("Which river crosses the capital of the country of the Atacama Desert?", "Mapocho River"),
             ("In which year was the composer of The Planets born?", "1874"),
             ("How many seats does the Estadio Centenario have?", "60,235"),
             ("Who composed The Planets?", "Gustav Holst")]
REACT = {  # question -> teacher reply per turn (turn = Observation lines so far)
    QUESTIONS[0][0]: ["Thought: I need the country of the desert.\nAction: search[Atacama Desert]",
                      "Thought: Chile; its capital is Santiago.\nAction: search[Santiago]",
                      "Thought: Find the river.\nAction: lookup[river]\nObservation: invented",
                      "Thought: The Mapocho.\nAction: finish[Mapocho River]"],
    QUESTIONS[1][0]: ["Thought: Holst wrote The Planets.\nAction: search[Gustav Holst]",
                      "Thought: Born 1874.\nAction: finish[1874]"],
    QUESTIONS[2][0]: ["Thought: Search the stadium.\nAction: search[Estadio Centenario]",
                      "Thought: I only see the city.\nAction: finish[Montevideo]"],  # wrong: filtered out
    QUESTIONS[3][0]: ["Thought: I know this.\nAction: finish[Gustav Holst]"],
}
COT = {q: [f"Thought: Let me think.\nAnswer: {a if i % 2 else 'unknown'}"] for i, (q, a) in enumerate(QUESTIONS)}


class CannedOpenAI(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: the reply for the prompt's question and turn; the model name picks the script."""
    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        q = re.findall(r"^Question: (.*)$", prompt, re.M)[-1]
        turn = prompt.split(f"Question: {q}")[-1].count("\nObservation:")
        script = (COT if body["model"] == "canned-cot" else REACT)[q]
        CannedOpenAI.requests.append(dict(path=self.path, stop=body.get("stop"), auth=self.headers.get("Authorization")))
        text = script[min(turn, len(script) - 1)]
        send_json(self, 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                           "finish_reason": "stop"}],
                              "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text) // 4}})

    def log_message(self, *a):
        pass


@pytest.fixture
def world(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "hotpotqa").mkdir(parents=True)
    rows = [dict(question=q, answer=a, dev_index=i, context=CONTEXT) for i, (q, a) in enumerate(QUESTIONS)]
    (data / "hotpotqa" / "dev_distractor.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("FIREACT_DATA", str(data))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-never-written")
    monkeypatch.setenv("FIREACT_CACHE", str(tmp_path / "cache"))   # files.cache_dir(): the teacher cache lives there
    server = ThreadingHTTPServer(("127.0.0.1", 0), CannedOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_pipeline_generate_filter_mix_train_eval(world, tiny_llama, capsys):
    import train
    tmp, url = world
    runs = tmp / "runs"
    for method, model in (("react", "canned-react"), ("cot", "canned-cot")):
        fireact.main(["generate", "--task", "hotpotqa_offline", "--split", "dev", "--allow-eval-split", "--method",
                      method, "--teacher-model", model, "--base-url", url, "--out", str(runs / f"{method}.jsonl"), "--workers", "2"])
    react = [json.loads(line) for line in (runs / "react.jsonl").read_text().splitlines()]
    assert len(react) == 4 and sum(r["em"] for r in react) == 3
    (a,) = [r for r in react if r["answer"] == "Mapocho River"]
    assert [s["action"] for s in a["steps"]] == ["search[Atacama Desert]", "search[Santiago]", "lookup[river]",
                                                "finish[Mapocho River]"]
    assert a["steps"][2]["observation"] == "(Result 1 / 1) The Mapocho River crosses the city."
    assert all(r["stop"] == ["\nObservation:"] and r["path"] == "/v1/chat/completions" for r in CannedOpenAI.requests)
    assert CannedOpenAI.requests[0]["auth"] == "Bearer sk-test-never-written"
    out = capsys.readouterr().out
    assert "tokens:" in out and "sk-test" not in out
    assert not any("sk-test" in p.read_text() for p in tmp.rglob("*") if p.is_file() and p.suffix != ".sqlite")

    # the same loop evaluates an API model (few-shot, concurrent requests)
    fireact.main(["eval", "--task", "hotpotqa_offline", "--teacher-model", "canned-react", "--base-url", url,
                  "--out", str(runs / "teacher_eval.json")])
    summary = json.loads((runs / "teacher_eval.summary.json").read_text())
    assert (summary["n"], summary["em"], summary["finish_rate"]) == (4, 75.0, 100.0)
    assert summary["mean_steps"] == (4 + 2 + 2 + 1) / 4

    # filter keeps right answers; mix takes K tasks x M methods
    for method in ("react", "cot"):
        fireact.main(["filter", str(runs / f"{method}.jsonl"), "--out", str(runs / f"{method}_ok.jsonl")])
    counts = fireact.mix(fireact.MixConfig(files=[str(runs / "react_ok.jsonl"), str(runs / "cot_ok.jsonl")],
                                           out=str(runs / "train.jsonl")))
    assert dict(counts) == {("hotpotqa_offline", "react"): 3, ("hotpotqa_offline", "cot"): 2}
    ratio = fireact.mix(fireact.MixConfig(files=[str(runs / "react_ok.jsonl"), str(runs / "cot_ok.jsonl")],
                                          per_method=["react=2", "cot=0"], out=str(runs / "ratio.jsonl")))
    assert dict(ratio) == {("hotpotqa_offline", "react"): 2, ("hotpotqa_offline", "cot"): 0}
    with pytest.raises(ValueError, match="react=x.*METHOD=N"):
        fireact.mix(fireact.MixConfig(files=[str(runs / "react_ok.jsonl")], per_method=["react=x"]))
    mixed = fireact.read_records(str(runs / "train.jsonl"))
    assert len(mixed) == 5 and all(r["steps"][-1]["action"].startswith("finish[") for r in mixed)

    # train a tiny model a few steps, then evaluate prompted vs fine-tuned on the offline corpus tool
    lora = train.train(train.TrainConfig(model=str(tiny_llama), data=[str(runs / "train.jsonl")], out=str(tmp / "lora"),
                                         max_steps=2, batch_size=2, micro_batch=2, val_frac=0.0,
                                         progress=False, lora_r=4, lora_alpha=8))
    assert (Path(lora) / "adapter_config.json").exists()
    fireact.main(["eval", "--task", "hotpotqa_offline", "--model", str(tiny_llama), "--adapter", str(lora),
                  "--n", "3", "--max-steps", "2", "--max-new-tokens", "6", "--out", str(runs / "eval.json"),
                  "--compare"])
    table = capsys.readouterr().out
    assert re.search(r"^prompted\s+3\s", table, re.M) and re.search(r"^fine-tuned\s+3\s", table, re.M)
    for label in ("prompted", "fine-tuned"):
        res = json.loads((runs / f"eval_{label}.json").read_text())
        summary = json.loads((runs / f"eval_{label}.summary.json").read_text())
        assert sorted(res) == ["0", "1", "2"]
        assert set(res["0"]) >= {"reward", "em", "f1", "gt", "pred", "prompt", "traj"}
        assert res["0"]["traj"].startswith(f"Question: {QUESTIONS[0][0]}\n")
        assert set(summary) >= {"em", "f1", "mean_steps", "finish_rate", "wall_s", "tokens"} and summary["n"] == 3
        assert 1 <= summary["mean_steps"] <= 3 and summary["tokens"]["completion_tokens"] > 0
        (scored,) = fireact.score(fireact.ScoreConfig(files=[str(runs / f"eval_{label}.json")]))
        assert scored["n"] == 3 and abs(scored["em"] - summary["em"]) < 1e-9
    # the same eval decoding through 4-bit layer weights: said on stderr, recorded in the summary
    from fast import cpu, linear
    if linear.INT4:
        fireact.main(["eval", "--task", "hotpotqa_offline", "--model", str(tiny_llama), "--adapter", str(lora),
                      "--n", "3", "--max-steps", "2", "--max-new-tokens", "6", "--out", str(runs / "q4.json"),
                      "--quant", "int4"])
        assert "quant: int4, relative RMS error of the layers' weights" in capsys.readouterr().err
        q4 = json.loads((runs / "q4.summary.json").read_text())
        assert q4["n"] == 3 and q4["quant"] == "int4" and q4["config"]["quant"] == "int4"
        assert q4["adapter_merged"] is False                # 4-bit weights would round the LoRA away
    # and in bf16: the CPU and the path chosen said on stderr (emulated where the CPU has no native bf16)
    fireact.main(["eval", "--task", "hotpotqa_offline", "--model", str(tiny_llama), "--adapter", str(lora),
                  "--n", "3", "--max-steps", "2", "--max-new-tokens", "6", "--out", str(runs / "bf16.json"),
                  "--dtype", "bfloat16"])
    err = capsys.readouterr().err
    assert re.search(r"^cpu: .*path: bf16", err, re.M) and ("EMULATED" in err) != cpu.native_bf16()
    bf = json.loads((runs / "bf16.summary.json").read_text())
    assert bf["n"] == 3 and bf["dtype"] == "bfloat16"
    assert summary["dtype"] == ("bfloat16" if cpu.native_bf16() else "float32")  # "" resolved by the CPU's policy
    assert summary["adapter_merged"] is True   # fine-tuned evals run W + BA as one weight


def test_batched_local_eval_equals_one_at_a_time(world, tiny_llama):
    import fast
    import model as M
    net, tok = M.load_model(str(tiny_llama))
    import tasks   # the task registry (questions, tools): tasks.py
    qs = tasks.load_questions("hotpotqa_offline")
    tool = tasks.make_tool("hotpotqa_offline")
    prompt_fn = fireact.zero_shot(tok)  # (the few-shot path runs in the pipeline test's --compare)
    def run(batch, mb=0):  # greedy only; mb > 0: K/V kept between turns (the fast path's prefix cache)
        llm = fireact.LocalLLM(net, tok, fast.for_inference(net, prefix_cache_mb=mb), max_new_tokens=10)
        return fireact.run_agent(llm, [tool.fork() for _ in batch], batch, prompt_fn, max_steps=2, retries=0), llm
    batched, _ = run(qs)
    single = [run([q])[0][0] for q in qs]
    assert [(e.steps, e.pred) for e in batched] == [(e.steps, e.pred) for e in single]
    assert all(len(e.steps) >= 1 for e in batched)
    cached, llm = run(qs, mb=64)
    assert [(e.steps, e.pred) for e in cached] == [(e.steps, e.pred) for e in batched]
    u = llm.usage  # turn 2 re-ran only its new tokens: the question and turn 1's step came from the cache
    assert u["prefill_tokens_reused"] > 0.3 * u["prompt_tokens"], u


@pytest.mark.skipif(not (REPO / "data" / "toy" / "train_questions.jsonl").exists(), reason="data/toy not generated")
def test_toy_pipeline_with_the_oracle_teacher(tmp_path, monkeypatch, tiny_llama):
    """The demo's path on a tiny model: oracle generate (ReAct + Reflexion) -> filter -> mix -> train -> eval."""
    import train
    monkeypatch.setenv("FIREACT_CACHE", str(tmp_path / "cache"))
    for method in ("react", "reflexion"):
        fireact.main(["generate", "--task", "toy", "--split", "train", "--teacher-model", "oracle", "--n", "6",
                      "--method", method, "--out", str(tmp_path / f"{method}.jsonl"), "--workers", "2"])
    recs = [json.loads(line) for line in (tmp_path / "react.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and sum(r["em"] for r in recs) >= 5
    assert all(r["steps"][-1]["action"].startswith("finish[") for r in recs)
    fireact.main(["filter", str(tmp_path / "react.jsonl"), str(tmp_path / "reflexion.jsonl"),
                  "--out", str(tmp_path / "ok.jsonl")])
    counts = fireact.mix(fireact.MixConfig(files=[str(tmp_path / "ok.jsonl")], per_method=["react=4", "reflexion=2"],
                                           out=str(tmp_path / "train.jsonl")))
    assert dict(counts) == {("toy", "react"): 4, ("toy", "reflexion"): 2}
    lora = train.train(train.TrainConfig(model=str(tiny_llama), data=[str(tmp_path / "train.jsonl")], max_steps=2,
                                         out=str(tmp_path / "lora"), val_frac=0.0, progress=False, lora_r=4,
                                         lora_alpha=8))
    fireact.main(["eval", "--task", "toy", "--split", "test", "--n", "3", "--model", str(tiny_llama), "--adapter",
                  str(lora), "--max-steps", "2", "--max-new-tokens", "8", "--out", str(tmp_path / "eval.json")])
    summary = json.loads((tmp_path / "eval.summary.json").read_text())
    assert (summary["task"], summary["run"], summary["n"]) == ("toy", "fine-tuned", 3)
    res = json.loads((tmp_path / "eval.json").read_text())
    assert sorted(res) == ["toy-test-0000", "toy-test-0001", "toy-test-0002"]
    assert all(r["traj"].startswith("Question: ") and r["steps"] for r in res.values())

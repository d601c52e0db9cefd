"""fireact.py (and tasks.py, its tasks and formats): metrics, loaders, the agent loop (invalid actions, re-sampling, step limit, reflexion, batching),
resumable generation after a crash, scoring FireAct's released runs, download over loopback.

    python -m pytest -q tests/test_fireact.py
"""
import csv
import dataclasses
import functools
import http.server
import io
import json
import re
import tarfile
import threading
import time
from pathlib import Path

import pytest

import fireact
import tasks
import tools
from common import files
from conftest import send_json
from extras import finetune_api as FA  # export-data, finetune-api: extras since issue 31 (`fireact.py` hands off)
from extras import report

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason="../shared/data is absent")

PAGES = [
    {"title": "Atacama Desert", "sentences": ["The Atacama Desert is a desert plateau in the north of Chile."]},
    {"title": "Santiago", "sentences": ["Santiago is the capital of Chile.", "The Mapocho River crosses the city."]},
    {"title": "Gustav Holst", "sentences": ["Gustav Holst (born 1874) was an English composer."]},
]


@pytest.fixture
def wiki(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAGES))
    return tools.LocalWiki(path)


class ScriptLLM:
    """Replies from a script {question: [reply for turn 0, turn 1, ...]}; the turn is the number of Observation
    lines after the question. Records every call (prompts, temperature) to check batching and re-sampling."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def complete_batch(self, prompts, stop=None, stop_at=None, temperature=None):
        self.calls.append(dict(n=len(prompts), stop=stop, temperature=temperature, prompts=prompts))
        outs = []
        for p in prompts:
            q = re.findall(r"^Question: (.*)$", p, re.M)[-1]
            turn = p.split(f"Question: {q}")[-1].count("Observation:")
            reply = self.script[q][min(turn, len(self.script[q]) - 1)]
            reply = reply(p) if callable(reply) else reply
            k = stop_at(reply) if stop_at else None
            outs.append(reply if k is None else reply[:k])
        return outs

    def extend(self, prompt, text):
        return prompt + text


def run(llm, wiki, questions, **kw):
    qs = [dict(id=str(i), question=q, answer=a) for i, (q, a) in enumerate(questions)]
    return fireact.run_agent(llm, [wiki.fork() for _ in qs], qs, fireact.few_shot("react", "hotpotqa"), **kw)


# ------------------------------------------------------------------------------------------------------ metrics
def test_metrics_edge_cases():
    n = tasks.normalize_answer
    assert n("The  Beatles!") == "beatles" and n("An apple, a day") == "apple day"
    assert n("théâtre") == "théâtre" and n("Ünïcode’s") == "ünïcode’s"  # SQuAD keeps non-ASCII as is
    assert tasks.score_answer("qa", "the Mapocho river.", "Mapocho River") == (1.0, 1.0)
    em, f1 = tasks.score_answer("qa", "Mapocho", "Mapocho River")
    assert em == 0.0 and abs(f1 - 2 / 3) < 1e-9
    assert tasks.score_answer("qa", "yes", "no") == (0.0, 0.0)
    assert tasks.f1_score("no way", "no") == 0.0  # HotpotQA: a yes/no gold needs an exact match for F1
    assert tasks.score_answer("qa", None, "x") == (0.0, 0.0) and tasks.score_answer("qa", "", "x") == (0.0, 0.0)
    assert tasks.score_answer("yesno", "Yes, because it floats.", "yes") == (1.0, 1.0)
    assert tasks.score_answer("yesno", "True", "yes")[0] == 1.0
    assert tasks.score_answer("yesno", "nope", "no")[0] == 0.0
    assert tasks.score_answer("yesno", "maybe", "no")[0] == 0.0
    for pred in ("B", "b", "(B)", "B. kitchen", "B) kitchen", "The answer is B."):
        assert tasks.score_answer("mc", pred, "B")[0] == 1.0, pred
    for pred in ("Bob", "kitchen", "", "C"):
        assert tasks.score_answer("mc", pred, "B")[0] == 0.0, pred


@needs_data
def test_loaders_and_subsets():
    ids = tasks.fireact_eval_ids()
    assert len(ids) == 500 and ids[:3] == [3687, 6238, 5388]
    hp = tasks.load_questions("hotpotqa")
    assert [q["id"] for q in hp[:2]] == ["3687", "6238"] and len(hp) == 500
    assert len(tasks.load_questions("hotpotqa_offline")) == 957
    # the experiments' fixed split of the 957: 200 to tune on, 757 to report; disjoint, seeded, in dev order
    tune, report = (tasks.load_questions("hotpotqa_offline", s) for s in ("tune", "report"))
    assert len(tune) == 200 and len(report) == 757 and not {q["id"] for q in tune} & {q["id"] for q in report}
    assert [int(q["id"]) for q in tune] == sorted(int(q["id"]) for q in tune)
    assert tune == tasks.load_questions("hotpotqa_offline", "tune")
    assert len(tasks.load_questions("bamboogle")) == 125
    sq = tasks.load_questions("strategyqa")
    assert len(sq) == 229 and {q["answer"] for q in sq} == {"yes", "no"}
    assert len(tasks.load_questions("mmlu", "train")) == 12126  # the auxiliary train set FireAct generated on
    mm = tasks.load_questions("mmlu", "dev")
    assert len(mm) == 285 and "\nD. " in mm[0]["question"] and {q["answer"] for q in mm} <= set("ABCD")
    assert len(tasks.load_questions("hotpotqa", "dev", n=7)) == 7
    with pytest.raises(ValueError, match="unknown task"):
        tasks.load_questions("nope")


def test_prompt_files_cover_every_task_and_method():
    for task in tasks.TASKS.values():
        for method in ("react", "cot", "reflexion"):
            text = fireact.few_shot(method, task.family)("Q?", [])
            assert text.endswith("Question: Q?\n" + ("Reflection:" if method == "reflexion" else ""))
    assert "finish[yes]" in fireact.few_shot("react", "strategyqa")("Q", []) or "finish[no]" in \
        fireact.few_shot("react", "strategyqa")("Q", [])
    assert re.search(r"^D\. ", fireact.few_shot("react", "mmlu")("Q", []), re.M)


# --------------------------------------------------------------------------------------------------- agent loop
def test_cut_and_split():
    text = "Thought: go\nAction: search[Santiago]\nObservation: invented\nThought: x\nAction: finish[y]"
    assert text[:fireact.cut_after_action(text)] == "Thought: go\nAction: search[Santiago]"
    assert fireact.cut_after_action("Thought: still thinking") is None
    assert fireact.cut_after_action("Thought: t\nAction: search[San") is None  # incomplete: keep generating
    assert fireact.cut_after_action("Thought: t\nAnswer: Paris\n") == len("Thought: t\nAnswer: Paris")
    assert fireact.split_step(" a\nb\nAction 2: Search[x] junk") == ("a b", "Search[x] junk")
    assert fireact.split_step("Thought: so\nAnswer: Paris") == ("so", "finish[Paris]")
    assert fireact.split_step("I am lost") == ("I am lost", None)


def test_agent_solves_and_batches(wiki):
    llm = ScriptLLM({
        "Q1": [" I need the desert.\nAction: search[Atacama Desert]\nObservation: made up\nThought: more",
               "Thought: Chile's capital is Santiago.\nAction: search[Santiago]",
               "Thought: found it.\nAction: lookup[river]",
               "Thought: done\nAction: finish[Mapocho River]"],
        "Q2": ["Thought: easy\nAction: finish[Gustav Holst]"],
    })
    eps = run(llm, wiki, [("Q1", "Mapocho River"), ("Q2", "Gustav Holst")], max_steps=11)
    a, b = eps
    assert [s["action"] for s in a.steps] == ["search[Atacama Desert]", "search[Santiago]", "lookup[river]",
                                              "finish[Mapocho River]"]
    assert a.steps[0]["thought"] == "I need the desert." and "north of Chile" in a.steps[0]["observation"]
    assert "Mapocho River crosses" in a.steps[2]["observation"]  # the real observation, not the made-up one
    assert a.pred == "Mapocho River" and not a.forced and b.pred == "Gustav Holst"
    assert [c["n"] for c in llm.calls] == [2, 1, 1, 1]  # both live episodes share one call per step
    assert all(c["stop"] == ["\nObservation:"] for c in llm.calls)
    rec = fireact.episode_record(a, "hotpotqa", "react", "script", "local")
    assert rec["em"] == 1.0 and rec["finished"] and set(rec) >= {"id", "task", "method", "question", "answer",
                                                                 "steps", "pred", "em", "source", "tool"}
    # batch_size bounds the live episodes per call; the queue refills as episodes end
    llm2 = ScriptLLM(llm.script)
    run(llm2, wiki, [("Q2", "x"), ("Q1", "y"), ("Q2", "z")], batch_size=2)
    assert max(c["n"] for c in llm2.calls) == 2 and sum(c["n"] for c in llm2.calls) == 6


def test_invalid_actions_and_resampling(wiki):
    llm = ScriptLLM({"Q": ["Thought: hmm\nAction: fly[to the moon]", "Thought: I wonder", "Action: finish[x]"]})
    (ep,) = run(llm, wiki, [("Q", "x")], max_steps=5, retries=2)
    assert ep.steps[0]["observation"].startswith("Invalid action")  # an invalid action is an observation
    # turn 1 wrote no action: re-sampled twice at temperature 0.7, then handed to the tool as invalid
    assert [c["temperature"] for c in llm.calls[1:4]] == [None, 0.7, 0.7]
    assert ep.steps[1]["action"] == "" and ep.steps[1]["observation"].startswith("Invalid action")
    assert ep.pred == "x" and len(ep.steps) == 3
    assert re.search(r"Action: fly\[to the moon\]\nObservation: Invalid action", llm.calls[1]["prompts"][0])


def test_step_limit_ends_unfinished_unless_forced(wiki):
    """FireAct/ReAct: an episode out of turns has no answer and scores 0; --force-answer is an opt-in extra turn."""
    script = {"Q": ["Thought: again\nAction: search[Santiago]"] * 3 + [" Santiago"]}
    llm = ScriptLLM(script)
    (ep,) = run(llm, wiki, [("Q", "Santiago")], max_steps=3)
    assert ep.done and len(ep.steps) == 3 and ep.pred is None and not ep.forced and len(llm.calls) == 3
    rec = fireact.episode_record(ep, "hotpotqa", "react", "s", "local")
    assert rec["em"] == 0.0 and not rec["finished"]
    llm = ScriptLLM(script)
    (ep,) = run(llm, wiki, [("Q", "Santiago")], max_steps=3, force_answer=True)
    assert len(ep.steps) == 4 and ep.forced and ep.pred == "Santiago"
    assert ep.steps[-1]["action"] == "finish[Santiago]"
    assert llm.calls[-1]["prompts"][0].endswith("Action: finish[") and llm.calls[-1]["stop"] == ["]", "\n"]
    rec = fireact.episode_record(ep, "hotpotqa", "react", "s", "local")
    assert rec["em"] == 1.0 and not rec["finished"]  # right, but not finished by the agent itself
    llm = ScriptLLM({"Q": ["Action: search[Santiago]"] * 2 + [""]})
    (ep,) = run(llm, wiki, [("Q", "Santiago")], max_steps=2, force_answer=True)
    assert ep.done and ep.forced and ep.pred == ""


def test_tool_service_failure_ends_only_that_episode(wiki):
    class DeadTool:  # a live tool whose service failed past its retries
        done = False
        def step(self, action):
            raise tools.APIError("GET http://127.0.0.1:1/w/api.php -> gave up after 3 attempts")
    llm = ScriptLLM({"Q1": ["Thought: t\nAction: search[Santiago]"], "Q2": ["Thought: t\nAction: finish[Gustav Holst]"]})
    qs = [dict(id="1", question="Q1", answer="a"), dict(id="2", question="Q2", answer="Gustav Holst")]
    a, b = fireact.run_agent(llm, [DeadTool(), wiki.fork()], qs, fireact.few_shot("react", "hotpotqa"))
    assert a.done and a.pred is None and "gave up after 3 attempts" in a.error
    assert b.pred == "Gustav Holst"


def test_teacher_resamples_are_distinct_requests(tmp_path):
    class Recorder:
        calls = []
        def chat(self, messages, **kw):
            self.calls.append(kw)
            return "Thought: t"
    llm = fireact.TeacherLLM(Recorder())
    llm.complete_batch(["P"], temperature=0.0)
    llm.complete_batch(["P"], temperature=0.7)
    llm.complete_batch(["P"], temperature=0.7)
    assert "seed" not in Recorder.calls[0] and [c["seed"] for c in Recorder.calls[1:]] == [0, 1]


def test_reflexion_fireact_rounds_use_no_gold(wiki):
    """Default Reflexion (FireAct's): a wrong finish ends the episode (no gold answer inside a trajectory); an
    episode still unsolved after the `at` rounds gets a reflection, which opens its next Thought."""
    task = tasks.TASKS["hotpotqa"]
    prompt_fn, max_steps, reflexion = fireact.method_setup(task, "reflexion", 11, reflect_at=[2, 4])
    assert reflexion.judge is None and reflexion.at == (2, 4)
    qs = [dict(id="0", question="Q", answer="Santiago")]
    llm = ScriptLLM({"Q": ["Thought: guess\nAction: finish[Lima]"]})
    (ep,) = fireact.run_agent(llm, [wiki.fork()], qs, prompt_fn, max_steps, reflexion=reflexion)
    assert ep.pred == "Lima" and ep.reflections == 0 and len(ep.steps) == 1  # wrong, and over: filter drops it
    llm = ScriptLLM({"Q": ["Thought: vague\nAction: search[desert]", "Thought: vague\nAction: search[capital]",
                           lambda p: " I searched vague words. I should search Santiago." if p.endswith("Reflection:")
                           else "Action: search[Santiago]", "Thought: found\nAction: finish[Santiago]"]})
    (ep,) = fireact.run_agent(llm, [wiki.fork()], qs, prompt_fn, max_steps, reflexion=reflexion)
    assert ep.reflections == 1 and ep.pred == "Santiago" and len(ep.steps) == 4
    assert ep.steps[2]["thought"] == f"{tasks.REFLECT_INTRO} I searched vague words. I should search Santiago."
    assert not any(s["observation"] == "Answer is incorrect." for s in ep.steps)
    assert llm.calls[2]["prompts"][0].endswith("Action: search[capital]\nObservation: " + ep.steps[1]["observation"]
                                                + "\nReflection:")
    rec = fireact.episode_record(ep, "hotpotqa", "reflexion", "s", "local")
    assert rec["reflections"] == 1 and [tasks.is_finish(s["action"]) for s in rec["steps"]] == [False] * 3 + [True]


def test_reflexion_gold_retry_drops_the_failed_attempt(wiki):
    """Opt-in (--reflect-on wrong): a wrong finish, judged with the gold answer, gets a reflection and a fresh
    attempt; the record keeps the reflection and the successful continuation only, never the wrong finish."""
    llm = ScriptLLM({"Q": [lambda p: "Action: search[Santiago]" if tasks.REFLECT_INTRO in p else
                           "Thought: guess\nAction: finish[Lima]",
                           lambda p: " I guessed." if p.endswith("Reflection:") else
                           "Thought: yes\nAction: finish[Santiago]"]})
    task = tasks.TASKS["hotpotqa"]
    prompt_fn, max_steps, reflexion = fireact.method_setup(task, "reflexion", 11, reflect_on="wrong")
    qs = [dict(id="0", question="Q", answer="Santiago")]
    (ep,) = fireact.run_agent(llm, [wiki.fork()], qs, prompt_fn, max_steps, reflexion=reflexion)
    assert ep.reflections == 1 and ep.pred == "Santiago" and ep.turns == 3
    assert [s["action"] for s in ep.steps] == ["search[Santiago]", "finish[Santiago]"]
    assert ep.steps[0]["thought"] == f"{tasks.REFLECT_INTRO} I guessed."
    assert llm.calls[1]["prompts"][0].endswith("Action: finish[Lima]\nObservation: Episode finished.\nReflection:")
    assert "finish[Lima]" not in llm.calls[2]["prompts"][0].split("Question: Q")[-1]  # the retry starts afresh


def test_cot_is_one_react_step(wiki):
    llm = ScriptLLM({"Q": ["Thought: Holst wrote it.\nAnswer: Gustav Holst\nQuestion: next"]})
    prompt_fn, max_steps, _ = fireact.method_setup(tasks.TASKS["hotpotqa"], "cot", 11, 5)
    qs = [dict(id="0", question="Q", answer="Gustav Holst")]
    (ep,) = fireact.run_agent(llm, [wiki.fork()], qs, prompt_fn, max_steps)
    assert ep.steps == [dict(thought="Holst wrote it.", action="finish[Gustav Holst]", observation="Episode finished.")]


# ------------------------------------------------------------------------------------------------ resumable I/O
class ChatTeacher:
    """Teacher-like: .chat over ScriptLLM replies; raises KeyboardInterrupt on call number `crash_at`."""

    def __init__(self, crash_at=None):
        self.n, self.crash_at, self.usage = 0, crash_at, {"prompt_tokens": 3, "completion_tokens": 2, "requests": 1}
        self.lock = threading.Lock()

    def chat(self, messages, **kw):
        with self.lock:
            self.n += 1
            if self.n == self.crash_at:
                raise KeyboardInterrupt
        q = re.findall(r"^Question: (.*)$", messages[-1]["content"], re.M)[-1]
        return f"Thought: easy\nAction: finish[{q.upper()}]"


def test_generate_resumes_after_crash(tmp_path, wiki, monkeypatch):
    qs = [dict(id=f"q{i}", question=f"question {i}", answer=f"QUESTION {i}" if i % 2 else "other") for i in range(12)]
    monkeypatch.setattr(tasks.HotpotQA, "load", lambda self, split: qs)
    monkeypatch.setattr(fireact, "make_tool", lambda *a, **k: wiki)
    cfg = fireact.GenerateConfig(task="hotpotqa", out=str(tmp_path / "t.jsonl"), workers=1)
    with pytest.raises(KeyboardInterrupt):  # one worker: the crash comes deterministically at question 6
        fireact.generate(cfg, teacher=ChatTeacher(crash_at=6))
    written = files.read_jsonl(cfg.out, resumable=True)
    assert len(written) == 5
    cfg.workers = 3
    with open(cfg.out, "a") as f:  # the crash also tore the record being written
        f.write('{"id": "q11", "task": "hotp')
    fireact.generate(cfg, teacher=ChatTeacher())
    recs = [json.loads(line) for line in Path(cfg.out).read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == sorted(q["id"] for q in qs)  # no duplicate, no loss
    assert recs[:len(written)] == written  # append-only: earlier records untouched
    assert sum(r["em"] for r in recs) == 6
    kept = fireact.filter_records(fireact.FilterConfig(files=[cfg.out], out=str(tmp_path / "ok.jsonl")))
    assert kept == 6


def test_task_choices_are_the_tasks():
    import typing
    assert set(typing.get_args(tasks.TaskName)) == set(tasks.TASKS)


def test_generate_with_noisy_tools_records_it_and_refuses_to_mix_settings(tmp_path):
    """--noise: trajectories that saw noisy observations (FireAct's robustness data); the oracle recovers from most."""
    out = tmp_path / "n.jsonl"
    fireact.main(["generate", "--task", "toy", "--method", "react", "--teacher-model", "oracle", "--n", "40",
                  "--noise", "0.5", "--out", str(out)])
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert all(r["run"]["noise"] == 0.5 and r["run"]["noise_mode"] == "none" for r in recs)
    assert any(s["observation"] == "None" for r in recs for s in r["steps"])
    assert sum(r["em"] for r in recs) >= 30
    with pytest.raises(ValueError, match="noise 0.5 -> None"):
        fireact.main(["generate", "--task", "toy", "--method", "react", "--teacher-model", "oracle", "--n", "40",
                      "--out", str(out)])


def test_parse_config_flags(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    cfg = fireact.parse_config(fireact.EvalConfig, ["--task", "bamboogle", "--max-steps", "7", "--compare",
                                                     "--noise", "0.5", "--adapter", str(tmp_path), "--compile"])
    assert (cfg.task, cfg.max_steps, cfg.compare, cfg.noise, cfg.compile) == ("bamboogle", 7, True, 0.5, True)
    cfg = fireact.parse_config(fireact.MixConfig, ["a.jsonl", "b.jsonl", "--tasks", "toy", "--per-group", "3"])
    assert cfg.files == ["a.jsonl", "b.jsonl"] and cfg.tasks == ["toy"] and cfg.per_group == 3


# ---------------------------------------------------------------------------------------------------- scoring
@needs_data
def test_score_reproduces_fireact_paper(capsys):
    res = fireact.score(fireact.ScoreConfig(files=[str(DATA / "fireact" / "trajs")]))
    out = capsys.readouterr().out
    ems = {r["file"].split("_models_")[-1].split("-d_")[0] if "llama" in r["file"] else "gpt-3.5": round(r["em"], 1)
           for r in res}
    assert ems == {"lora_llama-2-7b": 26.2, "lora_llama-2-13b": 34.4, "gpt-3.5": 40.0}
    assert all(r["n"] == 500 for r in res) and {r["entries"] for r in res} == {465, 499, 500}
    for em in ("26.2", "34.4", "40.0"):
        assert f"EM  {em}" in out


def test_score_our_results_with_summary_denominator(tmp_path, capsys):
    res = {"1": dict(pred="Paris", gt="paris", task="hotpotqa"), "2": dict(pred="B.", gt="B", task="mmlu")}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(res))
    path.with_suffix(".summary.json").write_text(json.dumps({"n": 4}))
    (r,) = fireact.score(fireact.ScoreConfig(files=[str(path)]))
    assert r["em"] == 50.0 and r["n"] == 4


def test_score_breakdown_of_errors(tmp_path, capsys):
    """Episodes by tool calls x outcome, from our results (steps) and FireAct's (ReAct text, chat messages)."""
    obs = lambda o: dict(thought="t", action="search[x]", observation=o)  # noqa: E731
    done = dict(thought="t", action="finish[a]", observation="Episode finished.")
    res = {"right": dict(pred="Paris", gt="Paris", task="hotpotqa", steps=[obs("The capital is Paris."), done]),
           "read": dict(pred="Lyon", gt="Paris", task="hotpotqa", steps=[obs("It is Paris."), obs("no"), done]),
           # 'Parisian' holds the gold's letters but not the word: never seen
           "search": dict(pred="Lyon", gt="Paris", task="hotpotqa", steps=[obs("A Parisian cafe."), done]),
           "yesno": dict(pred="no", gt="yes", task="hotpotqa", steps=[obs("yes"), obs("a"), obs("b"), done]),
           "fireact_text": dict(pred="Rome", gt="Rome", traj="### Instruction:\nQ?\n\n### Response:\nThought: t\n"
                                "Action: search[Italy]\nObservation: Its capital is Rome.\nThought: t\n"
                                "Action: finish[Rome]\nObservation: Episode finished, reward = True"),
           "fireact_chat": dict(pred="Bern", gt="Zurich", traj=[
               {"role": "user", "content": "Q?"},
               {"role": "assistant", "content": "Thought: t\nAction: finish[Bern]"},
               {"role": "user", "content": "Observation: Episode finished, reward = False"}])}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(res))
    (r,) = report.breakdown(report.BreakdownConfig(files=[str(path)]))  # score --breakdown: an extra since issue 31
    zero = dict.fromkeys(report.BREAKDOWN, 0)
    assert r["breakdown"] == {"0": {**zero, "wrong, never seen": 1},
                              "1": {**zero, "right": 2, "wrong, never seen": 1},
                              "2": {**zero, "wrong, answer seen": 1},
                              "3+": {**zero, "wrong, yes/no/MC": 1}}
    out = capsys.readouterr().out
    assert "wrong, never seen" in out and "       all        6 " in out
    cli = fireact.parse_config(fireact.ScoreConfig, [str(path), "--breakdown"])
    assert cli.breakdown
    with pytest.raises(ValueError, match=r"nope\.json: no such file$"):  # a results file: no download hint
        fireact.score(fireact.ScoreConfig(files=[str(path), str(tmp_path / "nope.json")]))
    with pytest.raises(ValueError, match=r"nope\.json: no such file; run `python fireact.py download`"):  # data
        tasks.read_data(tasks.data_dir() / "hotpotqa" / "nope.json")


# ---------------------------------------------------------------------------------------------------- download
@pytest.fixture
def loopback_files(tmp_path):
    """Serve a directory over HTTP on 127.0.0.1 -> (dir, base URL)."""
    src = tmp_path / "src"
    src.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(src))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield src, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@needs_data
def test_download_conversions_match_shared_data(tmp_path, loopback_files, monkeypatch):
    """Each conversion, fed the public files' formats over loopback, gives ../shared/data on the fields we use:
    Bamboogle's spreadsheet dates repaired, the 957 offline HotpotQA questions selected from the full distractor
    dev set, MMLU's auxiliary training set (without RACE) as the train split."""
    src, base = loopback_files
    clean = json.loads((DATA / "bamboogle" / "test.json").read_text())
    mangled = {v: k for k, v in tasks.Bamboogle.DATES.items()}
    with open(src / "bamboogle.csv", "w", newline="") as f:  # FireAct's CSV: 13 answers as spreadsheet dates
        w = csv.writer(f)
        w.writerow(["Question", "Answer"])
        w.writerows([r["question"], mangled.get(r["answer"], r["answer"])] for r in clean)
    assert (src / "bamboogle.csv").read_text().count("-May-") == 2
    shared = [json.loads(line) for line in (DATA / "hotpotqa" / "dev_distractor.jsonl").read_text().splitlines()]
    dev = json.loads((DATA / "hotpotqa" / "dev.json").read_text())
    in_957 = {r["dev_index"] for r in shared}
    others = [dict(_id=f"x{i}", question=dev[i]["question"], answer=dev[i]["answer"], context=[["T", ["s."]]],
                   supporting_facts=[]) for i in range(40) if i not in in_957][:5]
    full = [{k: v for k, v in r.items() if k != "dev_index"} for r in reversed(shared)] + others
    (src / "distractor.json").write_text(json.dumps(full))
    (src / "dev.json").write_text(json.dumps(dev))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, path in (("data/dev/abstract_algebra_dev.csv", DATA / "mmlu/dev/abstract_algebra_dev.csv"),
                           ("data/auxiliary_train/obqa.csv", DATA / "mmlu/auxiliary_train/obqa.csv"),
                           ("data/auxiliary_train/race.csv", DATA / "mmlu/auxiliary_train/obqa.csv")):
            tar.add(path, arcname=name)
    (src / "data.tar").write_bytes(buf.getvalue())
    monkeypatch.setattr(tasks.Bamboogle, "sources", {"bamboogle/test.csv": f"{base}/bamboogle.csv"})
    monkeypatch.setattr(tasks.HotpotQAOffline, "sources", {"hotpotqa/dev.json": f"{base}/dev.json",
                                                             "hotpotqa/hotpot_dev_distractor_v1.json": f"{base}/distractor.json"})
    monkeypatch.setattr(tasks.MMLU, "sources", {"mmlu/data.tar": f"{base}/data.tar"})
    monkeypatch.setattr(tasks.HotpotQA, "sources", {"hotpotqa/dev.json": f"{base}/dev.json"})
    for t in (tasks.StrategyQA,):
        monkeypatch.setattr(t, "sources", {})
    monkeypatch.setattr(tasks, "FIREACT_FILES", {"missing/x.json": f"{base}/nope.json"})
    assert all(url.startswith(base) for url in tasks.sources().values())  # nothing leaves this machine
    dest = tmp_path / "data"
    tasks.download(tasks.DownloadConfig(dest=str(dest), only=["bamboogle", "hotpotqa", "mmlu"]))
    assert json.loads((dest / "bamboogle" / "test.json").read_text()) == clean
    ours = {r["dev_index"]: r for r in map(json.loads, (dest / "hotpotqa" / "dev_distractor.jsonl").read_text().splitlines())}
    assert len(ours) == 957 and all(ours[r["dev_index"]] == r for r in shared)
    assert not (dest / "mmlu" / "auxiliary_train" / "race.csv").exists()
    monkeypatch.setenv("FIREACT_DATA", str(dest))
    assert len(tasks.load_questions("hotpotqa_offline")) == 957 and len(tasks.load_questions("bamboogle")) == 125
    assert len(tasks.load_questions("mmlu", "train")) == 4956 and len(tasks.load_questions("mmlu", "dev")) == 5
    with pytest.raises(Exception, match="404"):
        tasks.download(tasks.DownloadConfig(dest=str(dest), only=["missing"]))
    assert not (dest / "missing" / "x.json").exists()


@pytest.mark.skipif(not (fireact.REPO / "data" / "toy" / "corpus.jsonl").exists(), reason="data/toy not generated")
def test_noisy_tool_wiring():
    tool = tasks.make_tool("toy", noise=1.0).fork()
    title = json.loads((fireact.REPO / "data" / "toy" / "corpus.jsonl").read_text().splitlines()[0])["title"]
    assert tool.step(f"search[{title}]") == "None"  # p = 1: every observation is replaced
    assert tool.step("finish[x]") == "Episode finished." and tool.done and tool.answer == "x"
    assert tasks.make_tool("toy").fork().step(f"search[{title}]") != "None"


# --------------------------------------------------------------------------- the command line, as a user meets it
# `python fireact.py ...` in a subprocess against a scripted loopback OpenAI-style server and an offline world:
# exit codes, one-line errors without tracebacks, what lands in the files.
CONTEXT = [["Atacama Desert", ["The Atacama Desert is a desert plateau in the north of Chile."]],
           ["Santiago", ["Santiago is the capital of Chile.", "The Mapocho River crosses the city."]]]
WORLD_QS = [("Which river crosses the capital of the country of the Atacama Desert?", "Mapocho River"),
            ("Which country holds the Atacama Desert?", "Chile"),
            ("What is the capital of Chile?", "Santiago")]


class ScriptedOpenAI(http.server.BaseHTTPRequestHandler):
    """POST /v1/chat/completions. The model name picks a behaviour: `stuck` searches vaguely until the loop asks
    for a reflection, then solves the question; `wrong-first` finishes wrong, then (after a reflection) right;
    `loop` never finishes; `chat` answers FireAct's zero-shot chat format. Key `sk-bad` gets a 401."""
    requests = []

    def reply(self, body):
        msgs = body["messages"]
        if body["model"] == "chat":
            return "Thought: t\nAction: search[Santiago]" if len(msgs) == 1 else "Thought: t\nAction: finish[Mapocho River]"
        prompt = msgs[-1]["content"]
        if prompt.endswith("Action: finish["):
            return "Mapocho River]"
        if prompt.endswith("Reflection:"):
            return " I searched vague words. I should search the exact names."
        q = re.findall(r"^Question: (.*)$", prompt, re.M)[-1]
        tail = prompt.split(f"Question: {q}")[-1]
        if tasks.REFLECT_INTRO in tail:
            k = tail.split(tasks.REFLECT_INTRO)[1].count("\nObservation:")
            return "Action: search[Santiago]" if k == 0 else "Thought: It is the Mapocho.\nAction: finish[Mapocho River]"
        n = tail.count("\nObservation:")
        if body["model"] == "stuck":
            return f"Thought: vague\nAction: search[desert plateau {n}]"
        if body["model"] == "wrong-first":
            return "Thought: guess\nAction: finish[Lima]"
        return "Thought: again\nAction: search[Santiago]"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ScriptedOpenAI.requests.append(body)
        if body["model"] in ("hang", "trickle"):  # a server that never answers, or answers a byte at a time
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(40):
                time.sleep(0.25)
                if body["model"] == "trickle":
                    self.wfile.write(b" ")
                    self.wfile.flush()
            return
        if self.headers.get("Authorization") == "Bearer sk-bad":
            code, out = 401, {"error": {"message": "Incorrect API key provided: sk-bad.", "type": "invalid_request_error"}}
        else:
            text = self.reply(body)
            code, out = 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                           "finish_reason": "stop"}], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}
        send_json(self, code, out)

    def log_message(self, *a):
        pass


@pytest.fixture
def cli_world(tmp_path):
    """-> run(*args, key=...): `python fireact.py ARGS` with an offline 3-question hotpotqa_offline world and a
    scripted server (its URL is passed as --base-url to generate/eval)."""
    import os
    import subprocess
    import sys
    data = tmp_path / "data"
    (data / "hotpotqa").mkdir(parents=True)
    rows = [dict(question=q, answer=a, dev_index=i, context=CONTEXT) for i, (q, a) in enumerate(WORLD_QS)]
    (data / "hotpotqa" / "dev_distractor.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ScriptedOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    ScriptedOpenAI.requests = []

    def run(*args, key="sk-good"):
        args = [str(a) for a in args]
        if args[0] in ("generate", "eval"):  # defaults first: a test's own flags override them
            args = args[:1] + ["--base-url", url, "--timeout", "10", "--retries", "0"] + args[1:]
        env = dict(os.environ, FIREACT_DATA=str(data), FIREACT_CACHE=str(tmp_path / "cache"), OPENAI_API_KEY=key)
        return subprocess.run([sys.executable, str(fireact.REPO / "fireact.py"), *args], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=120)
    yield run, tmp_path
    server.shutdown()


def one_line_error(r, code, *words):
    lines = [l for l in r.stderr.splitlines() if l.strip() and "it/s]" not in l and "q/s]" not in l and "%|" not in l]
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and lines, r.stderr
    for w in words:
        assert w in lines[-1], (w, lines[-1])
    return lines[-1]


def test_cli_reflexion_reflects_without_gold_and_recovers(cli_world):
    run, tmp = cli_world
    out = tmp / "refl.jsonl"
    r = run("generate", "--task", "hotpotqa_offline", "--split", "dev", "--allow-eval-split", "--method", "reflexion",
            "--reflect-at", "2", "--teacher-model", "stuck", "--n", "1", "--out", out)
    assert r.returncode == 0, r.stderr
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["em"] == 1 and rec["reflections"] == 1 and rec["tool"] == "local" and rec["run"]["reflect_at"] == [2]
    assert [s["action"] for s in rec["steps"]] == ["search[desert plateau 0]", "search[desert plateau 1]",
                                                  "search[Santiago]", "finish[Mapocho River]"]
    assert rec["steps"][2]["thought"].startswith(tasks.REFLECT_INTRO + " I searched vague words")
    # the gold answer never reached a prompt: no "Answer is incorrect" feedback inside the trajectory
    tails = [m["content"].rsplit("Question: ", 1)[-1] for b in ScriptedOpenAI.requests for m in b["messages"]]
    assert len(tails) == 5 and not any("incorrect" in t or "Mapocho" in t.split("\n")[0] for t in tails)
    # opt-in gold-judged retry: the failed attempt (finish[Lima]) is not in the record
    out2 = tmp / "retry.jsonl"
    r = run("generate", "--task", "hotpotqa_offline", "--split", "dev", "--allow-eval-split", "--method", "reflexion",
            "--reflect-on", "wrong", "--teacher-model", "wrong-first", "--n", "1", "--out", out2)
    assert r.returncode == 0, r.stderr
    (rec,) = [json.loads(line) for line in out2.read_text().splitlines()]
    assert rec["em"] == 1 and "Lima" not in json.dumps(rec["steps"])
    assert [s["action"] for s in rec["steps"]] == ["search[Santiago]", "finish[Mapocho River]"]
    # ... and the default (no gold) keeps the wrong finish as the episode's end: filter drops it
    out3 = tmp / "fireact_way.jsonl"
    assert run("generate", "--task", "hotpotqa_offline", "--split", "dev", "--allow-eval-split", "--method",
               "reflexion", "--teacher-model", "wrong-first", "--n", "1", "--out", out3).returncode == 0
    assert json.loads(out3.read_text())["em"] == 0 and json.loads(out3.read_text())["reflections"] == 0
    # a record that breaks the invariant (a step after finish) is refused by every reader, with file:line
    bad = json.loads(out2.read_text())
    bad["steps"] = [dict(thought="g", action="finish[Lima]", observation="Episode finished.")] + bad["steps"]
    (tmp / "bad.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(bad) + "\n")
    one_line_error(run("mix", tmp / "bad.jsonl", "--out", tmp / "m.jsonl"), 1, "bad.jsonl:2", "follows finish")


def test_cli_splits_are_training_splits_unless_told(cli_world):
    run, tmp = cli_world
    one_line_error(run("generate", "--task", "hotpotqa_offline", "--teacher-model", "stuck", "--out", tmp / "g.jsonl"),
                   1, "hotpotqa_offline has no training split")
    one_line_error(run("generate", "--task", "toy", "--split", "dev", "--teacher-model", "oracle", "--out",
                       tmp / "g.jsonl"), 1, "--split dev", "evaluation split", "--allow-eval-split")
    r = run("generate", "--task", "toy", "--teacher-model", "oracle", "--n", "2", "--out", tmp / "toy.jsonl")
    assert r.returncode == 0 and "toy/train/react" in r.stdout, r.stderr
    assert {json.loads(l)["id"][:9] for l in (tmp / "toy.jsonl").read_text().splitlines()} == {"toy-train"}
    one_line_error(run("eval", "--task", "toy", "--split", "nope", "--teacher-model", "loop"), 1, "no split 'nope'")


def test_cli_unfinished_episodes_score_zero_unless_forced(cli_world):
    run, tmp = cli_world
    r = run("eval", "--task", "hotpotqa_offline", "--teacher-model", "loop", "--max-steps", "2", "--out", tmp / "e.json")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp / "e.summary.json").read_text())
    assert (s["em"], s["finished"], s["n"], s["failures"], s["force_answer"]) == (0.0, 0, 3, 0, False)
    assert all(len(v["steps"]) == 2 and v["pred"] == "" for v in json.loads((tmp / "e.json").read_text()).values())
    r = run("eval", "--task", "hotpotqa_offline", "--teacher-model", "loop", "--max-steps", "2", "--force-answer",
            "--out", tmp / "f.json")
    s = json.loads((tmp / "f.summary.json").read_text())
    assert r.returncode == 0 and s["finished"] == 0 and s["em"] > 0  # forced guesses score, and are marked
    assert s["config"]["force_answer"] and s["provenance"]["python"]


def test_cli_teacher_errors_are_loud(cli_world):
    """A 401 (or any dead teacher) is never a result: generate/eval exit non-zero with the server's message,
    eval's summary records the failures, score refuses to report it as a result; the key is never printed."""
    run, tmp = cli_world
    r = run("generate", "--task", "toy", "--teacher-model", "m", "--n", "2", "--out", tmp / "g.jsonl", key="sk-bad")
    line = one_line_error(r, 1, "every episode failed", "401", "Incorrect API key")
    assert "401" in r.stderr and "sk-bad" not in r.stderr + r.stdout and not (tmp / "g.jsonl").read_text()
    r = run("eval", "--task", "hotpotqa_offline", "--teacher-model", "m", "--out", tmp / "e.json", key="sk-bad")
    one_line_error(r, 1, "3 of 3 episodes failed", "401")
    s = json.loads((tmp / "e.summary.json").read_text())
    assert s["failures"] == 3 and "401" in s["errors"][0] and "sk-bad" not in json.dumps(s)
    r = run("score", tmp / "e.json")
    assert r.returncode == 1 and "3 FAILED episodes: not a result" in r.stdout
    one_line_error(run("generate", "--task", "toy", "--teacher-model", "oracle", "--n", "1", "--out",
                       tmp / "o.jsonl", "--split", "dev", "--allow-eval-split", "--task", "hotpotqa_offline"),
                   1, "every episode failed", "OracleTeacher")


def test_cli_teacher_deadline_covers_hanging_and_trickling_servers(cli_world):
    """--timeout is the total deadline of a request: a server that hangs, or trickles a byte every 0.25 s, costs
    about that long, and the run ends with one line saying so (it does not hang for minutes)."""
    run, tmp = cli_world
    for model in ("hang", "trickle"):
        t0 = time.time()
        r = run("generate", "--task", "toy", "--teacher-model", model, "--n", "1", "--out", tmp / f"{model}.jsonl",
                "--timeout", "1.5")
        assert time.time() - t0 < 15, model  # the 10 s default is overridden: 1.5 s plus start-up
        one_line_error(r, 1, "every episode failed")


def test_cli_bad_arguments_fail_before_any_work(cli_world):
    run, tmp = cli_world
    (tmp / "adir").mkdir()
    (tmp / "adir" / "empty.jsonl").write_text("")
    for args, words in ((["eval", "--batch-size", "-1"], ["--batch-size -1", ">= 0"]),
                        (["eval", "--n", "-98"], ["--n -98"]),
                        (["eval", "--noise", "-0.5"], ["--noise -0.5"]),
                        (["eval", "--out", tmp / "adir"], ["is a directory"]),
                        (["eval", "--out", tmp / "data" / "hotpotqa" / "dev_distractor.jsonl" / "x.json"], ["is a file"]),
                        (["generate", "--workers", "0"], ["--workers 0"]),
                        (["generate", "--method", "tot"], ["invalid choice", "reflexion"]),
                        (["eval", "--tool", "bing"], ["invalid choice", "snippet"]),
                        (["eval", "--exclude-overlap", tmp / "none.jsonl"], ["none.jsonl", "no such file"]),
                        (["mix", tmp / "missing.jsonl"], ["missing.jsonl", "no such file"]),
                        (["eval", "--adapter", tmp / "adir"], ["no adapter_config.json"]),
                        (["download", "--only", "nothing"], ["matches no source"]),
                        (["score", tmp / "adir" / "empty.jsonl"], ["no records"]),
                        (["frobnicate"], ["unknown command"])):
        r = run(*args)
        assert r.returncode in (1, 2) and "Traceback" not in r.stderr, (args, r.stderr)
        for w in words:
            assert w in r.stderr, (args, w, r.stderr)
    r = run("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in fireact.COMMANDS)


def test_cli_generate_output_is_locked_and_keyed_by_settings(cli_world):
    import fcntl
    run, tmp = cli_world
    out = tmp / "g.jsonl"
    assert run("generate", "--task", "toy", "--teacher-model", "oracle", "--n", "2", "--out", out).returncode == 0
    one_line_error(run("generate", "--task", "toy", "--method", "cot", "--teacher-model", "oracle", "--n", "2",
                       "--out", out), 1, "other settings", "method 'react' -> 'cot'")
    with open(out, "a") as f:  # a second writer (another generate) holds the file
        fcntl.flock(f, fcntl.LOCK_EX)
        one_line_error(run("generate", "--task", "toy", "--teacher-model", "oracle", "--n", "3", "--out", out),
                       1, "another generate is writing")
    lines = out.read_text().splitlines()
    assert len(lines) == 2
    out.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")  # a corrupt middle line
    for args in (["generate", "--task", "toy", "--teacher-model", "oracle", "--n", "3", "--out", out],
                 ["filter", out, "--out", tmp / "ok.jsonl"]):
        one_line_error(run(*args), 1, "g.jsonl:2")
    assert out.read_text().count("\n") == 3 and not (tmp / "ok.jsonl").exists()  # nothing damaged or half-written


def test_cli_exclude_overlap_and_zero_shot_chat(cli_world):
    run, tmp = cli_world
    train = tmp / "train.jsonl"
    train.write_text(json.dumps({"messages": [{"role": "user", "content": WORLD_QS[1][0].upper() + " "},
                                              {"role": "assistant", "content": "Thought: t\nAction: finish[Chile]"}]}) + "\n")
    r = run("eval", "--task", "hotpotqa_offline", "--teacher-model", "chat", "--zero-shot", "--exclude-overlap",
            train, "--out", tmp / "z.json")
    assert r.returncode == 0, r.stderr
    assert "dropped 1 of 3 questions" in r.stdout
    s = json.loads((tmp / "z.summary.json").read_text())
    assert s["n"] == 2 and s["excluded_overlap"] == 1 and s["finished"] == 2
    first = [b["messages"] for b in ScriptedOpenAI.requests if len(b["messages"]) == 1]
    assert sorted(m[0]["content"] for m in first) == sorted([WORLD_QS[0][0], WORLD_QS[2][0]])  # no few-shot prompt
    second = [b["messages"] for b in ScriptedOpenAI.requests if len(b["messages"]) == 3][0]
    assert [m["role"] for m in second] == ["user", "assistant", "user"] and second[2]["content"].startswith("Observation: ")


def test_mix_and_filter_need_no_torch(tmp_path):
    import subprocess
    import sys
    recs = [dict(id=str(i), task="toy", method="react", question=f"q{i}", answer="a", em=1.0,
                 steps=[dict(thought="t", action="finish[a]", observation="Episode finished.")]) for i in range(4)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); import fireact; "
            "fireact.main(['filter', 'g.jsonl', '--out', 'ok.jsonl']); fireact.main(['mix', 'ok.jsonl', '--out', 'm.jsonl'])")
    r = subprocess.run([sys.executable, "-c", code, str(fireact.REPO)], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 4


@needs_data
def test_no_turn_of_fireacts_data_is_cut_by_the_token_cap():
    """FireAct allowed 1,000 new tokens a turn; 12.5% of its MMLU and 8.1% of its StrategyQA assistant turns are
    longer than 128 tokens. Our cap (eval --max-new-tokens, generate --max-tokens) must cut none of them."""
    M = pytest.importorskip("model")
    from common import weights
    root = files.cache_dir() / "SmolLM2-135M-Instruct"
    if not (root / weights.PROVENANCE).exists():  # tests never go online; .ci/run fetches the default model first
        pytest.skip("the default model is not here yet: run `python model.py` once")
    tok = M.load_tokenizer(root)
    turns = [m["content"] for line in (DATA / "fireact/finetune/gpt_format/multitask_multimethod.jsonl").read_text().splitlines()
             for m in json.loads(line)["messages"] if m["role"] == "assistant"]
    longest = max(len(tok.encode(t)) for t in turns)
    assert len(turns) > 4000 and 128 < longest < fireact.EvalConfig.max_new_tokens
    assert fireact.GenerateConfig.max_tokens >= fireact.EvalConfig.max_new_tokens


def test_every_flag_of_every_command_has_help(capsys):
    from common import cli
    for name, (cls, _, doc) in fireact.COMMANDS.items():
        helps = cli.field_help(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not helps.get(f.name)]
        assert not missing, (name, missing)
        with pytest.raises(SystemExit) as e:
            fireact.main([name, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and doc in out and "(default:" in out
    assert fireact.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in fireact.COMMANDS)
    assert all(c in out for c in fireact.EXTRAS)   # listed too; their flags' help: tests/test_report.py, test_experiments.py


def test_alpaca_template_and_the_adapters_own_settings(tmp_path, capsys):
    """--recipe fireact trains with FireAct's Alpaca template; eval follows what the adapter was trained with:
    its template, and the tool family of its data (FireAct's files: Google -> snippet offline, google online)."""
    class Chars:  # a character tokenizer: enough to see the layout
        add_bos, bos_id, eos_id = False, 0, 1
        encode = staticmethod(lambda t: [ord(c) for c in t])
    steps = [dict(thought="t", action="search[x]", observation="o"), dict(thought="u", action="finish[y]", observation="")]
    ids, mask = fireact.render("Q?", steps, Chars, template="alpaca")
    text = "".join(chr(i) for i in ids[:-1])
    assert text.startswith("Below is an instruction that describes a task.") and "### Instruction:\nQ?\n\n### Response:\nThought: t" in text
    assert ids[-1] == Chars.eos_id and sum(mask) == len("Thought: t\nAction: search[x]\n") + len("Thought: u\nAction: finish[y]") + 1
    prompt = fireact.zero_shot(Chars, "alpaca")("Q?", steps[:1])
    assert "".join(map(chr, prompt)).endswith("### Response:\nThought: t\nAction: search[x]\nObservation: o\n")
    with pytest.raises(ValueError, match="step 1 of 2 is a finish"):
        fireact.render("Q?", [dict(thought="", action="finish[a]", observation="")] + steps[1:], Chars)
    (tmp_path / "ad").mkdir()  # as train.py records it (train.py's own test checks it writes data_tools)
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(
        {"fireact": {"template": "alpaca", "data_tools": {"google": 1}}}))
    trained = fireact.adapter_training(str(tmp_path / "ad"))
    trained.pop("base")
    assert trained == {"template": "alpaca", "data_tools": {"google": 1}}
    cfg = fireact.EvalConfig(task="hotpotqa_offline")
    assert tasks.pick_tool(cfg, tasks.TASKS["hotpotqa_offline"], trained) == "snippet"
    assert tasks.pick_tool(cfg, tasks.TASKS["strategyqa"], trained) == "google"
    assert "the adapter's training data came from the google tool" in capsys.readouterr().out
    assert tasks.pick_tool(fireact.EvalConfig(tool="local"), tasks.TASKS["toy"], trained) == "local"
    assert tasks.pick_tool(cfg, tasks.TASKS["toy"], {}) == "local"


# ------------------------------------------------------------------ the API student (FireAct's GPT-3.5 fine-tuning)
# export-data -> finetune-api -> eval --zero-shot, against a loopback server that imitates OpenAI's files and
# fine-tuning endpoints and then serves the "fine-tuned" model. No test reaches a real host.
STEPS = [dict(thought="I search the desert.", action="search[Atacama Desert]",
              observation="The Atacama Desert is a desert plateau.\nIt lies in Chile."),  # a multi-line observation
         dict(thought="", action="lookup[Chile]", observation="(Result 1 / 1) It lies in Chile."),  # no thought
         dict(thought="I wrote no action.", action="", observation="Invalid action: I wrote no action."),
         dict(thought="It is Chile.", action="finish[Chile]", observation="Episode finished, reward = True")]
EXPORT_RECS = [dict(id="0", task="hotpotqa", method="react", question="Which country holds the Atacama?",
                    answer="Chile", steps=STEPS),
               dict(id="1", task="mmlu", method="cot", question="Which is a desert?\nA. Atacama\nB. Seine\nC. Paris\nD. Holst",
                    answer="A", steps=[dict(thought="Atacama is one.", action="finish[A]",
                                            observation="Episode finished, reward = 1")])]


@pytest.mark.parametrize("fmt", FA.EXPORT_FORMATS)
def test_export_round_trip(tmp_path, fmt):
    """Each exported format reads back (read_records, which train.py uses) to the same questions and steps."""
    src = tmp_path / "ours.jsonl"
    files.write_jsonl(src, EXPORT_RECS)
    out = FA.export_data(FA.ExportDataConfig(files=[str(src)], format=fmt, out=str(tmp_path / f"x.{fmt}")))
    back = tasks.read_records(out)
    assert [(r["question"], r["steps"]) for r in back] == [(r["question"], r["steps"]) for r in EXPORT_RECS]
    text = out.read_text()
    if fmt == "alpaca":  # FireAct's layout: options open the output; CoT rows end without a newline
        rows = json.loads(text)
        assert rows[1]["instruction"] == "Which is a desert?" and rows[1]["output"].startswith("A. Atacama\nB. Seine")
        assert rows[0]["output"].endswith("reward = True\n") and rows[1]["output"].endswith("reward = 1")
        assert rows[0]["output"].count("\nObservation: ") == 4 and rows[0]["input"] == ""
    else:
        row = json.loads(text.splitlines()[0])
        turns = [(m["role"], m["content"]) for m in row["messages"]] if fmt == "openai" else \
            [({"human": "user", "gpt": "assistant"}[c["from"]], c["value"]) for c in row["conversations"]]
        assert turns[0] == ("user", "Which country holds the Atacama?")
        assert turns[1] == ("assistant", "Thought: I search the desert.\nAction: search[Atacama Desert]")
        assert turns[3] == ("assistant", "Action: lookup[Chile]") and turns[5] == ("assistant", "Thought: I wrote no action.")
        assert turns[-2:] == [("assistant", "Thought: It is Chile.\nAction: finish[Chile]"),
                              ("user", "Observation: Episode finished, reward = True")]
    # --no-final-observation: the conversation ends with the assistant's finish
    out = FA.export_data(FA.ExportDataConfig(files=[str(src)], format="openai", final_observation=False,
                                                   out=str(tmp_path / "noobs.jsonl")))
    assert all(json.loads(l)["messages"][-1]["role"] == "assistant" for l in out.read_text().splitlines())


@needs_data
def test_export_data_drops_fireacts_failed_trajectories_unless_told(tmp_path, capsys):
    """An API student is trained on what export-data writes: FireAct's 40 failed Reflexion rows stay out of it."""
    src = DATA / "fireact" / "finetune" / "alpaca_format" / "hotpotqa_multimethod.json"
    out = FA.export_data(FA.ExportDataConfig(files=[str(src)], out=str(tmp_path / "ft.jsonl")))
    assert len(out.read_text().splitlines()) == 734 - 40 and "dropped 40 of 734" in capsys.readouterr().err
    out = FA.export_data(FA.ExportDataConfig(files=[str(src)], keep_failed=True, out=str(tmp_path / "all.jsonl")))
    assert len(out.read_text().splitlines()) == 734


def _normalised(text):
    """What our reader keeps of a FireAct text: each line stripped, and no 'Question: ' label (MMLU rows carry
    one; our tasks' questions and eval prompts have none)."""
    return "\n".join(line.strip() for line in re.sub(r"^Question:\s*", "", text.strip()).strip().split("\n"))


@needs_data
@pytest.mark.parametrize("name,fmt,exact,same,quirks", [
    ("hotpotqa", "openai", 466, 500, 0), ("multitask_multimethod", "openai", 1272, 2055, 8),
    ("hotpotqa", "alpaca", 464, 500, 0), ("multitask_multimethod", "alpaca", 885, 2056, 7)])
def test_export_reproduces_fireacts_released_files(name, fmt, exact, same, quirks):
    """Our export of FireAct's own trajectories gives back its released gpt_format / alpaca_format rows. Equal on
    every field we use once white space at line ends, MMLU's 'Question: ' label and (alpaca) the output's final
    newline are set aside; the rest are FireAct's quirks: 5 rows where the assistant wrote the 'Observation:
    Episode finished' itself before the real one, 2 rows that open with the assistant, blank lines in a thought,
    StrategyQA rows with a 'Yes or no:' line at the head of the output (our reader moves it into the question)."""
    path = DATA / "fireact" / "finetune" / (f"gpt_format/{name}.jsonl" if fmt == "openai" else f"alpaca_format/{name}.json")
    src = [json.loads(l) for l in path.read_text().splitlines()] if fmt == "openai" else json.loads(path.read_text())
    n_exact = n_same = 0
    for s, r in zip(src, tasks.read_records(path), strict=True):
        e = FA.export_row(r, fmt)
        if fmt == "openai":
            a, b = ([(m["role"], _normalised(m["content"])) for m in x["messages"]] for x in (s, e))
        else:
            a, b = ([_normalised(x["instruction"]), x["input"], _normalised(x["output"])] for x in (s, e))
        n_exact, n_same = n_exact + (e == s), n_same + (a == b)
    assert (n_exact, n_same, len(src) - n_same) == (exact, same, quirks)


class FakeFineTuningAPI(http.server.BaseHTTPRequestHandler):
    """OpenAI's /files and /fine_tuning/jobs, then the fine-tuned model's /chat/completions. A job moves one state
    per look: validating_files -> queued -> running -> succeeded (an event each); a training file holding FAIL
    fails; an upload with a line that is not JSON gets a 400. The "fine-tuned" model has learnt its file by heart:
    it replies the assistant turn that follows the conversation so far in a training example."""
    files, jobs, log = {}, {}, []
    FLOW = ["validating_files", "queued", "running", "succeeded"]

    def _send(self, code, obj):
        send_json(self, code, obj)

    def do_GET(self):
        cls, path = FakeFineTuningAPI, self.path.split("?")[0]
        cls.log.append(("GET", path, self.headers.get("Authorization")))
        if path.startswith("/v1/files/"):
            return self._send(200, {"id": path.rsplit("/", 1)[1], "status": "processed"})
        if path == "/v1/fine_tuning/jobs":
            return self._send(200, {"data": list(cls.jobs.values())})
        job = cls.jobs[path.split("/")[4]]
        if path.endswith("/events"):
            return self._send(200, {"data": job["_events"][::-1]})  # newest first, as the API lists them
        if job["status"] not in ("succeeded", "failed"):
            failing = "FAIL" in cls.files[job["training_file"]] and job["status"] == "running"
            job["status"] = "failed" if failing else cls.FLOW[cls.FLOW.index(job["status"]) + 1]
            job["trained_tokens"] = 1234 if job["status"] == "succeeded" else None
            job["fine_tuned_model"] = f"ft:{job['model']}:fake::{job['id']}" if job["status"] == "succeeded" else None
            job["error"] = {"message": "Training file has 1 example that is too long.", "param": "training_file",
                            "code": "invalid_training_file"} if failing else None
            job["_events"].append({"id": f"ev-{len(job['_events'])}", "created_at": len(job["_events"]),
                                   "message": f"Job is {job['status']}"})
        self._send(200, {k: v for k, v in job.items() if k != "_events"})

    def do_POST(self):
        cls, raw = FakeFineTuningAPI, self.rfile.read(int(self.headers["Content-Length"]))
        cls.log.append(("POST", self.path, self.headers.get("Authorization")))
        if self.path == "/v1/files":
            boundary = raw.split(b"\r\n", 1)[0]
            parts = {re.search(rb'name="(\w+)"', p).group(1).decode(): p.split(b"\r\n\r\n", 1)[1][:-2]
                     for p in raw.split(boundary)[1:-1]}
            text = parts["file"].decode()
            bad = next((i for i, l in enumerate(text.splitlines(), 1) if not l.startswith("{")), None)
            if bad or parts["purpose"] != b"fine-tune":
                return self._send(400, {"error": {"message": f"Invalid file format. Line {bad}: not JSON."}})
            fid = f"file-{len(cls.files)}"
            cls.files[fid] = text
            return self._send(200, {"id": fid, "status": "uploaded"})
        body = json.loads(raw)
        if self.path == "/v1/fine_tuning/jobs":
            jid = f"ftjob-{len(cls.jobs)}"
            cls.jobs[jid] = dict(id=jid, model=body["model"], training_file=body["training_file"],
                                 validation_file=body.get("validation_file"), status="validating_files",
                                 hyperparameters=body.get("hyperparameters"), _events=[])
            return self._send(200, {k: v for k, v in cls.jobs[jid].items() if k != "_events"})
        job = next(j for j in cls.jobs.values() if j.get("fine_tuned_model") == body["model"])  # chat
        sofar, reply = body["messages"], "Thought: I never learnt this.\nAction: finish[unknown]"
        for line in cls.files[job["training_file"]].splitlines():
            msgs = json.loads(line)["messages"]
            if msgs[:len(sofar)] == sofar and len(msgs) > len(sofar):
                reply = msgs[len(sofar)]["content"]
                break
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}],
                         "usage": {"prompt_tokens": 5, "completion_tokens": 5}})

    def log_message(self, *a):
        pass


@pytest.fixture
def ft_world(tmp_path):
    """-> (run(*args, key=...) of `python fireact.py`, tmp dir, the fake API's /v1 URL)."""
    import os
    import subprocess
    import sys
    FakeFineTuningAPI.files, FakeFineTuningAPI.jobs, FakeFineTuningAPI.log = {}, {}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeFineTuningAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def run(*args, key="sk-ft-SECRET-42"):
        env = dict(os.environ, FIREACT_CACHE=str(tmp_path / "cache"), OPENAI_API_KEY=key)
        return subprocess.run([sys.executable, str(fireact.REPO / "fireact.py"), *map(str, args)], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=300)  # a guard against hangs only
    yield run, tmp_path, f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_cli_export_finetune_api_and_eval_zero_shot(ft_world):
    """The whole path: teacher trajectories -> export-data -> finetune-api (estimate, upload, job followed to its
    end, the model's name) -> a rerun that finds the job and pays nothing -> eval --zero-shot of the fine-tuned
    model in the same agent loop with the same tool and scoring. The key is in no output and no file."""
    run, tmp, url = ft_world
    assert run("generate", "--task", "toy", "--split", "dev", "--allow-eval-split", "--teacher-model", "oracle",
               "--n", "10", "--out", tmp / "traj.jsonl").returncode == 0
    r = run("export-data", tmp / "traj.jsonl", "--format", "openai", "--out", tmp / "train.jsonl")
    assert r.returncode == 0 and "wrote 10 openai examples" in r.stdout, r.stderr
    r = run("finetune-api", tmp / "train.jsonl", "--dry-run", "--base-url", url)
    assert r.returncode == 0, r.stderr
    assert re.search(r"10 examples, [\d,]+ tokens .* x 10 epochs \(auto\) = [\d,]+ trained tokens; estimated "
                     r"training cost \$[\d.]+ at \$8 per 1M", r.stdout), r.stdout
    assert FakeFineTuningAPI.log == [] and not (tmp / "train.jsonl.finetune.json").exists()  # nothing sent
    args = ("finetune-api", tmp / "train.jsonl", "--base-url", url, "--poll", "0.01", "--epochs", "2")
    r = run(*args)
    assert r.returncode == 0, r.stderr
    model = "ft:gpt-3.5-turbo:fake::ftjob-0"
    assert f"fine-tuned model: {model}" in r.stdout and "x 2 epochs = " in r.stdout
    assert "created job ftjob-0" in r.stdout  # validating_files; the fake moves a state per look:
    for status in ("queued", "running"):
        assert re.search(rf"ftjob-0: {status} \| 0 trained tokens \| Job is {status}", r.stdout), r.stdout
    assert "ftjob-0: succeeded | 1,234 trained tokens | Job is succeeded" in r.stdout
    (job,) = FakeFineTuningAPI.jobs.values()
    assert job["hyperparameters"] == {"n_epochs": 2} and FakeFineTuningAPI.files["file-0"] == (tmp / "train.jsonl").read_text()
    assert {a for _, _, a in FakeFineTuningAPI.log} == {"Bearer sk-ft-SECRET-42"}
    state = (tmp / "train.jsonl.finetune.json").read_text()
    assert model in state and "SECRET" not in state + r.stdout + r.stderr
    n = len(FakeFineTuningAPI.log)
    r = run(*args)  # resumable: the same file and settings find the finished job, and ask the server nothing
    assert r.returncode == 0 and f"already fine-tuned (job ftjob-0" in r.stdout and len(FakeFineTuningAPI.log) == n
    r = run("eval", "--task", "toy", "--split", "dev", "--n", "10", "--teacher-model", model, "--zero-shot",
            "--base-url", url, "--out", tmp / "eval.json")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp / "eval.summary.json").read_text())
    assert (s["em"], s["finished"], s["failures"], s["tool"]) == (100.0, 10, 0, "local")
    chats = [p for m, p, _ in FakeFineTuningAPI.log if p.endswith("/chat/completions")]
    assert len(chats) == sum(len(v["steps"]) for v in json.loads((tmp / "eval.json").read_text()).values())


def test_cli_finetune_api_errors_are_one_line(ft_world):
    """A file the server refuses (400), a job that fails, a file that breaks the API's rules: one line each, with
    the server's message or the file:line, exit 1, no traceback; a failed job is retried on a rerun."""
    run, tmp, url = ft_world
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "Action: finish[a]"}]}
            for i in range(10)]
    good = tmp / "good.jsonl"
    files.write_jsonl(good, rows)
    files.write_jsonl(tmp / "fail.jsonl", rows[:9] + [{"messages": rows[9]["messages"] + [
        {"role": "user", "content": "FAIL"}, {"role": "assistant", "content": "Action: finish[b]"}]}])
    r = run("finetune-api", tmp / "fail.jsonl", "--base-url", url, "--poll", "0.01")
    one_line_error(r, 1, "fine-tuning job ftjob-0 failed: Training file has 1 example that is too long. (training_file)")
    assert "ftjob-0: failed" in r.stdout
    r = run("finetune-api", tmp / "fail.jsonl", "--base-url", url, "--poll", "0.01")  # a rerun: a new job, same file
    assert "job ftjob-0 failed before" in r.stdout and "created job ftjob-1" in r.stdout
    assert sum(1 for m, p, _ in FakeFineTuningAPI.log if p == "/v1/files") == 1
    # the fake refuses a file whose line does not start with '{': our check passes it, the server does not
    (tmp / "spaced.jsonl").write_text("".join(" " + json.dumps(r) + "\n" for r in rows))
    one_line_error(run("finetune-api", tmp / "spaced.jsonl", "--base-url", url), 1,
                   "400 Bad Request", "Invalid file format. Line 1: not JSON.", "a rerun resumes")
    bad = tmp / "bad.jsonl"
    bad.write_text(good.read_text().replace('"assistant"', '"tool"', 1))
    one_line_error(run("finetune-api", bad, "--dry-run"), 1, "bad.jsonl:1: messages[1]: role 'tool'")
    one_line_error(run("finetune-api", good, tmp / "two.jsonl"), 2, "name one training file")
    r = run("finetune-api", good, "--base-url", "https://api.openai.com/v1", key="")
    one_line_error(r, 1, "set the environment variable OPENAI_API_KEY")


# ------------------------------------------------------------------------- ask: the agent, step by step (issue 14)
def test_on_step_streams_each_step_as_it_is_recorded(wiki):
    script = {"Q1": ["Thought: a\nAction: search[Santiago]", "Thought: b\nAction: finish[Santiago]"],
              "Q2": ["Thought: c\nAction: search[Gustav Holst]", "Thought: d\nAction: lookup[born]",
                     "Thought: e\nAction: finish[1874]"]}
    seen = []
    eps = run(ScriptLLM(script), wiki, [("Q1", "Santiago"), ("Q2", "1874")],
              on_step=lambda ep, step: seen.append((ep.question, len(ep.steps), dict(step), ep.done)))
    # turn by turn, both episodes' steps as each batched turn is applied, before their episodes end
    assert [(q, n) for q, n, _, _ in seen] == [("Q1", 1), ("Q2", 1), ("Q1", 2), ("Q2", 2), ("Q2", 3)]
    assert [s for q, _, s, _ in seen if q == "Q2"] == eps[1].steps and not any(done for *_, done in seen)
    assert [e.steps for e in run(ScriptLLM(script), wiki, [("Q1", "Santiago"), ("Q2", "1874")])] == \
        [e.steps for e in eps]   # the hook changes nothing


def test_load_local_compiles_the_decode_step_only_when_asked(tiny_llama, capsys):
    import model as M
    _, _, generate = fireact.load_local(fireact.EvalConfig(model=str(tiny_llama), device="cpu"))
    assert generate.compiled is None   # the fast path's generate (fast.for_inference) holds the compiled step
    _, _, generate = fireact.load_local(fireact.EvalConfig(model=str(tiny_llama), device="cpu", compile=True))
    assert generate.compiled is not None and "decode steps compiled (torch.compile, weights frozen" in capsys.readouterr().err
    _, _, generate = fireact.load_local(fireact.EvalConfig(model=str(tiny_llama), device="cpu", plain=True))
    assert generate is M.generate   # --plain: the teaching path, model.generate itself


def test_ask_prints_the_steps_then_the_answer(monkeypatch, capsys):
    import model as M
    q = tasks.load_questions("toy", "test", 1)[0]   # "In which town was the director of the film Iron Garden born?"
    script = {q["question"]: ["Thought: I search the film.\nAction: search[Iron Garden]",
                              "Thought: Now the director.\nAction: search[Jarek Orrmore]",
                              f"Thought: He was born there.\nAction: finish[{q['answer']}]"],
              "Who made it?": ["Thought: no idea\nAction: finish[nobody]"]}
    monkeypatch.setattr(fireact, "load_local", lambda cfg: (None, None, M.generate))   # no model: a scripted LLM
    monkeypatch.setattr(fireact, "LocalLLM", lambda *a, **k: ScriptLLM(script))          # answers
    asked = ["Who made it?"]

    def typed(prompt=""):   # --interactive: one more question, then Ctrl-D
        if not asked:
            raise EOFError
        return asked.pop(0)
    monkeypatch.setattr("builtins.input", typed)
    fireact.main(["ask", *q["question"].split(), "--interactive"])
    out = capsys.readouterr().out
    assert "\x1b[" not in out   # piped: plain text
    lines = out.splitlines()
    i = lines.index(f"Question: {q['question']}")
    assert lines[i + 1:i + 4] == ["Thought: I search the film.", "Action: search[Iron Garden]",
                                  lines[i + 3]] and lines[i + 3].startswith("Observation: Iron Garden is a")
    assert f"Answer: {q['answer']} | 3 steps | gold: {q['answer']} (right)" in lines
    assert lines[-1] == "Answer: nobody | 1 steps" and "Question: Who made it?" in lines
    fireact.main(["ask", "Who", "made", "it?", "--color", "always"])
    assert "\x1b[1;32mnobody\x1b[0m" in capsys.readouterr().out


def test_eval_plain_and_fast_give_the_same_trajectories(tmp_path):
    """--plain (model.generate, fp32, none of fast/) and the fast path in fp32: the same greedy episodes (on a
    random model whose argmaxes are decisive: near-ties would be decided by float rounding). The default dtype is
    the CPU's policy (bf16 where native) and is recorded as resolved."""
    from conftest import make_tiny_llama
    from fast.cpu import native_bf16
    tiny_llama = make_tiny_llama(tmp_path / "tiny", std=0.5)
    outs = {}
    for label, flags in (("fast", ["--dtype", "float32"]), ("plain", ["--plain"]), ("default", [])):
        out = tmp_path / f"{label}.json"
        fireact.main(["eval", "--task", "toy", "--split", "test", "--n", "3", "--model", str(tiny_llama), "--device",
                      "cpu", "--zero-shot", "--max-steps", "2", "--max-new-tokens", "12", "--out", str(out), *flags])
        outs[label] = {k: (v["steps"], v["pred"]) for k, v in json.loads(out.read_text()).items()}
    assert outs["plain"] == outs["fast"] and len(outs["fast"]) == 3
    assert json.loads((tmp_path / "plain.summary.json").read_text())["config"]["plain"]
    dtypes = {k: json.loads((tmp_path / f"{k}.summary.json").read_text())["dtype"] for k in outs}
    assert dtypes == {"fast": "float32", "plain": "float32", "default": "bfloat16" if native_bf16() else "float32"}


# ------------------------------------------------------------------------------ FireAct's prompts, failed rows
FIREACT_PROMPTS = DATA / "fireact" / "prompts"
FT = DATA / "fireact" / "finetune"


def test_prompt_sets_default_to_fireacts_with_its_tool_family(tmp_path):
    """--prompts "": FireAct's prompts with a search engine (snippet, google) on its task families; ours for the
    toy world and for page tools. FireAct's are read from the data dir, never from the repo."""
    d = lambda task, tool: fireact.default_prompts(tasks.TASKS[task], tool)  # noqa: E731
    assert [d("hotpotqa_offline", "snippet"), d("hotpotqa", "google"), d("strategyqa", "google"),
            d("mmlu", "snippet"), d("bamboogle", "google")] == ["fireact"] * 5
    assert [d("hotpotqa_offline", "local"), d("hotpotqa", "wikipedia"), d("toy", "snippet"), d("toy_yesno", "snippet"),
            d("toy_mc", "local")] == ["ours"] * 5
    assert fireact.prompt_file("react", "mmlu", "snippet", "fireact") == \
        tasks.data_dir() / "fireact" / "prompts" / "react_mmlu_google.txt"
    assert fireact.prompt_file("cot", "hotpotqa", "", "fireact").name == "cot_hotpotqa.txt"
    with pytest.raises(ValueError, match="FireAct released no reflexion prompt"):
        fireact.prompt_file("reflexion", "hotpotqa", "snippet", "fireact")
    used = fireact.prompts_used("reflexion", "hotpotqa", "snippet", "fireact")
    assert used["react"].endswith("react_hotpotqa_google.txt") and used["reflexion"].endswith("reflexion_hotpotqa_snippet.txt")
    # every file download fetches from FireAct's repository is one of its prompts/ (9 files)
    got = {rel: url for rel, url in tasks.sources().items() if rel.startswith("fireact/prompts/")}
    assert len(got) == 9 and all(url == tasks.FIREACT_RAW + "prompts/" + Path(rel).name for rel, url in got.items())
    if FIREACT_PROMPTS.exists():
        assert {Path(r).name for r in got} == {p.name for p in FIREACT_PROMPTS.glob("*.txt")}
    import os
    old = os.environ.get("FIREACT_DATA")
    os.environ["FIREACT_DATA"] = str(tmp_path)  # no prompts there: a one-line error that says how to get them
    try:
        with pytest.raises(ValueError, match="download --only fireact/prompts"):
            fireact.few_shot("react", "hotpotqa", "snippet", "fireact")
    finally:
        os.environ.pop("FIREACT_DATA") if old is None else os.environ.__setitem__("FIREACT_DATA", old)
    with pytest.raises(SystemExit):
        fireact.parse_config(fireact.EvalConfig, ["--prompts", "theirs"])


class FireActStyleLLM:
    """Replies in the line format of FireAct's examples; reads the question as FireAct's prompt shows it (the line
    after the examples, no `Question:` label) and the turn from the Observation lines after it."""

    def __init__(self, prefix, script):
        self.prefix, self.script, self.prompts = prefix, script, []

    def complete_batch(self, prompts, stop=None, stop_at=None, temperature=None):
        outs = []
        for p in prompts:
            assert p.startswith(self.prefix + "\n\n")
            self.prompts.append(p)
            tail = p[len(self.prefix) + 2:]
            question = tail.split("\n")[0]
            reply = self.script[question][tail.count("\nObservation:")]
            k = stop_at(reply) if stop_at else None
            outs.append(reply if k is None else reply[:k])
        return outs

    def extend(self, prompt, text):
        return prompt + text


@pytest.mark.skipif(not FIREACT_PROMPTS.exists(), reason="../shared/data/fireact/prompts is absent")
def test_fireacts_prompts_run_through_the_agent_loop(wiki):
    """FireAct's ReAct prompt, built as FireAct's generation.py builds it (examples, the question with no label,
    then the steps), runs a scripted LLM that writes FireAct's line format through run_agent; our renderer writes
    its examples' steps back line for line, so the history the model sees has its examples' format."""
    prefix = (FIREACT_PROMPTS / "react_hotpotqa_google.txt").read_text().strip()
    assert prefix.startswith("Solve a question answering task with interleaving Thought, Action, Observation steps.")
    # 4 examples (ours: 3), each a question line, then Thought/Action/Observation lines, ending in the finish's
    # `Observation: Episode finished, reward = 1`: parse_react reads them, segments renders them back unchanged
    examples = prefix.split("Here are some examples.")[1].strip().split("\n\n\n")
    assert len(examples) == 4
    for ex in examples:
        question, body = ex.split("\n", 1)
        preamble, steps = tasks.parse_react(body)
        assert not preamble and tasks.is_finish(steps[-1]["action"]) and steps[-1]["observation"].endswith("reward = 1")
        assert all(tools.parse_action(s["action"]) for s in steps)
        assert "".join(t for t, _ in fireact.segments(question, steps, for_inference=True)[1:]) == body.strip() + "\n"
    for family, label, n in (("strategyqa", "Yes or no: ", 4), ("mmlu", "Single choice: ", 3)):
        text = fireact.few_shot("react", family, "google", "fireact")("Q?", [])
        assert text.endswith(f"reward = 1.\n\n{label}Q?\n" if family == "strategyqa" else f"reward = 1\n\n{label}Q?\n")
        assert text.count("Observation: Episode finished, reward = 1") == n
    prompt_fn = fireact.few_shot("react", "hotpotqa", "snippet", "fireact")
    assert prompt_fn("Q?", []) == prefix + "\n\nQ?\n" and "Question:" not in prompt_fn("Q?", [])
    q = "Which river crosses the capital of the country of the Atacama Desert?"
    llm = FireActStyleLLM(prefix, {q: [
        "Thought: I need to search the Atacama Desert first.\nAction: search[Atacama Desert]\nObservation: made up",
        "Thought: It is in Chile. I need the capital of Chile.\nAction: search[Santiago]\nObservation: x",
        "Thought: The Mapocho River crosses Santiago.\nAction: finish[Mapocho River]\nObservation: Episode finished, reward = 1"]})
    (ep,) = fireact.run_agent(llm, [wiki.fork()], [dict(id="0", question=q, answer="Mapocho River")], prompt_fn, 11)
    assert ep.pred == "Mapocho River" and not ep.error and [s["action"] for s in ep.steps] == [
        "search[Atacama Desert]", "search[Santiago]", "finish[Mapocho River]"]
    assert ep.steps[0]["observation"].startswith("The Atacama Desert is a desert plateau")  # the tool's, not the LLM's
    # the last prompt: FireAct's layout, each step in its examples' line format, no invented observation
    assert llm.prompts[-1] == (f"{prefix}\n\n{q}\nThought: I need to search the Atacama Desert first.\n"
                               f"Action: search[Atacama Desert]\nObservation: {ep.steps[0]['observation']}\n"
                               f"Thought: It is in Chile. I need the capital of Chile.\nAction: search[Santiago]\n"
                               f"Observation: {ep.steps[1]['observation']}\n")
    # CoT with FireAct's prompt: `Thought: ...\nAnswer: X`, its examples' format, is one finish step
    cot_fn, max_steps, _ = fireact.method_setup(tasks.TASKS["hotpotqa"], "cot", 11, prompts="fireact")
    cot_prefix = (FIREACT_PROMPTS / "cot_hotpotqa.txt").read_text().strip()
    llm = FireActStyleLLM(cot_prefix, {q: ["Thought: Santiago's river.\nAnswer: Mapocho River\n\nWhat is"]})
    (ep,) = fireact.run_agent(llm, [wiki.fork()], [dict(id="0", question=q, answer="x")], cot_fn, max_steps)
    assert ep.pred == "Mapocho River" and len(ep.steps) == 1


@pytest.mark.skipif(not FIREACT_PROMPTS.exists(), reason="../shared/data/fireact/prompts is absent")
def test_cli_eval_and_generate_record_the_prompts(cli_world):
    """eval's summary and generate's records say which prompts were used; --prompts picks them."""
    import shutil
    run, tmp = cli_world
    shutil.copytree(FIREACT_PROMPTS, tmp / "data" / "fireact" / "prompts")  # the test's data dir (a tmp copy)
    r = run("eval", "--task", "hotpotqa_offline", "--tool", "snippet", "--teacher-model", "chat", "--max-steps", "1",
            "--out", tmp / "f.json")  # (model `chat`: the scripted server's reply that needs no `Question:` label)
    assert r.returncode == 0, r.stderr
    assert "prompts: fireact" in r.stdout and "--prompts overrides" in r.stdout
    s = json.loads((tmp / "f.summary.json").read_text())
    assert s["prompts"]["set"] == "fireact" and s["prompts"]["react"].endswith("react_hotpotqa_google.txt")
    sent = ScriptedOpenAI.requests[-1]["messages"][-1]["content"]
    assert sent.startswith("Solve a question answering task") and "\nQuestion:" not in sent
    r = run("eval", "--task", "hotpotqa_offline", "--tool", "snippet", "--prompts", "ours", "--teacher-model", "again",
            "--max-steps", "1", "--out", tmp / "o.json")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp / "o.summary.json").read_text())
    assert s["prompts"]["set"] == "ours" and s["prompts"]["react"].endswith("react_hotpotqa_snippet.txt")
    r = run("generate", "--task", "hotpotqa_offline", "--split", "dev", "--allow-eval-split", "--teacher-model", "again",
            "--max-steps", "1", "--tool", "local", "--out", tmp / "g.jsonl")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(l) for l in (tmp / "g.jsonl").read_text().splitlines()]
    # ours is the run without a `prompts` key (as every file from before --prompts: they resume, byte for byte)
    assert recs and all("prompts" not in rec["run"] for rec in recs) and "prompts: ours" in r.stdout
    r = run("generate", "--task", "hotpotqa_offline", "--split", "dev", "--allow-eval-split", "--teacher-model", "again",
            "--max-steps", "1", "--tool", "local", "--out", tmp / "g.jsonl")
    assert r.returncode == 0 and "3 done, 0 to go" in r.stdout, r.stdout + r.stderr
    r = run("generate", "--task", "hotpotqa_offline", "--split", "dev", "--allow-eval-split", "--teacher-model", "again",
            "--max-steps", "1", "--tool", "local", "--prompts", "fireact", "--out", tmp / "g.jsonl")
    one_line_error(r, 1, "prompts None -> 'fireact'")


def test_failed_rows_are_dropped_on_the_way_to_training(tmp_path, capsys):
    """A row whose last observation says `reward = False` (or `= 0`) is a failed attempt: train.py --data, mix and
    filter drop it and say how many, from which file; --keep-failed keeps it. read_records returns every row."""
    ok = {"instruction": "Q1", "input": "", "output": "Thought: t\nAction: finish[a]\nObservation: Episode finished, reward = True\n"}
    bad = {"instruction": "Q2", "input": "", "output": "Thought: t\nAction: finish[b]\nObservation: Episode finished, reward = False\n"}
    zero = {"messages": [{"role": "user", "content": "Q3"}, {"role": "assistant", "content": "Thought: t\nAction: finish[c]"},
                         {"role": "user", "content": "Observation: Episode finished, reward = 0"}]}
    (tmp_path / "a.json").write_text(json.dumps([ok, bad, ok]))
    (tmp_path / "g.jsonl").write_text(json.dumps(zero) + "\n")
    assert len(tasks.read_records(tmp_path / "a.json")) == 3
    assert [tasks.is_failed(r) for r in tasks.read_records(tmp_path / "a.json")] == [False, True, False]
    assert len(tasks.read_training_records(tmp_path / "a.json")) == 2
    assert f"{tmp_path / 'a.json'}: dropped 1 of 3 trajectories" in capsys.readouterr().out
    assert len(tasks.read_training_records(tmp_path / "a.json", keep_failed=True)) == 3
    counts = fireact.mix(fireact.MixConfig(files=[str(tmp_path / "a.json"), str(tmp_path / "g.jsonl")],
                                           out=str(tmp_path / "m.jsonl")))
    assert sum(counts.values()) == 2 and "dropped 1 of 1 trajectories" in capsys.readouterr().out
    counts = fireact.mix(fireact.MixConfig(files=[str(tmp_path / "a.json"), str(tmp_path / "g.jsonl")],
                                           out=str(tmp_path / "m.jsonl"), keep_failed=True))
    assert sum(counts.values()) == 4
    # filter: FireAct's rows carry no score; the unfailed ones are its successful trajectories
    assert fireact.filter_records(fireact.FilterConfig(files=[str(tmp_path / "a.json")], out=str(tmp_path / "f.jsonl"))) == 2
    import train as T
    cfg = T.parse_args(["--data", str(tmp_path / "a.json"), "--val-frac", "0"])
    tr, _ = T.load_data(cfg, log=print)
    assert len(tr) == 2 and "dropped 1 of 3" in capsys.readouterr().out
    tr, _ = T.load_data(T.parse_args(["--data", str(tmp_path / "a.json"), "--val-frac", "0", "--keep-failed"]))
    assert len(tr) == 3


@pytest.mark.skipif(not FT.exists(), reason="../shared/data/fireact/finetune is absent")
@pytest.mark.parametrize("name,total,failed", [
    ("alpaca_format/hotpotqa.json", 500, 0), ("alpaca_format/hotpotqa_multimethod.json", 734, 40),
    ("alpaca_format/multitask.json", 1344, 0), ("alpaca_format/multitask_multimethod.json", 2063, 47),
    ("gpt_format/hotpotqa_multimethod.jsonl", 733, 40), ("gpt_format/multitask_multimethod.jsonl", 2063, 47)])
def test_fireacts_released_files_lose_their_failed_rows(name, total, failed, capsys):
    """FireAct's failed rows are its Reflexion rows: 40 of hotpotqa_multimethod's 47 (every one opens its reflection
    with the same fixed sentence) and 47 of multitask_multimethod's 71."""
    recs = tasks.read_records(FT / name)
    kept = tasks.read_training_records(FT / name)
    assert (len(recs), len(recs) - len(kept)) == (total, failed)
    out = capsys.readouterr().out
    assert (f"dropped {failed} of {total}" in out and name.split("/")[-1] in out) if failed else out == ""
    refl = [r for r in recs if any("let me do a reflection" in s["thought"] for s in r["steps"])]
    assert all(any("let me do a reflection" in s["thought"] for s in r["steps"]) for r in recs if tasks.is_failed(r))
    if "multimethod" in name:
        assert len(refl) == (47 if "hotpotqa" in name else 71)
        sentences = {m for r in refl for s in r["steps"]
                     for m in re.findall(r"[^.]*let me do a reflection[^.]*\.", s["thought"])}
        assert sentences == {"Now that I haven't solved the task within 5 steps, let me do a reflection and think "
                             "about how to improve my strategy."}

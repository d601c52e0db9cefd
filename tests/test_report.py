"""The HTML report (`fireact.py view` = `python -m extras view`, extras/report.py), `score --breakdown`, and the loss-mask page (`train.py --show-mask N --html`), checked
on the HTML text (no browser)."""
import html
import json
import re
from pathlib import Path

import pytest

from common import cli
import fireact
import tasks
from extras import report

REPO = Path(__file__).resolve().parent.parent
TOY_TEST = [json.loads(l) for l in (REPO / "data" / "toy" / "test.jsonl").read_text().splitlines()[:4]]


def write_run(path, label, preds, finished=(True,) * 4, errors=("",) * 4, summary=True):
    """An eval results file as `fireact.py eval` writes it (+ its summary), on the first 4 toy test questions."""
    results = {}
    for q, pred, fin, err in zip(TOY_TEST, preds, finished, errors):
        steps = [dict(thought=f"I search {q['question'][:20]}", action="search[X <b>]", observation="X is <i>a town</i>."),
                 dict(thought="Done.", action=f"finish[{pred}]", observation="Episode finished")] if fin else \
            [dict(thought="Hmm", action="lookup[y]", observation="No more results.")]
        em = tasks.score_answer("qa", pred, q["answer"])[0] > 0
        results[q["id"]] = dict(reward=em, em=em, f1=1.0 * em, gt=q["answer"], pred=pred if fin else "",
                                question=q["question"], traj=fireact.history_text(q["question"], steps), task="toy",
                                steps=steps, finished=fin, forced=False, error=err)
    path.write_text(json.dumps(results))
    if summary:
        tasks.summary_path(path).write_text(json.dumps(dict(
            run=label, task="toy", split="test", n=4, em=100 * sum(r["em"] for r in results.values()) / 4, f1=0.0,
            finished=sum(finished), finish_rate=25.0 * sum(finished), mean_steps=1.5, failures=sum(map(bool, errors)),
            errors=[], tool="local", wall_s=12.5, tokens={"prompt_tokens": 1000, "completion_tokens": 234},
            model="SmolLM2-135M-Instruct", adapter="runs/toy_default" if label == "fine-tuned" else None,
            template="react", provenance={"git_commit": "0123456789abcdef"})))
    return path


def cards(page):
    return re.findall(r'<details[^>]* class="q" data-id="([^"]+)" data-status="([^"]+)" data-type="([^"]*)"', page)


def test_view_two_runs_side_by_side(tmp_path):
    gold = [q["answer"] for q in TOY_TEST]
    a = write_run(tmp_path / "eval_prompted.json", "prompted", ["nope", gold[1], "x", "y"],
                  finished=(True, True, False, True), errors=("", "", "", "server said 500"))
    b = write_run(tmp_path / "eval_fine-tuned.json", "fine-tuned", gold[:3] + ["wrong"])
    out = tmp_path / "report.html"
    with pytest.raises(SystemExit) as e:   # an extra: fireact.py hands it to `python -m extras view` (a process)
        fireact.main(["view", str(a), str(b), "--out", str(out)])
    assert e.value.code == 0
    page = out.read_text()
    # self-contained: no network fetches of any kind
    assert not re.search(r'(src|href)=["\']?(https?:)?//', page) and "@import" not in page
    assert "<style>" in page and "<script>" in page
    summary = re.search(r'<table id="summary">(.*?)</table>', page).group(1)
    rows = re.findall(r"<tr><td>(.*?)</td><td>(\d+)</td><td>([\d.]+)</td>", summary)
    assert rows == [("prompted", "4", "25.0"), ("fine-tuned", "4", "75.0")]
    assert "12.5" in summary and "1,234" in summary and "adapter: runs/toy_default" in summary and "commit 0123456789" in summary
    # every question once, with the status of each run, in file order; types from data/toy/test.jsonl
    got = cards(page)
    assert [c[0] for c in got] == [q["id"] for q in TOY_TEST]
    assert [c[1] for c in got] == ["wrong correct", "correct correct", "unfinished correct", "failed wrong"]
    assert [c[2] for c in got] == [q["type"] for q in TOY_TEST]
    # EM by type: the counts per type and the fine-tuned EM per type
    bytype = re.search(r'<table class="bytype" id="by-type">(.*?)</table>', page).group(1)
    for t in {q["type"] for q in TOY_TEST}:
        idx = [i for i, q in enumerate(TOY_TEST) if q["type"] == t]
        em = 100 * sum(i < 3 for i in idx) / len(idx)
        assert re.search(rf"<td>{t}</td><td>[\d.]+ <span class=\"ty\">\({len(idx)}\)</span></td><td>{em:.1f} ", bytype)
    assert 'id="by-template"' in page   # the toy questions' templates too
    # trajectories escaped (no HTML injection from model text), both runs side by side, gold and errors shown
    assert "search[X &lt;b&gt;]" in page and "<i>a town</i>" not in page and "X is &lt;i&gt;a town&lt;/i&gt;." in page
    first = page[page.index(f'data-id="{TOY_TEST[0]["id"]}"'):page.index(f'data-id="{TOY_TEST[1]["id"]}"')]
    assert first.count('<div class="run s-') == 2 and f"gold: <b>{html.escape(gold[0])}</b>" in first
    assert "error: server said 500" in page
    # the filters: statuses, run picker, disagreement, types, text search
    for needle in ('class="st" value="correct"', 'class="st" value="unfinished"', 'id="run"', 'id="diff"',
                   'id="type"', 'id="text"'):
        assert needle in page


def test_view_without_summary_and_errors(tmp_path, capfd):
    a = write_run(tmp_path / "r.json", "x", [q["answer"] for q in TOY_TEST], summary=False)
    page = report.runs_html([report.load_run(a)])
    assert re.search(r'<table id="summary"><tr>.*?</tr><tr><td>r</td><td>4</td><td>100.0</td>', page)
    assert 'id="run"' not in page   # one run: no run picker
    with pytest.raises(SystemExit):   # one line, no traceback, nothing written
        cli.run(lambda: fireact.main(["view", str(tasks.summary_path(a)), "--out", str(tmp_path / "o.html")]))
    assert "a summary; pass the results file" in capfd.readouterr().err   # the extras process's stderr
    assert not (tmp_path / "o.html").exists()


FIREACT_7B = next(iter(sorted((tasks.data_dir() / "fireact" / "trajs").glob("*llama-2-7b*.json"))), None)


@pytest.mark.skipif(FIREACT_7B is None, reason="FireAct's trajs files are not in the data dir")
def test_view_fireact_trajs_file(tmp_path):
    run = report.load_run(FIREACT_7B)
    s = report.summary_rows(run)
    assert s["n"] == 500 and round(s["em"], 1) == 26.2   # `fireact.py score` says the same
    by = report.em_by([run], "type")
    assert set(by) == {"bridge", "comparison"} and sum(n for _, n in (c[0] for c in by.values())) == len(run["rows"])
    row = run["rows"][0]   # alpaca text parsed back into question and steps
    assert row["question"] and not row["question"].startswith(("Below", "###")) and row["steps"][0]["action"]
    assert all(not s["action"].startswith("Observation") for r in run["rows"] for s in r["steps"])


def test_show_mask_html(tmp_path, tiny_llama, capsys):
    import model as M
    import train
    out = tmp_path / "mask.html"
    train.main(["--data", str(REPO / "data" / "toy" / "train.jsonl"), "--show-mask", "2", "--html", str(out),
                "--model", str(tiny_llama)])
    page = out.read_text()
    rec = tasks.read_records(REPO / "data" / "toy" / "train.jsonl")[2]
    pieces, n, trained = fireact.mask_pieces(rec, M.load_tokenizer(tiny_llama))
    spans = re.findall(r'<span class="(t|m)">(.*?)</span>', page[page.index('id="mask"'):], re.S)
    assert [(html.unescape(t), c == "t") for c, t in spans] == [(t, bool(m)) for t, m in pieces]
    assert any(c == "t" and "Action: search[" in t for c, t in spans)          # actions trained
    assert any(c == "m" and t.startswith("Observation:") for c, t in spans)    # observations masked
    assert f"{n} tokens, {trained} trained" in page


def test_score_breakdown_hands_off_and_every_flag_has_help(tmp_path):
    """`python fireact.py score --breakdown` (an extra since issue 31) runs `python -m extras breakdown`; the extras'
    flags have --help as fireact.py's do."""
    import dataclasses
    import subprocess
    import sys
    res = {"1": dict(pred="Paris", gt="Paris", task="hotpotqa", steps=[dict(thought="t", action="finish[Paris]",
                                                                            observation="Episode finished.")])}
    (tmp_path / "r.json").write_text(json.dumps(res))
    r = subprocess.run([sys.executable, str(REPO / "fireact.py"), "score", str(tmp_path / "r.json"), "--breakdown"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "EM 100.0" in r.stdout and "tool calls" in r.stdout, r.stderr
    for name, (cls, _, doc) in report.COMMANDS.items():
        helps = cli.field_help(cls)
        assert doc and not [f.name for f in dataclasses.fields(cls) if not helps.get(f.name)], name

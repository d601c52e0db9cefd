"""
Self-contained HTML pages for looking at the agent, and where its errors come from. One file per page, CSS and
JavaScript inline: it opens from disk with no network and no dependency.

    python -m extras view runs/toy_eval_prompted.json runs/toy_eval_fine-tuned.json --out report.html
    python -m extras view ../shared/data/fireact/trajs/*7b*.json --out fireact_7b.html   # (= python fireact.py view)
    python -m extras breakdown runs/eval.json        # (= python fireact.py score --breakdown): tool calls x outcome
    python train.py --data data/toy/train.jsonl --show-mask 3 --html mask.html   # (python -m extras mask-html)

The report: each run's summary (EM, F1, finish rate, mean steps, wall time, tokens, what made it), EM by question
type where the task has types, and every question with the trajectory of each run side by side, marked correct,
wrong, unfinished or failed, with filters. What the files mean (formats, metrics, statuses) is tasks.py's: this
file only renders and counts.
"""
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import fireact  # check_out_path, mask_pieces, score (the breakdown prints score's lines too)
import tasks
import train  # mask-html parses train.py's own flags (train.py --show-mask N --html PAGE hands them over)
from common import files

STATUSES = ("correct", "wrong", "unfinished", "failed")


# ------------------------------------------------------------------------------------------------------- data
def _flag(v) -> bool:  # FireAct's files write booleans as "True"/"False"
    return v.strip().lower() == "true" if isinstance(v, str) else bool(v)


_TYPES = {}


def question_info(task: str) -> dict:
    """{question id: {"type", "template"}} of a task's questions, where its source files carry them: the toy
    world's (bridge/comparison and the question template) and HotpotQA dev's (bridge/comparison, id = index)."""
    if task not in _TYPES:
        info = {}
        try:
            if task == "toy":
                for f in sorted((tasks.REPO / "data" / "toy").glob("*.jsonl")):
                    for r in tasks.read_data(f):
                        if "type" in r and "id" in r:
                            info[str(r["id"])] = {"type": r["type"], "template": r.get("template", "")}
            elif task.startswith("hotpotqa"):
                dev = tasks.read_data(tasks.data_dir() / "hotpotqa" / "dev.json")
                info = {str(i): {"type": r.get("type", "")} for i, r in enumerate(dev)}
        except ValueError:  # the data is not here: the report has no type breakdown, nothing else is missing
            pass
        _TYPES[task] = info
    return _TYPES[task]


def status(row) -> str:
    if row.get("error"):
        return "failed"
    if row["em"]:
        return "correct"  # also a forced answer that is right: it scores
    return "unfinished" if not row["finished"] else "wrong"


def load_run(path) -> dict:
    """A results file -> {name, path, summary, task, n, rows}; rows: {id, question, gold, pred, em, f1, finished,
    error, steps, type, template, status}. Reads eval's OUT.json (+ OUT.summary.json), FireAct's trajs/*.json and
    trajectory JSONL (generate's records)."""
    path = Path(path)
    if path.name.endswith(".summary.json"):
        raise ValueError(f"{path}: a summary; pass the results file beside it (its summary is read too)")
    if path.is_dir():
        raise ValueError(f"{path}: a directory; pass results files (eval's --out, FireAct's trajs/*.json)")
    sp = tasks.summary_path(path)
    summary = files.read_json(sp, want=dict) if sp.exists() else None
    raw = tasks.read_results(path)
    task = (summary or {}).get("task") or next((r["task"] for r in raw if r.get("task") in tasks.TASKS), None) \
        or ("hotpotqa" if path.name.startswith("hotpotqa") else "")
    metric = tasks.get_task(task).metric if task in tasks.TASKS else "qa"
    info, rows = question_info(task) if task else {}, []
    for r in raw:
        question, steps = r["question"], r["steps"]  # read_results parsed them from FireAct's traj text if needed
        pred = r.get("pred")
        em, f1 = tasks.score_answer(metric, pred, r["gold"])   # recomputed, as `fireact.py score` does
        row = dict(id=str(r["id"]), question=question, gold=str(r["gold"]), pred="" if pred is None else str(pred),
                   em=em, f1=f1, finished=_flag(r["finished"]) if "finished" in r else bool(pred),
                   error=str(r.get("error") or ""), steps=steps, **info.get(str(r["id"]), {}))
        row["status"] = status(row)
        rows.append(row)
    name = (summary or {}).get("run") or path.stem
    return dict(name=name, path=str(path), summary=summary, task=task, n=tasks.denominator(path, raw), rows=rows)


# ------------------------------------------------------------------------------------------------------- HTML
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1d2329;background:#f6f7f9}
header,main{max-width:1400px;margin:auto;padding:0 18px}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:17px;margin:22px 0 8px}
table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border:1px solid #d9dde2;padding:4px 8px;text-align:right;vertical-align:top}
th:first-child,td:first-child,td.l,th:last-child{text-align:left}th{background:#eef1f4}
.what{font-size:12px;color:#57606a;max-width:420px;text-align:left}
.bar{position:sticky;top:0;background:#f6f7f9;padding:8px 0;border-bottom:1px solid #d9dde2;z-index:2;
 display:flex;flex-wrap:wrap;gap:12px;align-items:center}
.bar input[type=search]{width:240px;padding:3px 6px}
details.q{background:#fff;border:1px solid #d9dde2;border-radius:6px;margin:8px 0}
details.q>summary{cursor:pointer;padding:7px 10px;display:flex;gap:8px;align-items:baseline;flex-wrap:wrap}
.qid{color:#57606a;font:12px monospace}.qt{font-weight:600;flex:1 1 400px}.ty{font-size:12px;color:#57606a}
.runs{display:grid;gap:10px;padding:0 10px 10px}
.run{border-top:3px solid #d9dde2;padding-top:4px;min-width:0}
.run h4{margin:4px 0;font-size:13px}.gold{padding:0 10px 6px;font-size:13px}
.b{display:inline-block;border-radius:9px;padding:0 8px;font-size:12px;font-weight:600;color:#fff}
.correct{background:#1a7f37}.wrong{background:#cf222e}.unfinished{background:#9a6700}.failed{background:#6e7781}
.run.s-correct{border-color:#1a7f37}.run.s-wrong{border-color:#cf222e}.run.s-unfinished{border-color:#9a6700}
.run.s-failed{border-color:#6e7781}
ol.traj{margin:0;padding-left:22px}ol.traj li{margin:4px 0}
.th{color:#0550ae}.ac{font-family:monospace;background:#fff8c5;padding:0 3px}
.ob{color:#57606a;font-size:13px;white-space:pre-wrap;border-left:2px solid #d9dde2;padding-left:6px;margin-top:2px}
.err{color:#cf222e;font-size:13px}.hide{display:none}
.tok{white-space:pre-wrap;font:13px/1.6 monospace;background:#fff;border:1px solid #d9dde2;padding:12px}
.tok .t{background:#aceebb;outline:1px solid #4ac26b}.tok .m{color:#8c959f}
"""

JS = """
const $=s=>document.querySelector(s),$$=s=>[...document.querySelectorAll(s)];
function apply(){
  const want=new Set($$('.st:checked').map(e=>e.value)),run=+($('#run')||{value:0}).value,
        ty=($('#type')||{value:''}).value,text=$('#text').value.toLowerCase(),diff=($('#diff')||{}).checked;
  let shown=0;
  for(const q of $$('details.q')){
    const st=q.dataset.status.split(' '),ok=want.has(st[run])&&(!ty||q.dataset.type===ty)&&
      (!text||q.textContent.toLowerCase().includes(text))&&(!diff||new Set(st).size>1);
    q.classList.toggle('hide',!ok);shown+=ok;}
  $('#count').textContent=shown+' of '+$$('details.q').length+' questions';}
function openAll(o){for(const q of $$('details.q:not(.hide)'))q.open=o;}
document.addEventListener('input',apply);apply();
"""


def esc(x) -> str:
    return html.escape("" if x is None else str(x))


def _page(title, body, script="") -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><style>{CSS}</style></head>"
            f"<body>{body}" + (f"<script>{script}</script>" if script else "") + "</body></html>\n")


def _num(x, fmt="{:.1f}"):
    return "" if x is None else fmt.format(x)


def summary_rows(run) -> dict:
    """The run's headline numbers: its summary file's where there is one, else computed from its rows."""
    s, rows, n = run["summary"] or {}, run["rows"], run["n"]
    tokens = s.get("tokens") or {}
    what = [f"{k}: {s[k]}" for k in ("model", "adapter", "template", "tool", "split") if s.get(k)]
    prov = s.get("provenance") or {}
    if prov.get("git_commit"):
        what.append(f"commit {prov['git_commit'][:10]}{' (dirty)' if prov.get('git_dirty') else ''}")
    return dict(run=run["name"], n=n, em=s.get("em", 100 * sum(r["em"] for r in rows) / n),
                f1=s.get("f1", 100 * sum(r["f1"] for r in rows) / n),
                finish=s.get("finish_rate", 100 * sum(r["finished"] for r in rows) / n),
                steps=s.get("mean_steps", sum(len(r["steps"]) for r in rows) / n),
                failed=sum(r["status"] == "failed" for r in rows), wall=s.get("wall_s"),
                tokens=(tokens.get("prompt_tokens", 0) + tokens.get("completion_tokens", 0)) or None,
                what="; ".join(what) or run["path"])


def _summary_table(runs) -> str:
    head = "<tr><th>run</th><th>n</th><th>EM</th><th>F1</th><th>finish %</th><th>mean steps</th><th>failed</th>" \
           "<th>wall s</th><th>tokens</th><th>what made it</th></tr>"
    body = "".join(
        f"<tr><td>{esc(s['run'])}</td><td>{s['n']}</td><td>{s['em']:.1f}</td><td>{s['f1']:.1f}</td>"
        f"<td>{s['finish']:.1f}</td><td>{s['steps']:.2f}</td><td>{s['failed']}</td><td>{_num(s['wall'])}</td>"
        f"<td>{_num(s['tokens'], '{:,}')}</td><td class=\"what\">{esc(s['what'])}</td></tr>"
        for s in map(summary_rows, runs))
    return f"<table id=\"summary\">{head}{body}</table>"


def em_by(runs, key) -> dict:
    """{group: [(EM %, count) per run]} over the questions whose `key` (type, template) is known."""
    groups = sorted({r[key] for run in runs for r in run["rows"] if r.get(key)})
    out = {}
    for g in groups:
        out[g] = []
        for run in runs:
            rs = [r for r in run["rows"] if r.get(key) == g]
            out[g].append((100 * sum(r["em"] for r in rs) / len(rs) if rs else None, len(rs)))
    return out


def _type_table(runs, key, label) -> str:
    table = em_by(runs, key)
    if not table:
        return ""
    head = f"<tr><th>{esc(label)}</th>" + "".join(f"<th>{esc(r['name'])}</th>" for r in runs) + "</tr>"
    body = "".join(f"<tr><td>{esc(g)}</td>" + "".join(
        f"<td>{'' if em is None else f'{em:.1f}'} <span class=\"ty\">({n})</span></td>" for em, n in cells) + "</tr>"
        for g, cells in table.items())
    return f"<h2>EM by {esc(label)}</h2><table class=\"bytype\" id=\"by-{esc(key)}\">{head}{body}</table>"


def _steps_html(steps) -> str:
    items = []
    for s in steps:
        obs = "" if s.get("observation") is None or tasks.is_finish(s["action"]) else \
            f"<div class=\"ob\">{esc(s['observation'])}</div>"
        items.append(f"<li><span class=\"th\">{esc(s.get('thought'))}</span><br>"
                     f"<span class=\"ac\">{esc(s['action'])}</span>{obs}</li>")
    return f"<ol class=\"traj\">{''.join(items)}</ol>"


def _question_html(qid, per_run, names) -> str:
    first = next(r for r in per_run if r is not None)
    sts = [r["status"] if r else "failed" for r in per_run]
    badges = " ".join(f"<span class=\"b {st}\" title=\"{esc(n)}\">{st}</span>" for st, n in zip(sts, names))
    ty = " · ".join(x for x in (first.get("type"), first.get("template")) if x)
    panels = []
    for r, n in zip(per_run, names):
        if r is None:
            panels.append(f"<div class=\"run\"><h4>{esc(n)}</h4><i>not in this run</i></div>")
            continue
        err = f"<div class=\"err\">error: {esc(r['error'])}</div>" if r["error"] else ""
        panels.append(f"<div class=\"run s-{r['status']}\"><h4>{esc(n)}: <span class=\"b {r['status']}\">"
                      f"{r['status']}</span> pred <q>{esc(r['pred'])}</q> · {len(r['steps'])} steps · F1 "
                      f"{r['f1']:.2f}</h4>{err}{_steps_html(r['steps'])}</div>")
    return (f"<details class=\"q\" data-id=\"{esc(qid)}\" data-status=\"{' '.join(sts)}\" "
            f"data-type=\"{esc(first.get('type', ''))}\"><summary><span class=\"qid\">{esc(qid)}</span>"
            f"<span class=\"qt\">{esc(first['question'])}</span><span class=\"ty\">{esc(ty)}</span>{badges}</summary>"
            f"<div class=\"gold\">gold: <b>{esc(first['gold'])}</b></div>"
            f"<div class=\"runs\" style=\"grid-template-columns:repeat({len(names)},minmax(0,1fr))\">"
            f"{''.join(panels)}</div></details>")


def runs_html(runs, title="FireAct agent runs") -> str:
    """The report page of one or more loaded runs (load_run); questions are matched across runs by id."""
    if not runs:
        raise ValueError("view: give at least one results file")
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):   # two runs with one label (two `prompted` evals): tell them apart
        names = [f"{n} ({Path(r['path']).name})" for n, r in zip(names, runs)]
        for r, n in zip(runs, names):
            r["name"] = n
    by_id = [{r["id"]: r for r in run["rows"]} for run in runs]
    ids = list(dict.fromkeys(i for run in runs for i in (r["id"] for r in run["rows"])))
    types = sorted({r["type"] for run in runs for r in run["rows"] if r.get("type")})
    status_boxes = " ".join(f"<label><input type=\"checkbox\" class=\"st\" value=\"{s}\" checked> "
                            f"<span class=\"b {s}\">{s}</span></label>" for s in STATUSES)
    run_pick = ("<label>status of <select id=\"run\">" + "".join(
        f"<option value=\"{i}\">{esc(n)}</option>" for i, n in enumerate(names)) + "</select></label> "
                "<label><input type=\"checkbox\" id=\"diff\"> runs disagree</label>") if len(runs) > 1 else ""
    type_pick = ("<label>type <select id=\"type\"><option value=\"\">all</option>" + "".join(
        f"<option>{esc(t)}</option>" for t in types) + "</select></label>") if types else ""
    bar = (f"<div class=\"bar\">{status_boxes} {run_pick} {type_pick} <input type=\"search\" id=\"text\" "
           f"placeholder=\"search question, answer, trajectory\"> <button onclick=\"openAll(true)\">expand</button>"
           f"<button onclick=\"openAll(false)\">collapse</button> <span id=\"count\"></span></div>")
    questions = "".join(_question_html(i, [b.get(i) for b in by_id], names) for i in ids)
    body = (f"<header><h1>{esc(title)}</h1><p>{len(runs)} run(s), {len(ids)} questions. "
            + ("Same question, runs side by side. " if len(runs) > 1 else "") +
            "Open a question for its trajectory: thought, <span class=\"ac\">action</span>, observation.</p></header>"
            f"<main><h2>Runs</h2>{_summary_table(runs)}{_type_table(runs, 'type', 'type')}"
            f"{_type_table(runs, 'template', 'question template')}<h2>Questions</h2>{bar}{questions}</main>")
    return _page(title, body.replace("<details class=\"q\"", "<details open class=\"q\"", 2), JS)


def mask_html(pieces, title="loss mask", note="") -> str:
    """[(text, trained)] (fireact.mask_pieces) -> a page with the trained tokens highlighted."""
    spans = "".join(f"<span class=\"{'t' if m else 'm'}\">{esc(t)}</span>" for t, m in pieces)
    return _page(title, f"<header><h1>{esc(title)}</h1><p>{esc(note)} <span class=\"tok\" style=\"padding:0 4px\">"
                        f"<span class=\"t\">trained</span> <span class=\"m\">not trained (masked)</span></span></p>"
                        f"</header><main><div class=\"tok\" id=\"mask\">{spans}</div></main>")


# ------------------------------------------------------------------------------------------------------- view
@dataclass
class ViewConfig:
    files: list = field(default_factory=list)  # results files (eval's OUT.json, FireAct's trajs/*.json) or trajectory JSONL; two runs side by side
    out: str = "report.html"      # the self-contained HTML report (no network needed to open it)
    title: str = "FireAct agent runs"  # the page's title

    def check(self):
        fireact.check_out_path(self.out)


def view(cfg: ViewConfig) -> Path:
    """Results files -> one self-contained HTML report."""
    runs = [load_run(f) for f in cfg.files]
    files.atomic_write(cfg.out, runs_html(runs, cfg.title))
    print(f"{cfg.out}: {len(runs)} run(s), {sum(len(r['rows']) for r in runs)} results")
    return Path(cfg.out)


# -------------------------------------------------------------------------------------- score --breakdown
BREAKDOWN = ("right", "wrong, answer seen", "wrong, never seen", "wrong, yes/no/MC")


def error_breakdown(rows: list[dict], metric: str = "") -> dict:
    """Where the errors come from. -> {tool calls ("0", "1", "2", "3+"): {outcome: episodes}}, outcomes in BREAKDOWN.
    'Seen' means the normalised gold answer occurs, as whole words, in one of the episode's observations: wrong
    after seeing it is a reading (or answering) error, wrong without ever seeing it a search error. A yes/no or
    option gold is never 'seen' in that sense, so such errors have their own column."""
    table = {}
    for r in rows:
        m = metric or (tasks.get_task(r["task"]).metric if r.get("task") in tasks.TASKS else "qa")
        steps = r["steps"]
        calls = sum(1 for s in steps if s.get("action") and not tasks.is_finish(s["action"]))
        gold = tasks.normalize_answer(r["gold"])
        seen = any(f" {gold} " in f" {tasks.normalize_answer(s.get('observation') or '')} " for s in steps if gold)
        if tasks.score_answer(m, r.get("pred"), r["gold"])[0] > 0:
            outcome = "right"
        elif m != "qa" or gold in ("yes", "no"):
            outcome = "wrong, yes/no/MC"
        else:
            outcome = "wrong, answer seen" if seen else "wrong, never seen"
        row = table.setdefault(str(calls) if calls < 3 else "3+", dict.fromkeys(BREAKDOWN, 0))
        row[outcome] += 1
    return dict(sorted(table.items()))


def print_breakdown(table: dict):
    total = {k: sum(row[k] for row in table.values()) for k in BREAKDOWN}
    n = sum(total.values())
    print(f"  {'tool calls':>10} {'episodes':>8} " + " ".join(f"{k:>18}" for k in BREAKDOWN))
    for calls, row in [*table.items(), ("all", total)]:
        print(f"  {calls:>10} {sum(row.values()):>8} " +
              " ".join(f"{row[k]:>10} ({100 * row[k] / n:4.1f}%)" for k in BREAKDOWN))


@dataclass
class BreakdownConfig:
    files: list = field(default_factory=list)    # results files or directories (ours, or FireAct's trajs/*.json)
    metric: Literal["", "qa", "yesno", "mc"] = ""  # "" = from the records' task (qa for FireAct trajs)
    n: int = 0                    # denominator override

    def check(self):
        if self.n < 0:
            raise ValueError(f"--n {self.n}: must be >= 0")


def breakdown(cfg: BreakdownConfig) -> list[dict]:
    """`fireact.py score --breakdown`: each file's score line, then its episodes by tool calls x outcome. Exits 1
    after them all when a file has failed episodes, as score does."""
    paths = [p for f in cfg.files for p in (sorted(Path(f).glob("*.json*")) if Path(f).is_dir() else [Path(f)])]
    results, failed = [], False
    for path in paths:
        if path.name.endswith(".summary.json"):
            continue
        try:
            (r,) = fireact.score(fireact.ScoreConfig(files=[str(path)], metric=cfg.metric, n=cfg.n))
        except SystemExit:  # failed episodes: score marked the line; go on, then exit as score does
            failed, r = True, dict(file=str(path))
        r["breakdown"] = error_breakdown(tasks.read_results(path), cfg.metric)
        print_breakdown(r["breakdown"])
        results.append(r)
    if not results:
        raise ValueError(f"score: no results files in {' '.join(cfg.files)}")
    if failed:
        raise SystemExit(1)
    return results


# ------------------------------------------------------------------------------------- train.py --show-mask --html
def mask_page(cfg) -> Path:
    """`python train.py --show-mask N --html PAGE` (train.py hands its flags over): record N's loss mask as a page."""
    rec, tok = train.mask_record(cfg, log=lambda *a: None)
    pieces, n, trained = fireact.mask_pieces(rec, tok, cfg.train_on, cfg.template)
    files.atomic_write(cfg.html, mask_html(pieces, f"record {cfg.show_mask}: the loss mask", f"{n} tokens, {trained} "
                                           f"trained (train_on={cfg.train_on}, template={cfg.template})."))
    print(f"{cfg.html}: written")
    return Path(cfg.html)


COMMANDS = {"view": (ViewConfig, view, "results files -> one self-contained HTML report"),
            "breakdown": (BreakdownConfig, breakdown, "score, and where the errors come from: tool calls x outcome"),
            "mask-html": (train.TrainConfig, mask_page, "train.py --show-mask N --html PAGE: the loss mask as a web page")}

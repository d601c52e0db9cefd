"""FireAct pipeline: tasks, metrics, prompts, ONE agent loop, and the generate/filter/mix/eval/score/download CLI.

    python fireact.py generate --task toy --split train --method react --teacher-model oracle --out runs/toy_react.jsonl
    python fireact.py generate --task hotpotqa --split train --method cot --teacher-model gpt-4 --n 500 --out runs/hp_cot.jsonl
    python fireact.py filter runs/toy_react.jsonl --out runs/toy_ok.jsonl
    python fireact.py mix runs/toy_ok.jsonl runs/hp_ok.jsonl --tasks toy hotpotqa --methods react cot --out runs/train.jsonl
    python fireact.py eval --task hotpotqa_offline --adapter runs/lora --n 100 --out runs/eval.json [--compare]
    python fireact.py score ../shared/data/fireact/trajs/          # prints EM 26.2 / 34.4 / 40.0
    python fireact.py download --dest ~/.cache/fireact/data

Prompt text layout (few-shot LLMs; the zero-shot student prompt is train.render(..., for_inference=True), the same
layout without the prefix):
    {prefix from data/prompts/{method}_{family}.txt}\n\nQuestion: {question}\n
    Thought: {thought}\nAction: {action}\nObservation: {observation}\n      <- once per step so far
The LLM writes `Thought: ...\nAction: ...`; we cut after the first complete Action line (DESIGN §5). CoT writes
`Thought: ...\nAnswer: X`, read as the one step `finish[X]`. A reflection prompt uses data/prompts/reflexion_*.txt
and ends with `Reflection:`; the reflection then opens the next Thought.
"""
import csv, hashlib, json, os, random, re, string, sys, threading, time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import tools  # no torch: cheap to import

REPO = Path(__file__).resolve().parent
SHARED_DATA = REPO.parent / "shared" / "data"
CACHE = Path(os.environ.get("FIREACT_CACHE", Path.home() / ".cache" / "fireact"))
PROMPTS = REPO / "data" / "prompts"
FIREACT_RAW = "https://raw.githubusercontent.com/anchen1011/FireAct/main/"
# Every public source in one table: path under the data dir -> URL. `download` converts the three marked formats.
SOURCES = {
    "hotpotqa/dev.json": "https://raw.githubusercontent.com/ysymyth/ReAct/master/data/hotpot_dev_v1_simplified.json",
    "hotpotqa/train.json": "https://raw.githubusercontent.com/ysymyth/ReAct/master/data/hotpot_train_v1.1_simplified.json",
    "hotpotqa/hotpot_dev_distractor_v1.json": "http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json",
    "bamboogle/test.csv": FIREACT_RAW + "data/bamboogle/test.csv",
    "strategyqa/dev.json": "https://raw.githubusercontent.com/eladsegal/strategyqa/main/data/strategyqa/dev.json",
    "strategyqa/train_filtered.json": "https://raw.githubusercontent.com/eladsegal/strategyqa/main/data/strategyqa/train_filtered.json",
    "mmlu/data.tar": "https://people.eecs.berkeley.edu/~hendrycks/data.tar",
    **{f"fireact/finetune/{fmt}/{name}.{ext}": FIREACT_RAW + f"data/finetune/{fmt}/{name}.{ext}"
       for fmt, ext in (("alpaca_format", "json"), ("gpt_format", "jsonl"))
       for name in ("hotpotqa", "hotpotqa_multimethod", "multitask", "multitask_multimethod")},
    **{f"fireact/trajs/{name}": FIREACT_RAW + f"trajs/{name}" for name in (
        "hotpotqa_dev_0_500_ft_gpt-3.5-turbo-0613_princeton-nlp__7woQRsdi_0.0_2023-09-21-16-19-51.json",
        "hotpotqa_dev_0_500_llama_models_lora_llama-2-13b-d_1000_0.7_2023-09-18-13-40-08.json",
        "hotpotqa_dev_0_500_llama_models_lora_llama-2-7b-d_1000_0.7_2023-09-19-00-49-36.json")},
}
PRICES = {"gpt-4o-mini": (0.15, 0.6), "gpt-4o": (2.5, 10.0), "gpt-4-turbo": (10.0, 30.0), "gpt-4": (30.0, 60.0),
          "gpt-3.5-turbo": (0.5, 1.5)}  # USD per 1M (prompt, completion) tokens; longest matching prefix wins


def data_dir() -> Path:
    """Where datasets live: $FIREACT_DATA, else ../shared/data beside the repo, else the download cache."""
    if os.environ.get("FIREACT_DATA"):
        return Path(os.environ["FIREACT_DATA"])
    return SHARED_DATA if SHARED_DATA.exists() else CACHE / "data"


def read_json(path):
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path}: missing (run `python fireact.py download`, or set FIREACT_DATA)")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------- metrics
def normalize_answer(s) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, squeeze white space."""
    s = "".join(c for c in str(s).lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def f1_score(pred, gold) -> float:
    """Token F1 of HotpotQA's official script: a yes/no/noanswer mismatch scores 0."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if (p in ("yes", "no", "noanswer") or g in ("yes", "no", "noanswer")) and p != g:
        return 0.0
    common = sum((Counter(p.split()) & Counter(g.split())).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p.split()), common / len(g.split())
    return 2 * precision * recall / (precision + recall)


def yes_no(s):
    """'Yes, because ...' -> 'yes'; booleans too; None when the text starts with neither."""
    words = normalize_answer(s).split()
    first = words[0] if words else ""
    return {"yes": "yes", "true": "yes", "no": "no", "false": "no"}.get(first)


def option_letter(s):
    """'B', '(b)', 'B. kitchen', 'the answer is C' -> the option letter; None if none."""
    s = str(s).strip()
    m = re.match(r"^\(?([A-Da-d])\)?(?:$|[\s.:)])", s) or re.search(r"answer is \(?([A-D])\b", s)
    return m.group(1).upper() if m else None


def score_answer(metric: str, pred, gold) -> tuple[float, float]:
    """(em, f1) for metric 'qa' (SQuAD EM/F1), 'yesno' (first word) or 'mc' (option letter)."""
    if pred is None:
        return 0.0, 0.0
    if metric == "yesno":
        em = float(yes_no(pred) is not None and yes_no(pred) == yes_no(gold))
        return em, em
    if metric == "mc":
        em = float(option_letter(pred) is not None and option_letter(pred) == option_letter(gold))
        return em, em
    return float(normalize_answer(pred) == normalize_answer(gold)), f1_score(pred, gold)


# ------------------------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    name: str
    metric: str         # qa | yesno | mc
    family: str         # prompt files: data/prompts/{method}_{family}.txt
    tool: str           # default tool: wikipedia | local | search
    split: str          # default split


TASKS = {t.name: t for t in (
    Task("hotpotqa", "qa", "hotpotqa", "wikipedia", "fireact500"),
    Task("hotpotqa_offline", "qa", "hotpotqa", "local", "dev"),
    Task("bamboogle", "qa", "hotpotqa", "wikipedia", "test"),
    Task("strategyqa", "yesno", "strategyqa", "wikipedia", "dev"),
    Task("mmlu", "mc", "mmlu", "wikipedia", "test"),
    Task("toy", "qa", "hotpotqa", "local", "dev"),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise SystemExit(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def fireact_eval_ids() -> list[int]:
    """FireAct's HotpotQA eval subset: the Random(233) shuffle of the 7405 dev indices, first 500."""
    idxs = list(range(7405))
    random.Random(233).shuffle(idxs)
    return idxs[:500]


def load_questions(task: str, split: str = "", n: int = 0) -> list[dict]:
    """Questions of a task as [{"id", "question", "answer"}] (answers as strings: 'yes'/'no', 'A'-'D')."""
    t, d = get_task(task), data_dir()
    split = split or t.split
    if task == "hotpotqa":
        if split == "train":
            rows = read_json(d / "hotpotqa" / "train.json")
            qs = [dict(id=str(i), question=r["question"], answer=r["answer"]) for i, r in enumerate(rows)]
        else:
            dev = read_json(d / "hotpotqa" / "dev.json")
            ids = fireact_eval_ids() if split == "fireact500" else range(len(dev))
            qs = [dict(id=str(i), question=dev[i]["question"], answer=dev[i]["answer"]) for i in ids]
    elif task == "hotpotqa_offline":
        qs = [dict(id=str(r["dev_index"]), question=r["question"], answer=r["answer"])
              for r in read_json(d / "hotpotqa" / "dev_distractor.jsonl")]
    elif task == "bamboogle":
        qs = [dict(id=str(i), question=r["question"], answer=r["answer"])
              for i, r in enumerate(read_json(d / "bamboogle" / "test.json"))]
    elif task == "strategyqa":
        rows = read_json(d / "strategyqa" / ("train_filtered.json" if split == "train" else "dev.json"))
        qs = [dict(id=r["qid"], question=r["question"], answer="yes" if r["answer"] else "no") for r in rows]
    elif task == "mmlu":
        qs = []
        for f in sorted((d / "mmlu" / split).glob("*.csv")):
            with open(f, newline="") as fh:
                for i, row in enumerate(csv.reader(fh)):
                    if len(row) != 6:
                        raise ValueError(f"{f}:{i + 1}: expected 6 columns, got {len(row)}")
                    q = row[0] + "".join(f"\n{l}. {o}" for l, o in zip("ABCD", row[1:5]))
                    qs.append(dict(id=f"{f.stem}-{i}", question=q, answer=row[5].strip()))
    else:  # toy: made by toyworld.py inside the repo (data/toy/train.jsonl holds trajectories, not questions)
        name = "train_questions" if split == "train" else split
        qs = [dict(id=str(r["id"]), question=r["question"], answer=r["answer"])
              for r in read_json(REPO / "data" / "toy" / f"{name}.jsonl")]
    return qs[:n] if n else qs


def make_tool(task: str, kind: str = "", noise: float = 0.0, noise_mode: str = "none", seed: int = 0):
    """The tool an episode of `task` uses (one shared backend; agent loops call .fork() per episode)."""
    kind = kind or get_task(task).tool
    if kind == "wikipedia":
        tool = tools.Wikipedia(cache_dir=CACHE / "wikipedia")
    elif kind == "search":
        tool = tools.GoogleSearch()
    elif kind == "local":
        if task == "toy":
            corpus = REPO / "data" / "toy" / "corpus.jsonl"
        elif task.startswith("hotpotqa"):  # offline corpus: the 9,366 paragraphs of the 957 distractor questions
            src = data_dir() / "hotpotqa" / "dev_distractor.jsonl"
            key = hashlib.sha1(f"{src.resolve()}:{src.stat().st_mtime_ns}".encode()).hexdigest()[:12]
            corpus = CACHE / "corpus" / f"dev_distractor_{key}.jsonl"  # rebuilt when the source changes
            if not corpus.exists():
                tools.build_corpus([src], corpus)
        else:
            raise SystemExit(f"--tool local: no offline corpus for task {task!r}")
        tool = tools.LocalWiki(corpus)
    else:
        raise SystemExit(f"unknown tool {kind!r}; choose wikipedia | local | search")
    return tools.NoisyTool(tool, noise, mode=noise_mode, seed=seed) if noise > 0 else tool


# ----------------------------------------------------------------------------------------------------- prompts
def history_text(question: str, steps: list[dict]) -> str:
    """Question and steps so far in the ReAct text layout (also the `traj` text of results files)."""
    out = f"Question: {question}\n"
    for s in steps:
        out += (f"Thought: {s['thought']}\n" if s.get("thought") else "") + f"Action: {s['action']}\n"
        out += f"Observation: {s['observation']}\n"
    return out


def few_shot(method: str, family: str):
    """prompt_fn(question, steps) -> text: the few-shot prefix of data/prompts/{method}_{family}.txt + history."""
    path = PROMPTS / f"{method}_{family}.txt"
    if not path.exists():
        raise SystemExit(f"{path}: no such prompt file")
    prefix = path.read_text().strip()
    suffix = "Reflection:" if method == "reflexion" else ""
    return lambda question, steps: f"{prefix}\n\n{history_text(question, steps)}{suffix}"


def zero_shot(tokenizer):
    """prompt_fn for fine-tuned students: token ids from train.render, the very function used in training."""
    import train
    return lambda question, steps: train.render(question, steps, tokenizer, for_inference=True)[0]


# -------------------------------------------------------------------------------------------------------- LLMs
class TeacherLLM:
    """An agent-loop LLM over tools.Teacher (or toyworld.OracleTeacher): concurrent HTTP chat requests."""

    def __init__(self, teacher, workers=8, max_tokens=256, temperature=0.0, rpm=None):
        self.teacher, self.workers, self.max_tokens, self.temperature, self.rpm = teacher, workers, max_tokens, temperature, rpm
        self.draws, self.lock = Counter(), threading.Lock()

    def _one(self, prompt, stop, temperature):
        extra = {}
        if temperature > 0:  # a re-sample is the same request: a per-draw seed keeps the cache from replaying it
            with self.lock:
                extra["seed"], self.draws[prompt] = self.draws[prompt], self.draws[prompt] + 1
        return self.teacher.chat([{"role": "user", "content": prompt}], temperature=temperature,
                                 max_tokens=self.max_tokens, stop=stop, **extra)

    def complete_batch(self, prompts, stop=None, stop_at=None, temperature=None):
        """One reply per prompt (an Exception object where a request failed for good), cut by stop_at."""
        t = self.temperature if temperature is None else temperature
        if len(prompts) == 1:  # already inside a worker thread (generate runs one episode per thread)
            try:
                outs = [self._one(prompts[0], stop, t)]
            except Exception as e:  # a dead request ends this episode only; it is not written, so a rerun retries it
                outs = [e]
        else:
            done = dict(tools.run_concurrently(lambda i: self._one(prompts[i], stop, t), range(len(prompts)),
                                               workers=self.workers, rpm=self.rpm))
            outs = [done[i] for i in range(len(prompts))]
        cut = lambda o: o[:k] if stop_at and (k := stop_at(o)) is not None else o
        return [o if isinstance(o, Exception) else cut(o) for o in outs]

    def extend(self, prompt, text):
        return prompt + text

    @property
    def usage(self):
        return dict(getattr(self.teacher, "usage", {}))


class LocalLLM:
    """An agent-loop LLM over model.generate: one batched generate call advances every prompt together."""

    def __init__(self, model, tokenizer, max_new_tokens=128, temperature=0.0, seed=0, prefix_cache_mb=2048):
        import model as M
        self.model, self.tok, self.max_new_tokens, self.temperature, self.seed = model, tokenizer, max_new_tokens, temperature, seed
        self._usage = Counter()
        # each turn's prompt extends the last one's: keep K/V between turns, prefill only the new tokens
        self.prefix_cache = M.PrefixCache(prefix_cache_mb << 20) if prefix_cache_mb > 0 else None

    def complete_batch(self, prompts, stop=None, stop_at=None, temperature=None):
        import model as M
        t = self.temperature if temperature is None else temperature
        self.seed += 1  # a re-sample must not repeat the same draw
        ids = [p if isinstance(p, list) else self.tok.encode(p, bos=self.tok.add_bos) for p in prompts]  # as generate
        outs = M.generate(self.model, self.tok, ids, max_new_tokens=self.max_new_tokens, temperature=t,
                          stop=stop, stop_at=stop_at, seed=self.seed, prefix_cache=self.prefix_cache)
        self._usage["requests"] += len(prompts)
        self._usage["prompt_tokens"] += sum(map(len, ids))
        self._usage["completion_tokens"] += sum(len(self.tok.encode(o)) for o in outs)
        return outs

    def extend(self, prompt, text):
        return prompt + (self.tok.encode(text) if isinstance(prompt, list) else text)

    @property
    def usage(self):  # prompt_tokens counts every prompt token; prefill_tokens_reused, those not recomputed
        return dict(self._usage, **({"prefill_tokens_reused": self.prefix_cache.reused} if self.prefix_cache else {}))


# -------------------------------------------------------------------------------------------------- agent loop
STOP = ["\nObservation:"]
ACTION_RE = re.compile(r"^[ \t]*(Action[ \t]*\d*|Answer)[ \t]*:(.*)$", re.M | re.I)
THOUGHT_RE = re.compile(r"^\s*Thought[ \t]*\d*[ \t]*:\s*", re.I)
FORCE = "Thought: I have used all my steps, so I give my best answer now.\nAction: finish["
REFLECT_INTRO = "My attempt has not worked yet, so I reflect on it before going on."


def cut_after_action(text: str):
    """Index just past the first complete `Action: ...` line (at its closing ']' or its newline), or None."""
    for m in ACTION_RE.finditer(text):
        arg = m.group(2)
        if m.group(1).lower().startswith("action") and "]" in arg:
            return m.start(2) + arg.index("]") + 1
        if m.end() < len(text):  # a newline follows: the line is complete
            return m.end()
    return None


def split_step(text: str):
    """LLM text -> (thought, action or None). `Answer: X` (CoT) reads as finish[X]."""
    m = ACTION_RE.search(text)
    head = text[:m.start()] if m else text
    thought = " ".join(THOUGHT_RE.sub("", line).strip() for line in head.splitlines() if line.strip())
    if not m:
        return thought, None
    arg = m.group(2).strip()
    return thought, (f"finish[{arg}]" if m.group(1).lower() == "answer" else arg)


@dataclass
class Episode:
    id: str
    question: str
    answer: str
    tool: object
    steps: list = field(default_factory=list)
    done: bool = False      # finished by its own finish action, by a forced finish, or by an error
    forced: bool = False
    pred: str = None
    error: str = ""
    prefill: str = ""       # text the next LLM turn continues (a reflection)
    reflections: int = 0
    reflect_due: bool = False


@dataclass
class Reflexion:
    prompt_fn: object       # (question, steps) -> reflection prompt
    judge: object           # (episode, answer) -> bool: is this answer right?
    at_step: int = 5        # reflect when this many steps passed unsolved ...
    max_reflections: int = 1  # ... or after a wrong finish, at most this often per episode


def run_agent(llm, tools_by_episode, questions, prompt_fn, max_steps=11, batch_size=0, retries=2,
              resample_temperature=0.7, reflexion=None, on_done=None) -> list[Episode]:
    """THE agent loop, for any LLM with .complete_batch/.extend. Live episodes (at most batch_size, 0 = all) advance
    together: one complete_batch call per step, refilled from the queue as episodes end. Returns the episodes."""
    queue = deque(Episode(q["id"], q["question"], q["answer"], t) for q, t in zip(questions, tools_by_episode))
    live, finished = [], []
    while queue or live:
        while queue and (not batch_size or len(live) < batch_size):
            live.append(queue.popleft())
        if reflexion:
            due = [ep for ep in live if ep.reflect_due]
            for ep, out in zip(due, llm.complete_batch([reflexion.prompt_fn(ep.question, ep.steps) for ep in due],
                                                        stop=["\nQuestion:", "\n\n"]) if due else []):
                if isinstance(out, Exception):
                    ep.error, ep.done = repr(out), True
                else:
                    ep.prefill = f"Thought: {REFLECT_INTRO} {' '.join(out.split())}\n"
                ep.reflections, ep.reflect_due = ep.reflections + 1, False
        # Out of steps: one last turn whose prompt already ends in `Action: finish[`.
        for forced in (False, True):
            group = [ep for ep in live if not ep.done and (len(ep.steps) >= max_steps) == forced]
            if not group:
                continue
            prompts = [llm.extend(prompt_fn(ep.question, ep.steps), FORCE if forced else ep.prefill) for ep in group]
            outs = llm.complete_batch(prompts, stop=["]", "\n"] if forced else STOP,
                                      stop_at=None if forced else cut_after_action)
            for _ in range(0 if forced else retries):  # re-sample the turns that wrote no action
                redo = [i for i, o in enumerate(outs) if not isinstance(o, Exception)
                        and split_step(group[i].prefill + o)[1] is None]
                if not redo:
                    break
                again = llm.complete_batch([prompts[i] for i in redo], stop=STOP, stop_at=cut_after_action,
                                           temperature=resample_temperature)
                for i, o in zip(redo, again):
                    outs[i] = o
            for ep, out in zip(group, outs):
                advance(ep, out, forced, reflexion)
        for ep in [ep for ep in live if ep.done]:
            finished.append(ep)
            if on_done:
                on_done(ep)
        live = [ep for ep in live if not ep.done]
    order = {q["id"]: i for i, q in enumerate(questions)}
    return sorted(finished, key=lambda ep: order[ep.id])


def advance(ep: Episode, out, forced: bool, reflexion):
    """Apply one LLM turn to an episode: parse, run the tool, record the step."""
    if isinstance(out, Exception):
        ep.error, ep.done = repr(out), True
        return
    text = FORCE + out.split("]")[0].strip() + "]" if forced else ep.prefill + out
    ep.prefill = ""
    thought, action = split_step(text)
    # No action even after re-sampling: the raw text goes to the tool, whose observation says it is invalid.
    try:
        observation = ep.tool.step(action if action is not None else (text.strip() or "(empty)"))
    except tools.APIError as e:  # the tool's service failed for good: end this episode, not the whole batch
        ep.error, ep.done = str(e), True
        return
    ep.steps.append(dict(thought=thought, action=action or "", observation=observation))
    ep.forced = forced
    if getattr(ep.tool, "done", False):
        answer = ep.tool.answer
        if reflexion and not forced and ep.reflections < reflexion.max_reflections and not reflexion.judge(ep, answer):
            ep.steps[-1]["observation"] = "Answer is incorrect."
            ep.tool, ep.reflect_due = ep.tool.fork(), True  # fresh episode state, same backend
        else:
            ep.pred, ep.done = answer, True
    elif forced:
        ep.done = True  # the forced finish failed to parse: no answer
    elif reflexion and len(ep.steps) == reflexion.at_step and ep.reflections < reflexion.max_reflections:
        ep.reflect_due = True


def episode_record(ep: Episode, task: str, method: str, source: str) -> dict:
    """Our trajectory record (DESIGN §4)."""
    em, f1 = score_answer(get_task(task).metric, ep.pred, ep.answer)
    return dict(id=ep.id, task=task, method=method, question=ep.question, answer=ep.answer, steps=ep.steps,
                pred=ep.pred, em=em, f1=f1, finished=ep.pred is not None and not ep.forced, forced=ep.forced,
                source=source)


# ------------------------------------------------------------------------------------------------- files, resume
def read_jsonl_resumable(path: Path) -> list[dict]:
    """Records already in an append-only JSONL file. A torn last line (a crash mid-write) is cut off the file."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(raw.rfind(b"\n") + 1)
        raw = raw[:raw.rfind(b"\n") + 1]
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


def append_jsonl(f, record: dict):
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())  # a record is either wholly on disk or torn at the end, which the next run cuts


def read_results(path: Path) -> list[dict]:
    """Our eval JSON / FireAct's trajs/*.json (dict id -> {pred, gt, ...}) or our trajectory JSONL -> rows."""
    if path.suffix == ".jsonl":
        return [dict(r, gold=r["answer"]) for r in read_json(path)]
    d = read_json(path)
    if not isinstance(d, dict):
        raise SystemExit(f"{path}: expected a dict id -> result (FireAct trajs schema)")
    return [dict(v, id=k, gold=v.get("gt", "")) for k, v in d.items()]


def denominator(path: Path, rows: list) -> int:
    """FireAct's rule: the subset's size counts, also where a file holds fewer entries. Taken from our summary
    file, else from a FireAct file name (`..._dev_0_500_...`), else the number of entries."""
    summary = path.with_suffix(".summary.json")
    if summary.exists():
        return json.loads(summary.read_text())["n"]
    m = re.search(r"_(\d+)_(\d+)_", path.name)
    return int(m.group(2)) - int(m.group(1)) if m else len(rows)


# ----------------------------------------------------------------------------------------------------- configs
@dataclass
class RunConfig:  # what generate and eval share
    task: str = "toy"
    split: str = ""               # "" = the task's default (toy: dev; pass train for training data)
    n: int = 0                    # first n questions (0 = all)
    tool: str = ""                # wikipedia | local | search; "" = the task's default
    max_steps: int = 11           # FireAct 11, ReAct 7
    teacher_model: str = ""       # an OpenAI-style model name, or "oracle" (toyworld.OracleTeacher)
    base_url: str = ""            # "" = OpenAI; any OpenAI-compatible server otherwise
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key; the key is never written
    seed: int = 0


@dataclass
class GenerateConfig(RunConfig):
    teacher_model: str = "gpt-4"
    method: str = "react"         # react | cot | reflexion
    out: str = "runs/trajectories.jsonl"
    reflect_at: int = 5           # Reflexion: reflect after this many unsolved steps (and after a wrong finish)
    workers: int = 8              # concurrent episodes
    rpm: int = 0                  # requests per minute (0 = unlimited)
    temperature: float = 0.0
    max_tokens: int = 256


@dataclass
class EvalConfig(RunConfig):
    model: str = ""               # local checkpoint dir / hub name; "" = the embedded SmolLM2-135M-Instruct
    adapter: str = ""             # LoRA adapter dir: fine-tuned, zero-shot prompt
    noise: float = 0.0            # probability that an observation is replaced (NoisyTool)
    noise_mode: str = "none"      # none | random
    out: str = "runs/eval.json"
    max_new_tokens: int = 128
    batch_size: int = 32          # live episodes per batched generate call
    prefix_cache_mb: int = 2048   # K/V kept between agent turns, so a turn prefills only its new tokens (0 = off)
    zero_shot: bool = False       # use the zero-shot (render) prompt even without an adapter
    compare: bool = False         # prompted (few-shot, no adapter) vs fine-tuned (adapter, zero-shot), side by side
    device: str = ""


@dataclass
class FilterConfig:
    files: list = field(default_factory=list)
    out: str = "runs/filtered.jsonl"
    keep_forced: bool = False


@dataclass
class MixConfig:
    files: list = field(default_factory=list)
    out: str = "runs/train.jsonl"
    tasks: list = field(default_factory=list)    # [] = every task found
    methods: list = field(default_factory=list)  # [] = every method found
    per_group: int = 0                           # at most this many per (task, method); 0 = all
    per_method: list = field(default_factory=list)  # METHOD=N caps that override per_group: react=450 cot=0
    seed: int = 0


@dataclass
class ScoreConfig:
    files: list = field(default_factory=list)
    metric: str = ""              # "" = from the records' task (qa for FireAct trajs)
    n: int = 0                    # denominator override


@dataclass
class DownloadConfig:
    dest: str = ""                # "" = ~/.cache/fireact/data (use with FIREACT_DATA=...)
    only: list = field(default_factory=list)     # path prefixes from SOURCES, e.g. mmlu fireact/trajs


def parse_config(cls, argv):
    """CLI flags from the dataclass fields (tools.parse_config): --max-steps 11, --compare / --no-compare, positional `files`."""
    return tools.parse_config(cls, argv, prog=f"fireact.py {cls.__name__[:-6].lower()}", positional=("files",))


# ---------------------------------------------------------------------------------------------------- commands
def make_teacher(name, base_url="", api_key_env="OPENAI_API_KEY", method=None):
    if name == "oracle":  # the toy world's scripted teacher, same interface as tools.Teacher
        import toyworld
        return toyworld.OracleTeacher(method=method)
    return tools.Teacher(name, base_url=base_url or None, api_key_env=api_key_env, cache_dir=CACHE / "teacher")


def method_setup(task: Task, method: str, max_steps: int, reflect_at: int):
    """(prompt_fn, max_steps, reflexion) for a generation method. CoT is one turn that must finish."""
    if method not in ("react", "cot", "reflexion"):
        raise SystemExit(f"unknown method {method!r}; choose react | cot | reflexion")
    if method == "cot":
        return few_shot("cot", task.family), 1, None
    judge = lambda ep, answer: score_answer(task.metric, answer, ep.answer)[0] > 0
    reflexion = Reflexion(few_shot("reflexion", task.family), judge, reflect_at) if method == "reflexion" else None
    return few_shot("react", task.family), max_steps, reflexion


def cost(model_name: str, usage: dict):
    keys = [k for k in PRICES if model_name.startswith(k)]
    if not keys:
        return None
    p_in, p_out = PRICES[max(keys, key=len)]
    return (usage.get("prompt_tokens", 0) * p_in + usage.get("completion_tokens", 0) * p_out) / 1e6


def generate(cfg: GenerateConfig, teacher=None) -> Path:
    """Teacher trajectories, one JSONL record per question, appended as each episode ends. Resumable: questions
    already in the file are skipped, so a killed run restarts where it stopped with no duplicate and no loss."""
    from tqdm import tqdm
    task = get_task(cfg.task)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {r["id"] for r in read_jsonl_resumable(out)}
    todo = [q for q in load_questions(cfg.task, cfg.split, cfg.n) if q["id"] not in done]
    teacher = teacher or make_teacher(cfg.teacher_model, cfg.base_url, cfg.api_key_env, cfg.method)
    llm = TeacherLLM(teacher, max_tokens=cfg.max_tokens, temperature=cfg.temperature)
    prompt_fn, max_steps, reflexion = method_setup(task, cfg.method, cfg.max_steps, cfg.reflect_at)
    base_tool = make_tool(cfg.task, cfg.tool, seed=cfg.seed)
    print(f"generate {cfg.task}/{cfg.method} with {cfg.teacher_model}: {len(done)} done, {len(todo)} to go -> {out}")
    # One episode per worker thread: each is written the moment it ends (the batch is the pool of threads).
    episode = lambda q: run_agent(llm, [base_tool.fork()], [q], prompt_fn, max_steps, reflexion=reflexion)[0]
    stats, t0 = Counter(), time.time()
    with open(out, "a") as f, tqdm(total=len(todo), unit="q", dynamic_ncols=True) as bar:
        for q, ep in tools.run_concurrently(episode, todo, workers=cfg.workers, rpm=cfg.rpm or None):
            if isinstance(ep, BaseException) and not isinstance(ep, Exception):
                raise ep  # Ctrl-C / exit inside a worker: stop; what is written stays valid
            if isinstance(ep, Exception) or ep.error:
                stats["errors"] += 1  # not written: a rerun tries it again
            else:
                rec = episode_record(ep, cfg.task, cfg.method, cfg.teacher_model)
                append_jsonl(f, rec)
                stats["written"] += 1
                stats["correct"] += rec["em"]
            bar.update(1)
            bar.set_postfix(ok=int(stats["correct"]), err=stats["errors"])
    usage = llm.usage
    c = cost(cfg.teacher_model, usage)
    print(f"wrote {stats['written']} ({int(stats['correct'])} correct), {stats['errors']} errors in "
          f"{time.time() - t0:.0f}s; tokens: {usage.get('prompt_tokens', 0)} prompt + "
          f"{usage.get('completion_tokens', 0)} completion in {usage.get('requests', 0)} requests "
          f"({usage.get('cached', 0)} cached); cost " + (f"${c:.2f}" if c is not None else "n/a"))
    return out


def filter_records(cfg: FilterConfig) -> int:
    """Keep the successful trajectories (right answer, finished by the agent itself), one per (task, method, id)."""
    seen, kept = set(), []
    for path in cfg.files:
        for r in read_json(Path(path)):
            key = (r.get("task"), r.get("method"), r["id"])
            if r.get("em", 0) > 0 and (cfg.keep_forced or not r.get("forced")) and key not in seen:
                seen.add(key)
                kept.append(r)
    write_jsonl(Path(cfg.out), kept)
    print(f"kept {len(kept)} successful trajectories -> {cfg.out}")
    return len(kept)


def write_jsonl(path: Path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    os.replace(tmp, path)


def mix(cfg: MixConfig) -> Counter:
    """K tasks x M methods -> one shuffled training file (our format; FireAct's files are read too)."""
    import train
    groups = {}
    for path in cfg.files:
        for r in train.read_records(path):
            groups.setdefault((r.get("task", "?"), r.get("method", "?")), []).append(r)
    caps = {}
    for spec in cfg.per_method:
        m, _, n = spec.partition("=")
        if not n.isdigit():
            raise SystemExit(f"mix: --per-method {spec!r}: expected METHOD=N, e.g. react=450")
        caps[m] = int(n)
    rng, out, counts = random.Random(cfg.seed), [], Counter()
    for (task, method), recs in sorted(groups.items()):
        if (cfg.tasks and task not in cfg.tasks) or (cfg.methods and method not in cfg.methods):
            continue
        recs.sort(key=lambda r: str(r.get("id", "")))  # generate writes in thread-finish order: make mix reproducible
        rng.shuffle(recs)
        take = recs[:caps[method]] if method in caps else recs[:cfg.per_group or None]
        out += take
        counts[(task, method)] = len(take)
    if not out:
        raise SystemExit(f"mix: no records for tasks {cfg.tasks} x methods {cfg.methods} in {cfg.files}")
    rng.shuffle(out)
    write_jsonl(Path(cfg.out), out)
    methods = sorted({m for _, m in counts})
    print("task".ljust(18) + "".join(m.rjust(11) for m in methods))
    for task in sorted({t for t, _ in counts}):
        print(task.ljust(18) + "".join(str(counts[(task, m)]).rjust(11) for m in methods))
    print(f"{len(out)} records -> {cfg.out}")
    return counts


def score(cfg: ScoreConfig) -> list[dict]:
    """EM/F1 of results files, recomputed from pred and gold; FireAct's denominator rule (see `denominator`)."""
    paths = [p for f in cfg.files for p in (sorted(Path(f).glob("*.json*")) if Path(f).is_dir() else [Path(f)])]
    results = []
    for path in paths:
        if path.name.endswith(".summary.json"):
            continue
        rows = read_results(path)
        n = cfg.n or denominator(path, rows)
        em = f1 = 0.0
        for r in rows:
            metric = cfg.metric or (get_task(r["task"]).metric if r.get("task") in TASKS else "qa")
            e, f = score_answer(metric, r.get("pred"), r["gold"])
            em, f1 = em + e, f1 + f
        results.append(dict(file=str(path), em=100 * em / n, f1=100 * f1 / n, entries=len(rows), n=n))
        print(f"EM {100 * em / n:5.1f}  F1 {100 * f1 / n:5.1f}  ({len(rows)} entries / {n})  {path.name}")
    return results


def run_eval(cfg: EvalConfig, llm, prompt_fn, label: str, out: Path) -> dict:
    """Run the agent on a task's questions, write FireAct-schema results + a summary, return the summary."""
    from tqdm import tqdm
    qs = load_questions(cfg.task, cfg.split, cfg.n)
    base_tool = make_tool(cfg.task, cfg.tool, cfg.noise, cfg.noise_mode, cfg.seed)
    t0 = time.time()
    with tqdm(total=len(qs), unit="q", desc=label, dynamic_ncols=True) as bar:
        eps = run_agent(llm, [base_tool.fork() for _ in qs], qs, prompt_fn, cfg.max_steps, cfg.batch_size,
                        on_done=lambda ep: bar.update(1))
    wall = time.time() - t0
    results = {}
    for ep in eps:
        r = episode_record(ep, cfg.task, "react", label)
        results[ep.id] = dict(reward=r["em"] > 0, em=r["em"] > 0, f1=r["f1"], gt=ep.answer, pred=ep.pred or "",
                              prompt="", traj=history_text(ep.question, ep.steps), task=cfg.task, steps=ep.steps,
                              finished=r["finished"], forced=ep.forced, error=ep.error)
    n = len(qs)
    summary = dict(run=label, task=cfg.task, model=cfg.teacher_model or cfg.model or "SmolLM2-135M-Instruct",
                   tool=cfg.tool or get_task(cfg.task).tool, noise=cfg.noise, n=n,
                   em=100 * sum(r["em"] for r in results.values()) / n,
                   f1=100 * sum(r["f1"] for r in results.values()) / n,
                   mean_steps=sum(len(ep.steps) for ep in eps) / n,
                   finish_rate=100 * sum(r["finished"] for r in results.values()) / n,
                   wall_s=wall, tokens=llm.usage)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def print_table(summaries: list[dict]):
    print(f"{'run':<28}{'n':>6}{'EM':>7}{'F1':>7}{'steps':>7}{'finish%':>9}{'wall s':>9}{'tokens':>10}")
    for s in summaries:
        tok = s["tokens"].get("prompt_tokens", 0) + s["tokens"].get("completion_tokens", 0)
        print(f"{s['run']:<28}{s['n']:>6}{s['em']:>7.1f}{s['f1']:>7.1f}{s['mean_steps']:>7.2f}"
              f"{s['finish_rate']:>9.1f}{s['wall_s']:>9.1f}{tok:>10}")


def evaluate(cfg: EvalConfig) -> list[dict]:
    """Prompted (few-shot) or fine-tuned (adapter, zero-shot) evaluation; --compare runs both on the same model."""
    family = get_task(cfg.task).family
    out = Path(cfg.out)
    if cfg.teacher_model:
        llm = TeacherLLM(make_teacher(cfg.teacher_model, cfg.base_url, cfg.api_key_env))
        summaries = [run_eval(cfg, llm, few_shot("react", family), f"{cfg.teacher_model} prompted", out)]
    else:
        import model as M
        if cfg.compare and not cfg.adapter:
            raise SystemExit("--compare needs --adapter (the fine-tuned run)")
        net, tok = M.load_model(cfg.model or None, device=cfg.device or None)
        runs = [("prompted", False), ("fine-tuned", True)] if cfg.compare else [
            ("fine-tuned" if cfg.adapter else "zero-shot" if cfg.zero_shot else "prompted", bool(cfg.adapter))]
        summaries = []
        for label, tuned in runs:
            if tuned:
                M.load_adapter(net, cfg.adapter)
            prompt_fn = zero_shot(tok) if tuned or cfg.zero_shot else few_shot("react", family)
            path = out.with_name(f"{out.stem}_{label}{out.suffix}") if cfg.compare else out
            llm = LocalLLM(net, tok, cfg.max_new_tokens, seed=cfg.seed, prefix_cache_mb=cfg.prefix_cache_mb)
            summaries.append(run_eval(cfg, llm, prompt_fn, label, path))
    print_table(summaries)
    return summaries


# ---------------------------------------------------------------------------------------------------- download
def fetch(url: str, path: Path, timeout=60):
    """GET url into path (a tmp file, then an atomic rename: a half download never looks finished)."""
    import requests
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with requests.get(url, stream=True, timeout=timeout, headers={"User-Agent": "fireact-from-scratch/0.1"}) as r:
        r.raise_for_status()
        with open(tmp, "wb") as f:
            for chunk in r.iter_content(1 << 20):
                f.write(chunk)
    os.replace(tmp, path)


def download(cfg: DownloadConfig) -> Path:
    """Fetch SOURCES into the data dir and convert to the layout load_questions reads (= ../shared/data)."""
    import tarfile
    dest = Path(cfg.dest).expanduser() if cfg.dest else CACHE / "data"
    for rel, url in SOURCES.items():
        if cfg.only and not any(rel.startswith(o) for o in cfg.only):
            continue
        path = dest / rel
        if not path.exists():
            print(f"{url} -> {path}")
            fetch(url, path)
        if rel == "mmlu/data.tar" and not (dest / "mmlu" / "test").exists():
            with tarfile.open(path) as tar:  # data/{dev,val,test}/*.csv -> mmlu/{dev,val,test}/
                for m in tar.getmembers():
                    parts = Path(m.name).parts
                    if m.isfile() and len(parts) == 3 and parts[1] in ("dev", "val", "test") and m.name.endswith(".csv"):
                        (dest / "mmlu" / parts[1]).mkdir(parents=True, exist_ok=True)
                        (dest / "mmlu" / parts[1] / parts[2]).write_bytes(tar.extractfile(m).read())
        elif rel == "bamboogle/test.csv":
            with open(path, newline="") as f:
                rows = [dict(question=r["Question"], answer=r["Answer"]) for r in csv.DictReader(f)]
            (dest / "bamboogle" / "test.json").write_text(json.dumps(rows, indent=1))
        elif rel.endswith("distractor_v1.json") and (dest / "hotpotqa" / "dev.json").exists():
            index = {r["question"]: i for i, r in enumerate(read_json(dest / "hotpotqa" / "dev.json"))}
            rows = [dict(r, dev_index=index[r["question"]]) for r in read_json(path) if r["question"] in index]
            write_jsonl(dest / "hotpotqa" / "dev_distractor.jsonl", rows)
    print(f"data in {dest}" + ("" if dest == data_dir() else f"; use it with FIREACT_DATA={dest}"))
    return dest


COMMANDS = {"generate": (GenerateConfig, generate), "eval": (EvalConfig, evaluate), "filter": (FilterConfig, filter_records),
            "mix": (MixConfig, mix), "score": (ScoreConfig, score), "download": (DownloadConfig, download)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python fireact.py {{{'|'.join(COMMANDS)}}} [--help]")
    cls, fn = COMMANDS[argv[0]]
    return fn(parse_config(cls, argv[1:]))


if __name__ == "__main__":
    main()

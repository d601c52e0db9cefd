"""FireAct pipeline: the trajectory format, tasks and metrics, prompts, ONE agent loop, and the CLI:
generate / filter / mix / eval / score / download / export-data / finetune-api / view / table.

    python fireact.py --help                                  # the commands; `python fireact.py eval --help`: every flag
    python fireact.py generate --task toy --method react --teacher-model oracle --out runs/toy_react.jsonl
    python fireact.py generate --task hotpotqa --method cot --teacher-model gpt-4 --n 500 --out runs/hp_cot.jsonl
    python fireact.py filter runs/toy_react.jsonl --out runs/toy_ok.jsonl
    python fireact.py mix runs/toy_ok.jsonl runs/hp_ok.jsonl --tasks toy hotpotqa --methods react cot --out runs/train.jsonl
    python fireact.py eval --task hotpotqa_offline --adapter runs/lora --n 100 --out runs/eval.json [--compare]
    python fireact.py score ../shared/data/fireact/trajs/          # prints EM 26.2 / 34.4 / 40.0
    python fireact.py download --dest ~/.cache/fireact/data
    python fireact.py export-data runs/train.jsonl --format openai --out runs/train_openai.jsonl   # or alpaca, sharegpt
    python fireact.py finetune-api runs/train_openai.jsonl --base-model gpt-3.5-turbo [--dry-run]   # FireAct's GPT-3.5
    python fireact.py eval --task hotpotqa --teacher-model ft:gpt-3.5-turbo:... --zero-shot              # ... student

This file owns the trajectory format (torch-free: `mix` and `filter` need no torch): its schema is in the
"trajectories" section, with every reader and the one render function that training (train.py) and inference
share. Each task is a small class owning its splits, loader, metric, prompt family, default tool and sources.

Prompt text layout (few-shot LLMs; the zero-shot student prompt is render(..., for_inference=True), the same
layout without the prefix):
    {prefix from data/prompts/{method}_{family}[_snippet].txt}\n\nQuestion: {question}\n
    Thought: {thought}\nAction: {action}\nObservation: {observation}\n      <- once per step so far
The LLM writes `Thought: ...\nAction: ...`; we cut after the first complete Action line (DESIGN §5). CoT writes
`Thought: ...\nAnswer: X`, read as the one step `finish[X]`. A reflection prompt uses data/prompts/reflexion_*.txt
and ends with `Reflection:`; the reflection then opens the next Thought.
"""
import csv, dataclasses, hashlib, json, os, random, re, string, sys, threading, time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common import cli, files  # flags, one-line errors, atomic writes, provenance (torch-free)
import tools  # no torch: cheap to import

REPO = Path(__file__).resolve().parent
SHARED_DATA = REPO.parent / "shared" / "data"
CACHE = Path(os.environ.get("FIREACT_CACHE", Path.home() / ".cache" / "fireact"))
PROMPTS = REPO / "data" / "prompts"
FIREACT_RAW = "https://raw.githubusercontent.com/anchen1011/FireAct/main/"
REACT_RAW = "https://raw.githubusercontent.com/ysymyth/ReAct/master/"
STRATEGYQA_RAW = "https://raw.githubusercontent.com/eladsegal/strategyqa/main/data/strategyqa/"
PRICES = {"gpt-4o-mini": (0.15, 0.6), "gpt-4o": (2.5, 10.0), "gpt-4-turbo": (10.0, 30.0), "gpt-4": (30.0, 60.0),
          "gpt-3.5-turbo": (0.5, 1.5)}  # USD per 1M (prompt, completion) tokens; longest matching prefix wins


def data_dir() -> Path:
    """Where datasets live: $FIREACT_DATA, else ../shared/data beside the repo, else the download cache."""
    if os.environ.get("FIREACT_DATA"):
        return Path(os.environ["FIREACT_DATA"])
    return SHARED_DATA if SHARED_DATA.exists() else CACHE / "data"


def read_json(path):
    path = Path(path)
    if not path.exists():  # the download hint only where download would help: a dataset, not a results file
        in_data = data_dir().absolute() in path.absolute().parents
        hint = " (run `python fireact.py download`, or set FIREACT_DATA)" if in_data else ""
        raise ValueError(f"{path}: no such file{hint}")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({e})") from None


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


# ------------------------------------------------------------------------------------------------ trajectories
# THE trajectory format: every reader, writer and renderer of trajectories is in this section (torch-free).
#
# Our record, one JSON object per line of a .jsonl file (generate writes it, filter/mix/train read it):
#   id        str    question id within its task ("toy-train-0001", a HotpotQA dev index, ...)
#   task      str    fireact task name (toy, hotpotqa, strategyqa, ...)
#   method    str    react | cot | reflexion ("" where a file does not say: FireAct's released files)
#   question  str    the question (MMLU: with its options A-D)
#   answer    str    the gold answer ("yes"/"no" for yesno tasks, "A".."D" for mc tasks)
#   steps     list   [{"thought": str, "action": str, "observation": str | None}], in order. An action is
#                    search[query], lookup[keyword] or finish[answer], or "" when the model wrote none (its
#                    observation then says the action was invalid). CoT is one step: a thought, then finish[X].
#                    A reflection (Reflexion) opens the thought of the step after it.
#   tool      str    which tool made the observations: local | snippet | wikipedia | google
#   pred, em, f1, finished, forced, reflections     the episode's own answer, its score and how it ended
#   source    str    the teacher model, or the file the record was read from
# Invariant: a trajectory holds at most one finish, and it is its last step. Readers refuse a record that
# breaks it (file:line), never cut it silently: a cut would train the student on whatever came first.
#
# FireAct's released files load as they are: alpaca JSON ({"instruction": question, "output": ReAct text}) and
# gpt-format JSONL ({"messages": [user question, assistant Thought/Action, user Observation, ...]}); so do
# ShareGPT rows ({"conversations": [{"from": "human" | "gpt", "value"}]}). `export_row` writes all three.
STEP_LINE = re.compile(r"^(Thought|Action|Observation)(?: \d+)?:[ \t]?(.*)$")
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{question}\n\n### Response:\n")  # FireAct's Llama prompt (alpaca-lora)
TEMPLATES = ("react", "alpaca")


def is_finish(action) -> bool:
    """Whether the tool ends the episode on this action: the tool's own parse, so a finish it refused
    ("finish[a [b]", unbalanced: "Invalid action", the episode goes on) is an ordinary step here too."""
    parsed = tools.parse_action(str(action).strip())
    return parsed is not None and parsed[0] == "finish"


def segments(question, steps, for_inference=False, template="react"):
    """THE layout of a trajectory as text: [(text, trained)], text None = end of sequence.
        Question: {question}\\n                      (template alpaca: FireAct's instruction block instead)
        Thought: {thought}\\nAction: {action}\\n       trained
        Observation: {observation}\\n                 not trained
        ...
        Thought: {thought}\\nAction: finish[{answer}]<eos>
    A step without an action (the model wrote none) has no Action line. for_inference: the prompt of the next
    model turn, ending right after the last Observation line (no end of sequence)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose {' | '.join(TEMPLATES)}")
    segs = [(ALPACA.format(question=question) if template == "alpaca" else f"Question: {question}\n", 0)]
    # the invariant: never render (train on) whatever came after a finish. A finish the tool refused
    # ("finish[a [b]", unbalanced) is no finish (is_finish): an ordinary step, as the agent saw it
    for i, s in enumerate(steps[:-1]):
        if is_finish(s["action"]):
            raise ValueError(f"step {i + 1} of {len(steps)} is a finish; a trajectory ends at its only finish")
    for s in steps:
        action, thought = s["action"].strip(), (s.get("thought") or "").strip()
        text = (f"Thought: {thought}\n" if thought else "") + (f"Action: {action}" if action else "")
        if is_finish(action) and not for_inference:
            segs += [(text, 1), (None, 1)]  # eos: the model learns to stop after finish[...]
            break
        segs.append((text + ("\n" if action else ""), 1))
        if s.get("observation") is not None:
            segs.append((f"Observation: {s['observation']}\n", 0))
    if not for_inference:  # a masked tail (a trajectory cut before its finish) teaches nothing
        while segs and segs[-1][1] == 0:
            segs.pop()
    return segs


def history_text(question, steps) -> str:
    """Question and steps so far as text: the few-shot prompt's tail and the `traj` of results files."""
    return "".join(text for text, _ in segments(question, steps, for_inference=True))


def render(question, steps, tokenizer, train_on="actions", for_inference=False, template="react"):
    """THE rendering for training and inference -> (ids, mask); mask[i] = 1 iff ids[i] is trained on.
    Each segment is encoded on its own and concatenated, so training and inference share token boundaries.
    train_on "all" trains every token (FireAct's code did: its mask was built and never used)."""
    if train_on not in ("actions", "all"):
        raise ValueError(f"unknown train_on {train_on!r}; choose actions | all")
    ids, mask = ([tokenizer.bos_id], [0]) if tokenizer.add_bos else ([], [])
    for text, m in segments(question, steps, for_inference, template):
        t = [tokenizer.eos_id] if text is None else tokenizer.encode(text)
        ids += t
        mask += [1 if train_on == "all" else m] * len(t)
    return ids, mask


def chat_messages(question, steps, final_observation=False):
    """FireAct's gpt format (how it fine-tuned and evaluated GPT-3.5): the question as the first user message,
    each Thought/Action as an assistant message, each Observation as a user message. final_observation: keep the
    finish's observation too (FireAct's files end with the user message `Observation: Episode finished, reward =
    True`); a prompt never has one, as it holds no finish."""
    msgs = [{"role": "user", "content": question}]
    for s in steps:
        action, thought = s["action"].strip(), (s.get("thought") or "").strip()
        msgs.append({"role": "assistant", "content": "\n".join(
            x for x in (f"Thought: {thought}" if thought else "", f"Action: {action}" if action else "") if x)})
        if s.get("observation") is not None and (final_observation or not is_finish(action)):
            msgs.append({"role": "user", "content": f"Observation: {s['observation']}"})
    return msgs


EXPORT_FORMATS = ("openai", "alpaca", "sharegpt")
MC_OPTIONS = re.compile(r"\n(A\. [^\n]*\nB\. [^\n]*\nC\. [^\n]*\nD\. [^\n]*)$")  # MMLU: options end the question


def export_row(rec, fmt="openai", final_observation=True) -> dict:
    """Our record -> one row of a fine-tuning format; `read_records` reads each back to the same steps.
        openai   {"messages": chat_messages(...)}: FireAct's gpt_format, OpenAI's fine-tuning format
        sharegpt {"conversations": [{"from": "human" | "gpt", "value": ...}]}: the same turns
        alpaca   {"instruction": question, "input": "", "output": "Thought: ...\\nAction: ...\\nObservation: ...\\n..."}:
                 FireAct's alpaca_format layout: MMLU's options open the output, and the output ends with a
                 newline except in CoT rows (one step), as in FireAct's files."""
    msgs = chat_messages(rec["question"], rec["steps"], final_observation)
    if fmt == "openai":
        return {"messages": msgs}
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                                  for m in msgs]}
    if fmt != "alpaca":
        raise ValueError(f"unknown export format {fmt!r}; choose {' | '.join(EXPORT_FORMATS)}")
    m = MC_OPTIONS.search(rec["question"])
    question, options = (rec["question"][:m.start()], [m.group(1)]) if m else (rec["question"], [])
    output = "\n".join(options + [x["content"] for x in msgs[1:]]) + ("" if rec.get("method") == "cot" else "\n")
    return {"instruction": question, "input": "", "output": output}


def mask_pieces(rec, tokenizer, train_on="actions", template="react"):
    """A record's rendering as [(text, trained)]: runs of equal mask decoded together (multi-byte chars
    survive), for show_mask and its HTML page (report.mask_html)."""
    ids, mask = render(rec["question"], rec["steps"], tokenizer, train_on, template=template)
    out, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and mask[j] == mask[i]:
            j += 1
        out.append((tokenizer.decode(ids[i:j]), mask[i]))
        i = j
    return out, len(ids), sum(mask)


def show_mask(rec, tokenizer, train_on="actions", color=None, template="react"):
    """Print a record with trained tokens in green (or [[...]] when not a terminal), masked ones dim."""
    pieces, n, trained = mask_pieces(rec, tokenizer, train_on, template)
    color = sys.stdout.isatty() if color is None else color
    on, off = ("\x1b[42;30m", "\x1b[0m") if color else ("[[", "]]")
    print("".join(f"{on}{text}{off}" if m else (f"\x1b[2m{text}\x1b[0m" if color else text) for text, m in pieces))
    print(f"-- {n} tokens, {trained} trained ({trained / max(1, n):.0%})")


def parse_react(text):
    """ReAct text -> (preamble lines before the first Thought/Action, steps). Lines that start no segment
    continue the previous one (multi-line observations); the preamble holds MMLU's options in FireAct's rows."""
    preamble, steps, last = [], [], None
    for line in text.split("\n"):
        m = STEP_LINE.match(line)
        if not m:
            if last is None:
                preamble.append(line)
            else:
                steps[-1][last] += "\n" + line
            continue
        kind, body = m.group(1).lower(), m.group(2)
        # a new step starts at a Thought, or at an Action/Observation when the current step already has one
        if not steps or kind == "thought" or (kind == "action" and steps[-1]["action"] is not None) \
                or steps[-1]["observation"] is not None:
            steps.append({"thought": "", "action": None, "observation": None})
        steps[-1][kind] = body
        last = kind
    for s in steps:
        for k, v in s.items():
            s[k] = v.strip() if v is not None else v
    return [p for p in preamble if p.strip()], steps


def check_steps(steps, where):
    """The invariant: at most one finish, and it is the last step. -> steps without trailing observation-only
    entries (FireAct's rows repeat `Observation: Episode finished` after a finish)."""
    done = next((j for j, s in enumerate(steps) if is_finish(s["action"] or "")), None)
    if done is not None:
        extra = [j for j in range(done + 1, len(steps)) if steps[j]["action"] or steps[j]["thought"]]
        if extra:
            raise ValueError(f"{where}: step {extra[0] + 1} follows finish at step {done + 1}; a trajectory ends "
                             f"at its only finish (a failed attempt must not reach training data)")
        steps = steps[:done + 1]
    return steps


def _record(path, lineno, question, output, i):
    """Question text + ReAct output text (alpaca/gpt formats) -> our trajectory record."""
    preamble, steps = parse_react(output)
    question = "\n".join([question.strip()] + preamble).strip()
    question = re.sub(r"^Question:\s*", "", question)  # FireAct's MMLU rows carry the label already
    if not question:
        raise ValueError(f"{path}:{lineno}: record has no question")
    if not any(s["action"] for s in steps):
        raise ValueError(f"{path}:{lineno}: expected 'Thought: ...' / 'Action: ...' lines in the output")
    steps = check_steps(steps, f"{path}:{lineno}")
    for s in steps:  # FireAct quirk: a few rows have a Thought with no Action (kept, rendered without one)
        s["action"] = s["action"] or ""
    final = steps[-1]["action"]
    answer = final[7:-1] if is_finish(final) and final.endswith("]") else None
    # FireAct's teacher searched Google through SerpAPI: its observations are snippets
    return {"id": f"{Path(path).stem}:{i}", "task": Path(path).stem, "method": "", "question": question,
            "answer": answer, "steps": steps, "tool": "google", "source": str(path)}


def _from_json(path, lineno, d, i):
    """One JSON object in any of the three formats -> our trajectory record, or a file:line ValueError."""
    if not isinstance(d, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(d).__name__}")
    if "steps" in d:  # ours
        if not isinstance(d["steps"], list) or not d["steps"] or not isinstance(d.get("question"), str):
            raise ValueError(f"{path}:{lineno}: 'question' must be a string and 'steps' a non-empty list")
        for j, s in enumerate(d["steps"]):
            if not isinstance(s, dict) or not isinstance(s.get("action"), str):
                raise ValueError(f"{path}:{lineno}: steps[{j}] has no 'action' string")
            for k in ("thought", "observation"):
                if not isinstance(s.get(k), (str, type(None))):
                    raise ValueError(f"{path}:{lineno}: steps[{j}].{k} must be a string, got {s[k]!r}")
        if len(check_steps(d["steps"], f"{path}:{lineno}")) < len(d["steps"]):
            raise ValueError(f"{path}:{lineno}: steps after finish; a trajectory ends at its only finish")
        return {"id": f"{Path(path).stem}:{i}", "source": str(path), **d}
    if "conversations" in d and isinstance(d["conversations"], list):  # ShareGPT: the gpt format, other names
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
        if not all(isinstance(c, dict) and c.get("from") in roles for c in d["conversations"]):
            raise ValueError(f"{path}:{lineno}: 'conversations' must be a list of {{from: human | gpt, value}}")
        d = {"messages": [{"role": roles[c["from"]], "content": c.get("value")} for c in d["conversations"]]}
    if "messages" in d:  # FireAct gpt format
        msgs = d["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in msgs):
            raise ValueError(f"{path}:{lineno}: 'messages' must be a list of {{role, content}}")
        # the first user message is the question; the rest alternate assistant Thought/Action and user
        # Observation. Two rows start with the assistant, the question as its first line: the preamble.
        q = msgs[0]["content"] if msgs and msgs[0].get("role") == "user" else ""
        rest = msgs[1:] if q else msgs
        return _record(path, lineno, q, "\n".join(m["content"] for m in rest), i)
    if "instruction" in d and "output" in d:  # FireAct alpaca format
        for k in ("instruction", "input", "output"):
            if not isinstance(d.get(k) or "", str):
                raise ValueError(f"{path}:{lineno}: '{k}' must be a string, got {d[k]!r} (wrong type)")
        q = "\n".join(x for x in (d["instruction"], d.get("input") or "") if x)
        return _record(path, lineno, q, d["output"], i)
    if "question" in d and "chain" in d:
        raise ValueError(f"{path}:{lineno}: this is a question file, not trajectories; generate them with "
                         f"`python fireact.py generate ...` (see README)")
    raise ValueError(f"{path}:{lineno}: unknown record format (keys {sorted(d)[:6]}); expected 'steps', "
                     f"'messages', 'conversations' or 'instruction'/'output'")


def read_records(path):
    """Our trajectory JSONL, FireAct alpaca JSON (a list), FireAct gpt JSONL or ShareGPT -> list of our records."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: " + ("is a directory, not a data file" if path.is_dir() else "no such file"))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); trajectory files are UTF-8 JSON") from None
    dec, out = json.JSONDecoder(), []
    if text.lstrip().startswith("["):  # a JSON array: decode element by element to know each one's line
        pos = text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                break
            lineno = text.count("\n", 0, pos) + 1
            try:
                d, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
            out.append(_from_json(path, lineno, d, len(out)))
        return out
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        out.append(_from_json(path, lineno, d, len(out)))
    return out


def write_jsonl(path: Path, records):
    """All records at once, atomically: a reader sees the old file or the new one, never half of one."""
    files.atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def append_jsonl(f, record: dict):
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())  # a record is either wholly on disk or torn at the end, which the next run cuts


def read_jsonl_resumable(path: Path) -> list[dict]:
    """Records already in an append-only JSONL file. A torn last line (a crash mid-write) is cut off the file;
    a corrupt line elsewhere is an error naming file:line (it was not written by us: refuse to guess)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        nl = raw.count(b"\n") + 1
        print(f"{path}:{nl}: torn last line (an interrupted write) removed", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(raw.rfind(b"\n") + 1)
        raw = raw[:raw.rfind(b"\n") + 1]
    out = []
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: corrupt line ({e.msg}); delete that line (the question is then "
                             f"generated again) or pass another --out") from None
    return out


# ------------------------------------------------------------------------------------------------------- tasks
class Task:
    """A task's facts in one place (nanochat-style): metric, prompt family, default tool, splits, loader and
    public sources. Splits: `train_splits` are what generate may use (the first is its default); `eval_splits`
    are for evaluation only (the first is eval's default) and generate refuses them unless told."""
    name, metric, family, tool = "", "qa", "hotpotqa", "local"  # metric: qa | yesno | mc; family: prompt files
    train_splits: tuple = ()
    eval_splits: tuple = ()
    sources: dict = {}      # path under the data dir -> public URL (`download`)

    def load(self, split: str) -> list[dict]:
        raise NotImplementedError

    def convert(self, dest: Path):
        """After `download`: turn the raw files in dest into the layout `load` reads."""

    def questions(self, split: str = "", n: int = 0) -> list[dict]:
        """[{"id", "question", "answer"}] of a split (answers as strings: 'yes'/'no', 'A'-'D'); never empty."""
        split = split or (self.eval_splits or self.train_splits)[0]
        if split not in self.train_splits + self.eval_splits:
            raise ValueError(f"task {self.name} has no split {split!r}; choose from "
                             f"{', '.join(self.train_splits + self.eval_splits)}")
        qs = self.load(split)
        if not qs:
            raise ValueError(f"task {self.name}, split {split}: no questions in {data_dir()} (run `python "
                             f"fireact.py download`, or set FIREACT_DATA)")
        if n < 0:
            raise ValueError(f"--n {n}: must be >= 0 (0 = all {len(qs)} questions)")
        return qs[:n] if n else qs


class HotpotQA(Task):
    name, tool = "hotpotqa", "wikipedia"
    train_splits, eval_splits = ("train",), ("fireact500", "dev")
    sources = {"hotpotqa/dev.json": REACT_RAW + "data/hotpot_dev_v1_simplified.json",
               "hotpotqa/train.json": REACT_RAW + "data/hotpot_train_v1.1_simplified.json"}

    def load(self, split):
        if split == "train":
            rows = read_json(data_dir() / "hotpotqa" / "train.json")
            return [dict(id=str(i), question=r["question"], answer=r["answer"]) for i, r in enumerate(rows)]
        dev = read_json(data_dir() / "hotpotqa" / "dev.json")
        ids = fireact_eval_ids() if split == "fireact500" else range(len(dev))
        return [dict(id=str(i), question=dev[i]["question"], answer=dev[i]["answer"]) for i in ids]


class HotpotQAOffline(Task):
    """The 957 HotpotQA dev questions whose 10 context paragraphs are public together (data/hotpotqa/
    offline_dev_indices.json): the offline corpus tools search their 9,366 paragraphs. Evaluation only."""
    name, tool = "hotpotqa_offline", "local"
    eval_splits = ("dev", "tune", "report")  # dev: all 957; tune + report: a fixed split of them (experiments)
    N_TUNE = 200  # questions of the tuning part: choices are made on it, results reported on the other 757
    sources = {"hotpotqa/dev.json": HotpotQA.sources["hotpotqa/dev.json"],
               "hotpotqa/hotpot_dev_distractor_v1.json": "http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json"}

    def load(self, split):
        qs = [dict(id=str(r["dev_index"]), question=r["question"], answer=r["answer"])
              for r in read_json(data_dir() / "hotpotqa" / "dev_distractor.jsonl")]
        if split == "dev":
            return qs
        order = sorted(range(len(qs)), key=lambda i: int(qs[i]["id"]))
        random.Random(0).shuffle(order)  # fixed once: seed 0 over the questions sorted by dev index
        keep = order[:self.N_TUNE] if split == "tune" else order[self.N_TUNE:]
        return [qs[i] for i in sorted(keep)]

    def convert(self, dest):
        raw, dev = dest / "hotpotqa" / "hotpot_dev_distractor_v1.json", dest / "hotpotqa" / "dev.json"
        if not raw.exists() or not dev.exists():
            return
        keep = set(json.loads((REPO / "data" / "hotpotqa" / "offline_dev_indices.json").read_text()))
        index = {r["question"]: i for i, r in enumerate(read_json(dev))}
        rows = [dict(r, dev_index=index[r["question"]]) for r in read_json(raw)
                if index.get(r["question"]) in keep]
        write_jsonl(dest / "hotpotqa" / "dev_distractor.jsonl", sorted(rows, key=lambda r: r["dev_index"]))


class Bamboogle(Task):
    name, tool = "bamboogle", "wikipedia"
    eval_splits = ("test",)
    sources = {"bamboogle/test.csv": FIREACT_RAW + "data/bamboogle/test.csv"}
    # FireAct's CSV went through a spreadsheet: 13 answers became dates like 29-May-32. The century (1904 or
    # 2004) and the layout ("30 June 2011") cannot be inferred, so the 13 true answers are listed here.
    DATES = {"29-May-32": "May 29, 1932", "6-Nov-05": "November 6, 1905", "22-Apr-94": "April 22, 1994",
             "20-Apr-66": "April 20, 1966", "13-Sep-93": "September 13, 1993", "31-Jul-58": "July 31, 1958",
             "30-Mar-71": "March 30, 1971", "30-Jun-11": "30 June 2011", "22-Apr-04": "April 22, 1904",
             "28-Mar-69": "March 28, 1969", "5-Jun-04": "June 5, 2004", "9-May-05": "May 9, 2005",
             "27-Jul-53": "July 27, 1953"}

    def load(self, split):
        return [dict(id=str(i), question=r["question"], answer=r["answer"])
                for i, r in enumerate(read_json(data_dir() / "bamboogle" / "test.json"))]

    def convert(self, dest):
        src = dest / "bamboogle" / "test.csv"
        with open(src, newline="", encoding="utf-8") as f:
            rows = [dict(question=r["Question"], answer=self.DATES.get(r["Answer"], r["Answer"]))
                    for r in csv.DictReader(f)]
        for i, r in enumerate(rows):
            if re.fullmatch(r"\d{1,2}-[A-Z][a-z]{2}-\d{2}", r["answer"]):
                raise ValueError(f"{src}:{i + 2}: answer {r['answer']!r} looks like a spreadsheet date with no "
                                 f"known correction; add it to Bamboogle.DATES")
        files.atomic_write(dest / "bamboogle" / "test.json", json.dumps(rows, indent=1, ensure_ascii=False))


class StrategyQA(Task):
    name, metric, family, tool = "strategyqa", "yesno", "strategyqa", "wikipedia"
    train_splits, eval_splits = ("train",), ("dev",)
    sources = {"strategyqa/dev.json": STRATEGYQA_RAW + "dev.json",
               "strategyqa/train_filtered.json": STRATEGYQA_RAW + "train_filtered.json"}

    def load(self, split):
        rows = read_json(data_dir() / "strategyqa" / ("train_filtered.json" if split == "train" else "dev.json"))
        return [dict(id=r["qid"], question=r["question"], answer="yes" if r["answer"] else "no") for r in rows]


class MMLU(Task):
    """Train: MMLU's auxiliary training set as FireAct kept it (ARC, OBQA, MCTest, law, science; no RACE),
    which FireAct's MMLU trajectories were generated on. Eval: MMLU's own dev/val/test."""
    name, metric, family, tool = "mmlu", "mc", "mmlu", "wikipedia"
    train_splits, eval_splits = ("train",), ("test", "dev", "val")
    sources = {"mmlu/data.tar": "https://people.eecs.berkeley.edu/~hendrycks/data.tar"}
    TAR_DIRS = {"dev": "dev", "val": "val", "test": "test", "auxiliary_train": "auxiliary_train"}

    def load(self, split):
        qs = []
        for f in sorted((data_dir() / "mmlu" / ("auxiliary_train" if split == "train" else split)).glob("*.csv")):
            with open(f, newline="", encoding="utf-8") as fh:
                for i, row in enumerate(csv.reader(fh)):
                    if len(row) != 6:
                        raise ValueError(f"{f}:{i + 1}: expected 6 columns, got {len(row)}")
                    q = row[0] + "".join(f"\n{l}. {o}" for l, o in zip("ABCD", row[1:5]))
                    qs.append(dict(id=f"{f.stem}-{i}", question=q, answer=row[5].strip()))
        return qs

    def convert(self, dest):
        import tarfile
        if (dest / "mmlu" / "test").exists() and (dest / "mmlu" / "auxiliary_train").exists():
            return
        with tarfile.open(dest / "mmlu" / "data.tar") as tar:  # data/{split}/*.csv -> mmlu/{split}/
            for m in tar.getmembers():
                parts = Path(m.name).parts
                if m.isfile() and len(parts) == 3 and parts[1] in self.TAR_DIRS and parts[2].endswith(".csv") \
                        and parts[2] != "race.csv":  # FireAct dropped RACE (long passages)
                    files.atomic_write(dest / "mmlu" / parts[1] / parts[2], tar.extractfile(m).read())


class Toy(Task):
    """The offline toy world (toyworld.py), inside the repo: HotpotQA-like questions (bridge, comparison)."""
    name, tool = "toy", "local"
    train_splits, eval_splits = ("train",), ("dev", "test")
    folder = REPO / "data" / "toy"

    def load(self, split):  # data/toy/train.jsonl holds trajectories; the training questions are train_questions
        name = "train_questions" if split == "train" else split
        return [dict(id=str(r["id"]), question=r["question"], answer=r["answer"])
                for r in read_json(self.folder / f"{name}.jsonl")]


class ToyYesNo(Toy):
    """The toy world's StrategyQA-like task: yes/no questions that need two facts the question never names."""
    name, metric, family = "toy_yesno", "yesno", "strategyqa"
    folder = REPO / "data" / "toy" / "toy_yesno"


class ToyMC(Toy):
    """The toy world's MMLU-like task: four options, checked with the tools one page each."""
    name, metric, family = "toy_mc", "mc", "mmlu"
    folder = REPO / "data" / "toy" / "toy_mc"


TASKS = {t.name: t for t in (HotpotQA(), HotpotQAOffline(), Bamboogle(), StrategyQA(), MMLU(), Toy(), ToyYesNo(),
                             ToyMC())}
TaskName = Literal["toy", "toy_yesno", "toy_mc", "hotpotqa", "hotpotqa_offline", "bamboogle", "strategyqa", "mmlu"]  # the --task choices (TASKS' keys)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def fireact_eval_ids() -> list[int]:
    """FireAct's HotpotQA eval subset: the Random(233) shuffle of the 7405 dev indices, first 500."""
    idxs = list(range(7405))
    random.Random(233).shuffle(idxs)
    return idxs[:500]


def load_questions(task: str, split: str = "", n: int = 0) -> list[dict]:
    return get_task(task).questions(split, n)


def question_key(q: str) -> str:
    """Questions compared across files (the overlap check): SQuAD-normalised text."""
    return normalize_answer(q)


# ------------------------------------------------------------------------------------------- tools and prompts
TOOLS = ("local", "snippet", "wikipedia", "google")  # local: page tool over a corpus; snippet: offline search engine


def corpus_path(task: str) -> Path:
    """The offline corpus of a task: the toy world's pages, or the 9,366 paragraphs of the 957 HotpotQA dev
    questions (built once from dev_distractor.jsonl into the cache, rebuilt when that file changes)."""
    if isinstance(get_task(task), Toy):  # every toy task asks about the same world
        return Toy.folder / "corpus.jsonl"
    if task.startswith("hotpotqa"):
        src = data_dir() / "hotpotqa" / "dev_distractor.jsonl"
        if not src.exists():
            raise ValueError(f"{src}: missing (run `python fireact.py download --only hotpotqa`)")
        key = hashlib.sha1(f"{src.resolve()}:{src.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        corpus = CACHE / "corpus" / f"dev_distractor_{key}.jsonl"
        if not corpus.exists():
            tools.build_corpus([src], corpus)
        return corpus
    raise ValueError(f"no offline corpus for task {task!r}: use --tool wikipedia or --tool google")


def make_tool(task: str, kind: str = "", noise: float = 0.0, noise_mode: str = "none", seed: int = 0):
    """The tool an episode of `task` uses (one shared backend; agent loops call .fork() per episode)."""
    kind = kind or get_task(task).tool
    if kind == "wikipedia":
        tool = tools.Wikipedia(cache_dir=CACHE / "wikipedia")
    elif kind == "google":
        tool = tools.GoogleSearch()
    elif kind == "local":
        tool = tools.LocalWiki(corpus_path(task))
    elif kind == "snippet":
        tool = tools.SnippetSearch(corpus_path(task))
    else:
        raise ValueError(f"unknown tool {kind!r}; choose {' | '.join(TOOLS)}")
    return tools.NoisyTool(tool, noise, mode=noise_mode, seed=seed) if noise > 0 else tool


def prompt_file(method: str, family: str, tool: str) -> Path:
    """data/prompts/{method}_{family}[_snippet].txt: search-engine tools (snippet, google) get the prompts whose
    search takes a free-text query and returns one snippet; page tools get the Wikipedia-style ones."""
    style = "_snippet" if tool in ("snippet", "google") and method != "cot" else ""
    return PROMPTS / f"{method}_{family}{style}.txt"


def few_shot(method: str, family: str, tool: str = ""):
    """prompt_fn(question, steps) -> text: the few-shot prefix of the prompt file + the history so far."""
    path = prompt_file(method, family, tool)
    if not path.exists():
        raise ValueError(f"{path}: no such prompt file")
    prefix = path.read_text(encoding="utf-8").strip()
    suffix = "Reflection:" if method == "reflexion" else ""
    return lambda question, steps: f"{prefix}\n\n{history_text(question, steps)}{suffix}"


def zero_shot(tokenizer, template="react"):
    """prompt_fn for fine-tuned students: token ids from `render`, the very function used in training."""
    return lambda question, steps: render(question, steps, tokenizer, for_inference=True, template=template)[0]


# -------------------------------------------------------------------------------------------------------- LLMs
class TeacherLLM:
    """An agent-loop LLM over tools.Teacher (or toyworld.OracleTeacher): concurrent HTTP chat requests. A prompt
    is text (sent as one user message) or a list of chat messages (FireAct's gpt format, `chat_messages`)."""

    def __init__(self, teacher, workers=8, max_tokens=1000, temperature=0.0, rpm=None):
        self.teacher, self.workers, self.max_tokens, self.temperature, self.rpm = teacher, workers, max_tokens, temperature, rpm
        self.draws, self.lock = Counter(), threading.Lock()

    def _one(self, prompt, stop, temperature):
        extra, msgs = {}, prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if temperature > 0:  # a re-sample is the same request: a per-draw seed keeps the cache from replaying it
            key = json.dumps(msgs)
            with self.lock:
                extra["seed"], self.draws[key] = self.draws[key], self.draws[key] + 1
        return self.teacher.chat(msgs, temperature=temperature, max_tokens=self.max_tokens, stop=stop, **extra)

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
        if isinstance(prompt, list):  # a chat model cannot continue a message: the prefill becomes its own turn
            return prompt + [{"role": "assistant", "content": text}] if text else prompt
        return prompt + text

    @property
    def usage(self):
        return dict(getattr(self.teacher, "usage", {}))


class LocalLLM:
    """An agent-loop LLM over model.generate: one batched generate call advances every prompt together."""

    def __init__(self, model, tokenizer, max_new_tokens=1000, temperature=0.0, seed=0, prefix_cache_mb=2048):
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
    done: bool = False      # ended: by its own finish, by a forced finish, out of turns, or by an error
    forced: bool = False
    pred: str = None
    error: str = ""
    turns: int = 0          # LLM turns taken (the step budget; a gold-judged retry does not reset it)
    prefill: str = ""       # text the next LLM turn continues (a reflection)
    reflections: int = 0
    reflect_due: bool = False
    restart: bool = False   # gold-judged retry: the failed attempt is dropped once its reflection is written


@dataclass
class Reflexion:
    """FireAct's Reflexion: an episode still unsolved after `at` rounds gets a reflection from the LLM, which opens
    its next Thought; no gold answer is used inside a trajectory. judge (opt-in, original Reflexion with gold
    feedback): after a wrong finish, reflect and retry from scratch; the failed attempt never reaches the record."""
    prompt_fn: object           # (question, steps) -> the reflection prompt
    at: tuple = (5, 9)          # FireAct reflected at its 6th and 10th ReAct rounds: after 5 and 9 unsolved steps
    judge: object = None        # (episode, answer) -> is it right?  None = no gold feedback (FireAct)
    max_retries: int = 2


def run_agent(llm, tools_by_episode, questions, prompt_fn, max_steps=11, batch_size=0, retries=2,
              resample_temperature=0.7, reflexion=None, on_done=None, force_answer=False, on_step=None) -> list[Episode]:
    """THE agent loop, for any LLM with .complete_batch/.extend. Live episodes (at most batch_size, 0 = all) advance
    together: one complete_batch call per step, refilled from the queue as episodes end. An episode out of turns
    ends unfinished (FireAct and ReAct score it 0), or with force_answer gets one last turn that must finish.
    on_step(ep, step) is called as each step is recorded (`ask` streams them); on_done(ep) as each episode ends."""
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
                    ep.error, ep.done = str(out), True
                else:
                    ep.prefill = f"Thought: {REFLECT_INTRO} {' '.join(out.split())}\n"
                ep.reflections, ep.reflect_due = ep.reflections + 1, False
                if ep.restart:
                    ep.steps, ep.restart = [], False
        for ep in live:
            if not ep.done and ep.turns >= max_steps and not force_answer:
                ep.done = True  # out of turns: unfinished, no answer
        for forced in (False, True) if force_answer else (False,):
            group = [ep for ep in live if not ep.done and (ep.turns >= max_steps) == forced]
            if not group:
                continue
            # forced: one last turn whose prompt already ends in `Action: finish[`
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
                advance(ep, out, forced, reflexion, on_step)
        for ep in [ep for ep in live if ep.done]:
            finished.append(ep)
            if on_done:
                on_done(ep)
        live = [ep for ep in live if not ep.done]
    order = {q["id"]: i for i, q in enumerate(questions)}
    return sorted(finished, key=lambda ep: order[ep.id])


def advance(ep: Episode, out, forced: bool, reflexion, on_step=None):
    """Apply one LLM turn to an episode: parse, run the tool, record the step."""
    if isinstance(out, Exception):
        ep.error, ep.done = str(out), True
        return
    ep.turns += 1
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
    if on_step:
        on_step(ep, ep.steps[-1])
    if getattr(ep.tool, "done", False):
        answer = ep.tool.answer
        if reflexion and reflexion.judge and not forced and ep.reflections < reflexion.max_retries \
                and not reflexion.judge(ep, answer):
            ep.tool, ep.reflect_due, ep.restart = ep.tool.fork(), True, True  # fresh tool state, same backend
        else:
            ep.pred, ep.done = answer, True
    elif forced:
        ep.done = True  # the forced finish failed to parse: no answer
    elif reflexion and ep.turns in reflexion.at:
        ep.reflect_due = True


def episode_record(ep: Episode, task: str, method: str, source: str, tool: str) -> dict:
    """Our trajectory record (the schema is in the trajectories section)."""
    em, f1 = score_answer(get_task(task).metric, ep.pred, ep.answer)
    return dict(id=ep.id, task=task, method=method, question=ep.question, answer=ep.answer, steps=ep.steps,
                pred=ep.pred, em=em, f1=f1, finished=ep.pred is not None and not ep.forced, forced=ep.forced,
                reflections=ep.reflections, tool=tool, source=source)


# ---------------------------------------------------------------------------------------------------- results
def read_results(path: Path) -> list[dict]:
    """Our eval JSON / FireAct's trajs/*.json (dict id -> {pred, gt, ...}) or our trajectory JSONL -> rows."""
    if path.suffix == ".jsonl":
        rows = [dict(r, gold=r["answer"]) for r in read_records(path)]
        if not rows:
            raise ValueError(f"{path}: no records in the file")
        return rows
    d = read_json(path)
    if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
        raise ValueError(f"{path}: expected a JSON object id -> result (FireAct trajs schema)")
    if not d:
        raise ValueError(f"{path}: no results in the file")
    rows = []
    for k, v in d.items():
        if not (isinstance(v.get("steps"), list) and v.get("question")):  # FireAct's trajs keep only the text
            question, steps = traj_question_steps(v.get("traj"))
            v = dict(v, question=v.get("question") or question,
                     steps=v["steps"] if isinstance(v.get("steps"), list) else steps)
        rows.append(dict(v, id=k, gold=v.get("gt", "")))
    return rows


def traj_question_steps(traj):
    """A results file's `traj` -> (question, steps): our ReAct text ("Question: ...\\nThought: ..."), FireAct's
    alpaca text (its instruction block) or FireAct's chat messages (gpt format)."""
    if isinstance(traj, list):  # [{"role": "user", "content": question}, assistant turn, "Observation: ...", ...]
        question = traj[0].get("content", "") if traj and traj[0].get("role") == "user" else ""
        text = "\n".join(str(m.get("content", "")) for m in traj[1 if question else 0:])
    else:
        m = re.match(r".*?### Instruction:\n(.*?)\n\n### Response:\n(.*)", str(traj or ""), re.S)
        question, text = (m.group(1), m.group(2)) if m else ("", str(traj or ""))
    preamble, steps = parse_react(text)
    question = re.sub(r"^Question:\s*", "", "\n".join([question.strip()] + preamble).strip())
    while steps and not steps[-1]["action"] and not steps[-1]["thought"]:  # "Observation: Episode finished"
        steps.pop()
    return question, [dict(thought=s["thought"], action=s["action"] or "", observation=s["observation"]) for s in steps]


def summary_path(path: Path) -> Path:
    return path.with_suffix(".summary.json")


def denominator(path: Path, rows: list) -> int:
    """FireAct's rule: the subset's size counts, also where a file holds fewer entries. Taken from our summary
    file, else from a FireAct file name (`..._dev_0_500_...`), else the number of entries."""
    if summary_path(path).exists():
        return json.loads(summary_path(path).read_text())["n"]
    m = re.search(r"_(\d+)_(\d+)_", path.name)
    return int(m.group(2)) - int(m.group(1)) if m else len(rows)


def check_out_path(path: str, flag="--out"):
    """Fail at the start, not after an hour of work, when a result could not be written there."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file path")
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, not a directory")
    if parent is not None and not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {path}: {parent} is not writable")


def error_digest(errors: list[str], k=3) -> list[str]:
    """The first k distinct error messages (servers repeat themselves)."""
    return list(dict.fromkeys(errors))[:k]


# ----------------------------------------------------------------------------------------------------- configs
@dataclass
class RunConfig:  # what generate and eval share
    task: TaskName = "toy"        # the task: its splits, metric, prompt family and default tool (README's task table)
    split: str = ""               # "" = generate: the task's training split; eval: its first evaluation split
    n: int = 0                    # first n questions (0 = all)
    tool: Literal["", "local", "snippet", "wikipedia", "google"] = ""  # local = page tool over the offline corpus, snippet = offline search engine (FireAct-style); "" = eval: the tool family of the adapter's training data, else the task's default
    max_steps: int = 11           # LLM turns per episode (FireAct 11, ReAct 7); an episode out of turns scores 0
    teacher_model: str = ""       # an OpenAI-style model name, or "oracle" (toyworld.OracleTeacher)
    base_url: str = ""            # "" = OpenAI; any OpenAI-compatible server otherwise
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key; the key is never written
    timeout: float = 60.0         # seconds: the total deadline of one teacher request (all of its reads)
    retries: int = 6              # retries of a teacher request after 429/5xx/timeouts, with backoff
    seed: int = 0                 # tool noise and re-sampling seed
    noise: float = 0.0            # probability that an observation is replaced (NoisyTool)
    noise_mode: Literal["none", "random"] = "none"  # none: the observation becomes "None" | random: another question's observation

    def check(self):
        get_task(self.task)
        if self.tool and self.tool not in TOOLS:
            raise ValueError(f"--tool {self.tool}: choose {' | '.join(TOOLS)}")
        for name, lo in (("n", 0), ("max_steps", 1), ("retries", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= {lo}")
        if self.timeout <= 0:
            raise ValueError(f"--timeout {self.timeout}: must be > 0 seconds")
        if self.noise_mode not in ("none", "random"):
            raise ValueError(f"--noise-mode {self.noise_mode}: choose none | random")
        if not 0 <= self.noise <= 1:
            raise ValueError(f"--noise {self.noise}: must be a probability in [0, 1]")
        check_out_path(self.out)


@dataclass
class GenerateConfig(RunConfig):
    teacher_model: str = "gpt-4"
    method: Literal["react", "cot", "reflexion"] = "react"  # the teacher's method
    out: str = "runs/trajectories.jsonl"  # append-only JSONL; a rerun with the same settings resumes it
    reflect_at: list = field(default_factory=lambda: [5, 9])  # Reflexion: reflect when still unsolved after these turns (FireAct: before its 6th and 10th)
    reflect_on: Literal["rounds", "wrong"] = "rounds"  # rounds: FireAct's (no gold answer in a trajectory) | wrong: also retry after a wrong finish, judged with the gold answer; the failed attempt is dropped
    allow_eval_split: bool = False  # generate on an evaluation split (its questions then must not be evaluated on)
    workers: int = 8              # concurrent episodes
    rpm: int = 0                  # requests per minute (0 = unlimited)
    temperature: float = 0.0      # teacher sampling temperature (re-samples of turns with no action use 0.7)
    max_tokens: int = 1000        # per teacher turn (FireAct's cap); a turn ends at its first complete Action line anyway

    def check(self):
        super().check()
        if self.method not in ("react", "cot", "reflexion"):
            raise ValueError(f"--method {self.method}: choose react | cot | reflexion")
        if self.reflect_on not in ("rounds", "wrong"):
            raise ValueError(f"--reflect-on {self.reflect_on}: choose rounds | wrong")
        self.reflect_at = [int(x) for x in self.reflect_at]
        for name, lo in (("workers", 1), ("rpm", 0), ("max_tokens", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= {lo}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"--temperature {self.temperature}: must be in [0, 2]")


@dataclass
class EvalConfig(RunConfig):
    model: str = ""               # local checkpoint dir / hub name; "" = the embedded SmolLM2-135M-Instruct
    adapter: str = ""             # LoRA adapter dir: fine-tuned, zero-shot prompt
    template: Literal["", "react", "alpaca"] = ""  # react | alpaca: the student's prompt layout; "" = what the adapter was trained with
    out: str = "runs/eval.json"   # per-question results (FireAct's trajs schema) + OUT.summary.json
    max_new_tokens: int = 1000    # per turn, FireAct's cap (its longest assistant turn is 526 tokens; 128 cut 12.5% of its MMLU turns); a turn ends at its first complete Action line anyway
    batch_size: int = 32          # live episodes per batched generate call
    prefix_cache_mb: int = 2048   # K/V kept between agent turns, so a turn prefills only its new tokens (0 = off)
    zero_shot: bool = False       # no few-shot prompt: the student's layout (local model) or FireAct's chat format (--teacher-model)
    compare: bool = False         # prompted (few-shot, no adapter) vs fine-tuned (adapter, zero-shot), side by side
    force_answer: bool = False    # an episode out of turns gets one more turn that must finish (ReAct scores it 0)
    exclude_overlap: list = field(default_factory=list)  # training files: drop eval questions that appear in them
    max_failures: float = 0.0     # exit non-zero when more than this fraction of episodes failed (server errors)
    device: str = ""              # cpu | cuda | mps; "" = the best available
    quant: Literal["", "int4"] = ""  # int4: decode through 4-bit layer weights (CPU; pays for one stream at a time, README §5)
    dtype: Literal["", "float32", "bfloat16"] = ""  # "" = float32 on CPU (the exact path), bfloat16 on CUDA; bfloat16 on a CPU pays only with native bf16 (README §5)
    compile: bool = False         # torch.compile the decode steps (fp32 CPU: every batch, weights frozen in; --quant int4: one row); minutes once; C++ compiler on CPU (README §5)

    def check(self):
        super().check()
        if self.template and self.template not in TEMPLATES:
            raise ValueError(f"--template {self.template}: choose {' | '.join(TEMPLATES)}")
        if not 0 <= self.max_failures <= 1:
            raise ValueError(f"--max-failures {self.max_failures}: must be a fraction in [0, 1]")
        for name, lo in (("max_new_tokens", 1), ("batch_size", 0), ("prefix_cache_mb", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= {lo}")
        for f in self.exclude_overlap + ([self.adapter] if self.adapter else []):
            if not Path(f).exists():
                raise ValueError(f"{f}: no such file or directory")
        if self.adapter and not (Path(self.adapter) / "adapter_config.json").is_file():
            raise ValueError(f"--adapter {self.adapter}: no adapter_config.json there; pass train.py's --out dir")
        if self.compare and not self.adapter:
            raise ValueError("--compare needs --adapter (the fine-tuned run)")


@dataclass
class FilterConfig:
    files: list = field(default_factory=list)    # trajectory files written by generate
    out: str = "runs/filtered.jsonl"  # the kept records
    keep_forced: bool = False     # keep episodes whose answer was forced out of them (not successful trajectories)

    def check(self):
        check_out_path(self.out)


@dataclass
class MixConfig:
    files: list = field(default_factory=list)    # trajectory files (ours, or FireAct's alpaca/gpt files)
    out: str = "runs/train.jsonl"  # the training file for train.py --data
    tasks: list = field(default_factory=list)    # [] = every task found
    methods: list = field(default_factory=list)  # [] = every method found
    per_group: int = 0                           # at most this many per (task, method); 0 = all
    per_method: list = field(default_factory=list)  # METHOD=N caps that override per_group: react=450 cot=0
    seed: int = 0                                # shuffle seed

    def check(self):
        check_out_path(self.out)
        if self.per_group < 0:
            raise ValueError(f"--per-group {self.per_group}: must be >= 0")


@dataclass
class ScoreConfig:
    files: list = field(default_factory=list)    # results files or directories (ours, or FireAct's trajs/*.json)
    metric: Literal["", "qa", "yesno", "mc"] = ""  # qa | yesno | mc; "" = from the records' task (qa for FireAct trajs)
    n: int = 0                    # denominator override
    breakdown: bool = False       # also: episodes by tool calls x outcome (right; wrong with the gold answer seen in
                                  # an observation: a reading error; wrong with it never seen: a search error)

    def check(self):
        if self.metric not in ("", "qa", "yesno", "mc"):
            raise ValueError(f"--metric {self.metric}: choose qa | yesno | mc")
        if self.n < 0:
            raise ValueError(f"--n {self.n}: must be >= 0")


@dataclass
class ExportConfig:
    files: list = field(default_factory=list)    # trajectory files (ours, or FireAct's alpaca/gpt files, or ShareGPT)
    format: Literal["openai", "alpaca", "sharegpt"] = "openai"  # openai: chat messages, FireAct's gpt_format = OpenAI's fine-tuning format | alpaca: FireAct's alpaca_format (a JSON array) | sharegpt: {"conversations": [{"from", "value"}]}
    out: str = "runs/train_openai.jsonl"  # the exported file
    final_observation: bool = True  # end with the finish's observation, as FireAct's files do ("Observation: Episode finished, reward = True"); the API trains on assistant messages only, so that tail is billed, not learned

    def check(self):
        if not self.files:
            raise ValueError("export-data: name at least one trajectory file")
        check_out_path(self.out)


@dataclass
class AskConfig:
    question: list = field(default_factory=list)  # the question (quotes optional: the words are joined)
    task: TaskName = "toy"        # the tool's corpus and the few-shot prompt family
    tool: Literal["", "local", "snippet", "wikipedia", "google"] = ""  # "" = the tool family of the adapter's training data, else the task's default
    model: str = ""               # local checkpoint dir / hub name; "" = the embedded SmolLM2-135M-Instruct
    adapter: str = ""             # LoRA adapter dir (fine-tuned, zero-shot prompt); "" = the prompted model (few-shot)
    template: Literal["", "react", "alpaca"] = ""  # the student's prompt layout; "" = what the adapter was trained with
    max_steps: int = 11           # LLM turns
    max_new_tokens: int = 1000    # per turn
    interactive: bool = False     # after this question, keep asking (an empty line or Ctrl-D ends)
    color: Literal["auto", "always", "never"] = "auto"  # auto: colour on a terminal, plain when piped
    device: str = ""              # cpu | cuda | mps; "" = the best available
    quant: Literal["", "int4"] = ""  # int4: decode through 4-bit layer weights (CPU; pays for one stream at a time, README §5)
    dtype: Literal["", "float32", "bfloat16"] = ""  # "" = float32 on CPU (the exact path), bfloat16 on CUDA; bfloat16 on a CPU pays only with native bf16 (README §5)
    compile: bool = False         # torch.compile the decode step: minutes once, then faster tokens; C++ compiler on CPU (README §5)

    def check(self):
        if self.max_steps < 1 or self.max_new_tokens < 1:
            raise ValueError("--max-steps and --max-new-tokens must be >= 1")
        if self.adapter and not Path(self.adapter).is_dir():
            raise ValueError(f"--adapter {self.adapter}: no such directory")


@dataclass
class ViewConfig:
    files: list = field(default_factory=list)  # results files (eval's OUT.json, FireAct's trajs/*.json) or trajectory JSONL; two runs are shown side by side
    out: str = "report.html"      # the self-contained HTML report (no network needed to open it)
    title: str = "FireAct agent runs"  # the page's title

    def check(self):
        check_out_path(self.out)


@dataclass
class TableConfig:
    dirs: list = field(default_factory=list)  # experiments run dirs (their rows/*.json) or row summary files
    out: str = ""                 # folder for table.md + table.png; "" = the first run dir

    def check(self):
        if not self.dirs:
            raise ValueError("table: give at least one run dir of experiments.py")


@dataclass
class FinetuneAPIConfig:
    files: list = field(default_factory=list)    # the training file: chat JSONL (export-data --format openai)
    base_model: str = "gpt-3.5-turbo"  # the model to fine-tune (FireAct: gpt-3.5-turbo-0613); priced: gpt-3.5-turbo, gpt-4o-mini, gpt-4o
    validation: str = ""          # a validation file in the same format (the API reports its loss)
    epochs: int = 0               # n_epochs; 0 = the API's auto (3 for 34 to 8,333 examples)
    suffix: str = ""              # a tag in the fine-tuned model's name
    dry_run: bool = False         # check the file and print the estimate, then stop: nothing is uploaded
    base_url: str = ""            # "" = OpenAI; any server with OpenAI's files and fine-tuning endpoints otherwise
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key; the key is never written
    poll: float = 30.0            # seconds between two looks at the job
    timeout: float = 300.0        # seconds: one request, the upload included
    retries: int = 6              # retries of a request after 429/5xx/timeouts, with backoff

    def check(self):
        if len(self.files) != 1:
            raise ValueError(f"finetune-api: name one training file, got {len(self.files)}")
        for name, lo in (("epochs", 0), ("retries", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"--{name} {getattr(self, name)}: must be >= {lo}")
        if self.poll <= 0 or self.timeout <= 0:
            raise ValueError(f"--poll {self.poll} / --timeout {self.timeout}: must be > 0 seconds")


@dataclass
class DownloadConfig:
    dest: str = ""                # "" = ~/.cache/fireact/data (use with FIREACT_DATA=...)
    only: list = field(default_factory=list)     # path prefixes from `sources()`, e.g. mmlu fireact/trajs

    def check(self):
        for o in self.only:
            if not any(rel.startswith(o) for rel in sources()):
                raise ValueError(f"--only {o}: matches no source; prefixes: "
                                 f"{', '.join(sorted({r.split('/')[0] for r in sources()}))}")


def parse_config(cls, argv):
    """Flags from the dataclass fields (cli.parse_config): --max-steps 11, --compare / --no-compare, positional
    `files` (`dirs`, `question`), --config FILE.json; each config's check() runs before any work."""
    name = next(k for k, v in COMMANDS.items() if v[0] is cls)
    return cli.parse_config(cls, argv, prog=f"fireact.py {name}", description=COMMANDS[name][2],
                            positional=("files", "question", "dirs"))


# ---------------------------------------------------------------------------------------------------- commands
def make_teacher(name, base_url="", api_key_env="OPENAI_API_KEY", method=None, timeout=60.0, retries=6):
    if name == "oracle":  # the toy world's scripted teacher, same interface as tools.Teacher
        import toyworld
        return toyworld.OracleTeacher(method=method)
    return tools.Teacher(name, base_url=base_url or None, api_key_env=api_key_env, cache_dir=CACHE / "teacher",
                         timeout=timeout, max_retries=retries)


def method_setup(task: Task, method: str, max_steps: int, reflect_at=(5, 9), reflect_on="rounds", tool=""):
    """(prompt_fn, max_steps, reflexion) for a generation method. CoT is one turn that must finish."""
    if method not in ("react", "cot", "reflexion"):
        raise ValueError(f"unknown method {method!r}; choose react | cot | reflexion")
    if method == "cot":
        return few_shot("cot", task.family), 1, None
    reflexion = None
    if method == "reflexion":
        judge = (lambda ep, answer: score_answer(task.metric, answer, ep.answer)[0] > 0) if reflect_on == "wrong" else None
        reflexion = Reflexion(few_shot("reflexion", task.family, tool), tuple(reflect_at), judge)
    return few_shot("react", task.family, tool), max_steps, reflexion


def cost(model_name: str, usage: dict):
    keys = [k for k in PRICES if model_name.startswith(k)]
    if not keys:
        return None
    p_in, p_out = PRICES[max(keys, key=len)]
    return (usage.get("prompt_tokens", 0) * p_in + usage.get("completion_tokens", 0) * p_out) / 1e6


def generate_split(task: Task, cfg) -> str:
    """generate's split: a training split unless told otherwise, so no evaluation question is trained on."""
    split = cfg.split or (task.train_splits[0] if task.train_splits else "")
    if not split:
        raise ValueError(f"task {task.name} has no training split (evaluation only: {', '.join(task.eval_splits)}); "
                         f"generate on another task, or pass --split S --allow-eval-split")
    if split in task.eval_splits and not cfg.allow_eval_split:
        raise ValueError(f"--split {split} of task {task.name} is an evaluation split; generate on "
                         f"{' | '.join(task.train_splits) or 'another task'}, or pass --allow-eval-split")
    return split


def generate(cfg: GenerateConfig, teacher=None) -> Path:
    """Teacher trajectories, one JSONL record per question, appended as each episode ends. Resumable: questions
    already in the file are skipped, so a killed run restarts where it stopped with no duplicate and no loss.
    The file is locked while a run writes it, and every record carries the settings that made it (`run`): a
    rerun with other settings is refused instead of mixing records or skipping work as "already done"."""
    import fcntl
    from tqdm import tqdm
    task = get_task(cfg.task)
    split = generate_split(task, cfg)
    tool = cfg.tool or task.tool
    run = dict(task=cfg.task, split=split, method=cfg.method, teacher=cfg.teacher_model, tool=tool,
               max_steps=cfg.max_steps, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
               **(dict(reflect_at=cfg.reflect_at, reflect_on=cfg.reflect_on) if cfg.method == "reflexion" else {}),
               **(dict(noise=cfg.noise, noise_mode=cfg.noise_mode) if cfg.noise else {}))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{out}: another generate is writing this file; wait for it or pass another --out") from None
        have = read_jsonl_resumable(out)
        for r in have[:1] + have[-1:]:
            old = r.get("run") or dict(task=r.get("task"), method=r.get("method"))
            diff = [f"{k} {old.get(k)!r} -> {run.get(k)!r}" for k in sorted(set(old) | set(run)) if old.get(k) != run.get(k)]
            if diff:
                raise ValueError(f"{out}: holds records made with other settings ({'; '.join(diff)}); "
                                 f"pass another --out, or the same settings to resume")
        done = {r["id"] for r in have}
        todo = [q for q in task.questions(split, cfg.n) if q["id"] not in done]
        teacher = teacher or make_teacher(cfg.teacher_model, cfg.base_url, cfg.api_key_env, cfg.method,
                                          cfg.timeout, cfg.retries)
        llm = TeacherLLM(teacher, max_tokens=cfg.max_tokens, temperature=cfg.temperature)
        prompt_fn, max_steps, reflexion = method_setup(task, cfg.method, cfg.max_steps, cfg.reflect_at,
                                                       cfg.reflect_on, tool)
        base_tool = make_tool(cfg.task, tool, cfg.noise, cfg.noise_mode, cfg.seed)  # noise: FireAct's robustness data
        print(f"generate {cfg.task}/{split}/{cfg.method} with {cfg.teacher_model}, tool {tool}: {len(done)} done, "
              f"{len(todo)} to go -> {out}")
        # One episode per worker thread: each is written the moment it ends (the batch is the pool of threads).
        episode = lambda q: run_agent(llm, [base_tool.fork()], [q], prompt_fn, max_steps, reflexion=reflexion)[0]
        stats, errors, t0 = Counter(), [], time.time()
        with tqdm(total=len(todo), unit="q", dynamic_ncols=True) as bar:
            for q, ep in tools.run_concurrently(episode, todo, workers=cfg.workers, rpm=cfg.rpm or None):
                if isinstance(ep, BaseException) and not isinstance(ep, Exception):
                    raise ep  # Ctrl-C / exit inside a worker: stop; what is written stays valid
                if isinstance(ep, Exception) or ep.error:
                    errors.append(cli.one_line(ep if isinstance(ep, Exception) else ep.error))
                    stats["errors"] += 1  # not written: a rerun tries it again
                else:
                    rec = dict(episode_record(ep, cfg.task, cfg.method, cfg.teacher_model, tool), run=run)
                    append_jsonl(f, rec)
                    stats["written"] += 1
                    stats["correct"] += rec["em"]
                bar.update(1)
                bar.set_postfix(ok=int(stats["correct"]), err=stats["errors"])
    usage = llm.usage
    c = cost(cfg.teacher_model, usage)
    print(f"wrote {stats['written']} ({int(stats['correct'])} correct), {stats['errors']} failed in "
          f"{time.time() - t0:.0f}s; tokens: {usage.get('prompt_tokens', 0)} prompt + "
          f"{usage.get('completion_tokens', 0)} completion in {usage.get('requests', 0)} requests "
          f"({usage.get('cached', 0)} cached); cost " + (f"${c:.2f}" if c is not None else "n/a"))
    if errors:
        print(f"{len(errors)} failed episodes (not written; a rerun retries them). First errors:\n  " +
              "\n  ".join(error_digest(errors)), file=sys.stderr)
        if not stats["written"]:
            raise ValueError(f"generate: every episode failed ({len(errors)}); first error: {errors[0]}")
    return out


def filter_records(cfg: FilterConfig) -> int:
    """Keep the successful trajectories (right answer, finished by the agent itself), one per (task, method, id)."""
    seen, kept = set(), []
    for path in cfg.files:
        for r in read_records(path):
            key = (r.get("task"), r.get("method"), r["id"])
            if r.get("em", 0) > 0 and (cfg.keep_forced or not r.get("forced")) and key not in seen:
                seen.add(key)
                kept.append(r)
    write_jsonl(Path(cfg.out), kept)
    print(f"kept {len(kept)} successful trajectories -> {cfg.out}")
    return len(kept)


def mix(cfg: MixConfig) -> Counter:
    """K tasks x M methods -> one shuffled training file (our format; FireAct's files are read too)."""
    groups = {}
    for path in cfg.files:
        for r in read_records(path):
            groups.setdefault((r.get("task", "?"), r.get("method", "?")), []).append(r)
    caps = {}
    for spec in cfg.per_method:
        m, _, n = spec.partition("=")
        if not n.isdigit():
            raise ValueError(f"mix: --per-method {spec!r}: expected METHOD=N, e.g. react=450")
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
        raise ValueError(f"mix: no records for tasks {cfg.tasks} x methods {cfg.methods} in {cfg.files}")
    rng.shuffle(out)
    write_jsonl(Path(cfg.out), out)
    methods = sorted({m for _, m in counts})
    print("task".ljust(18) + "".join(m.rjust(11) for m in methods))
    for task in sorted({t for t, _ in counts}):
        print(task.ljust(18) + "".join(str(counts[(task, m)]).rjust(11) for m in methods))
    print(f"{len(out)} records -> {cfg.out}")
    return counts


def score(cfg: ScoreConfig) -> list[dict]:
    """EM/F1 of results files, recomputed from pred and gold; FireAct's denominator rule (see `denominator`).
    A file with failed episodes (server errors) is marked: its EM is not a result."""
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
        failed = sum(1 for r in rows if r.get("error"))
        results.append(dict(file=str(path), em=100 * em / n, f1=100 * f1 / n, entries=len(rows), n=n, failures=failed))
        print(f"EM {100 * em / n:5.1f}  F1 {100 * f1 / n:5.1f}  ({len(rows)} entries / {n})  {path.name}" +
              (f"  [{failed} FAILED episodes: not a result]" if failed else ""))
        if cfg.breakdown:
            results[-1]["breakdown"] = error_breakdown(rows, cfg.metric)
            print_breakdown(results[-1]["breakdown"])
    if not results:
        raise ValueError(f"score: no results files in {' '.join(cfg.files)}")
    if any(r["failures"] for r in results):
        raise SystemExit(1)  # marked above; a script must not take it for a result
    return results


BREAKDOWN = ("right", "wrong, answer seen", "wrong, never seen", "wrong, yes/no/MC")


def error_breakdown(rows: list[dict], metric: str = "") -> dict:
    """Where the errors come from. -> {tool calls ("0", "1", "2", "3+"): {outcome: episodes}}, outcomes in BREAKDOWN.
    'Seen' means the normalised gold answer occurs, as whole words, in one of the episode's observations: wrong
    after seeing it is a reading (or answering) error, wrong without ever seeing it a search error. A yes/no or
    option gold is never 'seen' in that sense, so such errors have their own column."""
    table = {}
    for r in rows:
        m = metric or (get_task(r["task"]).metric if r.get("task") in TASKS else "qa")
        steps = r["steps"]
        calls = sum(1 for s in steps if s.get("action") and not is_finish(s["action"]))
        gold = normalize_answer(r["gold"])
        seen = any(f" {gold} " in f" {normalize_answer(s.get('observation') or '')} " for s in steps if gold)
        if score_answer(m, r.get("pred"), r["gold"])[0] > 0:
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


def overlap_filter(qs, files):
    """Drop questions that appear (normalised text) in training files. -> (kept, dropped count)."""
    if not files:
        return qs, 0
    seen = {question_key(r["question"]) for f in files for r in read_records(f)}
    kept = [q for q in qs if question_key(q["question"]) not in seen]
    print(f"--exclude-overlap: dropped {len(qs) - len(kept)} of {len(qs)} questions found in {' '.join(files)}")
    if not kept:
        raise ValueError(f"--exclude-overlap: every question of the split is in {' '.join(files)}")
    return kept, len(qs) - len(kept)


def run_eval(cfg: EvalConfig, llm, prompt_fn, label: str, out: Path, tool: str, meta: dict) -> dict:
    """Run the agent on a task's questions, write FireAct-schema results + a summary, return the summary."""
    from tqdm import tqdm
    task = get_task(cfg.task)
    split = cfg.split or task.eval_splits[0]
    qs, dropped = overlap_filter(task.questions(split, cfg.n), cfg.exclude_overlap)
    base_tool = make_tool(cfg.task, tool, cfg.noise, cfg.noise_mode, cfg.seed)
    t0 = time.time()
    with tqdm(total=len(qs), unit="q", desc=label, dynamic_ncols=True) as bar:
        eps = run_agent(llm, [base_tool.fork() for _ in qs], qs, prompt_fn, cfg.max_steps, cfg.batch_size,
                        on_done=lambda ep: bar.update(1), force_answer=cfg.force_answer)
    wall = time.time() - t0
    results = {}
    for ep in eps:
        r = episode_record(ep, cfg.task, "react", label, tool)
        results[ep.id] = dict(reward=r["em"] > 0, em=r["em"] > 0, f1=r["f1"], gt=ep.answer, pred=ep.pred or "",
                              question=ep.question,
                              prompt="", traj=history_text(ep.question, ep.steps), task=cfg.task, steps=ep.steps,
                              finished=r["finished"], forced=ep.forced, error=ep.error)
    n, errors = len(qs), [ep.error for ep in eps if ep.error]
    summary = dict(run=label, task=cfg.task, split=split, n=n,
                   em=100 * sum(r["em"] for r in results.values()) / n,
                   f1=100 * sum(r["f1"] for r in results.values()) / n,
                   finished=sum(r["finished"] for r in results.values()),
                   finish_rate=100 * sum(r["finished"] for r in results.values()) / n,
                   mean_steps=sum(len(ep.steps) for ep in eps) / n, failures=len(errors),
                   errors=error_digest(errors), excluded_overlap=dropped, tool=tool, wall_s=wall,
                   tokens=llm.usage, **meta, config=dataclasses.asdict(cfg))
    write_json(out, results)
    write_json(summary_path(out), summary)
    return summary


def write_json(path: Path, obj):
    files.atomic_write(path, json.dumps(obj, indent=1, ensure_ascii=False))


def print_table(summaries: list[dict]):
    print(f"{'run':<28}{'n':>6}{'EM':>7}{'F1':>7}{'steps':>7}{'finish%':>9}{'failed':>8}{'wall s':>9}{'tokens':>10}")
    for s in summaries:
        tok = s["tokens"].get("prompt_tokens", 0) + s["tokens"].get("completion_tokens", 0)
        print(f"{s['run']:<28}{s['n']:>6}{s['em']:>7.1f}{s['f1']:>7.1f}{s['mean_steps']:>7.2f}"
              f"{s['finish_rate']:>9.1f}{s['failures']:>8}{s['wall_s']:>9.1f}{tok:>10}")
    for s in summaries:
        if s["failures"]:
            print(f"{s['run']}: {s['failures']} failed episodes (scored 0). First errors:\n  " +
                  "\n  ".join(s["errors"]), file=sys.stderr)


def adapter_training(adapter: str) -> dict:
    """What an adapter was trained with, as train.py records it in adapter_config.json ("fireact"): its template,
    the tools that made its training data, and the base model it was really trained on. {} without an adapter."""
    if not adapter:
        return {}
    a = json.loads((Path(adapter) / "adapter_config.json").read_text())
    meta = a.get("fireact") or {}
    return dict(template=meta.get("template", "react"), data_tools=meta.get("data_tools", {}),
                base={k: a.get(k) for k in ("base_model_name_or_path", "base_model_source", "base_model_sha256")})


def pick_tool(cfg: EvalConfig, task: Task, trained: dict) -> str:
    """--tool, else the tool family the adapter's training data came from, else the task's default. Search
    engines (google, snippet) and page tools (wikipedia, local) are the two families; offline tasks use
    their offline member."""
    if cfg.tool:
        return cfg.tool
    used = Counter(trained.get("data_tools", {})).most_common(1)
    if not used or used[0][0] not in TOOLS:
        return task.tool
    engine = used[0][0] in ("google", "snippet")
    offline = task.tool == "local"
    choice = ("snippet" if offline else "google") if engine else ("local" if offline else "wikipedia")
    print(f"tool: {choice} (the adapter's training data came from the {used[0][0]} tool; --tool overrides)")
    return choice


def load_local(cfg):
    """The local model of eval and ask on the device model.pick_device chooses (cuda, mps, cpu), said on stderr."""
    import model as M
    device = M.pick_device(cfg.device)
    dtype = M.pick_dtype(cfg.dtype, device)
    print(f"device: {device}", file=sys.stderr)
    if str(device) == "cpu":  # what this CPU has and the path chosen for it (a bf16 that is emulated, said so)
        print(M.cpu_report(dtype, quant=cfg.quant, compiled=cfg.compile), file=sys.stderr)
    net, tok = M.load_model(cfg.model or None, device=device, dtype=dtype)
    return M.setup_inference(net, cfg.quant, cfg.compile), tok


def student_prompt(tok, zero: bool, template: str, task: Task, tool: str):
    """A fine-tuned student's prompt (render, no examples) or the prompted model's (few-shot ReAct for the tool)."""
    return zero_shot(tok, template) if zero else few_shot("react", task.family, tool)


def evaluate(cfg: EvalConfig) -> list[dict]:
    """Prompted (few-shot) or fine-tuned (adapter, zero-shot) evaluation; --compare runs both on the same model."""
    task = get_task(cfg.task)
    out = Path(cfg.out)
    trained = adapter_training(cfg.adapter)
    tool = pick_tool(cfg, task, trained)
    template = cfg.template or trained.get("template", "react")
    meta = dict(model=cfg.teacher_model or cfg.model or "SmolLM2-135M-Instruct", adapter=cfg.adapter or None,
                adapter_base=trained.get("base"),
                template=template, noise=cfg.noise, noise_mode=cfg.noise_mode, force_answer=cfg.force_answer,
                seed=cfg.seed, quant=cfg.quant or None, compile=cfg.compile or None,
                dtype=None if cfg.teacher_model else cfg.dtype or "auto", provenance=cli.provenance())
    if cfg.teacher_model:
        llm = TeacherLLM(make_teacher(cfg.teacher_model, cfg.base_url, cfg.api_key_env, timeout=cfg.timeout,
                                      retries=cfg.retries))
        if cfg.zero_shot:  # a fine-tuned API model, evaluated as FireAct evaluated its GPT-3.5: chat, no examples
            summaries = [run_eval(cfg, llm, chat_messages, f"{cfg.teacher_model} zero-shot", out, tool, meta)]
        else:
            summaries = [run_eval(cfg, llm, few_shot("react", task.family, tool), f"{cfg.teacher_model} prompted",
                                  out, tool, meta)]
    else:
        import model as M
        net, tok = load_local(cfg)
        runs = [("prompted", False), ("fine-tuned", True)] if cfg.compare else [
            ("fine-tuned" if cfg.adapter else "zero-shot" if cfg.zero_shot else "prompted", bool(cfg.adapter))]
        summaries = []
        for label, tuned in runs:
            if tuned:
                M.load_adapter(net, cfg.adapter, merge=not cfg.quant)
            prompt_fn = student_prompt(tok, tuned or cfg.zero_shot, template, task, tool)
            path = out.with_name(f"{out.stem}_{label}{out.suffix}") if cfg.compare else out
            llm = LocalLLM(net, tok, cfg.max_new_tokens, seed=cfg.seed, prefix_cache_mb=cfg.prefix_cache_mb)
            summaries.append(run_eval(cfg, llm, prompt_fn, label, path, tool,
                                      dict(meta, adapter=cfg.adapter if tuned else None,
                                           adapter_merged=tuned and not cfg.quant)))
    print_table(summaries)
    for s in summaries:
        if s["failures"] > cfg.max_failures * s["n"]:
            raise ValueError(f"eval: {s['failures']} of {s['n']} episodes failed (results written, marked); "
                             f"first error: {s['errors'][0]}")
    return summaries


# --------------------------------------------------------------------------------------------------- ask, view
def ask(cfg: AskConfig) -> list[Episode]:
    """One question through THE agent loop (run_agent), each Thought / Action / Observation printed as it is
    recorded (the on_step hook), then the answer; --interactive reads more questions from stdin."""
    import model as M
    color = cfg.color == "always" or (cfg.color == "auto" and sys.stdout.isatty())
    paint = (lambda code, text: f"\x1b[{code}m{text}\x1b[0m") if color else (lambda code, text: text)
    task, trained = get_task(cfg.task), adapter_training(cfg.adapter)
    tool = pick_tool(cfg, task, trained)
    net, tok = load_local(cfg)
    if cfg.adapter:
        M.load_adapter(net, cfg.adapter, merge=not cfg.quant)
    prompt_fn = student_prompt(tok, bool(cfg.adapter), cfg.template or trained.get("template", "react"), task, tool)
    llm, base_tool = LocalLLM(net, tok, cfg.max_new_tokens), make_tool(cfg.task, tool)
    gold = {question_key(q["question"]): q["answer"] for split in task.eval_splits for q in task.questions(split)}

    def show(ep, step):
        print(f"{paint('1;36', 'Thought:')} {step['thought']}\n{paint('1;33', 'Action:')} {step['action']}", flush=True)
        if not is_finish(step["action"]):
            print(f"{paint('2', 'Observation: ' + str(step['observation']))}", flush=True)
    episodes, question = [], " ".join(cfg.question).strip()
    print(f"{'fine-tuned: ' + cfg.adapter if cfg.adapter else 'prompted (few-shot)'} | {cfg.task} | tool {tool}")
    while question:
        print(f"{paint('1', 'Question:')} {question}", flush=True)
        ep = run_agent(llm, [base_tool.fork()], [dict(id="0", question=question, answer="")], prompt_fn,
                       cfg.max_steps, on_step=show)[0]
        answer = paint("1;32", ep.pred) if ep.pred is not None else paint("1;31", f"(none: {ep.error or 'out of steps'})")
        right = question_key(question) in gold and score_answer(task.metric, ep.pred, gold[question_key(question)])[0]
        known = f" | gold: {gold[question_key(question)]} ({'right' if right else 'wrong'})" \
            if question_key(question) in gold else ""
        print(f"{paint('1', 'Answer:')} {answer} | {len(ep.steps)} steps{known}", flush=True)
        episodes.append(ep)
        question = ""
        if cfg.interactive:
            try:
                question = input("\nQuestion> ").strip()
            except EOFError:
                break
    return episodes


def view(cfg: ViewConfig) -> Path:
    """Results files -> one self-contained HTML report (report.py)."""
    import report
    runs = [report.load_run(f) for f in cfg.files]
    files.atomic_write(cfg.out, report.runs_html(runs, cfg.title))
    print(f"{cfg.out}: {len(runs)} run(s), {sum(len(r['rows']) for r in runs)} results")
    return Path(cfg.out)


def table(cfg: TableConfig) -> Path:
    """Row summaries of experiments.py runs -> the README's markdown table and a PNG chart (experiments.py)."""
    import experiments
    md, png = experiments.table(cfg.dirs, cfg.out)
    print(md.read_text() + f"\n{md}, {png}")
    return md


# ---------------------------------------------------------------------------------------------------- download
FIREACT_FILES = {  # FireAct's released trajectories and eval runs (not a task: training data and reference runs)
    **{f"fireact/finetune/{fmt}/{name}.{ext}": FIREACT_RAW + f"data/finetune/{fmt}/{name}.{ext}"
       for fmt, ext in (("alpaca_format", "json"), ("gpt_format", "jsonl"))
       for name in ("hotpotqa", "hotpotqa_multimethod", "multitask", "multitask_multimethod")},
    **{f"fireact/trajs/{name}": FIREACT_RAW + f"trajs/{name}" for name in (
        "hotpotqa_dev_0_500_ft_gpt-3.5-turbo-0613_princeton-nlp__7woQRsdi_0.0_2023-09-21-16-19-51.json",
        "hotpotqa_dev_0_500_llama_models_lora_llama-2-13b-d_1000_0.7_2023-09-18-13-40-08.json",
        "hotpotqa_dev_0_500_llama_models_lora_llama-2-7b-d_1000_0.7_2023-09-19-00-49-36.json")},
}


def sources() -> dict:
    """Every public source: path under the data dir -> URL (each task's, then FireAct's files)."""
    return {**{rel: url for t in TASKS.values() for rel, url in t.sources.items()}, **FIREACT_FILES}


def download(cfg: DownloadConfig) -> Path:
    """Fetch the sources into the data dir and convert them to the layout the tasks read (= ../shared/data)."""
    dest = Path(cfg.dest).expanduser() if cfg.dest else CACHE / "data"
    want = lambda rel: not cfg.only or any(rel.startswith(o) for o in cfg.only)
    for rel, url in sources().items():
        if want(rel) and not (dest / rel).exists():
            print(f"{url} -> {dest / rel}")
            tools.fetch_file(url, dest / rel)
    for t in TASKS.values():
        if t.sources and all(want(rel) and (dest / rel).exists() for rel in t.sources):
            t.convert(dest)
    print(f"data in {dest}" + ("" if dest == data_dir() else f"; use it with FIREACT_DATA={dest}"))
    return dest


def export_data(cfg: ExportConfig) -> Path:
    """Trajectory files -> one fine-tuning file in OpenAI's chat format (FireAct's gpt_format), alpaca or ShareGPT."""
    rows = [export_row(r, cfg.format, cfg.final_observation) for f in cfg.files for r in read_records(f)]
    if cfg.format == "alpaca":  # FireAct's alpaca files are one JSON array
        files.atomic_write(cfg.out, json.dumps(rows, indent=4, ensure_ascii=False))
    else:
        write_jsonl(Path(cfg.out), rows)
    print(f"wrote {len(rows)} {cfg.format} examples -> {cfg.out}")
    return Path(cfg.out)


def finetune_api(cfg: FinetuneAPIConfig) -> str:
    """Check the file, print the estimate, then (unless --dry-run) upload, fine-tune and follow the job (tools.py);
    resumable. Evaluate the result with `eval --teacher-model ft:... --zero-shot`."""
    train = cfg.files[0]
    checks = [tools.check_chat_file(f, cfg.base_model) for f in [train] + ([cfg.validation] if cfg.validation else [])]
    est = tools.estimate(checks[0], cfg.base_model, cfg.epochs)
    usd = f"${est['usd']:,.2f} at ${est['price']:g} per 1M" if est["usd"] is not None else \
        f"no price known for {cfg.base_model} (priced: {', '.join(tools.FT_PRICES)})"
    print(f"{train}: {est['examples']:,} examples, {est['file_tokens']:,} tokens ({checks[0]['tokenizer']}) x "
          f"{est['epochs']} epochs{'' if cfg.epochs else ' (auto)'} = {est['trained_tokens']:,} trained tokens; "
          f"estimated training cost {usd}")
    for w in [w for c in checks for w in c["warnings"]]:
        print(f"note: {w}")
    if cfg.dry_run:
        return ""
    api = tools.FineTuneAPI(cfg.base_url or None, cfg.api_key_env, timeout=cfg.timeout, max_retries=cfg.retries)
    try:
        name = tools.finetune(api, train, cfg.base_model, cfg.validation, cfg.epochs, cfg.suffix, cfg.poll)
    except tools.APIError as e:  # one line with the server's message (cli.run prints ValueErrors so)
        raise ValueError(f"{e}; a rerun resumes from {tools.finetune_state_path(train)}") from None
    print(f"fine-tuned model: {name}\nevaluate it: python fireact.py eval --teacher-model {name} --zero-shot" +
          (f" --base-url {cfg.base_url}" if cfg.base_url else ""))
    return name


COMMANDS = {"generate": (GenerateConfig, generate, "teacher trajectories on a training split (resumable)"),
            "filter": (FilterConfig, filter_records, "keep the successful trajectories"),
            "mix": (MixConfig, mix, "K tasks x M methods -> one training file"),
            "eval": (EvalConfig, evaluate, "run the agent (prompted or fine-tuned) and score it"),
            "score": (ScoreConfig, score, "EM/F1 of results files (ours or FireAct's trajs)"),
            "download": (DownloadConfig, download, "fetch the public data sets and FireAct's files"),
            "export-data": (ExportConfig, export_data, "trajectories -> a fine-tuning file (openai chat, alpaca, sharegpt)"),
            "finetune-api": (FinetuneAPIConfig, finetune_api, "fine-tune an API model (FireAct's GPT-3.5 student)"),
            "ask": (AskConfig, ask, "one question through the agent, each step shown as it happens"),
            "view": (ViewConfig, view, "results files -> one self-contained HTML report"),
            "table": (TableConfig, table, "experiments.py run dirs -> the markdown table + PNG chart")}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python fireact.py COMMAND [--help] [flags]\n\ncommands:\n" +
              "\n".join(f"  {name:<14}{doc}" for name, (_, _, doc) in COMMANDS.items()))
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        raise ValueError(f"unknown command {argv[0]!r}; choose {' | '.join(COMMANDS)}")
    cls, fn, _ = COMMANDS[argv[0]]
    fn(parse_config(cls, argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="fireact.py") or 0)

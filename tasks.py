"""FireAct's tasks and file formats: support for fireact.py (data, not reading material; read fireact.py first).

    import tasks
    qs = tasks.load_questions("toy", "test", n=5)         # [{"id", "question", "answer"}]
    recs = tasks.read_records("data/toy/train.jsonl")     # our JSONL, FireAct's alpaca JSON / gpt JSONL, ShareGPT
    recs = tasks.read_training_records(path)              # the same, less failed attempts (FireAct's reward = False)
    tasks.score_answer("qa", "the Mapocho river.", "Mapocho River")   # (em, f1) = (1.0, 1.0)

What is here: the metrics (SQuAD EM/F1, yes/no, multiple choice); the trajectory record and every reader of it
(FireAct's released formats included); each task as a small class owning its splits, loader, metric, prompt family,
default tool and public sources (`python fireact.py download`); the offline corpora and the tool an episode uses;
the readers of results files (ours and FireAct's trajs). Torch-free: `fireact.py mix` and `filter` need no torch.
"""
import copy, csv, hashlib, json, os, random, re, string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common import cli, files, net
import tools  # no torch: cheap to import

REPO = cli.REPO
SHARED_DATA = REPO.parent / "shared" / "data"
FIREACT_RAW = "https://raw.githubusercontent.com/anchen1011/FireAct/main/"
REACT_RAW = "https://raw.githubusercontent.com/ysymyth/ReAct/master/"
STRATEGYQA_RAW = "https://raw.githubusercontent.com/eladsegal/strategyqa/main/data/strategyqa/"
DOWNLOAD_HINT = "run `python fireact.py download`, or set FIREACT_DATA"


def data_dir() -> Path:
    """Where datasets live: $FIREACT_DATA, else ../shared/data beside the repo, else the download cache."""
    if os.environ.get("FIREACT_DATA"):
        return Path(os.environ["FIREACT_DATA"])
    return SHARED_DATA if SHARED_DATA.exists() else files.cache_dir() / "data"


def read_data(path):
    """A dataset file (.json -> its value, .jsonl -> its rows). A missing one inside the data dir says how to get it
    (the download hint only where download would help: a dataset, not a results file)."""
    path = Path(path)
    hint = DOWNLOAD_HINT if data_dir().absolute() in path.absolute().parents else ""
    if path.suffix != ".jsonl":
        return files.read_json(path, hint=hint)
    if not path.exists():
        raise ValueError(f"{path}: no such file" + (f"; {hint}" if hint else ""))
    return files.read_jsonl(path)


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


def question_key(q: str) -> str:
    """Questions compared across files (the overlap check): SQuAD-normalised text."""
    return normalize_answer(q)


# ------------------------------------------------------------------------------------------------ trajectories
# Our record, one JSON object per line of a .jsonl file (generate writes it, filter/mix/train read it):
#   id        str    question id within its task ("toy-train-0001", a HotpotQA dev index, ...)
#   task      str    fireact task name (toy, hotpotqa, strategyqa, ...)
#   method    str    react | cot | reflexion ("" where a file does not say: FireAct's released files)
#   question  str    the question (MMLU: with its options A-D)
#   answer    str    the gold answer ("yes"/"no" for yesno tasks, "A".."D" for mc tasks)
#   steps     list   [{"thought": str, "action": str, "observation": str | None}], in order. An action is
#                    search[query], lookup[keyword] or finish[answer], or "" when the model wrote none (its
#                    observation then says the action was invalid). CoT is one step: a thought, then finish[X].
#                    A reflection (Reflexion) opens the thought of the step after it, after REFLECT_INTRO.
#   tool      str    which tool made the observations: local | snippet | wikipedia | google
#   pred, em, f1, finished, forced, reflections     the episode's own answer, its score and how it ended
#   source    str    the teacher model, or the file the record was read from
# Invariant: a trajectory holds at most one finish, and it is its last step. Readers refuse a record that
# breaks it (file:line), never cut it silently: a cut would train the student on whatever came first.
#
# FireAct's released files load as they are: alpaca JSON ({"instruction": question, "output": ReAct text}) and
# gpt-format JSONL ({"messages": [user question, assistant Thought/Action, user Observation, ...]}); so do
# ShareGPT rows ({"conversations": [{"from": "human" | "gpt", "value"}]}).
STEP_LINE = re.compile(r"^(Thought|Action|Observation)(?: \d+)?:[ \t]?(.*)$")
REFLECT_INTRO = "My attempt has not worked yet, so I reflect on it before going on."  # opens a reflection's Thought


def is_finish(action) -> bool:
    """Whether the tool ends the episode on this action: the tool's own parse, so a finish it refused
    ("finish[a [b]", unbalanced: "Invalid action", the episode goes on) is an ordinary step here too."""
    parsed = tools.parse_action(str(action).strip())
    return parsed is not None and parsed[0] == "finish"


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


# FireAct's released files are not all successful: 40 of hotpotqa_multimethod's 734 rows (47 of
# multitask_multimethod's 2,063), its Reflexion rows, end `Observation: Episode finished, reward = False` (or `= 0`).
# FireAct's method trains on successful trajectories only, so the readers on the way to training drop them.
FAILED = re.compile(r"Episode finished, reward = (False|0)\b")


def is_failed(rec) -> bool:
    """Whether a record's last observation says its episode failed (FireAct's `reward = False`)."""
    return bool(rec["steps"]) and bool(FAILED.search(str(rec["steps"][-1].get("observation") or "")))


def drop_failed(recs, path, keep=False, log=print):
    """recs without the failed ones (is_failed), saying how many were dropped from which file; keep: all of them."""
    failed = sum(map(is_failed, recs))
    if failed and not keep:
        log(f"{path}: dropped {failed} of {len(recs)} trajectories whose last observation says `Episode finished, "
            f"reward = False` (failed attempts; --keep-failed keeps them)")
        return [r for r in recs if not is_failed(r)]
    if failed:
        log(f"{path}: kept {failed} failed trajectories (`reward = False`), as --keep-failed asks")
    return recs


def read_training_records(path, keep_failed=False, log=print):
    """read_records on the way to training (train.py --data, fireact.py mix): failed trajectories dropped unless
    keep_failed. read_records itself returns every record of the file, as it is."""
    return drop_failed(read_records(path), path, keep_failed, log)


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
                         f"`python fireact.py generate ...` (see docs/real-data.md)")
    raise ValueError(f"{path}:{lineno}: unknown record format (keys {sorted(d)[:6]}); expected 'steps', "
                     f"'messages', 'conversations' or 'instruction'/'output'")


def read_records(path):
    """Our trajectory JSONL, FireAct alpaca JSON (a list), FireAct gpt JSONL or ShareGPT -> list of our records."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: " + ("is a directory, not a data file" if path.is_dir() else "no such file"))
    text = files.read_text(path)  # one that is not UTF-8: a ValueError naming it
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
            raise ValueError(f"task {self.name}, split {split}: no questions in {data_dir()} ({DOWNLOAD_HINT})")
        if n < 0:
            raise ValueError(f"--n {n}: must be >= 0 (0 = all {len(qs)} questions)")
        return qs[:n] if n else qs

    def training_split(self, split: str = "", allow_eval_split: bool = False) -> str:
        """generate's split: a training split unless told otherwise, so no evaluation question is trained on."""
        split = split or (self.train_splits[0] if self.train_splits else "")
        if not split:
            raise ValueError(f"task {self.name} has no training split (evaluation only: {', '.join(self.eval_splits)}"
                             f"); generate on another task, or pass --split S --allow-eval-split")
        if split in self.eval_splits and not allow_eval_split:
            raise ValueError(f"--split {split} of task {self.name} is an evaluation split; generate on "
                             f"{' | '.join(self.train_splits) or 'another task'}, or pass --allow-eval-split")
        return split


class HotpotQA(Task):
    name, tool = "hotpotqa", "wikipedia"
    train_splits, eval_splits = ("train",), ("fireact500", "dev")
    sources = {"hotpotqa/dev.json": REACT_RAW + "data/hotpot_dev_v1_simplified.json",
               "hotpotqa/train.json": REACT_RAW + "data/hotpot_train_v1.1_simplified.json"}

    def load(self, split):
        if split == "train":
            rows = read_data(data_dir() / "hotpotqa" / "train.json")
            return [dict(id=str(i), question=r["question"], answer=r["answer"]) for i, r in enumerate(rows)]
        dev = read_data(data_dir() / "hotpotqa" / "dev.json")
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
              for r in read_data(data_dir() / "hotpotqa" / "dev_distractor.jsonl")]
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
        keep = set(files.read_json(REPO / "data" / "hotpotqa" / "offline_dev_indices.json"))
        index = {r["question"]: i for i, r in enumerate(read_data(dev))}
        rows = [dict(r, dev_index=index[r["question"]]) for r in read_data(raw)
                if index.get(r["question"]) in keep]
        files.write_jsonl(dest / "hotpotqa" / "dev_distractor.jsonl", sorted(rows, key=lambda r: r["dev_index"]))


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
                for i, r in enumerate(read_data(data_dir() / "bamboogle" / "test.json"))]

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
        rows = read_data(data_dir() / "strategyqa" / ("train_filtered.json" if split == "train" else "dev.json"))
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
    world = REPO / "data" / "toy"   # the world's folder; `python toyworld.py --seed S --out DIR` makes others
    sub = ""                        # this task's folder inside the world

    @property
    def folder(self) -> Path:
        return self.world / self.sub

    def in_world(self, world) -> "Toy":
        """This task in another generated world (eval --world DIR): its questions and its pages."""
        world = Path(world)
        if not (world / "corpus.jsonl").is_file():
            raise ValueError(f"--world {world}: no corpus.jsonl there (make a world with `python toyworld.py "
                             f"--seed S --out {world}`)")
        t = copy.copy(self)
        t.world = world
        return t

    def load(self, split):  # data/toy/train.jsonl holds trajectories; the training questions are train_questions
        name = "train_questions" if split == "train" else split
        return [dict(id=str(r["id"]), question=r["question"], answer=r["answer"])
                for r in read_data(self.folder / f"{name}.jsonl")]


class ToyYesNo(Toy):
    """The toy world's StrategyQA-like task: yes/no questions that need two facts the question never names."""
    name, metric, family, sub = "toy_yesno", "yesno", "strategyqa", "toy_yesno"


class ToyMC(Toy):
    """The toy world's MMLU-like task: four options, checked with the tools one page each."""
    name, metric, family, sub = "toy_mc", "mc", "mmlu", "toy_mc"


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


# ------------------------------------------------------------------------------------------------------- tools
TOOLS = ("local", "snippet", "wikipedia", "google")  # local: page tool over a corpus; snippet: offline search engine


def corpus_path(task) -> Path:
    """The offline corpus of a task (a name or a Task): the toy world's pages, or the 9,366 paragraphs of the 957
    HotpotQA dev questions (built once from dev_distractor.jsonl into the cache, rebuilt when that file changes)."""
    task = get_task(task) if isinstance(task, str) else task
    if isinstance(task, Toy):  # every toy task of a world asks about the same pages
        return task.world / "corpus.jsonl"
    task = task.name
    if task.startswith("hotpotqa"):
        src = data_dir() / "hotpotqa" / "dev_distractor.jsonl"
        if not src.exists():
            raise ValueError(f"{src}: missing (run `python fireact.py download --only hotpotqa`)")
        key = hashlib.sha1(f"{src.resolve()}:{src.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        corpus = files.cache_dir() / "corpus" / f"dev_distractor_{key}.jsonl"
        if not corpus.exists():
            tools.build_corpus([src], corpus)
        return corpus
    raise ValueError(f"no offline corpus for task {task!r}: use --tool wikipedia or --tool google")


def make_tool(task, kind: str = "", noise: float = 0.0, noise_mode: str = "none", seed: int = 0):
    """The tool an episode of `task` (a name or a Task) uses (one shared backend; agent loops call .fork() per
    episode)."""
    kind = kind or (get_task(task) if isinstance(task, str) else task).tool
    if kind == "wikipedia":
        tool = tools.Wikipedia(cache_dir=files.cache_dir() / "wikipedia")
    elif kind == "google":
        tool = tools.GoogleSearch()
    elif kind == "local":
        tool = tools.LocalWiki(corpus_path(task))
    elif kind == "snippet":
        tool = tools.SnippetSearch(corpus_path(task))
    else:
        raise ValueError(f"unknown tool {kind!r}; choose {' | '.join(TOOLS)}")
    return tools.NoisyTool(tool, noise, mode=noise_mode, seed=seed) if noise > 0 else tool


def pick_tool(cfg, task: Task, trained: dict) -> str:
    """The tool of eval and ask: cfg.tool, else the tool family the adapter's training data came from, else the
    task's default. Search engines (google, snippet) and page tools (wikipedia, local) are the two families;
    offline tasks use their offline member."""
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


# ----------------------------------------------------------------------------------------------------- results
def read_results(path: Path) -> list[dict]:
    """Our eval JSON / FireAct's trajs/*.json (dict id -> {pred, gt, ...}) or our trajectory JSONL -> rows."""
    if path.suffix == ".jsonl":
        rows = [dict(r, gold=r["answer"]) for r in read_records(path)]
        if not rows:
            raise ValueError(f"{path}: no records in the file")
        return rows
    d = files.read_json(path)
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
        return files.read_json(summary_path(path))["n"]
    m = re.search(r"_(\d+)_(\d+)_", path.name)
    return int(m.group(2)) - int(m.group(1)) if m else len(rows)


# ---------------------------------------------------------------------------------------------------- download
FIREACT_FILES = {  # FireAct's released trajectories, prompts and eval runs (not a task: data and reference runs)
    **{f"fireact/finetune/{fmt}/{name}.{ext}": FIREACT_RAW + f"data/finetune/{fmt}/{name}.{ext}"
       for fmt, ext in (("alpaca_format", "json"), ("gpt_format", "jsonl"))
       for name in ("hotpotqa", "hotpotqa_multimethod", "multitask", "multitask_multimethod")},
    # FireAct's few-shot prompts (`fireact.py eval/generate --prompts fireact`): its repository's prompts/ folder
    **{f"fireact/prompts/{name}.txt": FIREACT_RAW + f"prompts/{name}.txt" for name in (
        *(f"react_{t}_google" for t in ("hotpotqa", "strategyqa", "mmlu")),
        *(f"{m}_{t}" for m in ("cot", "io") for t in ("hotpotqa", "strategyqa", "mmlu")))},
    **{f"fireact/trajs/{name}": FIREACT_RAW + f"trajs/{name}" for name in (
        "hotpotqa_dev_0_500_ft_gpt-3.5-turbo-0613_princeton-nlp__7woQRsdi_0.0_2023-09-21-16-19-51.json",
        "hotpotqa_dev_0_500_llama_models_lora_llama-2-13b-d_1000_0.7_2023-09-18-13-40-08.json",
        "hotpotqa_dev_0_500_llama_models_lora_llama-2-7b-d_1000_0.7_2023-09-19-00-49-36.json")},
}


def sources() -> dict:
    """Every public source: path under the data dir -> URL (each task's, then FireAct's files)."""
    return {**{rel: url for t in TASKS.values() for rel, url in t.sources.items()}, **FIREACT_FILES}


def fetch_sources(dest: Path, only=()) -> Path:
    """Fetch the sources (those under the path prefixes `only`; none = all) into dest and convert them to the
    layout the tasks read (= ../shared/data)."""
    want = lambda rel: not only or any(rel.startswith(o) for o in only)
    for rel, url in sources().items():
        if want(rel) and not (dest / rel).exists():
            print(f"{url} -> {dest / rel}")
            net.fetch_file(url, dest / rel)
    for t in TASKS.values():
        if t.sources and all(want(rel) and (dest / rel).exists() for rel in t.sources):
            t.convert(dest)
    print(f"data in {dest}" + ("" if dest == data_dir() else f"; use it with FIREACT_DATA={dest}"))
    return dest


@dataclass
class DownloadConfig:
    dest: str = ""                # "" = ~/.cache/fireact/data (use with FIREACT_DATA=...)
    only: list = field(default_factory=list)     # path prefixes of the sources, e.g. mmlu fireact/trajs

    def check(self):
        for o in self.only:
            if not any(rel.startswith(o) for rel in sources()):
                raise ValueError(f"--only {o}: matches no source; prefixes: "
                                 f"{', '.join(sorted({r.split('/')[0] for r in sources()}))}")


def download(cfg: DownloadConfig) -> Path:
    """`python fireact.py download`: the public sources into the data dir, converted to the layout the tasks read."""
    return fetch_sources(Path(cfg.dest).expanduser() if cfg.dest else files.cache_dir() / "data", cfg.only)

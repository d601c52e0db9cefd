"""FireAct, the agent side: how a trajectory becomes the student's text (render + the loss mask), the prompts, the
LLMs behind the agent, THE agent loop (run_agent), and the commands of the pipeline:

    python fireact.py generate --task toy --method react --teacher-model oracle --out runs/toy_react.jsonl
    python fireact.py filter runs/toy_react.jsonl --out runs/toy_ok.jsonl          # keep the successful ones
    python fireact.py mix runs/toy_ok.jsonl runs/hp_ok.jsonl --methods react cot --out runs/train.jsonl
    python train.py --data runs/train.jsonl --out runs/lora                         # (train.py: LoRA on the mix)
    python fireact.py eval --task toy --adapter runs/lora --n 100 --out runs/eval.json [--compare] [--plain]
    python fireact.py score ../shared/data/fireact/trajs/                          # EM 26.2 / 34.4 / 40.0
    python fireact.py ask "Where was the director of Iron Garden born?" --adapter runs/lora
    python fireact.py download                     # the public data sets (tasks.py owns them)
    python fireact.py --help                       # every command; `python fireact.py eval --help`: every flag

view, table, export-data and finetune-api are extras (`python -m extras ...`): this file hands them over.

The text layout (few-shot LLMs get a prefix of examples first; a fine-tuned student gets none):
    Question: {question}\n
    Thought: {thought}\nAction: {action}\n            <- trained (the model writes it)
    Observation: {observation}\n                      <- not trained (the tool wrote it)      ... once per step
The LLM writes `Thought: ...\nAction: ...`; we cut after the first complete Action line. CoT writes
`Thought: ...\nAnswer: X`, read as the one step `finish[X]`. A reflection prompt (data/prompts/reflexion_*.txt) ends
with `Reflection:`; the reflection then opens the next Thought. The few-shot examples are ours (data/prompts/) or
FireAct's own (--prompts fireact, the default with its search-engine tools on its tasks; read from the data dir).
Tasks, metrics and file formats: tasks.py.
"""
import dataclasses, json, os, random, re, sys, threading, time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common import cli, files, net  # flags and one-line errors, JSON/JSONL files, concurrent HTTP (torch-free)
import tools  # the agent's tools and the teacher (no torch)
from tasks import (REFLECT_INTRO, TASKS, TOOLS, DownloadConfig, Task, TaskName, Toy, data_dir, denominator,
                   download, get_task, is_finish, make_tool, pick_tool, question_key, read_records,
                   read_results, read_training_records, score_answer, summary_path)

REPO = cli.REPO
PROMPTS = REPO / "data" / "prompts"
PRICES = {"gpt-4o-mini": (0.15, 0.6), "gpt-4o": (2.5, 10.0), "gpt-4-turbo": (10.0, 30.0), "gpt-4": (30.0, 60.0),
          "gpt-3.5-turbo": (0.5, 1.5)}  # USD per 1M (prompt, completion) tokens; longest matching prefix wins


# ------------------------------------------------------------------------------------- the student's text + mask
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{question}\n\n### Response:\n")  # FireAct's Llama prompt (alpaca-lora)
TEMPLATES = ("react", "alpaca")


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


def mask_pieces(rec, tokenizer, train_on="actions", template="react"):
    """A record's rendering as [(text, trained)]: runs of equal mask decoded together (multi-byte chars
    survive), for show_mask and its HTML page (extras/report.py's mask_html)."""
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


# --------------------------------------------------------------------------------------------------------- prompts
# Two sets of few-shot prompts (--prompts): ours (data/prompts/, written for this project: a `Question:` label, a
# page-tool and a search-engine variant, a Reflexion prompt) and FireAct's own (its repository's prompts/, read from
# the data dir after `python fireact.py download`: ReAct with its Google-snippet tool, CoT; no Reflexion prompt).
PROMPT_SETS = ("ours", "fireact")
FIREACT_FAMILIES = ("hotpotqa", "strategyqa", "mmlu")
FIREACT_QUESTION = {"hotpotqa": "", "strategyqa": "Yes or no: ", "mmlu": "Single choice: "}  # as its examples ask


def default_prompts(task: Task, tool: str) -> str:
    """FireAct's prompts wherever FireAct's tool family is used (a search engine: snippet or google) on its task
    families; ours for the toy world and for page tools (wikipedia, local), for which FireAct wrote none."""
    fireact = tool in ("snippet", "google") and task.family in FIREACT_FAMILIES and not isinstance(task, Toy)
    return "fireact" if fireact else "ours"


def prompt_file(method: str, family: str, tool: str, prompts: str = "ours") -> Path:
    """ours: data/prompts/{method}_{family}[_snippet].txt (search-engine tools, snippet and google, get the prompts
    whose search takes a free-text query and returns one snippet; page tools the Wikipedia-style ones).
    fireact: {data dir}/fireact/prompts/react_{family}_google.txt or cot_{family}.txt, whatever the tool."""
    if prompts == "fireact":
        if family not in FIREACT_FAMILIES or method not in ("react", "cot"):
            raise ValueError(f"--prompts fireact: FireAct released no {method} prompt for {family} (it has react and "
                             f"cot for {', '.join(FIREACT_FAMILIES)}); pass --prompts ours")
        return data_dir() / "fireact" / "prompts" / (f"react_{family}_google.txt" if method == "react" else
                                                     f"cot_{family}.txt")
    if prompts != "ours":
        raise ValueError(f"unknown prompts {prompts!r}; choose {' | '.join(PROMPT_SETS)}")
    style = "_snippet" if tool in ("snippet", "google") and method != "cot" else ""
    return PROMPTS / f"{method}_{family}{style}.txt"


def few_shot(method: str, family: str, tool: str = "", prompts: str = "ours"):
    """prompt_fn(question, steps) -> text: the few-shot prefix of the prompt file + the history so far.
    ours:    {prefix}\n\nQuestion: {question}\n{steps}
    fireact: {prefix}\n\n{Yes or no: |Single choice: }{question}\n{steps}, FireAct's layout (generation.py:
             prompt file + question + newline; its examples carry no `Question:` label). Two differences: the
             prefix is always followed by one blank line (its MMLU and StrategyQA files end with no newline, so
             its code ran the question into the last example's line), and the prompt ends after the question or
             the last Observation (FireAct appended `Thought:`; here the model writes it, as with ours)."""
    path = prompt_file(method, family, tool, prompts)
    if not path.exists():
        hint = "; run `python fireact.py download --only fireact/prompts`, or pass --prompts ours" \
            if prompts == "fireact" else ""
        raise ValueError(f"{path}: no such prompt file{hint}")
    prefix = files.read_text(path).strip()
    suffix = "Reflection:" if method == "reflexion" else ""
    if prompts == "fireact":
        label = FIREACT_QUESTION[family]
        return lambda question, steps: (f"{prefix}\n\n{label}{question}\n" + "".join(
            text for text, _ in segments(question, steps, for_inference=True)[1:]))
    return lambda question, steps: f"{prefix}\n\n{history_text(question, steps)}{suffix}"


def prompts_used(method: str, family: str, tool: str, prompts: str) -> dict:
    """What a summary or a generate run records about its few-shot prompts: the set and the file(s)."""
    if method == "reflexion":  # FireAct released no reflection prompt: the ReAct turns use the set, reflections ours
        return {"set": prompts, "react": str(prompt_file("react", family, tool, prompts)),
                "reflexion": str(prompt_file("reflexion", family, tool, "ours"))}
    return {"set": prompts, method: str(prompt_file(method, family, tool, prompts))}


def zero_shot(tokenizer, template="react"):
    """prompt_fn for fine-tuned students: token ids from `render`, the very function used in training."""
    return lambda question, steps: render(question, steps, tokenizer, for_inference=True, template=template)[0]


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


# ------------------------------------------------------------------------------------------------------------ LLMs
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
            done = dict(net.run_concurrently(lambda i: self._one(prompts[i], stop, t), range(len(prompts)),
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
    """An agent-loop LLM over a local model: one batched `generate` call advances every live episode together.
    generate has model.generate's signature: model.generate itself (--plain) or fast.for_inference's (the default),
    which keeps each turn's K/V for the next, so a turn prefills only its new tokens (its .reused counts them)."""

    def __init__(self, model, tokenizer, generate, max_new_tokens=1000, temperature=0.0, seed=0):
        self.model, self.tok, self.generate = model, tokenizer, generate
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self._usage, self._reused0 = Counter(), getattr(generate, "reused", None)  # --compare: two LLMs, one generate

    def complete_batch(self, prompts, stop=None, stop_at=None, temperature=None):
        t = self.temperature if temperature is None else temperature
        self.seed += 1  # a re-sample must not repeat the same draw
        ids = [p if isinstance(p, list) else self.tok.encode(p, bos=self.tok.add_bos) for p in prompts]  # as generate
        outs = self.generate(self.model, self.tok, ids, max_new_tokens=self.max_new_tokens, temperature=t,
                             stop=stop, stop_at=stop_at, seed=self.seed)
        self._usage["requests"] += len(prompts)
        self._usage["prompt_tokens"] += sum(map(len, ids))
        self._usage["completion_tokens"] += sum(len(self.tok.encode(o)) for o in outs)
        return outs

    def extend(self, prompt, text):
        return prompt + (self.tok.encode(text) if isinstance(prompt, list) else text)

    @property
    def usage(self):  # prompt_tokens counts every prompt token; prefill_tokens_reused, those not recomputed
        reused = getattr(self.generate, "reused", None)
        return dict(self._usage, **({"prefill_tokens_reused": reused - self._reused0} if reused is not None else {}))


# -------------------------------------------------------------------------------------------------- the agent loop
STOP = ["\nObservation:"]  # a turn ends before the model invents an observation
ACTION_RE = re.compile(r"^[ \t]*(Action[ \t]*\d*|Answer)[ \t]*:(.*)$", re.M | re.I)
THOUGHT_RE = re.compile(r"^\s*Thought[ \t]*\d*[ \t]*:\s*", re.I)
FORCE = "Thought: I have used all my steps, so I give my best answer now.\nAction: finish["


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
    except net.APIError as e:  # the tool's service failed for good: end this episode, not the whole batch
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


def episode_record(ep: Episode, task: str, method: str, source: str, tool: str) -> dict:
    """Our trajectory record (the schema is in the trajectories section)."""
    em, f1 = score_answer(get_task(task).metric, ep.pred, ep.answer)
    return dict(id=ep.id, task=task, method=method, question=ep.question, answer=ep.answer, steps=ep.steps,
                pred=ep.pred, em=em, f1=f1, finished=ep.pred is not None and not ep.forced, forced=ep.forced,
                reflections=ep.reflections, tool=tool, source=source)


# --------------------------------------------------------------------------------------------------------- configs
# A dataclass per command: its fields are the flags (common/cli.py), each field's comment is its --help line.
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


def at_least(cfg, **bounds):
    """--flag must be >= its bound, as a one-line error."""
    for name, lo in bounds.items():
        if getattr(cfg, name) < lo:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be >= {lo}")


ToolChoice = Literal["", "local", "snippet", "wikipedia", "google"]  # tasks.TOOLS, or "" (the default)


@dataclass
class RunConfig:  # what generate and eval share
    task: TaskName = "toy"        # the task: its splits, metric, prompt family and default tool (tasks.py)
    split: str = ""               # "" = generate: the task's training split; eval: its first evaluation split
    n: int = 0                    # first n questions (0 = all)
    tool: ToolChoice = ""         # "" = the tool family of the adapter's training data, else the task's default
    max_steps: int = 11           # LLM turns per episode (FireAct 11, ReAct 7); an episode out of turns scores 0
    teacher_model: str = ""       # an OpenAI-style model name, or "oracle" (toyworld.OracleTeacher)
    base_url: str = ""            # "" = OpenAI; any OpenAI-compatible server otherwise
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key; the key is never written
    timeout: float = 60.0         # seconds: the total deadline of one teacher request
    retries: int = 6              # retries of a teacher request after 429/5xx/timeouts, with backoff
    seed: int = 0                 # tool noise and re-sampling seed
    noise: float = 0.0            # probability that an observation is replaced (tools.NoisyTool)
    noise_mode: Literal["none", "random"] = "none"  # none: the observation becomes "None" | random: another question's
    prompts: Literal["", "ours", "fireact"] = ""  # few-shot prompts; "" = FireAct's with snippet/google on its tasks, else ours
    world: str = ""               # toy tasks: another world's folder (python toyworld.py --seed S --out DIR); "" = data/toy

    def check(self):
        the_task(self)
        if self.tool and self.tool not in TOOLS:
            raise ValueError(f"--tool {self.tool}: choose {' | '.join(TOOLS)}")
        if self.prompts and self.prompts not in PROMPT_SETS:
            raise ValueError(f"--prompts {self.prompts}: choose {' | '.join(PROMPT_SETS)}")
        at_least(self, n=0, max_steps=1, retries=0)
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
    reflect_at: list = field(default_factory=lambda: [5, 9])  # Reflexion: reflect when still unsolved after these turns
    reflect_on: Literal["rounds", "wrong"] = "rounds"  # rounds: FireAct's, no gold answer | wrong: also retry a wrong finish
    allow_eval_split: bool = False  # generate on an evaluation split (its questions then must not be evaluated on)
    workers: int = 8              # concurrent episodes
    rpm: int = 0                  # requests per minute (0 = unlimited)
    temperature: float = 0.0      # teacher sampling temperature (re-samples of turns with no action use 0.7)
    max_tokens: int = 1000        # per teacher turn (FireAct's cap)

    def check(self):
        super().check()
        if self.method not in ("react", "cot", "reflexion"):
            raise ValueError(f"--method {self.method}: choose react | cot | reflexion")
        if self.reflect_on not in ("rounds", "wrong"):
            raise ValueError(f"--reflect-on {self.reflect_on}: choose rounds | wrong")
        self.reflect_at = [int(x) for x in self.reflect_at]
        at_least(self, workers=1, rpm=0, max_tokens=1)
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"--temperature {self.temperature}: must be in [0, 2]")


@dataclass
class LocalModelConfig:  # what eval and ask share: the local model and how it runs
    model: str = ""               # local checkpoint dir / hub name; "" = the embedded SmolLM2-135M-Instruct
    adapter: str = ""             # LoRA adapter dir: the fine-tuned student (zero-shot prompt)
    template: Literal["", "react", "alpaca"] = ""  # the student's prompt layout; "" = what the adapter was trained with
    max_new_tokens: int = 1000    # per turn (FireAct's cap); a turn ends at its first complete Action line anyway
    device: str = ""              # cpu | cuda | mps; "" = the best available
    plain: bool = False           # the teaching path only: model.generate, fp32 on CPU, none of fast/
    quant: Literal["", "int4"] = ""  # int4: decode through 4-bit layer weights (CPU; one stream at a time)
    dtype: Literal["", "float32", "bfloat16"] = ""  # "" = bf16 on CUDA and CPUs with native bf16, else fp32 (--plain: fp32 on CPU)
    compile: bool = False         # torch.compile the decode steps (minutes once; a C++ compiler on CPU)

    def check_local(self):
        if self.plain and (self.quant or self.compile):
            raise ValueError("--plain runs the teaching path: drop --quant / --compile (they are fast/'s)")


@dataclass
class EvalConfig(LocalModelConfig, RunConfig):
    out: str = "runs/eval.json"   # per-question results (FireAct's trajs schema) + OUT.summary.json
    batch_size: int = 32          # live episodes per batched generate call
    prefix_cache_mb: int = 2048   # K/V kept between agent turns, so a turn prefills only its new tokens (0 = off)
    zero_shot: bool = False       # no few-shot prompt: the student's layout, or FireAct's chat format (--teacher-model)
    compare: bool = False         # prompted (few-shot, no adapter) vs fine-tuned (adapter, zero-shot), side by side
    force_answer: bool = False    # an episode out of turns gets one more turn that must finish (ReAct scores it 0)
    exclude_overlap: list = field(default_factory=list)  # training files: drop eval questions that appear in them
    max_failures: float = 0.0     # exit non-zero when more than this fraction of episodes failed (server errors)

    def check(self):
        super().check()
        self.check_local()
        if self.template and self.template not in TEMPLATES:
            raise ValueError(f"--template {self.template}: choose {' | '.join(TEMPLATES)}")
        if not 0 <= self.max_failures <= 1:
            raise ValueError(f"--max-failures {self.max_failures}: must be a fraction in [0, 1]")
        at_least(self, max_new_tokens=1, batch_size=0, prefix_cache_mb=0)
        for f in self.exclude_overlap + ([self.adapter] if self.adapter else []):
            if not Path(f).exists():
                raise ValueError(f"{f}: no such file or directory")
        if self.adapter and not (Path(self.adapter) / "adapter_config.json").is_file():
            raise ValueError(f"--adapter {self.adapter}: no adapter_config.json there; pass train.py's --out dir")
        if self.compare and not self.adapter:
            raise ValueError("--compare needs --adapter (the fine-tuned run)")


@dataclass
class AskConfig(LocalModelConfig):
    question: list = field(default_factory=list)  # the question (quotes optional: the words are joined)
    task: TaskName = "toy"        # the tool's corpus and the few-shot prompt family
    tool: ToolChoice = ""         # "" = the tool family of the adapter's training data, else the task's default
    prompts: Literal["", "ours", "fireact"] = ""  # few-shot prompts (no adapter); "" = as eval chooses
    max_steps: int = 11           # LLM turns
    world: str = ""               # toy tasks: another world's folder (python toyworld.py --seed S --out DIR); "" = data/toy
    interactive: bool = False     # after this question, keep asking (an empty line or Ctrl-D ends)
    color: Literal["auto", "always", "never"] = "auto"  # auto: colour on a terminal, plain when piped

    def check(self):
        self.check_local()
        if self.prompts and self.prompts not in PROMPT_SETS:
            raise ValueError(f"--prompts {self.prompts}: choose {' | '.join(PROMPT_SETS)}")
        if self.max_steps < 1 or self.max_new_tokens < 1:
            raise ValueError("--max-steps and --max-new-tokens must be >= 1")
        if self.adapter and not Path(self.adapter).is_dir():
            raise ValueError(f"--adapter {self.adapter}: no such directory")


@dataclass
class FilterConfig:
    files: list = field(default_factory=list)    # trajectory files written by generate
    out: str = "runs/filtered.jsonl"  # the kept records
    keep_forced: bool = False     # keep episodes whose answer was forced out of them (not successful trajectories)
    keep_failed: bool = False     # keep FireAct's rows that end `reward = False` (its failed attempts)

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
    keep_failed: bool = False                    # keep FireAct's rows that end `reward = False` (dropped by default)

    def check(self):
        check_out_path(self.out)
        at_least(self, per_group=0)


@dataclass
class ScoreConfig:
    files: list = field(default_factory=list)    # results files or directories (ours, or FireAct's trajs/*.json)
    metric: Literal["", "qa", "yesno", "mc"] = ""  # "" = from the records' task (qa for FireAct trajs)
    n: int = 0                    # denominator override
    breakdown: bool = False       # also: episodes by tool calls x outcome (right; wrong with the answer seen or not)

    def check(self):
        if self.metric not in ("", "qa", "yesno", "mc"):
            raise ValueError(f"--metric {self.metric}: choose qa | yesno | mc")
        at_least(self, n=0)


# ------------------------------------------------------------------------------------------------------- commands
def make_teacher(name, base_url="", api_key_env="OPENAI_API_KEY", method=None, timeout=60.0, retries=6, world=""):
    if name == "oracle":  # the toy world's scripted teacher, same interface as tools.Teacher
        import toyworld
        return toyworld.OracleTeacher(method=method, **({"data_dir": world} if world else {}))
    return tools.Teacher(name, base_url=base_url or None, api_key_env=api_key_env,
                         cache_dir=files.cache_dir() / "teacher", timeout=timeout, max_retries=retries)


def method_setup(task: Task, method: str, max_steps: int, reflect_at=(5, 9), reflect_on="rounds", tool="",
                 prompts="ours"):
    """(prompt_fn, max_steps, reflexion) for a generation method. CoT is one turn that must finish. prompts: the
    set of the ReAct and CoT prompts; a reflection prompt is always ours (FireAct released none)."""
    if method not in ("react", "cot", "reflexion"):
        raise ValueError(f"unknown method {method!r}; choose react | cot | reflexion")
    if method == "cot":
        return few_shot("cot", task.family, prompts=prompts), 1, None
    reflexion = None
    if method == "reflexion":
        judge = (lambda ep, answer: score_answer(task.metric, answer, ep.answer)[0] > 0) if reflect_on == "wrong" else None
        reflexion = Reflexion(few_shot("reflexion", task.family, tool), tuple(reflect_at), judge)
    return few_shot("react", task.family, tool, prompts), max_steps, reflexion


def cost(model_name: str, usage: dict):
    keys = [k for k in PRICES if model_name.startswith(k)]
    if not keys:
        return None
    p_in, p_out = PRICES[max(keys, key=len)]
    return (usage.get("prompt_tokens", 0) * p_in + usage.get("completion_tokens", 0) * p_out) / 1e6


def generate(cfg: GenerateConfig, teacher=None) -> Path:
    """Teacher trajectories, one JSONL record per question, appended as each episode ends. Resumable: questions
    already in the file are skipped, so a killed run restarts where it stopped with no duplicate and no loss.
    The file is locked while a run writes it, and every record carries the settings that made it (`run`): a
    rerun with other settings is refused instead of mixing records or skipping work as "already done"."""
    import fcntl
    from tqdm import tqdm
    task = the_task(cfg)
    split = task.training_split(cfg.split, cfg.allow_eval_split)
    tool = cfg.tool or task.tool
    prompts = cfg.prompts or default_prompts(task, tool)
    run = dict(task=cfg.task, split=split, method=cfg.method, teacher=cfg.teacher_model, tool=tool,
               **({} if prompts == "ours" else dict(prompts=prompts)),  # no key: ours (files before --prompts too)
               **(dict(world=cfg.world) if cfg.world else {}),
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
        have = files.read_jsonl(out, resumable=True)  # a torn last line (a crash) is cut
        for r in have[:1] + have[-1:]:
            old = r.get("run") or dict(task=r.get("task"), method=r.get("method"))
            diff = [f"{k} {old.get(k)!r} -> {run.get(k)!r}" for k in sorted(set(old) | set(run)) if old.get(k) != run.get(k)]
            if diff:
                raise ValueError(f"{out}: holds records made with other settings ({'; '.join(diff)}); "
                                 f"pass another --out, or the same settings to resume")
        done = {r["id"] for r in have}
        todo = [q for q in task.questions(split, cfg.n) if q["id"] not in done]
        teacher = teacher or make_teacher(cfg.teacher_model, cfg.base_url, cfg.api_key_env, cfg.method,
                                          cfg.timeout, cfg.retries, world=cfg.world)
        llm = TeacherLLM(teacher, max_tokens=cfg.max_tokens, temperature=cfg.temperature)
        prompt_fn, max_steps, reflexion = method_setup(task, cfg.method, cfg.max_steps, cfg.reflect_at,
                                                       cfg.reflect_on, tool, prompts)
        base_tool = make_tool(task, tool, cfg.noise, cfg.noise_mode, cfg.seed)  # noise: FireAct's robustness data
        print(f"generate {cfg.task}/{split}/{cfg.method} with {cfg.teacher_model}, tool {tool}: {len(done)} done, "
              f"{len(todo)} to go -> {out}")
        print(f"prompts: {prompts} ({', '.join(f'{k} {v}' for k, v in prompts_used(cfg.method, task.family, tool, prompts).items() if k != 'set')})"
              + ("" if cfg.prompts else "; --prompts overrides"))
        # One episode per worker thread: each is written the moment it ends (the batch is the pool of threads).
        episode = lambda q: run_agent(llm, [base_tool.fork()], [q], prompt_fn, max_steps, reflexion=reflexion)[0]
        stats, errors, t0 = Counter(), [], time.time()
        with tqdm(total=len(todo), unit="q", dynamic_ncols=True) as bar:
            for q, ep in net.run_concurrently(episode, todo, workers=cfg.workers, rpm=cfg.rpm or None):
                if isinstance(ep, BaseException) and not isinstance(ep, Exception):
                    raise ep  # Ctrl-C / exit inside a worker: stop; what is written stays valid
                if isinstance(ep, Exception) or ep.error:
                    errors.append(cli.one_line(ep if isinstance(ep, Exception) else ep.error))
                    stats["errors"] += 1  # not written: a rerun tries it again
                else:
                    rec = dict(episode_record(ep, cfg.task, cfg.method, cfg.teacher_model, tool), run=run)
                    files.append_jsonl(f, rec)
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
    """Keep the successful trajectories (right answer, finished by the agent itself), one per (task, method, id).
    FireAct's released rows carry no score: they count as successful unless they end `reward = False`."""
    seen, kept = set(), []
    for path in cfg.files:
        for r in read_training_records(path, cfg.keep_failed):
            key = (r.get("task"), r.get("method"), r["id"])
            ok = r["em"] > 0 if "em" in r else True  # FireAct's: its failed rows are gone already (unless kept)
            if ok and (cfg.keep_forced or not r.get("forced")) and key not in seen:
                seen.add(key)
                kept.append(r)
    files.write_jsonl(cfg.out, kept)
    print(f"kept {len(kept)} successful trajectories -> {cfg.out}")
    return len(kept)


def mix(cfg: MixConfig) -> Counter:
    """K tasks x M methods -> one shuffled training file (our format; FireAct's files are read too)."""
    groups = {}
    for path in cfg.files:
        for r in read_training_records(path, cfg.keep_failed):  # FireAct's failed rows dropped unless kept
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
    files.write_jsonl(cfg.out, out)
    methods = sorted({m for _, m in counts})
    print("task".ljust(18) + "".join(m.rjust(11) for m in methods))
    for task in sorted({t for t, _ in counts}):
        print(task.ljust(18) + "".join(str(counts[(task, m)]).rjust(11) for m in methods))
    print(f"{len(out)} records -> {cfg.out}")
    return counts


def score(cfg: ScoreConfig) -> list[dict]:
    """EM/F1 of results files, recomputed from pred and gold; FireAct's denominator rule (see `denominator`).
    A file with failed episodes (server errors) is marked: its EM is not a result."""
    if cfg.breakdown:  # an extra (extras/report.py), run as its own process: nothing here imports the extras
        cli.hand_off(["breakdown", *cfg.files, *(["--metric", cfg.metric] if cfg.metric else []),
                      *(["--n", str(cfg.n)] if cfg.n else [])])
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
    if not results:
        raise ValueError(f"score: no results files in {' '.join(cfg.files)}")
    if any(r["failures"] for r in results):
        raise SystemExit(1)  # marked above; a script must not take it for a result
    return results


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


def the_task(cfg):
    """cfg.task as a Task, in cfg.world's generated world when one is given (toy tasks only)."""
    task = get_task(cfg.task)
    if cfg.world and not hasattr(task, "in_world"):
        raise ValueError(f"--world {cfg.world}: only the toy tasks have generated worlds, not {cfg.task}")
    return task.in_world(cfg.world) if cfg.world else task


def run_eval(cfg: EvalConfig, llm, prompt_fn, label: str, out: Path, tool: str, meta: dict) -> dict:
    """Run the agent on a task's questions, write FireAct-schema results + a summary, return the summary."""
    from tqdm import tqdm
    task = the_task(cfg)
    split = cfg.split or task.eval_splits[0]
    qs, dropped = overlap_filter(task.questions(split, cfg.n), cfg.exclude_overlap)
    base_tool = make_tool(task, tool, cfg.noise, cfg.noise_mode, cfg.seed)
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
    files.atomic_write(out, json.dumps(results, indent=1, ensure_ascii=False))
    files.atomic_write(summary_path(out), json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


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
    a = files.read_json(Path(adapter) / "adapter_config.json", want=dict)
    meta = a.get("fireact") or {}
    return dict(template=meta.get("template", "react"), data_tools=meta.get("data_tools", {}),
                base={k: a.get(k) for k in ("base_model_name_or_path", "base_model_source", "base_model_sha256")})


def error_digest(errors: list[str], k=3) -> list[str]:
    """The first k distinct error messages (servers repeat themselves)."""
    return list(dict.fromkeys(errors))[:k]


def load_local(cfg) -> tuple:
    """-> (model, tokenizer, generate) for eval and ask, on the device model.pick_device chooses (said on stderr).
    --plain: the teaching path, model.generate in fp32 on CPU. Else the fast path (fast/, applied here and only
    here): the best dtype this CPU runs, prepacked/int4 linears, shared-prefix and compiled decode, a prefix cache."""
    import model as M
    device = M.pick_device(cfg.device)
    print(f"device: {device}", file=sys.stderr)
    if cfg.plain:
        net, tok = M.load_model(cfg.model or None, device=device, dtype=M.pick_dtype(cfg.dtype, device))
        return net, tok, M.generate
    import fast.cpu  # the speed layer: imported by this entry point only, never by --plain
    dtype = fast.cpu.best_dtype(cfg.dtype, device)
    if str(device) == "cpu":  # what this CPU has and the path chosen for it (a bf16 that is emulated, said so)
        print(fast.cpu.cpu_report(dtype, quant=cfg.quant, compiled=cfg.compile), file=sys.stderr)
    net, tok = M.load_model(cfg.model or None, device=device, dtype=dtype)
    return net, tok, fast.for_inference(net, quant=cfg.quant, compile=cfg.compile,
                                        prefix_cache_mb=getattr(cfg, "prefix_cache_mb", 2048))


def student_prompt(tok, zero: bool, template: str, task: Task, tool: str, prompts: str = "ours"):
    """A fine-tuned student's prompt (render, no examples) or the prompted model's (few-shot ReAct for the tool)."""
    return zero_shot(tok, template) if zero else few_shot("react", task.family, tool, prompts)


def evaluate(cfg: EvalConfig) -> list[dict]:
    """Prompted (few-shot) or fine-tuned (adapter, zero-shot) evaluation; --compare runs both on the same model."""
    task = the_task(cfg)
    out = Path(cfg.out)
    trained = adapter_training(cfg.adapter)
    tool = pick_tool(cfg, task, trained)
    template = cfg.template or trained.get("template", "react")
    prompts = cfg.prompts or default_prompts(task, tool)
    few_shot_runs = cfg.compare or not (cfg.adapter or cfg.zero_shot)
    few = prompts_used("react", task.family, tool, prompts) if few_shot_runs else None  # recorded in summaries
    if few_shot_runs:
        print(f"prompts: {prompts} ({few['react']})" + ("" if cfg.prompts else "; --prompts overrides"))
    meta = dict(model=cfg.teacher_model or cfg.model or "SmolLM2-135M-Instruct", adapter=cfg.adapter or None,
                adapter_base=trained.get("base"),
                template=template, noise=cfg.noise, noise_mode=cfg.noise_mode, force_answer=cfg.force_answer,
                seed=cfg.seed, quant=cfg.quant or None, compile=cfg.compile or None,
                dtype=None if cfg.teacher_model else cfg.dtype or "auto", provenance=cli.provenance())
    if cfg.teacher_model:
        llm = TeacherLLM(make_teacher(cfg.teacher_model, cfg.base_url, cfg.api_key_env, timeout=cfg.timeout,
                                      retries=cfg.retries, world=cfg.world))
        if cfg.zero_shot:  # a fine-tuned API model, evaluated as FireAct evaluated its GPT-3.5: chat, no examples
            summaries = [run_eval(cfg, llm, chat_messages, f"{cfg.teacher_model} zero-shot", out, tool,
                                  dict(meta, prompts=None))]
        else:
            summaries = [run_eval(cfg, llm, few_shot("react", task.family, tool, prompts),
                                  f"{cfg.teacher_model} prompted", out, tool, dict(meta, prompts=few))]
    else:
        import model as M
        net, tok, generate_fn = load_local(cfg)
        meta["dtype"] = str(net.model.embed_tokens.weight.dtype).removeprefix("torch.")  # what "" resolved to here
        runs = [("prompted", False), ("fine-tuned", True)] if cfg.compare else [
            ("fine-tuned" if cfg.adapter else "zero-shot" if cfg.zero_shot else "prompted", bool(cfg.adapter))]
        summaries = []
        for label, tuned in runs:
            if tuned:
                M.load_adapter(net, cfg.adapter, merge=not cfg.quant)
            prompt_fn = student_prompt(tok, tuned or cfg.zero_shot, template, task, tool, prompts)
            path = out.with_name(f"{out.stem}_{label}{out.suffix}") if cfg.compare else out
            llm = LocalLLM(net, tok, generate_fn, cfg.max_new_tokens, seed=cfg.seed)
            summaries.append(run_eval(cfg, llm, prompt_fn, label, path, tool,
                                      dict(meta, adapter=cfg.adapter if tuned else None,
                                           adapter_merged=tuned and not cfg.quant,
                                           prompts=None if tuned or cfg.zero_shot else few)))
    print_table(summaries)
    for s in summaries:
        if s["failures"] > cfg.max_failures * s["n"]:
            raise ValueError(f"eval: {s['failures']} of {s['n']} episodes failed (results written, marked); "
                             f"first error: {s['errors'][0]}")
    return summaries


def ask(cfg: AskConfig) -> list[Episode]:
    """One question through THE agent loop (run_agent), each Thought / Action / Observation printed as it is
    recorded (the on_step hook), then the answer; --interactive reads more questions from stdin."""
    import model as M
    color = cfg.color == "always" or (cfg.color == "auto" and sys.stdout.isatty())
    paint = (lambda code, text: f"\x1b[{code}m{text}\x1b[0m") if color else (lambda code, text: text)
    task, trained = the_task(cfg), adapter_training(cfg.adapter)
    tool = pick_tool(cfg, task, trained)
    net, tok, generate_fn = load_local(cfg)
    if cfg.adapter:
        M.load_adapter(net, cfg.adapter, merge=not cfg.quant)
    prompt_fn = student_prompt(tok, bool(cfg.adapter), cfg.template or trained.get("template", "react"), task, tool,
                               cfg.prompts or default_prompts(task, tool))
    llm, base_tool = LocalLLM(net, tok, generate_fn, cfg.max_new_tokens), make_tool(task, tool)
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


COMMANDS = {"generate": (GenerateConfig, generate, "teacher trajectories on a training split (resumable)"),
            "filter": (FilterConfig, filter_records, "keep the successful trajectories"),
            "mix": (MixConfig, mix, "K tasks x M methods -> one training file"),
            "eval": (EvalConfig, evaluate, "run the agent (prompted or fine-tuned) and score it"),
            "score": (ScoreConfig, score, "EM/F1 of results files (ours or FireAct's trajs)"),
            "ask": (AskConfig, ask, "one question through the agent, each step shown as it happens"),
            "download": (DownloadConfig, download, "fetch the public data sets and FireAct's files")}  # tasks.py's
EXTRAS = {"view": "results files -> one self-contained HTML report",      # python -m extras COMMAND: the extras
          "table": "experiments grid run dirs -> the markdown table + PNG chart",
          "export-data": "trajectories -> a fine-tuning file (openai chat, alpaca, sharegpt)",
          "finetune-api": "fine-tune an API model (FireAct's GPT-3.5 student)"}


def parse_config(cls, argv):
    """Flags from the dataclass fields (cli.parse_config): --max-steps 11, --compare / --no-compare, positional
    `files` (`question`), --config FILE.json; each config's check() runs before any work."""
    name = next(k for k, v in COMMANDS.items() if v[0] is cls)
    return cli.parse_config(cls, argv, prog=f"fireact.py {name}", description=COMMANDS[name][2],
                            positional=("files", "question"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python fireact.py COMMAND [--help] [flags]\n\ncommands:\n" +
              "\n".join(f"  {name:<14}{doc}" for name, (_, _, doc) in COMMANDS.items()) + "\n\nextras (python -m "
              "extras COMMAND; this file hands them over):\n" + "\n".join(f"  {n:<14}{d}" for n, d in EXTRAS.items()))
        return 0 if argv else 2
    if argv[0] in EXTRAS:
        cli.hand_off(argv)  # a new process: nothing below the extras imports them
    if argv[0] not in COMMANDS:
        raise ValueError(f"unknown command {argv[0]!r}; choose {' | '.join([*COMMANDS, *EXTRAS])}")
    cls, fn, _ = COMMANDS[argv[0]]
    fn(parse_config(cls, argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="fireact.py") or 0)

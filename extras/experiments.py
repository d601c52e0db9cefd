"""
FireAct's experiments at laptop scale: every row of the experiments table as the command lines that make it
(generate -> filter -> mix -> train -> eval), run resumably, and the table + chart gathered from the rows.

    python -m extras grid --list                        # the toy rows, their commands and the CPU time they need
    python -m extras grid --grid toy --out runs/exp     # run them; a rerun skips every step that finished
    python -m extras grid --grid hotpotqa --eval-n 200  # real HotpotQA rows, each eval on 200 report questions
    python -m extras grid --only methods_react scaling_50 --dry-run   # print what would run
    python -m extras table runs/exp                     # -> runs/exp/table.md + table.png (also after each run)

Each step is a plain `fireact.py ...` or `train.py ...` command line, printed and recorded in the row's summary,
so any row can be rerun by hand; the runner calls the same `main(argv)` in-process (one interpreter, no reload
of torch per step).

Method: choices are made on dev, results are reported once on test. The toy grid's recipe, the mix of teacher
methods, is the `methods` row with the best dev EM (step `choose`, which writes RUN/chosen.json); every later toy
row builds on that choice. The HotpotQA rows tune on the 200-question `tune` part of the 957 offline questions
and report on the other 757 (`report`); row `hp_best` is the fine-tuned row with the best tune EM, read on report
after the choice (`python -m extras grid --grid hotpotqa --only hp_best`: no report eval runs before it).
"""
import ctypes
import gc
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common import cli, files
import fireact
import tasks

FT_DATA = tasks.SHARED_DATA / "fireact" / "finetune" / "alpaca_format"

# CPU cost model for --list: seconds per training trajectory / eval question, measured on a 2-core AVX2 CPU in fp32
# (the measurements: docs, "experiments")
GRID = ["-m", "extras", "grid"]  # a step that is the grid's own (a choice on dev): python -m extras grid --choose ...
CPU_S = {"train_toy": 1.4, "train_hp": 1.5, "eval_toy": 2.8, "eval_toy_prompted": 25.0, "eval_hp": 3.0,
         "eval_hp_prompted": 20.0}


@dataclass
class Step:
    name: str            # unique in the grid: shared steps (data) appear in several rows and run once
    argv: list           # ["fireact.py" | "train.py" | *GRID, *flags]; paths: relative to the run dir, or absolute
    cost: float = 0.0    # estimated CPU seconds (--list)
    questions: int = 0   # an eval's question count (--eval-n scales its cost)
    prompted: bool = False  # a prompted (few-shot) eval: --prompted-n subsamples it apart from the others

    def subsample(self, eval_n=0, prompted_n=0) -> int:  # the eval's --n under --eval-n / --prompted-n (0 = all)
        return prompted_n if self.prompted and prompted_n else eval_n

    def seconds(self, eval_n=0, prompted_n=0):
        n = self.subsample(eval_n, prompted_n)
        return self.cost * min(1, n / self.questions) if n and self.questions else self.cost


@dataclass
class Row:
    name: str
    group: str           # headline | methods | scaling | masking | full | noise | multitask | hotpotqa
    label: str           # what the table calls it
    steps: list          # [Step], in order
    evals: dict = field(default_factory=dict)  # tag ("test", "dev", "toy_mc test") -> eval --out path
    trains: bool = True  # its last train step is the row's own (time, data size); False: it evaluates another's
    shows: str = ""      # a choice file (hp_best.json): the label names the row that choice picked


def gen(task, method, noise=0.0):
    extra = ["--reflect-at", "2"] if method == "reflexion" else []  # toyworld.py: why 2 rounds on the toy
    tag = f"_noise{noise:g}" if noise else ""
    if noise:
        extra += ["--noise", str(noise), "--noise-mode", "none"]
    return Step(f"gen_{task}_{method}{tag}", ["fireact.py", "generate", "--task", task, "--method", method,
                                             "--teacher-model", "oracle", "--out", f"data/gen_{task}_{method}{tag}.jsonl",
                                             *extra], 5)


# train.py's CPU defaults, pinned so that a GPU run trains the same recipe (CUDA's defaults: 3 epochs of 16s), and
# LoRA dropout 0.05, the default every row of the table was trained with (train.py's is 0 since 2026-11-26)
RECIPE = {"--epochs": "1", "--batch-size": "4", "--micro-batch": "4", "--lora-dropout": "0.05"}


def train_step(name, data, *flags, n=545, hp=False):
    recipe = [x for k, v in RECIPE.items() if k not in flags for x in (k, v)]  # a row's own flag wins
    return Step(f"train_{name}", ["train.py", "--data", *data, "--out", f"train/{name}", "--no-progress", *recipe,
                                  *flags], n * CPU_S["train_hp" if hp else "train_toy"])


def eval_step(name, task, split, *flags, n=200, prompted=False, hp=False):
    kind = ("eval_hp" if hp else "eval_toy") + ("_prompted" if prompted else "")
    return Step(f"eval_{name}", ["fireact.py", "eval", "--task", task, "--split", split, "--out",
                                 f"evals/{name}.json", *flags], n * CPU_S[kind], n, prompted)


# three toy mixes of the same size (the default's 545): which methods, not how much data. The default data,
# data/toy/train.jsonl, is the one chosen on dev: ReAct only (toyworld.py)
MIXES = {"react": ["react=545"], "react_reflexion": ["react=470", "reflexion=75"],
         "react_cot_reflexion": ["react=420", "reflexion=75", "cot=50"]}
TOY_EVAL = ["--max-new-tokens", "128"]  # toy turns are short; prompted rambling is cut at 128 tokens (docs/experiments.md)


def toy_rows() -> list[Row]:
    data = [gen(t, m) for t in ("toy", "toy_yesno", "toy_mc") for m in ("react", "reflexion", "cot")]
    filt = {t: Step(f"filter_{t}", ["fireact.py", "filter", *(f"data/gen_{t}_{m}.jsonl" for m in ("react", "reflexion", "cot")),
                                     "--out", f"data/ok_{t}.jsonl"], 1) for t in ("toy", "toy_yesno", "toy_mc")}
    toy_data = data[:3] + [filt["toy"]]
    rows = [Row("prompted", "headline", "prompted (few-shot ReAct)", [
        eval_step("prompted_test", "toy", "test", *TOY_EVAL, prompted=True)], {"test": "evals/prompted_test.json"})]
    for m, caps in MIXES.items():
        mix = Step(f"mix_{m}", ["fireact.py", "mix", "data/ok_toy.jsonl", "--methods", *m.split("_"), "--per-method",
                                *caps, "--out", f"data/mix_{m}.jsonl"], 1)
        rows.append(Row(f"methods_{m}", "methods", m.replace("_", " + ").replace("cot", "CoT").replace(
            "react", "ReAct").replace("reflexion", "Reflexion"), toy_data + [
            mix, train_step(f"methods_{m}", [f"data/mix_{m}.jsonl"]),
            eval_step(f"methods_{m}_dev", "toy", "dev", "--adapter", f"train/methods_{m}", *TOY_EVAL, n=100),
            eval_step(f"methods_{m}_test", "toy", "test", "--adapter", f"train/methods_{m}", *TOY_EVAL)],
            {"dev": f"evals/methods_{m}_dev.json", "test": f"evals/methods_{m}_test.json"}))
    choose = Step("choose", [*GRID, "--choose", "methods"], 0)
    method_steps = [s for r in rows if r.group == "methods" for s in r.steps]
    chosen = method_steps + [choose]  # every later toy row trains on the mix chosen on dev
    for n in (50, 100, 200, 400):
        rows.append(Row(f"scaling_{n}", "scaling", f"{n} trajectories", chosen + [
            train_step(f"scaling_{n}", [f"data/chosen.jsonl:{n}"], n=n),
            eval_step(f"scaling_{n}_test", "toy", "test", "--adapter", f"train/scaling_{n}", *TOY_EVAL)],
            {"test": f"evals/scaling_{n}_test.json"}))
    rows.append(Row("mask_all", "masking", "loss on every token (--train-on all)", chosen + [
        train_step("mask_all", ["data/chosen.jsonl"], "--train-on", "all"),
        eval_step("mask_all_test", "toy", "test", "--adapter", "train/mask_all", *TOY_EVAL)],
        {"test": "evals/mask_all_test.json"}))
    rows.append(Row("full", "full", "full fine-tuning (--full)", chosen + [
        train_step("full", ["data/chosen.jsonl"], "--full"),
        eval_step("full_test", "toy", "test", "--model", "train/full/model", "--zero-shot", *TOY_EVAL)],
        {"test": "evals/full_test.json"}))
    rows.append(Row("noise_finetuned_clean", "noise", "fine-tuned, clean observations", chosen + [
        eval_step("noise_finetuned_clean_test", "toy", "test", "--adapter", "train/chosen", *TOY_EVAL)],
        {"test": "evals/noise_finetuned_clean_test.json"}, trains=False))
    for who, flags, prompted in (("prompted", [], True), ("finetuned", ["--adapter", "train/chosen"], False)):
        for mode in ("none", "random"):
            rows.append(Row(f"noise_{who}_{mode}", "noise", f"{who.replace('finetuned', 'fine-tuned')}, p=0.5 "
                            f"{mode} observations", (chosen if not prompted else []) + [
                eval_step(f"noise_{who}_{mode}_test", "toy", "test", *flags, "--noise", "0.5", "--noise-mode", mode,
                          *TOY_EVAL, prompted=prompted)], {"test": f"evals/noise_{who}_{mode}_test.json"}, trains=False))
    noisy = [gen("toy", "react", 0.5),
             Step("filter_toy_noisy", ["fireact.py", "filter", "data/gen_toy_react_noise0.5.jsonl",
                                       "--out", "data/ok_toy_noisy.jsonl"], 1),
             Step("mix_noisy", ["fireact.py", "mix", "data/ok_toy_noisy.jsonl", "--per-group", "545",
                                "--out", "data/mix_noisy.jsonl"], 1),
             train_step("noisy_data", ["data/mix_noisy.jsonl"])]
    rows.append(Row("noisy_data", "noise", "fine-tuned on noisy-tool trajectories (p=0.5 none)", noisy + [
        eval_step("noisy_data_clean_test", "toy", "test", "--adapter", "train/noisy_data", *TOY_EVAL),
        eval_step("noisy_data_none_test", "toy", "test", "--adapter", "train/noisy_data", "--noise", "0.5",
                  "--noise-mode", "none", *TOY_EVAL),
        eval_step("noisy_data_random_test", "toy", "test", "--adapter", "train/noisy_data", "--noise", "0.5",
                  "--noise-mode", "random", *TOY_EVAL)],
        {"test": "evals/noisy_data_clean_test.json", "test, p=0.5 none": "evals/noisy_data_none_test.json",
         "test, p=0.5 random": "evals/noisy_data_random_test.json"}))
    # multi-task: each extra task alone (the same methods as the chosen toy mix, per task) and all three together
    single = {}
    for t in ("toy_yesno", "toy_mc"):
        single[t] = data[3 * (1 + ("toy_yesno", "toy_mc").index(t)):][:3] + [filt[t], Step(
            f"mix_{t}", [*GRID, "--choose", f"mix:{t}"], 1)]
        rows.append(Row(f"single_{t}", "multitask", f"{t} alone", chosen + single[t] + [
            train_step(f"single_{t}", [f"data/mix_{t}.jsonl"], n=375),
            eval_step(f"single_{t}_test", t, "test", "--adapter", f"train/single_{t}", *TOY_EVAL)],
            {f"{t} test": f"evals/single_{t}_test.json"}))
        rows.append(Row(f"prompted_{t}", "multitask", f"{t} prompted (few-shot)", [
            eval_step(f"prompted_{t}_test", t, "test", *TOY_EVAL, prompted=True)], {f"{t} test": f"evals/prompted_{t}_test.json"}))
    multi = Step("mix_multitask", ["fireact.py", "mix", "data/chosen.jsonl", "data/mix_toy_yesno.jsonl",
                                   "data/mix_toy_mc.jsonl", "--out", "data/mix_multitask.jsonl"], 1)
    rows.append(Row("multitask", "multitask", "toy + toy_yesno + toy_mc", chosen + single["toy_yesno"] +
                    single["toy_mc"] + [multi, train_step("multitask", ["data/mix_multitask.jsonl"], n=1295)] + [
        eval_step(f"multitask_{t}_test", t, "test", "--adapter", "train/multitask", *TOY_EVAL)
        for t in ("toy", "toy_yesno", "toy_mc")],
        {f"{t} test": f"evals/multitask_{t}_test.json" for t in ("toy", "toy_yesno", "toy_mc")}))
    # run order (the table has its own): the recipe choice first, then the cheap rows, so that a run cut short
    # has measured the most findings; the prompted evals (3k-token few-shot prefixes, 11 turns) are the dearest
    return sorted(rows, key=lambda r: RUN_ORDER.index(r.name))


RUN_ORDER = ("methods_react", "methods_react_reflexion", "methods_react_cot_reflexion", "scaling_50", "scaling_100",
             "scaling_200", "noise_finetuned_clean", "noise_finetuned_none", "noise_finetuned_random", "mask_all",
             "prompted", "scaling_400", "full", "single_toy_yesno", "single_toy_mc", "multitask", "noisy_data",
             "noise_prompted_none", "noise_prompted_random", "prompted_toy_yesno", "prompted_toy_mc")


HP_EVAL = ["--max-steps", "7"]  # ReAct's and the reference points' budget on HotpotQA


def hotpotqa_rows() -> list[Row]:
    rows = [Row("hp_prompted", "hotpotqa", "prompted (few-shot, snippet tool)", [
        eval_step("hp_prompted_report", "hotpotqa_offline", "report", "--tool", "snippet", *HP_EVAL, n=757,
                  prompted=True, hp=True)], {"report": "evals/hp_prompted_report.json"})]
    sizes = {"hotpotqa": 500, "hotpotqa_multimethod": 734, "multitask": 1344, "multitask_multimethod": 2063}  # records
    for name, n in sizes.items():
        rows.append(Row(f"hp_{name}", "hotpotqa", f"fine-tuned on FireAct's {name}", [
            train_step(f"hp_{name}", [str(FT_DATA / f"{name}.json")], n=n, hp=True),
            eval_step(f"hp_{name}_tune", "hotpotqa_offline", "tune", "--adapter", f"train/hp_{name}", *HP_EVAL,
                      n=200, hp=True),
            eval_step(f"hp_{name}_report", "hotpotqa_offline", "report", "--adapter", f"train/hp_{name}", *HP_EVAL,
                      n=757, hp=True)],
            {"tune": f"evals/hp_{name}_tune.json", "report": f"evals/hp_{name}_report.json"}))
    rows.append(Row("hp_mask_all", "hotpotqa", "FireAct's hotpotqa, loss on every token", [
        train_step("hp_mask_all", [str(FT_DATA / "hotpotqa.json")], "--train-on", "all", n=500, hp=True),
        eval_step("hp_mask_all_tune", "hotpotqa_offline", "tune", "--adapter", "train/hp_mask_all", *HP_EVAL,
                  n=200, hp=True),
        eval_step("hp_mask_all_report", "hotpotqa_offline", "report", "--adapter", "train/hp_mask_all", *HP_EVAL,
                  n=757, hp=True)], {"tune": "evals/hp_mask_all_tune.json", "report": "evals/hp_mask_all_report.json"}))
    # FireAct trained its students for 3 epochs; the grid's recipe is 1 (the CPU default): the step count that the
    # toy's scaling rows say matters most, tried on tune before it is read on report. Then the same with LoRA
    # dropout 0, train.py's default since the toy's dev split chose it (compiled: the same loss, faster); then that
    # recipe's rank and learning rate, each moved once, and FireAct's multitask file at its epoch count (docs/experiments.md)
    drop0 = ["--epochs", "3", "--lora-dropout", "0", "--compile"]
    for name, label, data, flags in (
            ("hp_hotpotqa_3ep", "FireAct's hotpotqa, 3 epochs (finetune.py's default; its README trains 30)", "hotpotqa", ["--epochs", "3"]),
            ("hp_hotpotqa_3ep_drop0", "FireAct's hotpotqa, 3 epochs, LoRA dropout 0", "hotpotqa", drop0),
            ("hp_hotpotqa_3ep_r64", "FireAct's hotpotqa, 3 epochs, LoRA dropout 0, rank 64", "hotpotqa",
             [*drop0, "--lora-r", "64", "--lora-alpha", "128"]),
            ("hp_hotpotqa_3ep_lr1e3", "FireAct's hotpotqa, 3 epochs, LoRA dropout 0, lr 1e-3", "hotpotqa",
             [*drop0, "--lr", "1e-3"]),
            ("hp_multitask_3ep", "FireAct's multitask, 3 epochs, LoRA dropout 0", "multitask", drop0)):
        rows.append(Row(name, "hotpotqa", label, [
            train_step(name, [str(FT_DATA / f"{data}.json")], *flags, n=3 * sizes[data], hp=True),
            eval_step(f"{name}_tune", "hotpotqa_offline", "tune", "--adapter", f"train/{name}", *HP_EVAL, n=200,
                      hp=True),
            eval_step(f"{name}_report", "hotpotqa_offline", "report", "--adapter", f"train/{name}", *HP_EVAL,
                      n=757, hp=True)],
            {"tune": f"evals/{name}_tune.json", "report": f"evals/{name}_report.json"}))
    # FireAct compared LoRA with full fine-tuning; here on real data, with the 3-epoch recipe (every weight trained,
    # lr 1e-4; fp32 pinned, as the LoRA rows trained: the bf16 default of CPUs with native bf16 was gated on LoRA
    # runs only). Its model is a checkpoint, not an adapter
    rows.append(Row("hp_full", "hotpotqa", "FireAct's hotpotqa, 3 epochs, full fine-tuning (--full)", [
        train_step("hp_full", [str(FT_DATA / "hotpotqa.json")], "--epochs", "3", "--full", "--compile", "--dtype",
                   "float32", n=2700, hp=True),
        *[eval_step(f"hp_full_{split}", "hotpotqa_offline", split, "--model", "train/hp_full/model", "--zero-shot",
                    "--tool", "snippet", *HP_EVAL, n=n, hp=True) for split, n in (("tune", 200), ("report", 757))]],
        {"tune": "evals/hp_full_tune.json", "report": "evals/hp_full_report.json"}))
    hp_fts = [s for r in rows[1:5] for s in r.steps]
    for who, flags, prompted, before in (("prompted", ["--tool", "snippet"], True, []),
                                         ("finetuned", ["--adapter", "train/hp_chosen"], False,
                                          hp_fts + [Step("hp_choose", [*GRID, "--choose", "hp"], 0)])):
        rows.append(Row(f"hp_noise_{who}", "hotpotqa", f"{who.replace('finetuned', 'best fine-tuned')}, p=0.5 none "
                        "observations", before + [
            eval_step(f"hp_noise_{who}_report", "hotpotqa_offline", "report", *flags, "--noise", "0.5",
                      "--noise-mode", "none", *HP_EVAL, n=757, prompted=prompted, hp=True)],
            {"report": f"evals/hp_noise_{who}_report.json"}, trains=False))
    # the bar is on "the best fine-tuned row": which one is a choice, so it is made on tune (every fine-tuned
    # row's tune eval, `--choose hp_best`) and read once on report. Its steps are the fine-tuned rows' training and
    # tune evals only, so `--only hp_best` never reads a report score before the choice is made
    fts = [r for r in rows if trains_own(r) and not is_full(r)]  # its eval loads an adapter: the LoRA recipes
    rows.append(Row("hp_best", "hotpotqa", "best fine-tuned, chosen on tune", [
        *[s for r in fts for s in r.steps if not s.name.endswith("_report")],
        Step("hp_choose_best", [*GRID, "--choose", "hp_best"], 0),
        eval_step("hp_best_report", "hotpotqa_offline", "report", "--adapter", "train/hp_best", *HP_EVAL, n=757,
                  hp=True)], {"report": "evals/hp_best_report.json"}, trains=False, shows="hp_best.json"))
    return rows


def trains_own(row: Row) -> bool:  # a row that trains its own model (not one that evaluates another's)
    return row.trains and any(s.name.startswith("train_") for s in row.steps)


def is_full(row: Row) -> bool:  # a row that fine-tunes every weight (--full): a checkpoint, not an adapter
    return any("--full" in s.argv for s in row.steps if s.name.startswith("train_"))


# the fine-tuned HotpotQA rows with an adapter, in the grid's order (simplest first: a tie goes to the earlier); the
# first four are FireAct's four data files
HP_BEST = [r.name.removeprefix("hp_") for r in hotpotqa_rows() if trains_own(r) and not is_full(r)]


GRIDS = {"toy": toy_rows, "hotpotqa": hotpotqa_rows}


# ------------------------------------------------------------------------------------------------ choices on dev
def dev_em(run: Path, row: str, split: str) -> float:
    return read_summary(run / "evals" / f"{row}_{split}.json")["em"]


# --choose WHAT: (candidate rows, the split that chooses, their evals' prefix, the name of the link + record, what
# the record calls the pick)
CHOICES = {"methods": (["react", "react_reflexion", "react_cot_reflexion"], "dev", "methods", "chosen", "mix"),
           "hp": (HP_BEST[:4], "tune", "hp", "hp_chosen", "data"),
           "hp_best": (HP_BEST, "tune", "hp", "hp_best", "row")}


def choose(run: Path, what: str):
    """`--choose methods`: the toy mix whose model has the best dev EM -> data/chosen.jsonl, train/chosen.
    `--choose hp`: the FireAct data whose model has the best tune EM -> train/hp_chosen.
    `--choose hp_best`: the fine-tuned HotpotQA row (any recipe) with the best tune EM -> train/hp_best.
    `--choose mix:TASK`: an extra toy task's mix, with the methods (and per-method counts) of the chosen mix."""
    if what.startswith("mix:"):
        task, picked = what[4:], files.read_json(run / "chosen.json", want=dict)
        fireact.main(["mix", str(run / f"data/ok_{task}.jsonl"), "--methods", *picked["mix"].split("_"),
                      "--per-method", *MIXES[picked["mix"]], "--out", str(run / f"data/mix_{task}.jsonl")])
        return
    if what not in CHOICES:
        raise ValueError(f"--choose {what}: expected {', '.join(CHOICES)} or mix:TASK")
    rows, split, prefix, name, kind = CHOICES[what]
    ems = {r: dev_em(run, f"{prefix}_{r}", split) for r in rows}
    best = max(rows, key=lambda r: (ems[r], -rows.index(r)))  # ties: the simpler (earlier) one
    link = run / "train" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(f"{prefix}_{best}")
    record = {kind: best, f"{split}_em": ems}
    if what == "methods":
        shutil.copyfile(run / f"data/mix_{best}.jsonl", run / "data/chosen.jsonl")
    files.atomic_write(run / f"{name}.json", json.dumps(record, indent=1))
    print(f"chosen on {split}: {best} ({', '.join(f'{k} {v:.1f}' for k, v in ems.items())})")


# --------------------------------------------------------------------------------------------------- the runner
@dataclass
class GridConfig:
    grid: Literal["toy", "hotpotqa"] = "toy"  # toy: the offline toy world's rows | hotpotqa: the real-data rows
    out: str = "runs/exp"          # the run dir: data/, train/, evals/, steps/ (what finished), rows/ (summaries)
    only: list = field(default_factory=list)  # row names to run (their shared steps run too); [] = every row
    list: bool = False             # print the rows, their commands and the estimated CPU time; run nothing
    dry_run: bool = False          # print the commands that would run now (finished steps skipped)
    eval_n: int = 0                # > 0: every eval on the first N questions of its split (a subsample; said in the table)
    prompted_n: int = 0            # > 0: the prompted (few-shot) evals on the first N instead (they cost ~9x)
    model: str = ""                # the student's base model (train.py/eval --model); "" = the embedded SmolLM2-135M
    device: str = ""               # passed to train.py and eval (cpu | cuda); "" = their default
    eval_batch: int = 0            # > 0: eval's --batch-size (live episodes per generate call; a GPU takes 200)
    choose: str = ""               # (a step of the grid) make the choice on dev: methods | hp | hp_best | mix:TASK

    def check(self):
        names = [r.name for r in GRIDS[self.grid]()]
        bad = [n for n in self.only if n not in names]
        if bad:
            raise ValueError(f"--only {bad[0]}: no such row in grid {self.grid}; rows: {', '.join(names)}")
        for name in ("eval_n", "prompted_n", "eval_batch"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 0")


def host(device: str = "") -> str:
    """The machine a step ran on: the CPU's name (fast.cpu.cpu_info), and the GPU's when the steps use one."""
    import torch
    from fast.cpu import cpu_info
    from model import pick_device
    gpu = pick_device(device) if device != "cpu" else "cpu"
    return cpu_info()["name"] + (f" + {torch.cuda.get_device_name(gpu)}" if gpu.startswith("cuda") else "")


def resolve(step: Step, run: Path, cfg: GridConfig) -> list:
    """The step's full argv: paths under the run dir made absolute, the run-wide flags added."""
    if step.argv[:3] == GRID:
        return [*step.argv, "--out", str(run)]
    script, *args = step.argv
    out = [str(run / a.split(":")[0]) + (":" + a.split(":", 1)[1] if ":" in a else "")
           if a.startswith(("data/", "train/", "evals/")) else a for a in args]
    if cfg.device and (script == "train.py" or out[0] == "eval"):
        out += ["--device", cfg.device]
    if cfg.model and (script == "train.py" or out[0] == "eval") and "--model" not in out:
        out += ["--model", cfg.model]
    n = step.subsample(cfg.eval_n, cfg.prompted_n)
    if n and script == "fireact.py" and out[0] == "eval":
        out += ["--n", str(n)]
    if cfg.eval_batch and script == "fireact.py" and out[0] == "eval":
        out += ["--batch-size", str(cfg.eval_batch)]
    return [script, *out]


def run_step(argv: list):
    """One step in this interpreter: the same main() its command line calls. After it, what it freed goes back to
    the OS (gc, then glibc's malloc_trim), and the runner prints its RSS (a grid's runner once met the OOM killer)."""
    script, *args = argv
    try:
        if script == "train.py":
            import train
            train.main(args)
        elif script == "fireact.py":
            fireact.main(args)
        elif argv[:3] == GRID:
            main(argv[3:])
        else:
            raise ValueError(f"a grid step runs fireact.py, train.py or the grid itself, not {script}")
    finally:
        gc.collect()
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None).malloc_trim(0)


def read_summary(path: Path) -> dict:
    return files.read_json(tasks.summary_path(path), want=dict)


def trained_on(step: Step, run: Path) -> int:
    """How many trajectories a train step's --data holds (train.py's FILE:N samples N of FILE)."""
    from train import split_spec
    args = step.argv[step.argv.index("--data") + 1:]
    n = 0
    for a in args[:next((i for i, a in enumerate(args) if a.startswith("--")), len(args))]:
        path, k = split_spec(a)
        got = len(tasks.read_records(run / path if path.startswith("data/") else Path(path)))
        n += min(got, k) if k else got
    return n


def row_summary(row: Row, order: int, run: Path, cfg: GridConfig, done: dict) -> dict:
    """Everything that made the row: its commands, where and how long each ran, and each eval's numbers."""
    evals = {}
    for tag, path in row.evals.items():
        s = read_summary(run / path)
        evals[tag] = {k: s[k] for k in ("task", "split", "n", "em", "f1", "finish_rate", "mean_steps", "wall_s",
                                        "failures", "tool", "noise", "noise_mode")}
        step = next(s for s in row.steps if s.argv[0] == "fireact.py" and path in s.argv)  # the eval that wrote it
        evals[tag]["command"] = done[step.name]["command"]
    step = next((s for s in reversed(row.steps) if s.name.startswith("train_")), None) if row.trains else None
    train = done[step.name] if step else None
    chosen = {}
    for f in [f"{c[3]}.json" for c in CHOICES.values()]:
        if (run / f).exists():
            chosen[f] = files.read_json(run / f)
    label = row.label + (f": hp_{chosen[row.shows]['row']}" if row.shows in chosen else "")
    return dict(name=row.name, group=row.group, label=label, order=order, x=step and trained_on(step, run), evals=evals,
                train_s=train and train["seconds"], train_host=train and train["host"],
                eval_host=done[next(s.name for s in reversed(row.steps) if s.name.startswith("eval_"))]["host"],
                commands=[done[s.name]["command"] for s in row.steps], choices=chosen, eval_n=cfg.eval_n,
                provenance=cli.provenance())


def run_grid(cfg: GridConfig):
    run = Path(cfg.out)
    rows = [r for r in GRIDS[cfg.grid]() if not cfg.only or r.name in cfg.only]
    steps = {}
    for r in rows:
        for s in r.steps:
            steps.setdefault(s.name, s)
    if cfg.list:
        total = sum(s.seconds(cfg.eval_n, cfg.prompted_n) for s in steps.values())
        for r in rows:
            print(f"{r.name:<28}{r.group:<11}{r.label}")
        print(f"\n{len(rows)} rows, {len(steps)} steps: about {total / 3600:.1f} h of CPU time on a 2-core AVX2 CPU "
              f"(cost model in extras/experiments.py; on an H200 the three methods rows took 8 min)")
        for s in steps.values():
            print(f"  {s.seconds(cfg.eval_n, cfg.prompted_n) / 60:6.1f} min  python " + " ".join(resolve(s, run, cfg)))
        return
    (run / "steps").mkdir(parents=True, exist_ok=True)
    (run / "rows").mkdir(exist_ok=True)
    where = host(cfg.device)
    todo = [s for s in steps.values() if not (run / "steps" / f"{s.name}.json").exists()]
    print(f"grid {cfg.grid}: {len(rows)} rows, {len(steps)} steps, {len(todo)} to run; about "
          f"{sum(s.seconds(cfg.eval_n, cfg.prompted_n) for s in todo) / 3600:.1f} h of CPU time on a 2-core AVX2 CPU ({where})", flush=True)
    failed, skipped = set(), set()  # failed includes skipped: the steps after a failure in its rows
    order = {r.name: i for i, r in enumerate(GRIDS[cfg.grid]())}
    for r in rows:
        for s in r.steps:
            rec = run / "steps" / f"{s.name}.json"
            if rec.exists() or s.name in failed:
                continue
            if any(p.name in failed for p in r.steps[:r.steps.index(s)]):
                failed.add(s.name)
                skipped.add(s.name)
                continue
            argv = resolve(s, run, cfg)
            command = "python " + " ".join(argv)
            print(f"\n[{time.strftime('%H:%M:%S')}] {s.name}: {command}", flush=True)
            if cfg.dry_run:
                failed.add(s.name)  # so that later steps of the row are listed, not run
                continue
            t0 = time.time()
            try:
                run_step(argv)
            except (Exception, SystemExit) as e:  # a failed step (argparse exits too) skips the rows that need it
                traceback.print_exc()
                print(f"step {s.name} failed: {cli.one_line(e)}", file=sys.stderr, flush=True)
                failed.add(s.name)
                continue
            rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") \
                if os.path.exists("/proc/self/statm") else 0
            print(f"[{time.strftime('%H:%M:%S')}] {s.name} done in {time.time() - t0:.0f} s; runner RSS now "
                  f"{rss / 2**30:.1f} GiB", flush=True)
            files.atomic_write(rec, json.dumps({"command": command, "seconds": round(time.time() - t0, 1),
                                              "host": where, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))
        if cfg.dry_run or any(s.name in failed for s in r.steps):
            continue
        done = {s.name: files.read_json(run / "steps" / f"{s.name}.json") for s in r.steps}
        files.atomic_write(run / "rows" / f"{r.name}.json", json.dumps(row_summary(r, order[r.name], run, cfg, done), indent=1))
    if not cfg.dry_run:
        md, png = table([str(run)])
        print(f"\n{md.read_text()}\ntable: {md}, chart: {png}")
        if failed:
            broke = [n for n in failed if n not in skipped]
            raise ValueError(f"{len(broke)} step(s) failed ({', '.join(broke)}), {len(skipped)} skipped because "
                             f"they need one; rerun to retry them")


# -------------------------------------------------------------------------------------------- table and chart
def load_rows(dirs) -> list[dict]:
    rows = []
    for d in dirs:
        d = Path(d)
        found = sorted((d / "rows").glob("*.json")) if (d / "rows").is_dir() else [d] if d.is_file() else []
        if not found:
            raise ValueError(f"{d}: no row summaries (expected {d / 'rows'}/*.json from the grid)")
        for f in found:
            try:
                rows.append(files.read_json(f, want=dict))
            except ValueError as e:
                raise ValueError(f"{f}: not a row summary ({cli.one_line(e)})") from None
    return rows


GROUP_ORDER = ("headline", "methods", "scaling", "masking", "full", "noise", "multitask", "hotpotqa")


def scaling_points(rows) -> list:
    """[(trajectories, toy test EM)] of the scaling rows, ending at the full mix: the methods row chosen on dev
    (recorded in the choices of any row trained after the choice, from whichever run dir)."""
    mix = next((r["choices"]["chosen.json"]["mix"] for r in rows if r.get("choices", {}).get("chosen.json")), None)
    pick = [r for r in rows if mix and r["name"] == f"methods_{mix}" and "test" in r["evals"]][:1]
    return sorted((r["x"], r["evals"]["test"]["em"]) for r in rows if r["group"] == "scaling" or r in pick)


def table(dirs, out: str = "") -> tuple[Path, Path]:
    """Row summaries -> OUT/table.md (one markdown table, grouped) and OUT/table.png (EM per row; the scaling
    curve). OUT = the first run dir unless given."""
    rows = sorted(load_rows(dirs), key=lambda r: (GROUP_ORDER.index(r["group"]) if r["group"] in GROUP_ORDER
                                                   else 99, r.get("order", 0)))
    out = Path(out or (dirs[0] if Path(dirs[0]).is_dir() else Path(dirs[0]).parent.parent))
    chosen = {}
    for r in rows:
        for f, c in r.get("choices", {}).items():
            chosen[("methods_" if f == "chosen.json" else "hp_") + c.get("mix", c.get("data", ""))] = \
                f"chosen on {'dev' if f == 'chosen.json' else 'tune'}"
    lines = ["| group | row | evaluated on | EM | F1 | finish % | steps | n | train s | eval s | on | chosen | what it ran |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        train_s = "-" if r["train_s"] is None else f"{r['train_s']:.0f}"
        train_cmd = [c for c in r["commands"] if c.startswith("python train.py")][-1:] if r["train_s"] is not None else []
        for tag, e in r["evals"].items():
            what = f"{e['task']} {e['split']}" + (f", p={e['noise']:g} {e['noise_mode']}" if e["noise"] else "")
            cmd = " ; ".join(short(c) for c in train_cmd + [eval_command(r, e)] if c)
            lines.append(f"| {r['group']} | {r['label']} | {what} | {e['em']:.1f} | {e['f1']:.1f} | "
                         f"{e['finish_rate']:.0f} | {e['mean_steps']:.2f} | {e['n']} | {train_s} | {e['wall_s']:.0f} | "
                         f"{machine(r)} | {chosen.get(r['name'], '')} | `{cmd}` |")
    hosts = sorted({r["train_host"] for r in rows if r.get("train_host")})
    lines += ["", "Machines: " + ("; ".join(hosts) or "-") + ". Commands: each row's summary in rows/*.json."]
    md = out / "table.md"
    files.atomic_write(md, "\n".join(lines) + "\n")
    return md, chart(rows, out / "table.png")


def eval_command(row, e) -> str:
    """The command that made eval `e` of `row`: recorded with it, or (summaries written before it was) the row's
    eval command with the same task, split and noise flags."""
    if e.get("command"):
        return e["command"]
    noise = f"--noise {e['noise']:g} --noise-mode {e['noise_mode']}" if e.get("noise") else None
    ran = [c for c in row["commands"] if c.startswith("python fireact.py eval") and f"--split {e['split']}" in c
           and f"--task {e['task']} " in c + " " and (noise in c if noise else "--noise " not in c)]
    return ran[-1] if ran else ""


def machine(row) -> str:
    """Where a row ran, in a word: GPU (its name) or CPU."""
    host = row.get("train_host") or row.get("eval_host") or ""
    return host.split(" + ")[-1].replace("NVIDIA ", "") if "NVIDIA" in host else "CPU" if host else "?"


def short(command: str) -> str:
    """A row's command as the table shows it: what sets it apart (its data, flags), not the run dir, the pinned
    recipe at its pinned value (a row that changes it, say --epochs 3, shows its value) or the run-wide flags
    (all in the row's summary)."""
    words, out, skip = command.split()[1:], [], 0
    common = {"--out": 1, "--no-progress": 0, "--device": 1, "--batch-size": 1, "--n": 1, "--micro-batch": 1,
              "--model": 1}
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else None
        if skip:
            skip -= 1
        elif w in RECIPE and RECIPE[w] == nxt:
            skip = 1
        elif w in common and not (w == "--model" and nxt is not None and nxt.endswith("/model")):
            skip = common[w]
        else:
            out.append(Path(w).name if "/" in w else w)
    return " ".join(out)


def chart(rows, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bars = [(f"{r['group']}: {r['label']}" + (f" ({tag})" if len(r["evals"]) > 1 else ""), r["group"], e["em"])
            for r in rows for tag, e in r["evals"].items() if tag not in ("dev", "tune")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, max(4, 0.3 * len(bars))), gridspec_kw={"width_ratios": [2, 1]})
    colors = dict(zip(GROUP_ORDER, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
                                    "#8c8c8c")))
    ys = range(len(bars))[::-1]
    a.barh(list(ys), [v for *_, v in bars], color=[colors.get(g, "#4c72b0") for _, g, _ in bars])
    a.set_yticks(list(ys), [l for l, *_ in bars])
    for y, (*_, v) in zip(ys, bars):
        a.text(v + 1, y, f"{v:.1f}", va="center", fontsize=7)
    a.set_xlim(0, 105)
    a.set_xlabel("EM (test / report split)")
    a.tick_params(axis="y", labelsize=7)
    pts = scaling_points(rows)
    if pts:
        b.plot([x for x, _ in pts], [y for _, y in pts], "o-")
        for x, y in pts:
            b.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        b.set_xscale("log")
        b.minorticks_off()
        b.set_xticks([x for x, _ in pts], [str(x) for x, _ in pts])
        b.set_ylim(0, 100)
        b.set_xlabel("training trajectories")
        b.set_ylabel("toy test EM")
        b.set_title("data scaling")
    else:
        b.axis("off")
    fig.tight_layout()
    files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def grid(cfg: GridConfig):
    """`python -m extras grid`: run the grid's rows (or --list / --dry-run them), or make one choice (--choose)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # one line per step, not a progress bar per eval
    if cfg.choose:
        return choose(Path(cfg.out), cfg.choose)
    run_grid(cfg)


def main(argv: list):
    """The grid's own steps (--choose), run in-process as fireact.py's and train.py's are."""
    return grid(cli.parse_config(GridConfig, argv, prog="python -m extras grid", description=COMMANDS["grid"][2]))


@dataclass
class TableConfig:
    dirs: list = field(default_factory=list)  # grid run dirs (their rows/*.json) or row summary files
    out: str = ""                 # folder for table.md + table.png; "" = the first run dir

    def check(self):
        if not self.dirs:
            raise ValueError("table: give at least one run dir of the grid")


def make_table(cfg: TableConfig) -> Path:
    """`python -m extras table`: row summaries of grid runs -> the markdown table and a PNG chart."""
    md, png = table(cfg.dirs, cfg.out)
    print(md.read_text() + f"\n{md}, {png}")
    return md


COMMANDS = {"grid": (GridConfig, grid, "FireAct's experiments as a resumable grid of command lines"),
            "table": (TableConfig, make_table, "grid run dirs -> the markdown table + PNG chart")}

"""The experiments grid (`python -m extras grid`, extras/experiments.py): a real run of toy rows on a tiny model (data -> train -> eval, the dev
choice, row summaries, table + chart), resumption, a failing step that skips only the rows needing it, and the
one-line errors.

    python -m pytest -q tests/test_experiments.py
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tasks
from common import files
from conftest import make_tiny_llama
from extras import experiments as X

REPO = Path(__file__).resolve().parent.parent


def write_json(path, obj):  # as eval writes its summary
    files.atomic_write(path, json.dumps(obj, indent=1))


@pytest.fixture
def quick(monkeypatch):
    """Two optimizer steps per training and two 8-token turns per episode: the grid's logic, not its quality."""
    monkeypatch.setattr(X, "RECIPE", {**X.RECIPE, "--max-steps": "2"})
    monkeypatch.setattr(X, "TOY_EVAL", ["--max-steps", "2", "--max-new-tokens", "8"])


def test_toy_rows_run_choose_on_dev_resume_and_tabulate(tmp_path, quick, capsys):
    tiny = make_tiny_llama(tmp_path / "tiny", std=0.3)
    run = tmp_path / "run"
    args = ["--out", str(run), "--model", str(tiny), "--eval-n", "2", "--device", "cpu",
            "--only", "scaling_50", "full", "noise_finetuned_none"]
    X.main(args)
    rows = {p.stem: json.loads(p.read_text()) for p in (run / "rows").glob("*.json")}
    assert set(rows) == {"scaling_50", "full", "noise_finetuned_none"}
    s50 = rows["scaling_50"]
    assert s50["x"] == 50 and s50["evals"]["test"]["n"] == 2 and s50["train_s"] > 0
    assert s50["commands"][-2].startswith("python train.py --data ") and ":50 " in s50["commands"][-2]
    assert any(c.startswith("python -m extras grid --choose methods") for c in s50["commands"])
    assert rows["full"]["commands"][-1].endswith(f"--zero-shot --max-steps 2 --max-new-tokens 8 --device cpu --n 2")
    assert rows["noise_finetuned_none"]["train_s"] is None  # it evaluates the chosen adapter, trains nothing
    assert rows["noise_finetuned_none"]["evals"]["test"]["noise"] == 0.5
    assert "--noise 0.5 --noise-mode none" in rows["noise_finetuned_none"]["evals"]["test"]["command"]
    # the choice is made on dev: every dev EM is 0 with a random model, so the tie goes to the simplest mix
    chosen = json.loads((run / "chosen.json").read_text())
    assert chosen["mix"] == "react" and set(chosen["dev_em"]) == set(X.MIXES)
    assert (run / "data/chosen.jsonl").read_bytes() == (run / "data/mix_react.jsonl").read_bytes()
    assert (run / "train/chosen").resolve() == (run / "train/methods_react").resolve()
    md = (run / "table.md").read_text()
    assert "| scaling | 50 trajectories | toy test | 0.0 |" in md and "p=0.5 none" in md
    assert (run / "table.png").stat().st_size > 10_000
    # resumable: a second run finds every step done and runs none
    capsys.readouterr()
    X.main(args)
    assert ", 0 to run;" in capsys.readouterr().out
    # `python -m extras table` (= `fireact.py table`) gathers rows from several run dirs
    md2, png2 = X.table([str(run), str(run / "rows" / "full.json")], out=str(tmp_path))
    assert md2.read_text().count("full fine-tuning") == 2 and png2.exists()


def test_table_shows_each_evals_own_command(tmp_path):
    """A row with three evals of one split (clean tools, None and random observations): each table line shows the
    command that made it, recorded per eval (now) or found in the row's commands (summaries written before)."""
    base = "python fireact.py eval --task toy --split test --out evals/x{}.json --adapter train/a"
    cmds = [base.format(0), base.format(1) + " --noise 0.5 --noise-mode none",
            base.format(2) + " --noise 0.5 --noise-mode random"]
    ev = lambda noise, mode: dict(task="toy", split="test", n=10, em=1.0, f1=1.0, finish_rate=100, mean_steps=3,
                                  wall_s=1, failures=0, tool="local", noise=noise, noise_mode=mode)
    evals = {"test": ev(0.0, "none"), "test, none": ev(0.5, "none"), "test, random": ev(0.5, "random")}
    row = dict(name="r", group="noise", label="L", order=0, x=None, evals=evals, train_s=None, train_host=None,
               eval_host="h", commands=["python train.py --data d.jsonl --out train/a"] + cmds, choices={})
    (tmp_path / "rows").mkdir()
    for recorded in (False, True):
        for e, c in zip(evals.values(), cmds):
            if recorded:
                e["command"] = c
        (tmp_path / "rows" / "r.json").write_text(json.dumps(row))
        md, _ = X.table([str(tmp_path)])
        lines = [line for line in md.read_text().splitlines() if line.startswith("| noise")]
        assert [("--noise-mode none" in line, "--noise-mode random" in line) for line in lines] == \
            [(False, False), (True, False), (False, True)]


def test_table_command_hides_the_pinned_recipe_but_shows_a_rows_own_value():
    """The table's command column shows what sets a row apart: a recipe flag at its pinned value is in the row's
    summary, not the table; a row that changes it (FireAct's 3 epochs) shows its own value."""
    pinned = " ".join(f"{k} {v}" for k, v in X.RECIPE.items())
    train = "python train.py --data /d/hotpotqa.json --out /r/train/a --no-progress "
    assert X.short(train + pinned) == "train.py --data hotpotqa.json"
    assert X.short(train + pinned.replace("--epochs 1", "--epochs 3")) == "train.py --data hotpotqa.json --epochs 3"
    assert X.short(train + pinned + " --train-on all") == "train.py --data hotpotqa.json --train-on all"
    assert X.short("python fireact.py eval --task toy --split test --n 100 --batch-size 16 --adapter /r/train/a") \
        == "fireact.py eval --task toy --split test --adapter a"


def test_a_failed_step_skips_the_rows_that_need_it(tmp_path, monkeypatch):
    ran = []

    def fake(argv):  # every step "succeeds" instantly, writing what an eval writes, except one training
        ran.append(argv)
        if argv[0] == "train.py" and "scaling_50" in " ".join(argv):
            raise ValueError("disk full")
        if argv[:2] == ["fireact.py", "eval"]:
            out = Path(argv[argv.index("--out") + 1])
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json(tasks.summary_path(out), dict(
                task="toy", split="test", n=1, em=100.0, f1=100.0, finish_rate=100.0, mean_steps=2.0, wall_s=1.0,
                failures=0, tool="local", noise=0.0, noise_mode="none"))
        elif argv[0] == "train.py":
            Path(argv[argv.index("--out") + 1]).mkdir(parents=True, exist_ok=True)
        elif argv[0] == "fireact.py":  # generate, filter, mix: their output file
            out = Path(argv[argv.index("--out") + 1])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("{}\n")
        if argv[:3] == X.GRID:
            X.main(argv[3:])

    monkeypatch.setattr(X, "run_step", fake)
    monkeypatch.setattr(X, "trained_on", lambda step, run: 7)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"1 step\(s\) failed \(train_scaling_50\), 1 skipped"):
        X.main(["--out", str(run), "--only", "scaling_50", "scaling_100"])
    assert sorted(p.stem for p in (run / "rows").glob("*.json")) == ["scaling_100"]
    assert not any("scaling_50_test" in " ".join(a) for a in ran)  # its eval never ran
    assert not (run / "steps" / "train_scaling_50.json").exists()  # a rerun retries it


def test_choose_takes_the_best_dev_em(tmp_path):
    (tmp_path / "evals").mkdir()
    for row, em in (("react", 60.0), ("react_reflexion", 71.0), ("react_cot_reflexion", 71.0)):
        write_json(tmp_path / "evals" / f"methods_{row}_dev.summary.json", {"em": em})
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"mix_{row}.jsonl").write_text(row + "\n")
    X.choose(tmp_path, "methods")
    assert json.loads((tmp_path / "chosen.json").read_text())["mix"] == "react_reflexion"  # tie: the simpler
    assert (tmp_path / "data/chosen.jsonl").read_text() == "react_reflexion\n"
    assert Path(str((tmp_path / "train/chosen").readlink())) == Path("methods_react_reflexion")


def run_cli(*args):  # `python experiments.py ...` before issue 31
    return subprocess.run([sys.executable, "-m", "extras", "grid", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_list_and_one_line_errors(tmp_path):
    r = run_cli("--list")
    assert r.returncode == 0 and "methods_react_cot_reflexion" in r.stdout and "h of CPU time" in r.stdout
    assert "python train.py --data runs/exp/data/chosen.jsonl:50" in r.stdout
    hours = lambda out: float(re.search(r"about ([\d.]+) h of CPU time", out).group(1))
    r2 = run_cli("--list", "--eval-n", "100", "--prompted-n", "30")  # prompted evals on 30, the others on 100
    lines = r2.stdout.splitlines()
    assert any("--out runs/exp/evals/prompted_test.json" in l and l.endswith("--n 30") for l in lines), r2.stdout
    assert any("evals/mask_all_test.json" in l and l.endswith("--n 100") for l in lines)
    assert hours(r2.stdout) < hours(run_cli("--list", "--eval-n", "100").stdout) < hours(r.stdout)
    r = run_cli("--grid", "hotpotqa", "--list")
    assert r.returncode == 0 and "--split report" in r.stdout and "--split tune" in r.stdout
    r = run_cli("--only", "nope", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--only nope: no such row in grid toy" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "bad.json").write_text("{not json")
    r = subprocess.run([sys.executable, str(REPO / "fireact.py"), "table", str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and f"{tmp_path / 'rows' / 'bad.json'}: not a row summary" in r.stderr


def test_scaling_curve_ends_at_the_mix_chosen_on_dev_from_any_run():
    row = lambda name, group, x, em, mix=None: dict(name=name, group=group, x=x, evals={"test": {"em": em}},
                                                    choices={"chosen.json": {"mix": mix}} if mix else {})
    rows = [row("methods_react", "methods", 545, 82.0), row("methods_react_reflexion", "methods", 545, 67.5),
            row("scaling_200", "scaling", 200, 54.0, mix="react"), row("scaling_50", "scaling", 50, 6.0, mix="react")]
    assert X.scaling_points(rows) == [(50, 6.0), (200, 54.0), (545, 82.0)]   # methods_react: chosen, from another run
    assert X.scaling_points(rows[:2]) == []                                   # no scaling row, no choice: no curve


def test_a_rows_own_training_flag_replaces_the_pinned_recipe_value():
    argv = X.train_step("x", ["d.jsonl"], "--epochs", "3").argv
    assert argv.count("--epochs") == 1 and argv[argv.index("--epochs") + 1] == "3"
    assert argv[argv.index("--lora-dropout") + 1] == "0.05"                  # the rest of the recipe stays pinned
    hp = {r.name: r for r in X.hotpotqa_rows()}
    step = hp["hp_hotpotqa_3ep"].steps[0].argv
    assert step[step.index("--epochs") + 1] == "3" and step.count("--epochs") == 1


def test_hp_best_is_chosen_on_tune_before_any_report_eval_runs(tmp_path):
    row = next(r for r in X.hotpotqa_rows() if r.name == "hp_best")
    names = [s.name for s in row.steps]
    choose = names.index("hp_choose_best")
    assert all(not n.endswith("_report") for n in names[:choose])  # the choice never sees a report score
    assert names[choose + 1:] == ["eval_hp_best_report"] and "hp_choose" not in names  # only its own choice
    assert {f"eval_hp_{r}_tune" for r in X.HP_BEST} <= set(names[:choose])  # every fine-tuned row is a candidate
    full = next(r for r in X.hotpotqa_rows() if r.name == "hp_full")      # full fine-tuning: a checkpoint, so
    assert X.is_full(full) and "full" not in X.HP_BEST and "train_hp_full" not in names  # not an adapter candidate
    assert all(s.argv[s.argv.index("--model") + 1] == "train/hp_full/model" and "--zero-shot" in s.argv
               for s in full.steps if s.name.startswith("eval_"))
    (tmp_path / "evals").mkdir()
    assert len(X.HP_BEST) == 10
    for r, em in zip(X.HP_BEST, (19.0, 15.0, 19.0, 16.0, 12.0, 21.5, 21.5, 13.0, 21.0, 20.0)):
        write_json(tmp_path / "evals" / f"hp_{r}_tune.summary.json", {"em": em})
    X.choose(tmp_path, "hp_best")
    record = json.loads((tmp_path / "hp_best.json").read_text())
    assert record["row"] == "hotpotqa_3ep" and record["tune_em"]["mask_all"] == 12.0  # tie: the earlier row
    assert Path(str((tmp_path / "train/hp_best").readlink())) == Path("hp_hotpotqa_3ep")
    with pytest.raises(ValueError, match="--choose best: expected"):
        X.choose(tmp_path, "best")


def test_every_flag_has_help():
    import dataclasses
    from common import cli
    for name, (cls, _, doc) in X.COMMANDS.items():
        helps = cli.field_help(cls)
        assert doc and not [f.name for f in dataclasses.fields(cls) if not helps.get(f.name)], name

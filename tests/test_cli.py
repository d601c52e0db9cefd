"""Tests for common/cli.py and common/files.py: flags and help from a dataclass, Literal choices, --config round trip, check() errors, one-line
user errors from run(), atomic_write, provenance.

    python -m pytest -q tests/test_cli.py
"""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from common import cli, files

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Base:
    steps: int = 10                 # optimizer steps
    name: str = ""                  # run name; "" = none
                                    # (a second comment line continues the first)
    # a block comment about what follows: not anyone's help
    files: list = field(default_factory=list)  # input files


@dataclass
class Conf(Base):
    steps: int = 5
    mode: Literal["fast", "exact"] = "fast"  # how to run: 100% fast, or exact
    rate: float = 0.5               # a rate in (0, 1]
    merge: bool = False             # also merge
    no_comment: int = 3

    def check(self):
        if not 0 < self.rate <= 1:
            raise ValueError(f"--rate {self.rate}: must be in (0, 1]\nsecond line")


def parse(argv, **kw):
    return cli.parse_config(Conf, argv, prog="prog", **kw)


def test_help_comes_from_field_comments_with_defaults_and_choices(capsys):
    assert cli.field_help(Conf) == {"steps": "optimizer steps", "files": "input files",
                                    "name": 'run name; "" = none (a second comment line continues the first)',
                                    "mode": "how to run: 100% fast, or exact", "rate": "a rate in (0, 1]",
                                    "merge": "also merge"}   # the base's comment serves the overriding subclass
    with pytest.raises(SystemExit) as e:
        parse(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ["--steps STEPS optimizer steps (default: 5)", "--mode {fast,exact} how to run: 100% fast, or exact "
                 "(default: fast)", "--merge, --no-merge also merge (default: False)",
                 "--no-comment NO_COMMENT (default: 3)", "--files FILES [FILES ...] input files (default: none)",
                 "--name NAME run name; \"\" = none (a second comment line continues the first) (default: '')"]:
        assert text in out, text
    assert "block comment" not in out


def test_flags_types_lists_bools_and_literal_choices(capsys):
    c = parse(["--steps", "7", "--files", "a", "b", "--merge", "--mode", "exact", "--rate", "1"])
    assert (c.steps, c.files, c.merge, c.mode, c.rate) == (7, ["a", "b"], True, "exact", 1.0)
    assert parse([]) == Conf()
    with pytest.raises(SystemExit) as e:
        parse(["--mode", "slow"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err == "prog: error: argument --mode: invalid choice: 'slow' (choose from 'fast', 'exact')\n"


@dataclass
class Policy:
    compile: bool | None = None     # on or off; auto = the entry point decides
    steps: int = 1


def test_a_policy_bool_is_none_unless_given(tmp_path, capsys):
    """`x: bool | None = None`: --x / --no-x set it, absent it stays None (the entry point's policy decides), the
    help says auto, and a saved config keeps either."""
    P = lambda argv: cli.parse_config(Policy, argv, prog="prog")
    assert P([]).compile is None and P(["--compile"]).compile is True and P(["--no-compile"]).compile is False
    for saved in (None, True, False):
        (tmp_path / "c.json").write_text(json.dumps({"compile": saved}))
        assert P(["--config", str(tmp_path / "c.json")]).compile is saved
    (tmp_path / "c.json").write_text(json.dumps({"compile": 1}))
    with pytest.raises(SystemExit):
        P(["--config", str(tmp_path / "c.json")])
    assert "key 'compile': expected bool, got 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        P(["--help"])
    assert "--compile, --no-compile on or off; auto = the entry point decides (default: auto)" in \
        " ".join(capsys.readouterr().out.split())


def test_positional_fields(tmp_path):
    c = parse(["x.jsonl", "y.jsonl", "--steps", "2"], positional=("files",))
    assert c.files == ["x.jsonl", "y.jsonl"] and c.steps == 2


def test_check_error_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--rate", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "prog: error: --rate 0.0: must be in (0, 1] second line\n"


def test_config_file_round_trip_and_explicit_flags_override(tmp_path, capsys):
    saved = dataclasses.asdict(Conf(steps=9, mode="exact", files=["a"], merge=True, rate=0.25))
    (tmp_path / "config.json").write_text(json.dumps(saved))
    c = parse(["--config", str(tmp_path / "config.json")])
    assert dataclasses.asdict(c) == saved and cli.explicit(c) == set(saved)
    c = parse(["--config", str(tmp_path / "config.json"), "--steps", "3", "--no-merge"])
    assert (c.steps, c.merge, c.mode, c.rate, c.files) == (3, False, "exact", 0.25, ["a"])
    assert cli.explicit(parse(["--steps", "3"])) == {"steps"}
    assert cli.explicit(Conf(rate=0.3)) == {"rate"}          # built in code: what differs from the defaults


@pytest.mark.parametrize("content,err", [
    ('{"steps": 1, "stepz": 2}', "unknown key 'stepz' (not a Conf setting"),
    ('{"steps": "many"}', "key 'steps': expected int, got 'many'"),
    ('{"steps": true}', "key 'steps': expected int, got True"),
    ('{"rate": 1}', None),                                  # an int is a fine float
    ('{"files": "a"}', "key 'files': expected a list of str, got 'a'"),
    ('{"mode": "slow"}', "key 'mode': 'slow' is not one of 'fast', 'exact'"),
    ('{"rate": 2.0}', "--rate 2.0: must be in (0, 1]"),       # check() runs on file values too
    ('[1, 2]', "expected a JSON object of settings"),
    ('{"steps": ', "Expecting value"),
])
def test_config_file_errors_name_file_and_key(tmp_path, capsys, content, err):
    f = tmp_path / "c.json"
    f.write_text(content)
    if err is None:
        assert parse(["--config", str(f)]).rate == 1.0
        return
    with pytest.raises(SystemExit) as e:
        parse(["--config", str(f)])
    out = capsys.readouterr().err
    assert e.value.code == 2 and out.count("\n") == 1 and err in out, out
    assert out.startswith("prog: error: ") and (str(f) in out or "--rate" in out)


SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from common import cli, files
def main():
    kind = sys.argv[1]
    if kind == "value":
        raise ValueError("data.jsonl:3: bad record\\nwith a second line")
    if kind == "missing":
        open("/nonexistent/x.jsonl")
    if kind == "dir":
        open({tmp!r})
    if kind == "utf8":
        files.read_text({bad!r})
    if kind == "interrupt":
        raise KeyboardInterrupt
    if kind == "bug":
        raise RuntimeError("a bug keeps its traceback")
    print("ok")
cli.run(main)
"""


@pytest.mark.parametrize("kind,code,want", [
    ("value", 1, "prog.py: error: data.jsonl:3: bad record with a second line"),
    ("missing", 1, "prog.py: error: /nonexistent/x.jsonl: No such file or directory"),
    ("dir", 1, "Is a directory"),
    ("utf8", 1, "bad.jsonl: not UTF-8 text (invalid start byte at byte 1)"),
    ("interrupt", 130, "prog.py: interrupted"),
    ("ok", 0, ""),
])
def test_run_turns_user_errors_into_one_line(tmp_path, kind, code, want):
    (tmp_path / "bad.jsonl").write_bytes(b"{\xff}\n")
    (tmp_path / "prog.py").write_text(SCRIPT.format(repo=str(REPO), tmp=str(tmp_path), bad=str(tmp_path / "bad.jsonl")))
    r = subprocess.run([sys.executable, str(tmp_path / "prog.py"), kind], capture_output=True, text=True, timeout=60)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == (1 if want else 0) and want in r.stderr, r.stderr


def test_run_keeps_tracebacks_for_bugs(tmp_path):
    (tmp_path / "prog.py").write_text(SCRIPT.format(repo=str(REPO), tmp="", bad=""))
    r = subprocess.run([sys.executable, str(tmp_path / "prog.py"), "bug"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" in r.stderr and "RuntimeError: a bug" in r.stderr


def test_atomic_write_bytes_str_and_writer_and_failure_keeps_old(tmp_path):
    p = tmp_path / "sub" / "f.json"
    files.atomic_write(p, "héllo")
    assert p.read_text(encoding="utf-8") == "héllo"
    files.atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    files.atomic_write(p, lambda f: f.write(b"from a writer"))
    assert p.read_bytes() == b"from a writer"

    def half(f):
        f.write(b"half of it")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(p, half)
    assert p.read_bytes() == b"from a writer" and os.listdir(p.parent) == ["f.json"]   # no temporary left


def test_atomic_path_for_writers_that_take_a_name_and_the_files_mode(tmp_path):
    p = tmp_path / "model.gguf"
    with files.atomic_path(p) as tmp:
        assert tmp.parent == tmp_path and tmp != p and not p.exists()
        tmp.write_bytes(b"complete")
    assert p.read_bytes() == b"complete" and os.listdir(tmp_path) == ["model.gguf"]
    assert oct(p.stat().st_mode & 0o777) == oct(0o666 & ~files._UMASK)   # others may read it, as any saved file
    with pytest.raises(OSError, match="killed"):
        with files.atomic_path(p) as tmp:
            tmp.write_bytes(b"half")
            raise OSError("killed mid-write")
    assert p.read_bytes() == b"complete" and os.listdir(tmp_path) == ["model.gguf"]   # old kept, no temporary
    q = files.atomic_write(tmp_path / "q.json", "{}")
    assert oct(q.stat().st_mode & 0o777) == oct(0o666 & ~files._UMASK)        # not mkstemp's 0600


def test_a_dead_writers_temporaries_are_removed_a_live_ones_kept(tmp_path):
    dead = 2**22 + 12345                               # above Linux's default pid_max: no such process
    left = [tmp_path / f".out.gguf.{dead}.x1.tmp", tmp_path / f"out.gguf.tmp{dead}"]
    left[0].write_bytes(b"half")
    left[1].mkdir()
    live = tmp_path / f".out.gguf.{os.getpid()}.x2.tmp"  # another thread of this process, writing now
    live.write_bytes(b"in progress")
    with files.atomic_path(tmp_path / "out.gguf") as tmp:
        assert str(os.getpid()) in tmp.name             # a killed writer's file says whose it was
        tmp.write_bytes(b"whole")
    assert sorted(os.listdir(tmp_path)) == sorted(["out.gguf", live.name])


def test_read_json_and_jsonl_name_the_file_and_line(tmp_path):
    p = tmp_path / "a.json"
    with pytest.raises(ValueError, match="a.json: no such file; run it"):
        files.read_json(p, hint="run it")
    p.write_text("[1]")
    with pytest.raises(ValueError, match="a.json: expected a JSON object, found list"):
        files.read_json(p, want=dict)
    j = tmp_path / "r.jsonl"
    j.write_text('{"a": 1}\n\n{bad\n')
    with pytest.raises(ValueError, match="r.jsonl:3: invalid JSON"):
        files.read_jsonl(j)
    j.write_text('{"a": 1}\n{"b": 2}\n{"c": ')               # a torn tail: a crash mid-append
    with pytest.raises(ValueError, match="r.jsonl:3"):
        files.read_jsonl(j)                                    # a file we did not write: refuse to guess
    assert files.read_jsonl(j, resumable=True) == [{"a": 1}, {"b": 2}]
    assert j.read_text() == '{"a": 1}\n{"b": 2}\n'            # the torn line is cut off the file
    assert files.read_jsonl(tmp_path / "none.jsonl", resumable=True) == []


def test_cache_dir_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("FIREACT_CACHE", str(tmp_path))
    assert files.cache_dir() == tmp_path
    monkeypatch.setenv("FIREACT_CACHE", "")                   # empty = unset: never the working directory
    assert files.cache_dir() == Path.home() / ".cache" / "fireact"


def test_provenance_commit_versions_no_host(tmp_path, monkeypatch):
    info = cli.provenance()
    assert {"project_version", "git_commit", "git_dirty", "python", "time"} <= set(info)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert info["git_commit"] == head.stdout.strip() and isinstance(info["git_dirty"], bool)
    import socket
    assert socket.gethostname() not in json.dumps(info)
    monkeypatch.setattr(cli, "REPO", tmp_path)           # not a git checkout: None, never an exception
    assert cli.provenance()["git_commit"] is None
    monkeypatch.setenv("PATH", str(tmp_path))            # no git at all
    assert cli.provenance()["git_commit"] is None


def test_cli_imports_neither_torch_nor_http():
    code = "import sys; from common import cli, files; print(sorted(m for m in ('torch', 'requests', 'urllib3') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stderr

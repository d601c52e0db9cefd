"""
What every command line of the project shares: dataclass config -> flags, --config FILE.json, validation, one-line
user errors and the provenance a run records. Plumbing: torch-free, HTTP-free, imported by every entry point.

    @dataclass
    class Config:
        steps: int = 10                         # optimizer steps (shown by --help, with the default)
        mode: Literal["fast", "exact"] = "fast" # a Literal gives the choices argparse enforces
        def check(self):                        # optional: ranges, raised as a one-line parser error
            if self.steps < 0: raise ValueError("--steps must be >= 0")

    if __name__ == "__main__":
        cli.run(lambda: main(cli.parse_config(Config, description=__doc__)))   # --steps 3 --config run/config.json
"""
import argparse
import ast
import dataclasses
import datetime
import inspect
import io
import json
import os
import platform
import subprocess
import sys
import textwrap
import tokenize
import typing
from pathlib import Path

from common.files import read_text

VERSION = "0.1"
REPO = Path(__file__).resolve().parent.parent  # the project root


def field_help(cls) -> dict:
    """{field: its trailing `# comment`} from the source of cls and its dataclass bases (a subclass's comment wins).
    Comment-only lines right below, indented deeper than the field, continue its comment; a comment at the
    field's own indentation is a block comment about what follows, not help."""
    helps = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
            body = ast.parse(src).body[0].body
            comments = {t.start[0]: (t.start[1], t.string.lstrip("#").strip())
                        for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
        except (OSError, TypeError, SyntaxError, tokenize.TokenError):
            continue                    # no source (an interactive class): flags still work, without help
        lines = src.splitlines()
        for node in body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            line = next((n for n in range(node.lineno, node.end_lineno + 1) if n in comments), None)
            if line is None:
                continue
            parts = [comments[line][1]]
            while line + 1 in comments and lines[line].lstrip().startswith("#") \
                    and comments[line + 1][0] > node.col_offset:
                line += 1
                parts.append(comments[line][1])
            helps[node.target.id] = " ".join(parts)
    return helps


def _default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _kind(f, hints, default):
    """-> (python type of one value, choices or None, is_list)."""
    hint = hints.get(f.name, type(default))
    opt = [a for a in typing.get_args(hint) if a is not type(None)]
    if default is None and len(opt) == 1:  # `x: bool | None = None`: None = the entry point decides (a policy)
        hint = opt[0]
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices, False
    if hint is list or typing.get_origin(hint) is list:
        args = typing.get_args(hint)
        return (args[0] if args else str), None, True
    return (hint if isinstance(hint, type) else type(default)), None, False


def _check_value(name, value, typ, choices, is_list, default=0):
    """A --config file's value against the field's type -> the value, or a ValueError saying what is wrong."""
    if value is None and default is None:  # a policy field saved undecided
        return None
    def ok(v):    # exact types: True is an int to Python, not to a setting; an int is a fine float
        return type(v) is typ or (typ is float and type(v) is int)
    if is_list:
        if not isinstance(value, list) or not all(ok(v) for v in value):
            raise ValueError(f"key {name!r}: expected a list of {typ.__name__}, got {value!r}")
        return value
    if not ok(value):
        raise ValueError(f"key {name!r}: expected {typ.__name__}, got {value!r}")
    if choices and value not in choices:
        raise ValueError(f"key {name!r}: {value!r} is not one of {', '.join(map(repr, choices))}")
    return float(value) if typ is float else value


class _Parser(argparse.ArgumentParser):
    def error(self, message):    # one line, not the whole usage block: `train.py: error: --lr -1: must be > 0`
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def parse_config(cls, argv=None, prog=None, description=None, positional=()):
    """The project's one config -> CLI mechanism: a flag per dataclass field (--max-steps 11, --merge/--no-merge,
    --data A B), help from the field's comment, choices from Literal[...]; fields named in `positional` become
    positional arguments taking one or more values. `--config FILE.json` loads a saved config (a run's
    config.json); flags given explicitly override it. A bad value or a failing `cls.check()` (or __post_init__)
    is a one-line parser error (exit 2). `explicit(cfg)` tells which fields the user set."""
    p = _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.json", help="load the settings saved in FILE.json (a run's config.json); "
                   "flags given explicitly override it")
    try:
        hints = typing.get_type_hints(cls)
    except NameError:                   # an unresolvable annotation: the defaults' types serve
        hints = {}
    helps, kinds = field_help(cls), {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        default = _default(f)
        typ, choices, is_list = kinds[f.name] = _kind(f, hints, default)
        shown = " ".join(map(str, default)) or "none" if isinstance(default, list) else \
            (repr(default) if default == "" else "auto" if default is None else default)
        text = helps.get(f.name, "")
        text = (text + " " if text else "") + ("" if default is dataclasses.MISSING else f"(default: {shown})")
        kw = dict(help=text.replace("%", "%%"), default=argparse.SUPPRESS)   # SUPPRESS: absent unless given
        if f.name in positional:
            p.add_argument(f.name, nargs="+", type=typ, help=kw["help"])
        elif typ is bool:
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=typ, choices=choices, nargs="+" if is_list else None,
                           required=default is dataclasses.MISSING, **kw)
    given = vars(p.parse_args(argv))
    path, values = given.pop("config", None), {}
    if path:
        try:
            saved = json.loads(read_text(path))
            if not isinstance(saved, dict):
                raise ValueError("expected a JSON object of settings")
            for k, v in saved.items():
                if k not in kinds:
                    raise ValueError(f"unknown key {k!r} (not a {cls.__name__} setting; see --help)")
                values[k] = _check_value(k, v, *kinds[k], _default(fields[k]))
        except (OSError, ValueError) as e:
            msg = e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)
            p.error(f"--config {path}: {msg.removeprefix(f'{path}: ')}")
    values.update(given)
    try:
        cfg = cls(**values)
        if hasattr(cfg, "check"):
            cfg.check()
    except ValueError as e:
        p.error(one_line(e))
    object.__setattr__(cfg, "_explicit", frozenset(values))   # a frozen dataclass works too
    return cfg


def explicit(cfg) -> set:
    """The fields the user set: on the command line or in --config (parse_config records them); for a config
    built in code, the fields that differ from their defaults. Presets (train.py's --recipe) fill in the rest."""
    if hasattr(cfg, "_explicit"):
        return set(cfg._explicit)
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != _default(f)}


def one_line(e) -> str:
    """An exception -> its message on one line; OSErrors as 'FILE: reason'."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(part.strip() for part in msg.splitlines() if part.strip())


def run(main, prog=None):
    """Call main() as a command: user errors (ValueError, OSError, a non-UTF-8 file) become ONE line on stderr,
    `prog: error: message`, and exit 1; Ctrl-C exits 130. Anything else is a bug and keeps its traceback."""
    prog = prog or Path(sys.argv[0]).name
    try:
        return main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:   # UnicodeDecodeError is a ValueError (read_text names the file)
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)


def _git(*args):
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def provenance() -> dict:
    """What made a run: the project's git commit and whether tracked files differ from it (None outside a git
    checkout), versions and the time. Nothing else: no hostname, no environment (secrets live there)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    info = {"project_version": VERSION, "git_commit": commit, "git_dirty": None if status is None else bool(status),
            "python": platform.python_version(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if "torch" in sys.modules:           # only when already imported: cli.py stays torch-free
        info["torch"] = sys.modules["torch"].__version__
    return info


def hand_off(argv, package="extras"):
    """Run `python -m extras ARGV...` as a new process and exit with its status: the command lines that moved up to
    the extras (`python model.py serve`, `python fireact.py view`, ...) keep working while nothing below the
    extras imports them (the import graph stays one way). stdin/stdout/stderr and the working directory carry."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    raise SystemExit(subprocess.call([sys.executable, "-m", package, *argv], env=env))

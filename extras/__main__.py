"""
The extras' one entry point: `python -m extras COMMAND [--help] [flags]` (litgpt's __main__.py, in small).

    python -m extras                                     # the commands, one line each
    python -m extras serve --adapter runs/toy_default    # an OpenAI-compatible server (extras/serve.py)
    python -m extras export --adapter runs/toy_default --out runs/student.gguf --format gguf   # extras/export.py
    python -m extras view runs/eval.json --out report.html                                     # extras/report.py

Owns the dispatch, nothing else. Each extras module declares its commands as
`COMMANDS = {"name": (ConfigClass, function, "one-line help")}`; the listing reads those dicts from the modules'
source (no module is imported for it), and a command imports only its own module (`serve` never loads
matplotlib). Flags come from the config dataclass (common.cli.parse_config), user errors are one line
(common.cli.run). Nothing imports this package: it is the top of the import graph, and the old command lines
(`python model.py serve`, `python fireact.py view`, ...) reach it as a new process (common.cli.hand_off).
"""
import ast
import importlib
import sys
from pathlib import Path

from common import cli, files

HERE = Path(__file__).resolve().parent
ORDER = ("serve", "export", "finetune_api", "report", "experiments")  # the listing's order; any other module follows
POSITIONAL = ("files", "dirs", "question")  # config fields given as positional arguments (as fireact.py's were)


def declared(module: str) -> dict:
    """{command: one-line help} from extras/MODULE.py's `COMMANDS = {...}`, read with ast (not imported). A dict
    built in code rather than written out is read by importing the module."""
    tree = ast.parse(files.read_text(HERE / f"{module}.py"))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if not any(isinstance(t, ast.Name) and t.id == "COMMANDS" for t in targets):
            continue
        d = node.value
        if isinstance(d, ast.Dict) and all(isinstance(k, ast.Constant) for k in d.keys):
            return {k.value: v.elts[2].value if isinstance(v, ast.Tuple) and len(v.elts) > 2
                    and isinstance(v.elts[2], ast.Constant) else "" for k, v in zip(d.keys, d.values)}
        return {name: doc for name, (_, _, doc) in load(module).items()}
    return {}


def load(module: str) -> dict:
    """extras/MODULE.py's COMMANDS (imports the module and what it needs)."""
    return importlib.import_module(f"{__package__ or 'extras'}.{module}").COMMANDS


def commands() -> dict:
    """{command: (module, one-line help)} over every extras module there is; one that cannot be read (mid-edit, a
    syntax error) is left out with a note on stderr, and the others still work."""
    found = {p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_")}
    out = {}
    for module in [m for m in ORDER if m in found] + sorted(found - set(ORDER)):
        try:
            for name, doc in declared(module).items():
                out.setdefault(name, (module, doc))
        except (SyntaxError, ValueError, OSError) as e:
            print(f"python -m extras: skipping extras/{module}.py: {cli.one_line(e)}", file=sys.stderr)
    return out


def usage(table: dict) -> str:
    return ("usage: python -m extras COMMAND [--help] [flags]\n\ncommands:\n" +
            "\n".join(f"  {name:<14}{doc}" for name, (_, doc) in table.items()))


def main(argv=None):
    """Run one command -> what its function returns (tests call this in-process); no command: the usage."""
    argv = sys.argv[1:] if argv is None else list(argv)
    table = commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(table), file=sys.stdout if argv else sys.stderr)
        if not argv:
            raise SystemExit(2)
        return None
    if argv[0] not in table:
        print(f"python -m extras: error: unknown command {argv[0]!r}; choose {' | '.join(table)}", file=sys.stderr)
        raise SystemExit(2)
    name, prog = argv[0], f"python -m extras {argv[0]}"
    cls, fn, doc = load(table[name][0])[name]
    return cli.run(lambda: fn(cli.parse_config(cls, argv[1:], prog=prog, description=doc, positional=POSITIONAL)),
                   prog=prog)


if __name__ == "__main__":
    main()

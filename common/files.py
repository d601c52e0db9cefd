"""
Files, one owner each: UTF-8 text, JSON and JSONL reading (with the torn-tail policy of append-only files), atomic
writes, sha256 and the cache directory. Plumbing: torch-free and HTTP-free, imported by everything above it.

    from common import files
    cfg = files.read_json("run/config.json", want=dict)      # one-line ValueError naming the file when it is bad
    rows = files.read_jsonl("runs/gen.jsonl", resumable=True) # a torn last line (a crash mid-write) is cut off
    files.atomic_write("out/summary.json", json.dumps(s))      # the old content or the new, never half of it
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """$FIREACT_CACHE when set and not empty, else ~/.cache/fireact: downloads, converted models, datasets."""
    return Path(os.environ.get("FIREACT_CACHE") or Path.home() / ".cache" / "fireact")


def not_utf8(path, e: UnicodeDecodeError) -> ValueError:
    """The error for a file that is not UTF-8, naming it (the bare codec error names no file)."""
    return ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8")


def read_text(path) -> str:
    """A UTF-8 text file; one that is not UTF-8 is a ValueError naming it (OSErrors name it already)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None


def read_json(path, want=None, hint: str = ""):
    """A JSON file -> its value. A missing file, bad JSON or (with want=dict/list) the wrong top-level type is a
    one-line ValueError naming the file, followed by `hint` (what to do about it)."""
    path = Path(path)
    hint = f"; {hint}" if hint else ""
    if not path.exists():
        raise ValueError(f"{path}: no such file{hint}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}){hint}") from None
    if want is not None and not isinstance(d, want):
        raise ValueError(f"{path}: expected a JSON {'object' if want is dict else want.__name__}, found "
                         f"{type(d).__name__}{hint}")
    return d


def read_jsonl(path, resumable: bool = False) -> list:
    """A JSONL file -> its values, blank lines skipped; a bad line is a ValueError naming file:line.
    resumable=True is the policy of the append-only files this project writes (append_jsonl): a missing file is
    empty, and a torn last line (a crash mid-write) is cut off the file with a note on stderr, so the next run
    goes on from the last whole record; a corrupt line elsewhere is still an error (we did not write it)."""
    path = Path(path)
    if resumable and not path.exists():
        return []
    raw = path.read_bytes()
    if resumable and raw and not raw.endswith(b"\n"):
        nl = raw.count(b"\n") + 1
        print(f"{path}:{nl}: torn last line (an interrupted write) removed", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(raw.rfind(b"\n") + 1)
        raw = raw[:raw.rfind(b"\n") + 1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    out = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})"
                             + ("; delete that line (its work is then done again) or pass another --out"
                                if resumable else "")) from None
    return out


def write_jsonl(path, records) -> Path:
    """All records at once, atomically: a reader sees the old file or the new one, never half of one."""
    return atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def append_jsonl(f, record) -> None:
    """One record onto an open append-only file, flushed and fsync'd: on disk whole, or torn at the end (which
    read_jsonl(resumable=True) cuts)."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(path) -> None:
    """Make a rename inside `path` survive a power cut (some filesystems cannot fsync a directory: skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_tmp(path) -> None:
    """Delete what processes that died mid-write (a crash, a kill) left beside `path`: the <name>.tmp<pid>*
    folders of directory writers and atomic_write's .<name>.<pid>.*.tmp files. A live writer's are kept."""
    path = Path(path)
    if os.name != "posix" or not path.parent.is_dir():
        return
    pats = ((f"{path.name}.tmp*", re.escape(path.name) + r"\.tmp(\d+)"),
            (f".{path.name}.*.tmp", re.escape(f".{path.name}.") + r"(\d+)\..*\.tmp"))
    for glob, rx in pats:
        for p in path.parent.glob(glob):
            m = re.match(rx, p.name)
            if m and not _alive(int(m[1])):
                print(f"removing {p}: left half-written by a run that died", file=sys.stderr)
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


_UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it: not from threads)
os.umask(_UMASK)


def atomic_write(path, data, commit=True) -> Path:
    """Write bytes, str (UTF-8) or, for big objects, a function that writes to the open binary file (torch.save),
    so that `path` holds either its old content or the complete new one: a temporary file in the same directory,
    fsync, os.replace, then fsync of the directory. -> path. commit=False: stop before the rename and return the
    complete, fsync'd temporary file, for files that must change together and are renamed by the caller in a
    chosen order (an adapter's weights, then its config). New files get the usual 0644-style mode (umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600: others could not read a saved model or results file
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if not commit:
            return Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path, commit=True):
    """For writers that take a file NAME (a library's save(path)): yields a temporary path beside `path`; when the
    block ends without an error, the file is fsync'd and renamed onto `path` (atomic_write's guarantees; commit=
    False: left complete and fsync'd for the caller to rename, as atomic_write's); on an error it is removed.
    `with files.atomic_path(out) as tmp: writer.write(tmp)`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not commit:
            return
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_file(f) -> str:
    """sha256 of a path, or of an open binary file from its start."""
    if isinstance(f, (str, Path)):
        with open(f, "rb") as fh:
            return sha256_file(fh)
    f.seek(0)
    h = hashlib.sha256()
    while chunk := f.read(1 << 24):
        h.update(chunk)
    return h.hexdigest()

"""
Extras: fine-tuning an API model, FireAct's GPT-3.5 student. Trajectories -> a fine-tuning file (export-data), the
local check of a chat file against the API's documented rules, the cost estimate, and OpenAI's /files and
/fine_tuning/jobs endpoints (finetune-api: upload, create, follow; resumable, so a rerun never pays twice).

    python -m extras export-data runs/train.jsonl --format openai --out runs/train_openai.jsonl   # or alpaca, sharegpt
    python -m extras finetune-api runs/train_openai.jsonl --base-model gpt-3.5-turbo [--dry-run]
    (the old `python fireact.py export-data|finetune-api ...` command lines hand off to these)

In code:
    check_chat_file("train.jsonl", "gpt-3.5-turbo")                      # the API's rules, file:line errors
    finetune(FineTuneAPI(), "train.jsonl", "gpt-3.5-turbo")               # -> "ft:gpt-3.5-turbo:...", resumable
"""
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import fireact  # chat_messages (the chat layout), check_out_path
import tasks  # read_records: every trajectory format
from common import files
from common.net import APIError, openai_client, shorten

# ----------------------------------------------------------------------------------------------------------------
# export-data: our records (or FireAct's files) -> a fine-tuning file

EXPORT_FORMATS = ("openai", "alpaca", "sharegpt")
MC_OPTIONS = re.compile(r"\n(A\. [^\n]*\nB\. [^\n]*\nC\. [^\n]*\nD\. [^\n]*)$")  # MMLU: options end the question


def export_row(rec, fmt="openai", final_observation=True) -> dict:
    """Our record -> one row of a fine-tuning format; `tasks.read_records` reads each back to the same steps.
        openai   {"messages": chat_messages(...)}: FireAct's gpt_format, OpenAI's fine-tuning format
        sharegpt {"conversations": [{"from": "human" | "gpt", "value": ...}]}: the same turns
        alpaca   {"instruction": question, "input": "", "output": "Thought: ...\\nAction: ...\\nObservation: ...\\n..."}:
                 FireAct's alpaca_format layout: MMLU's options open the output, and the output ends with a
                 newline except in CoT rows (one step), as in FireAct's files."""
    msgs = fireact.chat_messages(rec["question"], rec["steps"], final_observation)
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


@dataclass
class ExportDataConfig:
    files: list = field(default_factory=list)    # trajectory files (ours, or FireAct's alpaca/gpt files, or ShareGPT)
    format: Literal["openai", "alpaca", "sharegpt"] = "openai"  # openai: chat messages (FireAct's gpt_format) | alpaca: a JSON array | sharegpt: conversations
    out: str = "runs/train_openai.jsonl"  # the exported file
    final_observation: bool = True  # end with the finish's observation, as FireAct's files do (billed, not trained on)
    keep_failed: bool = False  # keep trajectories that end `reward = False` (dropped by default: FireAct's method)

    def check(self):
        if not self.files:
            raise ValueError("export-data: name at least one trajectory file")
        fireact.check_out_path(self.out)


def export_data(cfg: ExportDataConfig) -> Path:
    """Trajectory files -> one fine-tuning file in OpenAI's chat format (FireAct's gpt_format), alpaca or ShareGPT."""
    rows = [export_row(r, cfg.format, cfg.final_observation) for f in cfg.files
            for r in tasks.read_training_records(f, cfg.keep_failed, log=lambda m: print(m, file=sys.stderr))]
    if cfg.format == "alpaca":  # FireAct's alpaca files are one JSON array
        files.atomic_write(cfg.out, json.dumps(rows, indent=4, ensure_ascii=False))
    else:
        files.write_jsonl(cfg.out, rows)
    print(f"wrote {len(rows)} {cfg.format} examples -> {cfg.out}")
    return Path(cfg.out)


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning through the API: the local check of a chat training file against the API's documented rules, the
# cost estimate, OpenAI's /files and /fine_tuning/jobs endpoints, and the resumable run

# USD per 1M trained tokens (tokens in the file x epochs), from OpenAI's pricing page (2025; check before spending)
FT_PRICES = {"gpt-3.5-turbo": 8.0, "gpt-4o-mini": 3.0, "gpt-4o": 25.0}
# the longest training example each base model takes, in tokens (the API cuts longer ones before their finish)
FT_CONTEXT = {"gpt-3.5-turbo": 16385, "gpt-3.5-turbo-0613": 4096, "gpt-4o-mini": 65536, "gpt-4o": 65536}
FT_MIN_EXAMPLES, FT_MAX_BYTES = 10, 512 << 20  # the API's floor on examples; its cap on one uploaded file
FT_ROLES = ("system", "user", "assistant")
FT_DONE = ("succeeded", "failed", "cancelled")


def _by_prefix(table, model):
    """The entry of the longest key that `model` starts with (gpt-4o-mini-2024-07-18 -> gpt-4o-mini), or None."""
    keys = [k for k in table if model.startswith(k)]
    return table[max(keys, key=len)] if keys else None


def auto_epochs(n_examples):
    """The API's n_epochs="auto", as OpenAI's cookbook documents it: 3 epochs, raised so that small files make at
    least 100 example passes (at most 25 epochs), lowered so large ones make at most 25,000 (at least 1)."""
    if n_examples * 3 < 100:
        return min(25, -(-100 // n_examples))
    if n_examples * 3 > 25000:
        return max(1, 25000 // n_examples)
    return 3


def token_counter(model):
    """-> (count(text) -> tokens, how). Exact with a tiktoken-compatible package (tiktoken, or bpe-openai, which
    ships its vocabularies and so works offline); else an estimate of 4 characters a token (OpenAI's rule of
    thumb; on FireAct's data cl100k_base gives 4.4, so the estimate runs ~10% high, on the safe side)."""
    name = "o200k_base" if model.startswith(("gpt-4o", "gpt-4.1", "o")) else "cl100k_base"  # gpt-3.5, gpt-4
    for package in ("tiktoken", "bpe_openai"):
        try:
            enc = __import__(package).get_encoding(name)
            enc.encode_ordinary("probe")  # tiktoken fetches its vocabulary on first use: offline that fails here
        except Exception:  # not installed, or no vocabulary: try the next, then estimate
            continue
        return (lambda text: len(enc.encode_ordinary(text))), f"{name} via {package}"  # special tokens as text
    return (lambda text: -(-len(text) // 4)), "estimated at 4 characters a token (pip install tiktoken for exact counts)"


def check_chat_file(path, model="gpt-3.5-turbo"):
    """Check a chat fine-tuning file (JSONL of {"messages": [{role, content}, ...]}) against the API's rules before
    paying for an upload: JSON per line, roles system/user/assistant with string content, system only first, at
    least one non-empty assistant message, `weight` 0/1 on assistant messages only, each example within the base
    model's token limit, at least 10 examples. A broken rule is a ValueError naming file:line.
    -> dict(examples, tokens: per example (counted as OpenAI's cookbook counts chat tokens: 3 per message + role +
    content, 3 per example), tokenizer, warnings: [one line each]). Warnings: examples that end with a user message
    (FireAct's layout: the API trains on assistant messages only, so that tail is billed but not learned) or open
    with the assistant (two rows of FireAct's multitask_multimethod data)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: " + ("is a directory, not a training file" if path.is_dir() else "no such file"))
    if path.stat().st_size > FT_MAX_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size / 2**20:.0f} MiB, over the API's 512 MiB per file; split it")
    count, how = token_counter(model)
    limit = _by_prefix(FT_CONTEXT, model)
    tokens, tail_user, head_assistant = [], [], []
    lines = files.read_text(path).split("\n")  # not UTF-8: a ValueError naming the file (the API reads UTF-8)
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    for n, line in enumerate(lines, 1):
        where = f"{path}:{n}"
        if not line.strip():
            raise ValueError(f"{where}: blank line; the API reads one example per line (delete it)")
        try:
            ex = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: invalid JSON ({shorten(e, 100)})") from None
        msgs = ex.get("messages") if isinstance(ex, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: expected {{\"messages\": [...]}} with at least one message (export our "
                             f"trajectories with `python -m extras export-data --format openai`)")
        total = 3
        for j, m in enumerate(msgs):
            at = f"{where}: messages[{j}]"
            if not isinstance(m, dict):
                raise ValueError(f"{at}: expected an object {{role, content}}, got {type(m).__name__}")
            extra = set(m) - {"role", "content", "name", "weight"}
            if extra:
                raise ValueError(f"{at}: unknown key {sorted(extra)[0]!r}; a message has role, content (name, weight)")
            if m.get("role") not in FT_ROLES:
                raise ValueError(f"{at}: role {m.get('role')!r} is not one of {', '.join(FT_ROLES)}")
            if m["role"] == "system" and j > 0:
                raise ValueError(f"{at}: a system message must come first")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"{at}: 'content' must be a string, got {m.get('content')!r:.40}")
            if "weight" in m and (m["role"] != "assistant" or m["weight"] not in (0, 1)):
                raise ValueError(f"{at}: 'weight' must be 0 or 1, and only on an assistant message")
            total += 3 + count(m["role"]) + count(m["content"]) + (1 if "name" in m else 0)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            raise ValueError(f"{where}: no non-empty assistant message; the API learns only from assistant messages")
        bad = next((j for j, m in enumerate(msgs) if m["role"] == "assistant" and not m["content"].strip()), None)
        if bad is not None:
            raise ValueError(f"{where}: messages[{bad}]: an empty assistant message; the API refuses it")
        if limit and total > limit:
            raise ValueError(f"{where}: {total:,} tokens, over {model}'s {limit:,} a training example; the API "
                             f"would cut it before its end: shorten it or leave it out")
        tokens.append(total)
        (tail_user if msgs[-1]["role"] != "assistant" else []).append(n)
        (head_assistant if next(m for m in msgs if m["role"] != "system")["role"] == "assistant" else []).append(n)
    if len(tokens) < FT_MIN_EXAMPLES:
        raise ValueError(f"{path}: {len(tokens)} examples; the API needs at least {FT_MIN_EXAMPLES}")
    warnings = []
    if tail_user:
        warnings.append(f"{len(tail_user)} of {len(tokens)} examples end with a user message (first: {path}:"
                        f"{tail_user[0]}): billed, not trained on (FireAct's layout; --no-final-observation drops it)")
    if head_assistant:
        warnings.append(f"{len(head_assistant)} examples open with an assistant message, not the question (first: "
                        f"{path}:{head_assistant[0]})")
    return dict(examples=len(tokens), tokens=tokens, tokenizer=how, warnings=warnings)


def estimate(check, model, epochs=0):
    """What a job will cost: -> dict(examples, file_tokens, epochs, trained_tokens, usd or None, price)."""
    n_epochs = epochs or auto_epochs(check["examples"])
    trained = sum(check["tokens"]) * n_epochs
    price = _by_prefix(FT_PRICES, model)
    return dict(examples=check["examples"], file_tokens=sum(check["tokens"]), epochs=n_epochs,
                trained_tokens=trained, price=price, usd=None if price is None else trained * price / 1e6)


def _check_id(data):
    if not isinstance(data.get("id"), str):
        raise ValueError("no 'id' in the reply")


def _check_list(data):
    if not isinstance(data.get("data"), list):
        raise ValueError("no 'data' list in the reply")


class FineTuneAPI:
    """OpenAI's files and fine-tuning endpoints (any server that speaks them), over the teacher's Client: retries,
    deadlines, one-line APIErrors with the server's message, the key from the environment and never written."""

    def __init__(self, base_url=None, api_key_env="OPENAI_API_KEY", timeout=300.0, max_retries=6,
                 sleep=time.sleep, deadline=900.0):
        self.base_url, self.client = openai_client("fine-tune", base_url, api_key_env, timeout=timeout,
                                                   max_retries=max_retries, sleep=sleep, deadline=deadline)

    def _call(self, method, path, check=_check_id, **kw):
        return self.client.request(method, f"{self.base_url}/{path}", check=check, **kw)[0]

    def upload(self, path, purpose="fine-tune"):
        """POST /files (multipart) -> the file object {id, status, ...}."""
        path = Path(path)
        return self._call("POST", "files", files={"purpose": (None, purpose),
                                                  "file": (path.name, path.read_bytes(), "application/jsonl")})

    def file(self, file_id):
        return self._call("GET", f"files/{file_id}")

    def create_job(self, training_file, model, validation_file=None, epochs=0, suffix=""):
        """POST /fine_tuning/jobs -> the job {id, status, ...}; epochs 0 = the API's "auto"."""
        body = {"training_file": training_file, "model": model,
                **({"validation_file": validation_file} if validation_file else {}),
                **({"hyperparameters": {"n_epochs": epochs}} if epochs else {}), **({"suffix": suffix} if suffix else {})}
        return self._call("POST", "fine_tuning/jobs", json_body=body)

    def job(self, job_id):
        return self._call("GET", f"fine_tuning/jobs/{job_id}")

    def jobs(self, limit=100):
        return self._call("GET", "fine_tuning/jobs", check=_check_list, params={"limit": limit})["data"]

    def events(self, job_id, limit=100):
        """The job's latest events, oldest first."""
        data = self._call("GET", f"fine_tuning/jobs/{job_id}/events", check=_check_list, params={"limit": limit})
        return sorted(data["data"], key=lambda e: (e.get("created_at", 0), str(e.get("id", ""))))


def finetune_state_path(train_path):
    return Path(f"{train_path}.finetune.json")


def finetune(api, train_path, model, validation_path="", epochs=0, suffix="", poll=30.0, sleep=time.sleep,
             log=print):
    """Fine-tune `model` on a checked chat file through `api` (a FineTuneAPI) -> the fine-tuned model's name.

    Resumable, so a rerun never pays twice: the run is keyed by the file's sha256, the validation file's, the base
    model, the epochs and the server, and its state (file ids, job id, status, model name; never the key) lives
    next to the training file in TRAIN.finetune.json, rewritten atomically after each step. A rerun follows the
    job it finds there (or prints the finished model's name at once); a job that failed is reported and a new one
    started on the uploaded files. Before creating a job, the server's job list is searched for one already made
    on the same uploaded file (a crash between creating it and writing the state).
    Follows the job with one line per change: status, trained tokens, the latest event. A failed or cancelled job
    is a ValueError of one line with the server's message."""
    state_path = finetune_state_path(train_path)
    key = "|".join([files.sha256_file(train_path), files.sha256_file(validation_path) if validation_path else "-", model,
                    f"epochs={epochs or 'auto'}", api.base_url])
    state = files.read_json(state_path, want=dict, hint="delete it to start over (a job made from it is then found "
                            "again by its uploaded file only if that file is uploaded again)") if state_path.exists() else {}
    run = state.setdefault(key, dict(base_model=model, epochs=epochs or "auto", base_url=api.base_url,
                                     train=str(train_path), validation=str(validation_path) or None))

    def save(**kw):
        run.update(kw)
        files.atomic_write(state_path, json.dumps(state, indent=1))

    if run.get("fine_tuned_model"):
        log(f"already fine-tuned (job {run['job']}, {state_path}): {run['fine_tuned_model']}")
        return run["fine_tuned_model"]
    for role, path in (("training_file", train_path), ("validation_file", validation_path)):
        if path and not run.get(role):
            f = api.upload(path)
            log(f"uploaded {path} -> {f['id']}")
            save(**{role: f["id"]})
        while path:  # the API takes a file once it has processed it
            f = api.file(run[role])
            if f.get("status") in ("error", "deleted"):
                save(**{role: None})
                raise ValueError(f"{path}: the API refused the file: {shorten(f.get('status_details') or f['status'])}")
            if f.get("status") in (None, "processed"):
                break
            sleep(min(poll, 5.0))
    if run.get("job") and run.get("status") in ("failed", "cancelled"):
        log(f"job {run['job']} {run['status']} before ({run.get('error') or 'no message'}); starting a new one")
        save(job=None, status=None, error=None)
    if not run.get("job"):
        found = [j for j in api.jobs() if j.get("status") not in ("failed", "cancelled") and
                 (j.get("training_file"), j.get("validation_file")) == (run["training_file"], run.get("validation_file"))]
        job = found[0] if found else api.create_job(run["training_file"], model, run.get("validation_file"),
                                                     epochs, suffix)
        log(("found job " if found else "created job ") + job["id"])
        save(job=job["id"], status=job.get("status"))
    seen, last = set(), None
    while True:
        job = api.job(run["job"])
        new = [e for e in api.events(run["job"]) if e.get("id") not in seen]
        seen.update(e.get("id") for e in new)
        status = job.get("status", "?")
        line = (f"{run['job']}: {status} | {job.get('trained_tokens') or 0:,} trained tokens" +
                (f" | {shorten(new[-1].get('message', ''), 160)}" if new else ""))
        if new or status != last:
            log(line)
        if status != last:
            save(status=status)
        last = status
        if status == "succeeded":
            name = job.get("fine_tuned_model")
            if not name:
                raise ValueError(f"job {run['job']} succeeded but named no fine_tuned_model: {json.dumps(job)[:200]}")
            save(fine_tuned_model=name, trained_tokens=job.get("trained_tokens"))
            return name
        if status in FT_DONE:
            err = job.get("error") or {}
            msg = shorten(err.get("message") or (new[-1].get("message") if new else "") or "no message", 300)
            save(error=msg)
            raise ValueError(f"fine-tuning job {run['job']} {status}: {msg}" +
                             (f" ({err['param']})" if err.get("param") else "") + "; fix it and rerun")
        sleep(poll)


# ----------------------------------------------------------------------------------------------------------------
# finetune-api: check, estimate, then upload, fine-tune and follow the job


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


def finetune_api(cfg: FinetuneAPIConfig) -> str:
    """Check the file, print the estimate, then (unless --dry-run) upload, fine-tune and follow the job; resumable.
    Evaluate the result with `python fireact.py eval --teacher-model ft:... --zero-shot`."""
    train = cfg.files[0]
    checks = [check_chat_file(f, cfg.base_model) for f in [train] + ([cfg.validation] if cfg.validation else [])]
    est = estimate(checks[0], cfg.base_model, cfg.epochs)
    usd = f"${est['usd']:,.2f} at ${est['price']:g} per 1M" if est["usd"] is not None else \
        f"no price known for {cfg.base_model} (priced: {', '.join(FT_PRICES)})"
    print(f"{train}: {est['examples']:,} examples, {est['file_tokens']:,} tokens ({checks[0]['tokenizer']}) x "
          f"{est['epochs']} epochs{'' if cfg.epochs else ' (auto)'} = {est['trained_tokens']:,} trained tokens; "
          f"estimated training cost {usd}")
    for w in [w for c in checks for w in c["warnings"]]:
        print(f"note: {w}")
    if cfg.dry_run:
        return ""
    api = FineTuneAPI(cfg.base_url or None, cfg.api_key_env, timeout=cfg.timeout, max_retries=cfg.retries)
    try:
        name = finetune(api, train, cfg.base_model, cfg.validation, cfg.epochs, cfg.suffix, cfg.poll)
    except APIError as e:  # one line with the server's message (cli.run prints ValueErrors so)
        raise ValueError(f"{e}; a rerun resumes from {finetune_state_path(train)}") from None
    print(f"fine-tuned model: {name}\nevaluate it: python fireact.py eval --teacher-model {name} --zero-shot" +
          (f" --base-url {cfg.base_url}" if cfg.base_url else ""))
    return name


COMMANDS = {"export-data": (ExportDataConfig, export_data,
                            "trajectories -> a fine-tuning file (openai chat, alpaca, sharegpt)"),
            "finetune-api": (FinetuneAPIConfig, finetune_api, "fine-tune an API model (FireAct's GPT-3.5 student)")}

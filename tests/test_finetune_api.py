"""Tests for extras/finetune_api.py: the local check of a chat fine-tuning file, the cost estimate, and the
files/jobs client with its resumable state, against the loopback server of tests/test_tools.py.
Run: python -m pytest -q tests/test_finetune_api.py"""
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import extras.finetune_api as F  # noqa: E402
from common.net import APIError  # noqa: E402
from test_tools import KEY, serve  # noqa: E402  (the loopback server with injected faults)


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning through the API: the local file check, the estimate, the files/jobs client and its resumable state


def chat_rows(n, **extra):
    return [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": "Thought: t\nAction: finish[a]"}], **extra} for i in range(n)]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("edit,error", [
    (lambda rows: rows.__setitem__(3, "{oops"), "f.jsonl:4: invalid JSON"),
    (lambda rows: rows[1]["messages"][1].update(role="tool"), "f.jsonl:2: messages[1]: role 'tool' is not one of"),
    (lambda rows: rows[0]["messages"][0].pop("content"), "f.jsonl:1: messages[0]: 'content' must be a string"),
    (lambda rows: rows[0]["messages"][0].update(extra=1), "f.jsonl:1: messages[0]: unknown key 'extra'"),
    (lambda rows: rows[4]["messages"].append({"role": "system", "content": "s"}), "f.jsonl:5: messages[2]: a system message must come first"),
    (lambda rows: rows[2]["messages"].pop(), "f.jsonl:3: no non-empty assistant message"),
    (lambda rows: rows[2]["messages"][1].update(weight=2), "f.jsonl:3: messages[1]: 'weight' must be 0 or 1"),
    (lambda rows: rows[6]["messages"][0].update(content="word " * 20000), "f.jsonl:7: 2"),  # ~25k tokens
    (lambda rows: rows.__delitem__(slice(1, None)), "1 examples; the API needs at least 10"),
    (lambda rows: rows.insert(5, {"prompt": "p", "completion": "c"}), "f.jsonl:6: expected {\"messages\": [...]}"),
])
def test_check_chat_file_errors_name_file_and_line(tmp_path, edit, error):
    rows = chat_rows(12)
    edit(rows)
    path = tmp_path / "f.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    with pytest.raises(ValueError) as e:
        F.check_chat_file(path, "gpt-3.5-turbo")
    assert error in str(e.value) and "\n" not in str(e.value)
    if "2" == error[-1]:
        assert "over gpt-3.5-turbo's 16,385 a training example" in str(e.value)
        assert F.check_chat_file(path, "gpt-4o-mini")["examples"] == 12  # 65,536 for gpt-4o-mini


def test_check_chat_file_counts_tokens_and_warns(tmp_path, monkeypatch):
    rows = chat_rows(12)
    rows[3]["messages"].append({"role": "user", "content": "Observation: Episode finished, reward = True"})
    path = write_rows(tmp_path / "f.jsonl", rows)
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # no tokenizer package: the 4-characters estimate
    monkeypatch.setitem(sys.modules, "bpe_openai", None)
    c = F.check_chat_file(path)
    assert c["tokenizer"].startswith("estimated at 4 characters")
    # cookbook counting: 3 per example + per message 3 + role + content, at ceil(characters / 4) here
    assert c["tokens"][0] == 3 + (3 + 1 + 3) + (3 + 3 + 7)  # user, 'question 0'; assistant, 28 characters
    assert c["tokens"][3] == c["tokens"][0] + 3 + 1 + 11
    (w,) = c["warnings"]
    assert w.startswith("1 of 12 examples end with a user message") and "f.jsonl:4" in w
    e = F.estimate(c, "gpt-3.5-turbo")
    assert (e["epochs"], e["trained_tokens"], e["price"]) == (9, 9 * sum(c["tokens"]), 8.0)  # auto: 100 passes
    assert e["usd"] == pytest.approx(e["trained_tokens"] * 8 / 1e6)
    assert F.estimate(c, "gpt-4o-mini-2024-07-18", epochs=2)["price"] == 3.0
    assert F.estimate(c, "davinci-002")["usd"] is None
    assert [F.auto_epochs(n) for n in (10, 34, 2063, 8333, 10000, 100000)] == [10, 3, 3, 3, 2, 1]


def ft_app(state):
    """OpenAI's files and fine-tuning endpoints, in-process: jobs go running -> succeeded (or failed)."""
    def app(method, path, raw):
        path = path.split("?")[0]
        state["calls"].append((method, path))
        if method == "POST" and path == "/v1/files":
            boundary = raw.split(b"\r\n", 1)[0]
            parts = {re.search(rb'name="(\w+)"', p).group(1).decode(): p.split(b"\r\n\r\n", 1)[1][:-2]
                     for p in raw.split(boundary)[1:-1]}
            state["uploads"].append(parts)
            return 200, {"id": f"file-{len(state['uploads'])}", "status": "uploaded"}
        if path.startswith("/v1/files/"):
            state["file_looks"] += 1
            return 200, {"id": path.rsplit("/", 1)[1], "status": "processed" if state["file_looks"] > 1 else "pending"}
        if method == "POST" and path == "/v1/fine_tuning/jobs":
            body = json.loads(raw)
            job = dict(id=f"ftjob-{len(state['jobs'])}", status="running", trained_tokens=None, **body)
            state["jobs"].append(job)
            return 200, job
        if path == "/v1/fine_tuning/jobs":
            return 200, {"data": state["jobs"]}
        job = next(j for j in state["jobs"] if j["id"] == path.split("/")[4])
        if path.endswith("/events"):
            return 200, {"data": [{"id": f"ev-{k}", "created_at": k, "message": f"Step {k}/2"} for k in (2, 1)]}
        job.update(status=state["end"], trained_tokens=99, fine_tuned_model="ft:m:org::x" if state["end"] == "succeeded" else None,
                   error={"message": "Quota exceeded."} if state["end"] == "failed" else None)
        return 200, job
    return app


def test_finetune_uploads_follows_and_resumes(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", chat_rows(10))
    val = write_rows(tmp_path / "val.jsonl", chat_rows(10))
    state = dict(calls=[], uploads=[], jobs=[], file_looks=0, end="succeeded")
    lines = []
    with serve(ft_app(state), faults=[("status", 503)]) as srv:  # the first upload gets a 503 and is retried
        api = F.FineTuneAPI(srv.url + "/v1", timeout=5, max_retries=2, sleep=lambda s: None)
        assert F.finetune(api, train, "gpt-4o-mini", val, epochs=3, suffix="fa", poll=0.01,
                              sleep=lambda s: None, log=lines.append) == "ft:m:org::x"
        assert [u["purpose"] for u in state["uploads"]] == [b"fine-tune"] * 2
        assert state["uploads"][0]["file"] == train.read_bytes() and state["uploads"][1]["file"] == val.read_bytes()
        first, retry = srv.log[0]["body"], srv.log[1]["body"]  # the 503'd upload, then its retry: all resent
        assert train.read_bytes() in first and len(first) == len(retry) and state["uploads"][0] != {}
        (job,) = state["jobs"]
        assert (job["training_file"], job["validation_file"], job["hyperparameters"], job["suffix"], job["model"]) == \
            ("file-1", "file-2", {"n_epochs": 3}, "fa", "gpt-4o-mini")
        assert lines[-1] == "ftjob-0: succeeded | 99 trained tokens | Step 2/2"  # events oldest first: the latest
        assert all(h["headers"]["Authorization"] == f"Bearer {KEY}" for h in srv.log)
        saved = json.loads((tmp_path / "train.jsonl.finetune.json").read_text())
        (run,) = saved.values()
        assert run["fine_tuned_model"] == "ft:m:org::x" and run["job"] == "ftjob-0" and KEY not in json.dumps(saved)
        n = len(state["calls"])
        assert F.finetune(api, train, "gpt-4o-mini", val, epochs=3, log=lines.append) == "ft:m:org::x"
        assert len(state["calls"]) == n  # resumed from the state file: no request at all
        # another base model is another run: new uploads and job. A crash after the job was created and before
        # the state recorded it: the rerun finds that job in the server's list instead of paying again
        state["end"] = "running-forever"
        key_free = lambda: json.loads((tmp_path / "train.jsonl.finetune.json").read_text())
        with pytest.raises(RuntimeError):
            F.finetune(api, train, "gpt-3.5-turbo", poll=0.01, log=lines.append,
                           sleep=lambda s: (_ for _ in ()).throw(RuntimeError("crash")))
        st = key_free()
        run35 = next(r for r in st.values() if r["base_model"] == "gpt-3.5-turbo")
        assert run35["job"] == "ftjob-1" and len(state["jobs"]) == 2
        run35["job"] = None
        (tmp_path / "train.jsonl.finetune.json").write_text(json.dumps(st))
        state["end"] = "failed"
        with pytest.raises(ValueError, match=r"^fine-tuning job ftjob-1 failed: Quota exceeded\.; fix it and rerun$"):
            F.finetune(api, train, "gpt-3.5-turbo", poll=0.01, sleep=lambda s: None, log=lines.append)
        assert "found job ftjob-1" in lines and len(state["jobs"]) == 2 and len(state["uploads"]) == 3


def test_finetune_api_errors_are_one_line_with_the_servers_message(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", chat_rows(10))
    bad = {"error": {"message": "Invalid file format. Example 3: messages must not be empty.", "type": "invalid_request_error"}}
    with serve(ft_app(dict(calls=[], uploads=[], jobs=[], file_looks=0, end="succeeded")),
               faults=[("status", 400, {}, bad), ("status", 429, {}, {"error": {"message": "You exceeded your quota."}})] * 3) as srv:
        api = F.FineTuneAPI(srv.url + "/v1", timeout=5, max_retries=0)
        with pytest.raises(APIError) as e:
            api.upload(train)
        assert str(e.value) == (f"fine-tune: 400 Bad Request from {srv.url}/v1/files: Invalid file format. Example 3: "
                                f"messages must not be empty.")
        with pytest.raises(APIError, match="You exceeded your quota") as e:
            api.create_job("file-1", "gpt-3.5-turbo")
        assert "\n" not in str(e.value) and KEY not in str(e.value)
    with pytest.raises(ValueError, match="set the environment variable NOPE"):
        F.FineTuneAPI(api_key_env="NOPE")

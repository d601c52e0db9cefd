"""
Benchmarks for tools.py and common/net.py: LocalWiki and SnippetSearch index build time and search latency over
the HotpotQA corpus, and the teacher client's reliability against a local server that fails a share of requests
transiently.

    python bench/tools.py                      # both
    python bench/tools.py --what search        # search latency only
    python bench/tools.py --what teacher --requests 1000 --fail-rate 0.3 --workers 16

Search: the corpus is built from ../shared/data/hotpotqa/dev_distractor.jsonl (9,366 paragraphs) into a temp dir;
each query runs `tool.fork().step("search[...]")` as the agent would, for both offline tools (`local`: a page's first
sentences; `snippet`: one Google-like passage). Three query sets: exact titles (title index), the HotpotQA questions
as free text (BM25 path), and titles with one typo (BM25, mostly misses of the title index).
Teacher: N distinct chat requests through `run_concurrently` to the loopback OpenAI server of tests/test_tools.py,
which fails each attempt with probability --fail-rate (500/503/429/dropped connection/malformed JSON).
"""
import dataclasses
import importlib.util
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import cli, net  # noqa: E402
import tools  # noqa: E402


@dataclasses.dataclass
class BenchConfig:
    what: str = "all"  # all | search | teacher
    hotpot: str = str(ROOT.parent / "shared" / "data" / "hotpotqa" / "dev_distractor.jsonl")
    queries: int = 1000  # per query set
    requests: int = 1000  # teacher requests
    fail_rate: float = 0.3
    workers: int = 16
    max_retries: int = 10
    backoff: float = 0.05  # seconds; the local server has no real overload to back off from
    seed: int = 0


def percentiles(times_s):
    ms = np.array(times_s) * 1000
    return f"median {np.median(ms):.3f} ms  p95 {np.percentile(ms, 95):.3f} ms  max {ms.max():.2f} ms"


def bench_search(cfg, tmp):
    path = Path(cfg.hotpot)
    if not path.exists():
        print(f"search: {path} absent, skipped")
        return
    t0 = time.perf_counter()
    n = tools.build_corpus([path], tmp / "corpus.jsonl")
    t1 = time.perf_counter()
    wiki = tools.LocalWiki(tmp / "corpus.jsonl")
    t2 = time.perf_counter()
    snip = tools.SnippetSearch(tmp / "corpus.jsonl")
    t3 = time.perf_counter()
    print(f"corpus: {n} paragraphs; build {t1 - t0:.2f} s")
    print(f"local   load + index {t2 - t1:.2f} s ({len(wiki.bm25.vocab)} terms, {len(wiki.bm25.post_w)} postings, "
          f"{wiki.bm25.n} pages)")
    print(f"snippet load + index {t3 - t2:.2f} s ({len(snip.bm25.vocab)} terms, {len(snip.bm25.post_w)} postings, "
          f"{snip.bm25.n} windows)")
    rng = random.Random(cfg.seed)
    questions = [json.loads(line)["question"] for line in path.open()]

    def typo(t):
        i = rng.randrange(len(t))
        return t[:i] + "x" + t[i + 1:]

    sets = {"exact title": rng.choices(wiki.titles, k=cfg.queries),
            "free-text question": rng.choices(questions, k=cfg.queries),
            "title with a typo": [typo(t) for t in rng.choices(wiki.titles, k=cfg.queries)]}
    for tool in (wiki, snip):
        everything = []
        for name, queries in sets.items():
            times, how = [], {}
            for q in queries:
                episode = tool.fork()
                s = time.perf_counter()
                episode.step(f"search[{q}]")
                times.append(time.perf_counter() - s)
                how[episode.last_search["how"]] = how.get(episode.last_search["how"], 0) + 1
            everything += times
            print(f"{tool.name:7s} search {name:20s} n={len(times)}: {percentiles(times)}  answered by {how}")
        print(f"{tool.name:7s} search {'all':20s} n={len(everything)}: {percentiles(everything)}  "
              f"(target: median < 5 ms) {'OK' if np.median(everything) < 0.005 else 'MISSED'}")


def bench_teacher(cfg, tmp):
    spec = importlib.util.spec_from_file_location("test_tools", ROOT / "tests" / "test_tools.py")
    tt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tt)  # the loopback servers live with the tests; one implementation
    prompts = [f"question {i}" for i in range(cfg.requests)]
    with tt.serve(tt.openai_app, fail_rate=cfg.fail_rate, seed=cfg.seed) as srv:
        for run in ("first run", "rerun (cached)"):
            teacher = tools.Teacher("bench", base_url=srv.url + "/v1", api_key_env=None, timeout=5,
                                    max_retries=cfg.max_retries, backoff=cfg.backoff, cache_dir=tmp / "cache",
                                    seed=cfg.seed)
            ask = lambda p: teacher.chat([{"role": "user", "content": p}])
            sent, t0 = len(srv.log), time.perf_counter()
            results = list(net.run_concurrently(ask, prompts, workers=cfg.workers))
            wall = time.perf_counter() - t0
            ok = sum(r == f"echo: {p}" for p, r in results)
            errors = [r for _, r in results if isinstance(r, Exception)]
            entries = sorted(tmp.joinpath("cache").rglob("*.json"))
            keys = {json.loads(e.read_text())["request"]["json"]["messages"][0]["content"] for e in entries}
            print(f"teacher {run}: {ok}/{len(prompts)} answered correctly, {len(errors)} errors; "
                  f"HTTP attempts {len(srv.log) - sent}, retries {teacher.usage['retries']}, "
                  f"cached {teacher.usage['cached']}; cache entries {len(entries)} for {len(keys)} distinct "
                  f"requests (duplicates: {len(entries) - len(keys)}); wall {wall:.2f} s "
                  f"({cfg.workers} workers, fail rate {cfg.fail_rate}, backoff {cfg.backoff} s)")
            for e in errors[:3]:
                print("  error:", e)


def main():
    cfg = cli.parse_config(BenchConfig, description=__doc__.split("\n\n")[0])
    logging.getLogger("fireact.net").setLevel(logging.ERROR)  # hundreds of expected retry warnings
    if cfg.what not in ("all", "search", "teacher"):
        raise SystemExit(f"--what must be all, search or teacher, got {cfg.what!r}")
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.what in ("all", "search"):
            bench_search(cfg, Path(tmp))
        if cfg.what in ("all", "teacher"):
            bench_teacher(cfg, Path(tmp))


if __name__ == "__main__":
    main()

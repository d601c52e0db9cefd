"""Replay FireAct's own agents' search queries through the offline snippet tool (issue 32, section 3).

    python bench/replay_queries.py                      # FireAct's three released HotpotQA runs (../shared/data)
    python bench/replay_queries.py --trajs FILE ...     # other results files in FireAct's trajs schema

FireAct's released eval runs (`fireact/trajs/*.json`, keyed by HotpotQA dev index) hold each episode's searches
and the Google (SerpAPI) snippet it got back. On the questions that are also among the 957 offline ones
(`hotpotqa_offline`, whose paragraphs make the offline corpus), each `search[query]` is sent as it is to
`tools.SnippetSearch` over that corpus, and both observations are checked for the gold answer the way
`score --breakdown` does ("seen": the normalised gold occurs as whole words in the normalised observation;
yes/no golds are left out, as there). Per search: how often Google's snippet held the gold, how often ours does.
Also: how many of FireAct's HotpotQA *training* observations are short answer-box strings (< 40 characters),
and how many of our snippet tool's observations on the same queries are.

A benchmark, not a test: it needs ../shared/data (or FIREACT_DATA) and builds the corpus index (~1 min on a CPU).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tasks  # noqa: E402
import tools  # noqa: E402


def seen(gold: str, obs) -> bool:
    g = tasks.normalize_answer(gold)
    return bool(g) and f" {g} " in f" {tasks.normalize_answer(obs or '')} "


def searches(steps):
    for s in steps:
        parsed = tools.parse_action((s.get("action") or "").strip())
        if parsed and parsed[0] == "search" and parsed[1]:
            yield parsed[1], s.get("observation")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trajs", nargs="*", default=None, help="FireAct-schema results files (default: its 3 runs)")
    args = ap.parse_args(argv)
    trajs = args.trajs or sorted(str(p) for p in (tasks.data_dir() / "fireact" / "trajs").glob("*.json"))
    offline = {q["id"]: q for q in tasks.load_questions("hotpotqa_offline", "dev")}
    t0 = time.time()
    tool = tools.SnippetSearch(tasks.corpus_path("hotpotqa_offline"))
    print(f"snippet tool over {len(tool.titles)} pages, {len(tool.texts)} windows ({time.time() - t0:.0f} s)")
    print(f"{'run':<34}{'shared q':>9}{'searches':>9}{'google hit %':>13}{'snippet hit %':>14}"
          f"{'q: google %':>12}{'q: snippet %':>13}")
    for path in trajs:
        rows = {r["id"]: r for r in tasks.read_results(Path(path))}
        shared = [k for k in rows if k in offline and tasks.normalize_answer(offline[k]["answer"]) not in ("yes", "no")]
        n = g_hit = o_hit = 0
        q_g = q_o = 0
        for k in shared:
            gold = offline[k]["answer"]
            any_g = any_o = False
            for query, obs in searches(rows[k]["steps"]):
                ours = tool.fork().step(f"search[{query}]")
                n += 1
                g_hit += seen(gold, obs)
                o_hit += seen(gold, ours)
                any_g |= seen(gold, obs)
                any_o |= seen(gold, ours)
            q_g, q_o = q_g + any_g, q_o + any_o
        name = Path(path).name
        label = "gpt-3.5 (ft)" if "gpt-3.5" in name else name.split("_lora_")[-1].split("-d_")[0]
        pct = lambda a, b: 100 * a / max(1, b)  # noqa: E731
        print(f"{label:<34}{len(shared):>9}{n:>9}{pct(g_hit, n):>13.1f}{pct(o_hit, n):>14.1f}"
              f"{pct(q_g, len(shared)):>12.1f}{pct(q_o, len(shared)):>13.1f}")
        all_shared = [k for k in rows if k in offline]
        print(f"{'':<34}({len(all_shared)} of its {len(rows)} entries are offline questions; "
              f"{len(all_shared) - len(shared)} with a yes/no gold left out)")
    # the remaining difference: FireAct's training observations vs ours
    ft = tasks.data_dir() / "fireact" / "finetune" / "alpaca_format" / "hotpotqa.json"
    if ft.exists():
        obs = [s["observation"] for r in tasks.read_records(ft) for s in r["steps"]
               if s.get("observation") is not None and not tasks.is_finish(s["action"])]
        short = sum(len(o) < 40 for o in obs)
        queries = [q for r in tasks.read_records(ft) for q, _ in searches(r["steps"])]
        ours = [tool.fork().step(f"search[{q}]") for q in queries]
        print(f"FireAct's hotpotqa training data: {short} of {len(obs)} observations ({100 * short / len(obs):.1f}%) "
              f"are under 40 characters (answer-box strings); our snippet tool on the same {len(queries)} queries: "
              f"{sum(len(o) < 40 for o in ours)} ({100 * sum(len(o) < 40 for o in ours) / len(ours):.1f}%)")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

"""Batched agent evaluation vs the same episodes run one at a time, with the embedded model (SmolLM2-135M).

    python bench/eval.py                       # 64 toy dev episodes (else the offline HotpotQA subset)
    python bench/eval.py --n 16 --max-steps 2 --max-new-tokens 24
    python bench/eval.py --prompt few-shot --versus unshared --n 20   # the prompted eval: shared prefix on/off
    python bench/eval.py --adapter runs/exp/train/chosen --versus unmerged --max-new-tokens 128   # the fine-tuned
                                               # eval: LoRA merged into the weights (what eval does) vs kept apart

Both runs use fireact.run_agent with greedy decoding without re-sampling, so they do the same work and must give
the same episodes. Batched: all live episodes advance together through one generate call per step (the fast
path's, fast.for_inference, as eval's default).
Sequential: one episode at a time. Unshared: batched, but each row attends to its own copy of the prompt prefix
the rows share (the few-shot examples) instead of one copy for all (fast/decode.py's shared prefix). Unmerged:
batched, with --adapter's LoRA as a term of its own in each projection instead of merged into the weights. Last
line: `eval speedup vs sequential: X.XXx` (or `vs unshared`, `vs unmerged`).
"""
import sys
import time
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from common import cli  # noqa: E402
import fast.cpu  # noqa: E402
import fast.decode  # noqa: E402
import fireact  # noqa: E402
import model as M  # noqa: E402
import tasks  # noqa: E402


@dataclass
class BenchConfig:
    n: int = 64
    max_steps: int = 3
    max_new_tokens: int = 32
    task: str = ""        # "" = toy if data/toy exists, else hotpotqa_offline
    model: str = ""       # "" = the embedded SmolLM2-135M-Instruct
    prompt: Literal["zero-shot", "few-shot"] = "zero-shot"  # zero-shot: the student's layout; few-shot: the prompted eval's examples
    versus: Literal["sequential", "unshared", "unmerged"] = "sequential"  # the reference run: one episode at a time, batched with the shared prefix attended per row, or batched with --adapter unmerged
    adapter: str = ""     # LoRA adapter dir: the fine-tuned eval (zero-shot prompt in the adapter's template), merged as eval does


def main(argv=None):
    cfg = cli.parse_config(BenchConfig, argv, description=__doc__.split("\n\n")[0])
    task = cfg.task or ("toy" if (fireact.REPO / "data" / "toy" / "dev.jsonl").exists() else "hotpotqa_offline")
    qs = tasks.load_questions(task, n=cfg.n)
    tool = tasks.make_tool(task)
    if cfg.versus == "unmerged" and not cfg.adapter:
        raise SystemExit("--versus unmerged: give --adapter DIR (the LoRA to keep apart)")
    net, tok = M.load_model(cfg.model or None)
    fast.for_inference(net)                                           # as eval does: the swaps, then the adapter
    if cfg.adapter:
        M.load_adapter(net, cfg.adapter, merge=True)
    t = tasks.get_task(task)
    prompt_fn = fireact.student_prompt(tok, cfg.prompt == "zero-shot" or bool(cfg.adapter),
                                       fireact.adapter_training(cfg.adapter).get("template", "react"), t, t.tool)
    print(fast.cpu.cpu_report(), flush=True)

    def run(batch):
        llm = fireact.LocalLLM(net, tok, fast.decode.Generator(), cfg.max_new_tokens)  # a fresh prefix cache a run
        eps = fireact.run_agent(llm, [tool.fork() for _ in batch], batch, prompt_fn, cfg.max_steps, retries=0)
        return eps, llm.usage

    run(qs[:2])  # warm-up (allocator, kernels)
    t0 = time.time()
    batched, usage = run(qs)
    t_batched = time.time() - t0
    print(f"batched:    {t_batched:8.1f} s  ({len(qs) / t_batched * 60:.1f} episodes/min)", flush=True)
    t0 = time.time()
    if cfg.versus == "sequential":
        ref = [run([q])[0][0] for q in qs]
    elif cfg.versus == "unmerged":
        M.unmerge_lora(net)
        ref = run(qs)[0]
        M.merge_lora(net)
    else:
        shared_min, fast.decode.SHARED_PREFIX_MIN = fast.decode.SHARED_PREFIX_MIN, 10**9  # each row: its own copy
        try:
            ref = run(qs)[0]
        finally:
            fast.decode.SHARED_PREFIX_MIN = shared_min
    t_ref = time.time() - t0
    same = sum((a.steps, a.pred) == (b.steps, b.pred) for a, b in zip(batched, ref))
    steps = sum(len(e.steps) for e in batched)
    print(f"task {task}, {'fine-tuned (' + cfg.adapter + ')' if cfg.adapter else cfg.prompt + ' prompt'}: {len(qs)} episodes, {steps} steps, {usage['completion_tokens']} "
          f"generated tokens, max_steps {cfg.max_steps}, max_new_tokens {cfg.max_new_tokens}, "
          f"{torch.get_num_threads()} threads")
    print(f"{cfg.versus + ':':11s} {t_ref:8.1f} s  ({len(qs) / t_ref * 60:.1f} episodes/min)")
    print(f"identical episodes: {same}/{len(qs)} (greedy; batched rows may differ by float rounding)")
    print(f"eval speedup vs {cfg.versus}: {t_ref / t_batched:.2f}x")


if __name__ == "__main__":
    main()

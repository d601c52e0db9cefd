"""Batched agent evaluation vs the same episodes run one at a time, with the embedded model (SmolLM2-135M).

    python bench/eval.py                       # 64 toy dev episodes (else the offline HotpotQA subset)
    python bench/eval.py --n 16 --max-steps 2 --max-new-tokens 24

Both runs use fireact.run_agent with the zero-shot prompt (fireact.render) and greedy decoding without re-sampling,
so they do the same work and must give the same episodes. Batched: all live episodes advance together through
one model.generate call per step. Sequential: one episode at a time. Last line: `eval speedup vs sequential: X.XXx`.
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cli  # noqa: E402
import fireact  # noqa: E402
import model as M  # noqa: E402


@dataclass
class BenchConfig:
    n: int = 64
    max_steps: int = 3
    max_new_tokens: int = 32
    task: str = ""        # "" = toy if data/toy exists, else hotpotqa_offline
    model: str = ""       # "" = the embedded SmolLM2-135M-Instruct


def main(argv=None):
    cfg = cli.parse_config(BenchConfig, argv, description=__doc__.split("\n\n")[0])
    task = cfg.task or ("toy" if (fireact.REPO / "data" / "toy" / "dev.jsonl").exists() else "hotpotqa_offline")
    qs = fireact.load_questions(task, n=cfg.n)
    tool = fireact.make_tool(task)
    net, tok = M.load_model(cfg.model or None)
    prompt_fn = fireact.zero_shot(tok)

    def run(batch):
        llm = fireact.LocalLLM(net, tok, cfg.max_new_tokens)
        eps = fireact.run_agent(llm, [tool.fork() for _ in batch], batch, prompt_fn, cfg.max_steps, retries=0)
        return eps, llm.usage

    run(qs[:2])  # warm-up (allocator, kernels)
    t0 = time.time()
    batched, usage = run(qs)
    t_batched = time.time() - t0
    print(f"batched:    {t_batched:8.1f} s  ({len(qs) / t_batched * 60:.1f} episodes/min)", flush=True)
    t0 = time.time()
    single = [run([q])[0][0] for q in qs]
    t_seq = time.time() - t0
    same = sum((a.steps, a.pred) == (b.steps, b.pred) for a, b in zip(batched, single))
    steps = sum(len(e.steps) for e in batched)
    print(f"task {task}: {len(qs)} episodes, {steps} steps, {usage['completion_tokens']} generated tokens, "
          f"max_steps {cfg.max_steps}, max_new_tokens {cfg.max_new_tokens}, {M.torch.get_num_threads()} threads")
    print(f"sequential: {t_seq:8.1f} s  ({len(qs) / t_seq * 60:.1f} episodes/min)")
    print(f"identical episodes: {same}/{len(qs)} (greedy; batched rows may differ by float rounding)")
    print(f"eval speedup vs sequential: {t_seq / t_batched:.2f}x")


if __name__ == "__main__":
    main()

"""
Our LoRA training step vs transformers + PEFT, on the SmolLM2-135M shape (random weights), same data, same LoRA
targets and rank, in the same run. Each side runs in its own fresh subprocess so peak memory is its own.

    python bench/train.py                      # ours as `python train.py` runs here: bf16 base where native, compiled
                                               # (batch 4 x 512, ~half the tokens masked, 3 timed steps each)
    python bench/train.py --steps 5 --threads 2 --targets q_proj,v_proj --r 8
    python bench/train.py --compile 0          # ours eager (train.py --no-compile)
    python bench/train.py --dtype float32      # ours with an fp32 base (the default where bf16 is emulated)
    python bench/train.py --dropout 0 --compile 1   # LoRA dropout off on both sides; ours as train.py --compile
    python bench/train.py --compile 1 --quant int8  # ours as train.py --compile --quant int8 (VNNI CPUs)
    python bench/train.py --plain 1            # ours as train.py --plain: the teaching path (fp32 on CPU, eager)

Ours is train.py's own step: its loss, and (unless --plain 1) the fast path train.py applies (fast/training.py:
the precision policy, attention kernel, dropout, int8, compiled loss). It prints the CPU, what it has and the path
ours takes (fast.cpu.cpu_report), and two baselines: transformers+PEFT
in float32 and in bfloat16 (transformers' best setting depends on the CPU: bf16 wins only with native bf16
matmuls; on a CPU without them, AVX2 only, the bf16 baseline is skipped with a line saying so). Last line:
`train speedup vs transformers+peft: X.XXx` (tokens/s ours / the faster baseline's).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=2)


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS every 5 ms in a thread: the peak above the baseline = training memory."""
    def __enter__(self):
        self.base, self.peak, self.stop = rss(), rss(), False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()
        return self

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *a):
        self.stop = True
        self.t.join()


def make_batch(B, T, vocab, seed=0):
    """Random tokens; the mask alternates trained spans and masked 'observation' spans of random length, about
    half of each, like agent data. -> ids [B, T], mask [B, T] (1 = trained target)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        t, on = 0, 0
        while t < T:
            n = int(torch.randint(16, 96, (1,), generator=g))
            mask[b, t:t + n] = on
            t, on = t + n, 1 - on
    mask[:, 0] = 0
    if not mask[:, 1:].any():  # the loss would be 0/0 (NaN) on both sides: nothing to time
        raise SystemExit(f"--batch {B} --seq {T}: no trained token in the batch (the first masked span can be up "
                         "to 95 tokens); use a longer --seq")
    return ids, mask


def worker(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    targets = args.targets.split(",")
    ids, mask = make_batch(args.batch, args.seq, SMOLLM2_135M["vocab_size"])
    if args.worker == "ours":
        import model as M
        import train as T
        from fast import cpu, training
        cfg = T.TrainConfig(dtype=args.dtype, quant=args.quant, compile=bool(args.compile), plain=bool(args.plain))
        dtype = M.pick_dtype(args.dtype, "cpu") if cfg.plain else cpu.best_dtype(args.dtype, "cpu", train=True)
        model = M.load_checkpoint(args.dir, dtype=dtype)
        M.apply_lora(model, tuple(targets), r=args.r, alpha=2 * args.r, dropout=args.dropout)
        autocast = T.mixed_precision(model, dtype, "cpu")
        y = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
        y = torch.cat([y, torch.full((args.batch, 1), -100)], 1)       # y[:, t] = target for position t
        n_sup = int((y != -100).sum())
        loss_sum = T.loss_sum
        if not cfg.plain:   # train.py's fast path; int8 smoothing from the batch, the loss compiled under --compile 1
            loss_sum = training.for_training(model, cfg, autocast, [(ids, y)], T.loss_sum, T.head_loss,
                                             log=lambda *a: None)

        def step():
            with autocast:
                return loss_sum(model, ids, y) / n_sup
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM
        dtype = torch.bfloat16 if args.worker == "hf-bf16" else torch.float32  # PEFT keeps LoRA weights fp32
        model = LlamaForCausalLM.from_pretrained(args.dir, dtype=dtype, attn_implementation="sdpa")
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
        labels = torch.where(mask.bool(), ids, -100)                    # HF shifts labels itself

        def step():
            return model(input_ids=ids, labels=labels).loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    with PeakRSS() as mem:
        for i in range(args.steps + 1):                                   # step 0 is warm-up, not timed
            t0 = time.perf_counter()
            loss = step()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t0)
            else:
                first = time.perf_counter() - t0                          # the warm-up (and the compile)
            losses.append(loss.item())
    tok = args.batch * args.seq
    res = {"tok_s": tok / (sum(times) / len(times)), "best_tok_s": tok / min(times),
           "peak_mb": (mem.peak - mem.base) / 2**20, "rss_mb": mem.peak / 2**20, "first_s": first,
           "loss0": losses[0], "trainable": sum(p.numel() for p in params)}
    if args.profile:  # the limit: this CPU's matmul peak in the base's dtype, and where one step's time goes
        from limits import matmul_peak, top_ops

        def one_step():
            step().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        res["profile"] = top_ops(one_step, rows=args.profile)
        res["peak_flops"], res["peak_dtype"] = matmul_peak(dtype), str(dtype)
    print(json.dumps(res))


def share_of_peak(res, args):
    """Each side's useful matmul work per second (the same FLOPs for both: fast.training.train_flops of this step)
    as a share of the peak its worker measured, then its profile."""
    import model as M
    from fast.training import train_flops
    from limits import share_line
    with torch.device("meta"):
        net = M.Llama(M.ModelConfig.from_hf(SMOLLM2_135M))
    ids, mask = make_batch(args.batch, args.seq, SMOLLM2_135M["vocab_size"])
    flops = train_flops(net, args.batch * args.seq, int(mask[:, 1:].sum()), args.seq)
    for name, r in res.items():
        print(share_line(f"{name} step", flops, args.batch * args.seq / r["tok_s"], r["peak_flops"],
                         r["peak_dtype"]) + "; its costliest ops (one step, torch.profiler):\n" + r["profile"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--r", type=int, default=16)
    import train as T
    p.add_argument("--dropout", type=float, default=T.TrainConfig.lora_dropout,
                   help="LoRA dropout, both sides (default: train.py's)")
    p.add_argument("--compile", type=int, default=-1, choices=[-1, 0, 1], help="ours: torch.compile the loss, as "
                   "train.py --compile (the warm-up step, not timed, compiles); -1 = train.py's default for a run of "
                   "the demo's length (fast.training.auto_compile)")
    p.add_argument("--hf-bf16", type=int, default=1, choices=[0, 1, 2], help="also time transformers+PEFT with a "
                   "bfloat16 base: 1 where the CPU has native bf16, 2 even where it is emulated")
    p.add_argument("--dtype", default="", choices=["", "float32", "bfloat16"],
                   help="ours: the frozen base's dtype; empty = train.py's choice (bfloat16 where the CPU has native "
                        "bf16, else float32)")
    p.add_argument("--quant", default="", choices=["", "int8"], help="ours: train.py --quant (int8 frozen matmuls)")
    p.add_argument("--plain", type=int, default=0, help="ours: train.py --plain (the teaching path, no fast/*)")
    p.add_argument("--profile", type=int, default=8, help="after timing: each side's share of this CPU's matmul "
                   "peak, and a torch.profiler table of its N costliest ops (0 = off)")
    p.add_argument("--worker", choices=["ours", "hf", "hf-bf16"])
    p.add_argument("--dir")
    args = p.parse_args()
    if args.compile == -1:  # what `python train.py` does on this machine for a long run (the demo: 130+ steps)
        from fast import training
        args.compile = int(not args.plain and training.auto_compile(T.TrainConfig(), torch.device("cpu"),
                                                                      training.COMPILE_MIN_STEPS, log=lambda *a: None))
    if args.worker:
        return worker(args)
    from transformers import LlamaConfig, LlamaForCausalLM
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(d)
        import model as M
        from fast import cpu
        dtype = M.pick_dtype(args.dtype, "cpu") if args.plain else cpu.best_dtype(args.dtype, "cpu", train=True)
        report = cpu.cpu_report(dtype, quant=args.quant, train=True)
        print(report.replace("path: ", "training path (ours" + (", --plain" if args.plain else "") + "): ")
              + ("; decoder blocks and loss compiled" if args.compile else "; eager"), flush=True)
        print(f"SmolLM2-135M shape, random weights; batch {args.batch}x{args.seq}, LoRA r={args.r} on "
              f"{args.targets}; {args.steps} timed steps, {args.threads} threads")
        res = {}
        hf_bf16 = args.hf_bf16 == 2 or (args.hf_bf16 == 1 and cpu.native_bf16())
        if args.hf_bf16 == 1 and not hf_bf16:   # an hour of emulated bf16 that no user would pick on this CPU
            print("transformers+peft bf16: skipped: this CPU has no native bf16 (emulated, many times slower than "
                  "fp32); --hf-bf16 2 runs it anyway", flush=True)
        for name in ("hf", "hf-bf16", "ours") if hf_bf16 else ("hf", "ours"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", name, "--dir", d]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            res[name] = json.loads(out.stdout.strip().splitlines()[-1])
            r = res[name]
            label = {"hf": "transformers+peft fp32", "hf-bf16": "transformers+peft bf16"}.get(name, "ours (train.py)")
            print(f"{label:23s} {r['tok_s']:8.1f} tokens/s (best step {r['best_tok_s']:.1f}), peak training memory "
                  f"{r['peak_mb']:.0f} MB above the loaded model (process peak RSS {r['rss_mb']:.0f} MB), "
                  f"first loss {r['loss0']:.4f}, {r['trainable']:,} trainable; first step (not timed) {r['first_s']:.0f} s",
                  flush=True)
    if args.profile:
        share_of_peak(res, args)
    base = [k for k in res if k != "ours"]
    best = max(base, key=lambda k: res[k]["tok_s"])
    print("ours vs each: " + ", ".join(f"{res['ours']['tok_s'] / res[k]['tok_s']:.2f}x vs {k}" for k in base)
          + f"; best baseline: {best}")
    print(f"peak memory ours / theirs ({best}): {res['ours']['peak_mb'] / res[best]['peak_mb']:.2f}")
    print(f"train speedup vs transformers+peft: {res['ours']['tok_s'] / res[best]['tok_s']:.2f}x")


if __name__ == "__main__":
    main()

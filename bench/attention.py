"""
CPU training's causal attention, one layer forward + backward: ours (fast.attention.causal_attention: SDPA's forward, a
blocked flash backward) vs F.scaled_dot_product_attention, which transformers runs (attn_implementation="sdpa").
SmolLM2-135M's heads (9 query, 3 kv, 64 wide), random inputs, the same tensors for both, interleaved.

    python bench/attention.py                          # batch 4, T = 256 512 640 768 896, bf16 and fp32
    python bench/attention.py --seq 512 --dtype bfloat16 --threads 2

train.py takes ours only where it won here (bf16, T <= fast.attention.ATTN_MAX_T); the last line is the ratio at T = 512
in bf16, the bench/train.py shape: `attention fwd+bwd speedup vs sdpa: X.XXx`.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast import attention, cpu  # noqa: E402
from generate import timed  # noqa: E402  (best of N, the two interleaved: the benches' one timer)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, nargs="+", default=[256, 512, 640, 768, 896])
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu.cpu_report(train=True).split("; path")[0] + f"; {args.threads} threads, batch {args.batch}, 9/3 heads x 64")
    ratio = {}
    for T in args.seq:
        for name in args.dtype:
            dt = getattr(torch, name)
            g = torch.Generator().manual_seed(0)
            q = torch.randn(args.batch, T, 9, 64, generator=g).to(dt).transpose(1, 2).requires_grad_()  # as after rope
            k, v = (torch.randn(args.batch, 3, T, 64, generator=g).to(dt).requires_grad_() for _ in range(2))
            do = torch.randn(args.batch, 9, T, 64, generator=g).to(dt)
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(do)
            ours = lambda: attention.causal_attention(q, k, v)[0].backward(do)
            sdpa(), ours()                                              # warm-up
            s, o = (1000 * t for t in timed([sdpa, ours], args.reps)[0])  # ms, best of --reps each
            ratio[T, name] = s / o
            used = "ours" if name == "bfloat16" and T <= attention.ATTN_MAX_T else "sdpa"
            print(f"T={T:5d} {name:8s}: sdpa {s:7.1f} ms, ours {o:7.1f} ms, {s / o:.2f}x   (train.py takes {used})")
    if (512, "bfloat16") in ratio:
        print(f"attention fwd+bwd speedup vs sdpa: {ratio[512, 'bfloat16']:.2f}x")


if __name__ == "__main__":
    main()

"""
How close a bench is to what this CPU can do: the measured peak of a plain matmul, and where a step's time goes.
Shared by bench/train.py and bench/generate.py (issue 35: "close to the limit, shown").

    from limits import matmul_peak, top_ops
    peak = matmul_peak(torch.bfloat16)            # FLOP/s of a large torch.mm, this dtype, this thread count
    print(top_ops(lambda: step(), rows=8))        # a torch.profiler table of the ops that took the time
"""
import time

import torch


def matmul_peak(dtype=torch.float32, n: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of a plain square `torch.mm` (n x n x n) in `dtype` at the current thread count: the best of
    repeated runs for about `seconds`. The denominator of a bench's 'share of peak': what this CPU's GEMM reaches
    with the libraries torch ships, measured in the same process and under the same ISA holds as the bench."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool, the library's packing buffers
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def share_line(name: str, flops: float, seconds: float, peak: float, dtype) -> str:
    """One line: achieved GFLOP/s of `flops` work in `seconds`, and its share of the measured matmul peak."""
    dt = str(dtype).removeprefix("torch.")
    return (f"{name}: {flops / seconds / 1e9:.1f} GFLOP/s of model matmul work = {flops / seconds / peak:.0%} of "
            f"this CPU's measured {dt} matmul peak ({peak / 1e9:.1f} GFLOP/s, torch.mm 2048^3, "
            f"{torch.get_num_threads()} threads)")


def top_ops(fn, rows: int = 8) -> str:
    """Run fn once under torch.profiler (CPU) -> a table of the `rows` ops with the most self time, plus a line
    for the rest: where a step's time goes besides the GEMMs."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    lines = [f"  {'op':42s} {'self ms':>9s} {'share':>6s} {'calls':>6s}"]
    for e in events[:rows]:
        lines.append(f"  {e.key[:42]:42s} {e.self_cpu_time_total / 1e3:9.1f} {e.self_cpu_time_total / total:6.1%} "
                     f"{e.count:6d}")
    rest = sum(e.self_cpu_time_total for e in events[rows:])
    lines.append(f"  {'(all other ops: ' + str(max(0, len(events) - rows)) + ')':42s} {rest / 1e3:9.1f} "
                 f"{rest / total:6.1%}")
    return "\n".join(lines)

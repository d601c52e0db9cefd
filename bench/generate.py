"""
Generation speed (ours vs transformers `generate`) and checkpoint-loading peak memory, on the SmolLM2-135M shape
with random weights. Same prompts, same greedy token count, same process, interleaved runs.

    python bench/generate.py                          # batch 1 and 8, 64 new tokens
    python bench/generate.py --new-tokens 32 --repeats 1 --layers 30 --hf-bf16 0
    python bench/generate.py --quant int4 --memory 0  # ours with 4-bit layer weights (batch 1 is where it wins)
    python bench/generate.py --compile 1 --memory 0   # ours with its decode steps compiled (compile time apart)
    python bench/generate.py --dtype float32 --memory 0    # ours in fp32 (the default where bf16 is not native)
    python bench/generate.py --memory-dir ~/.cache/fireact/SmolLM2-135M-Instruct   # the load of a real checkpoint
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/generate.py
                                                      # an AVX2-only CPU, simulated (the first line says so)

Its first line is the CPU, what it has (and what an ISA hold leaves it) and the path ours takes
(fast.cpu.cpu_report). Two baselines: transformers in float32 and in bfloat16 (its best setting depends on the CPU: bf16 wins only with
native bf16 matmuls). The last line reads `generate speedup vs transformers: X.XXx` (batch 8), against the faster of the two baselines.
"""
import subprocess, sys, tempfile, time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fast  # noqa: E402
import model as M  # noqa: E402
from fast.cpu import best_dtype, cpu_report  # noqa: E402
from common import cli  # noqa: E402


@dataclass
class BenchConfig:
    new_tokens: int = 64      # tokens generated per prompt (eos disabled so both generate exactly this many)
    prompt_min: int = 48      # prompt lengths vary in [prompt_min, prompt_max] so batch 8 exercises left padding
    prompt_max: int = 128
    repeats: int = 3          # best of N interleaved timed runs (the CPU is shared: take the least disturbed)
    layers: int = 30
    threads: int = 1          # torch threads for both (0 = torch default). 1: on a shared 2-core CPU, 2 threads
                              # per process oversubscribe the cores and both sides mostly spin-wait
    memory: int = 1           # measure peak RSS while loading the checkpoint (fresh subprocesses)
    memory_dir: str = ""      # measure the load of this checkpoint folder instead (e.g. ~/.cache/fireact/
                              # SmolLM2-135M-Instruct, the embedded model), then stop
    speed: int = 1            # measure generation speed
    hf_bf16: int = 1          # also time transformers in bfloat16 (the second baseline)
    fast: int = 1             # ours with its fast path (fast.for_inference); 0 = model.generate, the plain path
    quant: str = ""           # int4: ours decodes through 4-bit layer weights (fast.quantize). The random weights
                              # here are not on a 4-bit grid, so its greedy rows may differ: a speed figure only
    dtype: str = ""           # ours' weights: "" = what eval / ask / serve pick (fast.cpu.best_dtype: bf16 where the CPU
                              # has native bf16, else float32), or float32 / bfloat16
    profile: int = 8          # after timing: ours' share of this CPU's matmul peak at batch 8, and a torch.profiler
                              # table of its N costliest ops (0 = off)
    compile: int = 0          # 1: ours compiles its decode step (fast.decode.CompiledDecode: fp32 any batch, weights
                              # frozen; int4 one row); the compile happens in the warm-up, printed apart, not timed


class NoEosTokenizer:
    """Just what generate() needs; no eos so every row runs the full budget, like transformers with min_new_tokens."""
    eos_ids, pad_id, add_bos = set(), 0, False

    def decode(self, ids):
        return " ".join(map(str, ids))


def smollm2_checkpoint(d: Path, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def timed(fns, repeats):
    """Best-of-`repeats` seconds for each fn, interleaved so both see the same (shared, noisy) CPU."""
    best, outs = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best, outs


def bench_batch(ours, generate, refs, prompts, c: BenchConfig):
    """-> (ours' seconds, {baseline name: its seconds}) for one batch of prompts."""
    from transformers import GenerationConfig
    B, L = len(prompts), max(map(len, prompts))
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding for transformers too
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1

    def run_ref(ref, n=c.new_tokens):
        g = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            return ref.generate(input_ids=ids, attention_mask=mask, generation_config=g)[:, L:].tolist()

    def run_ours(n=c.new_tokens):
        return generate(ours, NoEosTokenizer(), prompts, max_new_tokens=n)

    names = list(refs)
    fns = [run_ours] + [lambda r=refs[k]: run_ref(r) for k in names]
    t = time.perf_counter()
    run_ours(2), [run_ref(r, 2) for r in refs.values()]  # warm-up (allocator, thread pool, weight packing)
    if getattr(generate, "compiled", None) is not None:
        print(f"batch {B}: warm-up, compiling if this shape needs it, took {time.perf_counter() - t:.0f} s (not in "
              "the timed runs)", flush=True)
    times, outs = timed(fns, c.repeats)
    n = B * c.new_tokens
    line = f"batch {B}: ours {n / times[0]:7.1f} tok/s"
    for k, t, o in zip(names, times[1:], outs[1:]):
        same = sum(a == " ".join(map(str, b)) for a, b in zip(outs[0], o))
        line += f"  transformers {k} {n / t:7.1f} tok/s ({t / times[0]:.2f}x, identical greedy rows {same}/{B})"
    print(line, flush=True)
    return times[0], dict(zip(names, times[1:]))


def report(B, t_ours, t_refs):
    """The ratio against each baseline, and against the faster one (transformers' best setting here)."""
    best = min(t_refs, key=t_refs.get)
    print(f"batch {B} speedup: " + ", ".join(f"{t / t_ours:.2f}x vs transformers {k}" for k, t in t_refs.items())
          + f"; best baseline: {best}", flush=True)
    return t_refs[best] / t_ours


LOAD_SNIPPET = """
import re, sys, torch
sys.path.insert(0, {root!r})
def status(key):  # VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
def rss(): return status("VmRSS")
before, anon = rss(), status("RssAnon")
if {hf}:
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM.from_pretrained({d!r}, dtype=torch.float32)
else:
    import model as M
    m = M.load_checkpoint({d!r})
peak = status("VmHWM")
print(before, peak, status("RssAnon") - anon)
"""


def load_memory(d: Path, hf: bool):
    """A fresh process loading the checkpoint: (RSS before the load, peak RSS, anonymous memory the load added),
    bytes. Peak RSS counts the file's pages a load maps and touches (shared with the page cache, evictable);
    anonymous memory is what the load holds privately (a copy of the weights, a converted copy)."""
    root = str(Path(__file__).resolve().parent.parent)
    code = LOAD_SNIPPET.format(root=root, hf=hf, d=str(d))
    if hf:  # import transformers before measuring `before`, as `model` is imported before for ours
        code = code.replace("before, anon =", "import transformers.models.llama.modeling_llama\nbefore, anon =")
    else:
        code = code.replace("before, anon =", "import model as M\nbefore, anon =")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), int(out[1]), int(out[2])


def print_load_memory(d: Path, weights: int):
    for name, hf in (("ours", False), ("transformers", True)):
        before, peak, anon = load_memory(d, hf)
        print(f"load peak RSS ({name}): {peak / 2**20:.0f} MiB total, +{(peak - before) / 2**20:.0f} MiB "
              f"for the load = {(peak - before) / weights:.2f}x the weights ({peak / weights:.2f}x incl. "
              f"the {before / 2**20:.0f} MiB interpreter+torch baseline); anonymous memory +{anon / 2**20:.0f} MiB "
              f"= {anon / weights:.2f}x", flush=True)


def decode_limits(ours, generate, prompts, seconds, dtype, c: BenchConfig):
    """Ours at batch 8: its matmul work per second as a share of this CPU's measured matmul peak (same dtype and
    threads), then where one generate call's time goes (torch.profiler)."""
    from limits import matmul_peak, share_line, top_ops
    cfg = ours.config
    n_head = cfg.vocab_size * cfg.hidden_size
    n_body = sum(p.numel() for n, p in ours.named_parameters() if "embed" not in n and "lm_head" not in n)
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim  # scores + values, per token per key
    flops = 0
    for p in prompts:  # prefill: every prompt token through the body; the head at the last; then each new token
        L = len(p)
        flops += 2 * n_body * L + attn * L * (L + 1) / 2 + 2 * n_head
        flops += sum(2 * n_body + 2 * n_head + attn * (L + i) for i in range(1, c.new_tokens))
    print(share_line("ours, batch 8 (prefill + decode)", flops, seconds, matmul_peak(dtype), dtype)
          + "; its costliest ops (one generate call, torch.profiler):", flush=True)
    print(top_ops(lambda: generate(ours, NoEosTokenizer(), prompts, max_new_tokens=c.new_tokens), rows=c.profile),
          flush=True)


def main(argv=None):
    c = cli.parse_config(BenchConfig, argv, description=__doc__)
    if c.threads:
        torch.set_num_threads(c.threads)
    dtype = best_dtype(c.dtype, "cpu") if c.fast else M.pick_dtype(c.dtype, "cpu")
    if not c.fast and (c.quant or c.compile):
        raise SystemExit("--quant and --compile are fast-path options (not with --fast 0)")
    # first line: the CPU, what it has (and any ISA hold: ONEDNN_MAX_CPU_ISA, ...) and the path ours takes
    print(cpu_report(dtype, quant=c.quant, compiled=bool(c.compile)) if c.fast
          else f"path: {c.dtype}, model.generate (--fast 0)", flush=True)
    if c.memory_dir:
        d = Path(c.memory_dir).expanduser()
        weights = sum(f.stat().st_size for f in M.checkpoint_files(d))
        print(f"{d}: {weights / 2**20:.0f} MiB of safetensors", flush=True)
        return print_load_memory(d, weights)
    from transformers import LlamaForCausalLM
    with tempfile.TemporaryDirectory() as tmp:
        d = smollm2_checkpoint(Path(tmp), c.layers)
        weights = (d / "model.safetensors").stat().st_size
        print(f"SmolLM2-135M shape ({c.layers} layers), random weights, {weights / 2**20:.0f} MiB float32, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
        if c.memory:
            print_load_memory(d, weights)
        if not c.speed:
            return
        ours = M.load_checkpoint(d, dtype=dtype)
        # no prefix cache: each timed run prefills its prompts, as transformers does
        generate = fast.for_inference(ours, c.quant, bool(c.compile), prefix_cache_mb=0) if c.fast else M.generate
        refs = {"float32": LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()}
        if c.hf_bf16:
            refs["bfloat16"] = LlamaForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(c.prompt_min, c.prompt_max + 1, (8,), generator=g).tolist()
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths]
    report(1, *bench_batch(ours, generate, refs, prompts[:1], c))
    t8, refs8 = bench_batch(ours, generate, refs, prompts, c)
    speedup = report(8, t8, refs8)
    if c.profile:
        decode_limits(ours, generate, prompts, t8, dtype, c)
    print(f"generate speedup vs transformers: {speedup:.2f}x")


if __name__ == "__main__":
    main()

"""
The speed layer: swaps and wrappers the entry points apply where the hardware has them, never the model itself.
Each gives model.py's results (greedy tokens; tests compare them) sooner. `--plain` skips all of it.

    import model as M, fast
    net, tok = M.load_model()
    generate = fast.for_inference(net)               # instead of M.generate: same signature, same tokens
    print(generate(net, tok, ["<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"])[0])

    cpu.py        what this CPU runs natively; cpu_report; best_dtype (bf16 where it is native)
    linear.py     oneDNN-prepacked and int4 linears (pack), the fast LoRA dropout (swap_dropout)
    attention.py  shared-prefix attention, bf16 decode attention, causal attention with a blocked backward
    decode.py     Generator: prefix cache, shared prompt prefix, growing cache, KV budget, compiled decode
    training.py   int8 frozen GEMMs, the compiled loss, MFU (train.py's fast path)
"""
import sys

from fast.attention import swap_attention
from fast.decode import CompiledDecode, Generator
from fast.linear import pack, refresh_packs


def quantize(model, quant: str):
    """--quant: pack the decoder layers' weights to 4 bits (fast.linear) and say on stderr what it cost them."""
    if quant:
        refresh_packs(pack(model, True, quant))
        packs = [p[1] for m in model.model.layers.modules() if getattr(m, "quant", "") for p in m.packs.values()]
        err = (sum(p[2] for p in packs) / sum(p[3] for p in packs)) ** 0.5  # relative RMS error of their weights
        print(f"quant: {quant}, relative RMS error of the layers' weights {err:.1e}"
              + (" (they were on a 4-bit grid already)" if err < 5e-3 else ""), file=sys.stderr)
    return model


def for_inference(model, quant: str = "", compile: bool = False, prefix_cache_mb: int = 2048) -> Generator:
    """The inference options eval, ask, serve and `model.py` share, in their one order: the attention kernels,
    prepacked linears, --quant (4-bit layers), then --compile (the decode step, which reads those packs).
    -> a Generator: call it as model.generate (it keeps a prefix cache of prefix_cache_mb between calls)."""
    swap_attention(model)
    pack(model, True)
    quantize(model, quant)
    return Generator(prefix_cache_mb, CompiledDecode(model) if compile else None)

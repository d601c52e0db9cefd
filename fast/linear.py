"""
Inference linears the way this CPU runs them fastest, as swaps: the frozen weights prepacked for oneDNN (fp32, and
bf16 where it is native), q/k/v and gate/up fused into one matmul each, or packed to 4 bits (int4, --quant). The
model's own classes never mention them: pack(model) gives its Attention, MLP and head these subclasses.

    from fast import linear
    linear.pack(model)                  # packed at the first inference call; pack(model, False) goes back to F.linear
    linear.pack(model, quant="int4")    # the decoder layers' linears through 4-bit weights (head, norms stay fp32)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M
from fast.cpu import INT4, INT4_GROUP, ONEDNN, ONEDNN_BF16, PACKED_FP32_ANY_ROWS, PACKED_MAX_ROWS  # noqa: F401


def use_packed(mod, x) -> bool:
    """Whether `mod` (with a `packs` dict, None = off) runs x through packed weights: fp32 CPU inference (bf16
    too on CPUs with native bf16; no autograd: training keeps F.linear) with few rows (decode), or with any
    number of rows (prefill too) in fp32 where the CPU has AVX-512."""
    if torch.compiler.is_compiling() and not mod.quant:
        return False  # oneDNN's packed weights are opaque to the compiler; inductor plans fp32 linears itself
    return (mod.packs is not None and (ONEDNN or mod.quant) and x.device.type == "cpu"
            and (x.dtype == torch.float32 or x.dtype == torch.bfloat16 and (mod.quant or ONEDNN_BF16))
            and not torch.is_grad_enabled() and (x.numel() <= PACKED_MAX_ROWS * x.shape[-1]
                                                 or PACKED_FP32_ANY_ROWS and x.dtype == torch.float32 and not mod.quant))

def fast_linear(mod, name, mods, x) -> list:
    """x through the Linear modules `mods` as ONE matmul: their weights concatenated along the outputs (bitwise
    the same as separate matmuls: each output is its own dot product) and packed once, kept in mod.packs[name]:
    reordered into oneDNN's blocked layout, as inductor's freezing pass does (MKL's sgemm re-packs the weight on
    every call, which at a few rows costs as much as the arithmetic), or with mod.quant == "int4" quantised to
    4 bits (int4_pack). -> one output per module. The pack is rebuilt when a weight is replaced or changed in
    place (LoRA merge/unmerge bump its version); an unmerged LoRA adds its own low-rank term, in fp32."""
    p = mod.packs.get(name)
    if torch.compiler.is_compiling():  # traced: the packs were checked before the call (refresh_packs)
        key = p[0]
    else:
        key = pack_key(mods)
    if p is None or p[0] != key:
        with torch.no_grad():
            w = torch.cat([m.weight for m in mods]) if len(mods) > 1 else mods[0].weight
            bias = [getattr(m, "bias", None) for m in mods]
            b = None if all(t is None for t in bias) else torch.cat(
                [t if t is not None else w.new_zeros(m.weight.shape[0]) for t, m in zip(bias, mods)])
            packed = int4_pack(w) if mod.quant == "int4" else torch.ops.mkldnn._reorder_linear_weight(w)
            p = mod.packs[name] = (key, packed, b, [m.weight.shape[0] for m in mods], mods)
    if mod.quant == "int4":  # the kernel takes bf16 activations (with fp32 ones it falls back to a path ~15x slower)
        q, sz = p[1][:2]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), q,
                                                        INT4_GROUP, sz).to(x.dtype).view(*x.shape[:-1], -1)
        y = y if p[2] is None else y + p[2]
    else:
        y = torch.ops.mkldnn._linear_pointwise(x, p[1], p[2], "none", [], "")
    ys = y.split(p[3], -1) if len(mods) > 1 else (y,)
    return [m.add_lora(x, y) if isinstance(m, M.LoRALinear) and not m.merged else y for m, y in zip(mods, ys)]

def weights_key(tensors) -> tuple:  # which tensors (a pack's weights, a frozen graph's parameters), and their
    return tuple((t.data_ptr(), t._version) for t in tensors)  # in-place version (LoRA merge/unmerge bump it)

def pack_key(mods) -> tuple:  # which weights a pack was made from
    return weights_key(m.weight for m in mods)

def refresh_packs(model):
    """Pack the 4-bit weights that are not packed yet or changed since (LoRA merge/unmerge): one eager decode
    step, whose fast_linear calls do it. The compiled decode step reads the packs as they are, so the Generator
    calls this before it; fast.quantize calls it to pack every layer up front."""
    mods = [m for m in model.modules() if getattr(m, "quant", "") and m.packs is not None]
    if any(not m.packs or any(p[0] != pack_key(p[4]) for p in m.packs.values()) for m in mods):
        with torch.no_grad():
            model.hidden(torch.zeros(1, 1, dtype=torch.long, device=model.device), cache=model.new_cache(1, 1))

@torch.no_grad()
def int4_pack(w: torch.Tensor):
    """w [out, in] -> (packed codes for torch's CPU int4 kernel, scales and zeros [in/32, out, 2] bf16, squared
    error of the weights it represents, squared norm of w). Asymmetric 4-bit codes, one (scale, min) per 32 inputs:
    GGUF Q4_1's layout. A weight dequantised from Q4_1 lies on that grid (Q4_1 maps a block's min and max to
    codes 0 and 15, so min and max give back its scale), and only the bf16 rounding of scale and zero is lost;
    any other weight is rounded to 16 levels per block. The kernel computes w = (code - 8) * scale + zero."""
    n, k = w.shape
    wg = w.float().reshape(n, k // INT4_GROUP, INT4_GROUP)                        # [out, in/32, 32]
    lo, hi = wg.amin(-1), wg.amax(-1)                                              # [out, in/32]
    scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    sz = torch.stack([scale, lo + 8 * scale], -1).to(torch.bfloat16)               # [out, in/32, 2]
    s, z = sz[..., :1].float(), sz[..., 1:].float()                                # rounded: code with them
    codes = ((wg - z) / s + 8).round().clamp(0, 15)                                # [out, in/32, 32] in 0..15
    deq = (codes - 8) * s + z
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).reshape(n, k), 2)
    return packed, sz.transpose(0, 1).contiguous(), float((deq - wg).pow(2).sum()), float(wg.pow(2).sum())


def swap_class(module, mixin):
    """Give `module` the subclass (mixin, its class): litgpt's way of changing a layer without touching the model's
    code. Idempotent; swaps compose (fast.attention's mixin and these)."""
    cls = type(module)
    if not issubclass(cls, mixin):
        key = (mixin, cls)
        if key not in _SWAPPED:
            _SWAPPED[key] = type(mixin.__name__ + cls.__name__, (mixin, cls), {})
        module.__class__ = _SWAPPED[key]
    return module

_SWAPPED = {}

class PackedAttention:
    """Attention whose q, k, v run as one prepacked matmul (bitwise three) and o prepacked, when use_packed."""
    def forward(self, x, cos, sin, mask, cache):
        if not use_packed(self, x):
            return super().forward(x, cos, sin, mask, cache)
        B, T, _ = x.shape
        q, k, v = fast_linear(self, "qkv", (self.q_proj, self.k_proj, self.v_proj), x)
        q = q.view(B, T, self.nh, self.hd).transpose(1, 2)                 # [B, nh, T, hd]
        k = k.view(B, T, self.nkv, self.hd).transpose(1, 2)                # [B, nkv, T, hd]
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        if self.q_norm is not None:  # Qwen3, as model.Attention.forward
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = M.rope(q, cos, sin), M.rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.idx, k, v)                            # [B, nkv, S, hd]
        y = self.attend(q, k, v, mask, cache).transpose(1, 2).reshape(B, T, self.nh * self.hd)
        # o decides on its own input: under autocast the attention hands it bf16, which an fp32 pack cannot take
        return fast_linear(self, "o", (self.o_proj,), y)[0] if use_packed(self, y) else self.o_proj(y)

class PackedMLP:
    """The MLP with gate and up as one prepacked matmul, down prepacked, when use_packed."""
    def forward(self, x):
        if not use_packed(self, x):
            return super().forward(x)
        g, u = fast_linear(self, "gate_up", (self.gate_proj, self.up_proj), x)
        return fast_linear(self, "down", (self.down_proj,), F.silu(g) * u)[0]

class PackedHead:
    """The Llama whose LM head runs prepacked (always fp32 weights: the head is never quantised)."""
    def head(self, h):
        if not use_packed(self, h):
            return super().head(h)
        lin = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return fast_linear(self, "head", (lin,), h)[0]

def pack(model, on: bool = True, quant: str = ""):
    """Inference linears through prepacked weights where it wins (on), or plain F.linear (off: bitwise what
    training computes; frees the packed copies). quant="int4": the decoder layers' linears decode through 4-bit
    weights (int4_pack; bf16 activations), the head kept fp32; prefill stays fp32. -> model."""
    if quant not in ("", "int4"):
        raise ValueError(f"--quant {quant}: choose int4 (or nothing: fp32)")
    if quant:
        if not INT4:
            raise ValueError(f"--quant {quant}: this torch ({torch.__version__}) has no CPU int4 kernel "
                             "(aten._weight_int4pack_mm_for_cpu); use fp32")
        if model.device.type != "cpu":
            raise ValueError(f"--quant {quant}: the int4 kernel is CPU only (this model is on {model.device})")
        bad = [(n, m.in_features) for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)
               and m.in_features % INT4_GROUP]
        if bad:
            raise ValueError(f"--quant {quant}: layers.{bad[0][0]} has {bad[0][1]} inputs, not a multiple of "
                             f"the {INT4_GROUP}-input group")
    swaps = ((M.Attention, PackedAttention), (M.MLP, PackedMLP), (M.Llama, PackedHead))
    for m in model.modules():
        for mixin in [mixin for cls, mixin in swaps if isinstance(m, cls)]:
            swap_class(m, mixin)
            m.packs = {} if on else None  # name -> (key, packed weight, bias, output sizes, modules); None = off
            m.quant = quant if on and m is not model else ""
    return model

# ----------------------------------------------------------------------------------------------------------------
# LoRA dropout for CPU training

def dropout(x, p):
    """Inverted dropout, as F.dropout. On CPU, F.dropout draws one random number per element, and those draws
    were 15% of a LoRA training step (210 masks of [B, T, D] per step on SmolLM2). Here one 64-bit draw gives
    four 16-bit uniforms (p exact to 1/65536): 2.5x cheaper. torch.where keeps only the bool mask for backward."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # compiled: inductor fuses F.dropout's draws
        return F.dropout(x, p)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # full 64-bit range
    keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= round(p * 65536) - 32768  # P(keep) = 1 - p
    return torch.where(keep, x, 0.0) * (1 / (1 - p))

class Dropout(nn.Module):
    """nn.Dropout through dropout() above: swap_dropout puts it in every LoRA layer (train.py's fast path)."""
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return dropout(x, self.p) if self.training and self.p > 0 else x

def swap_dropout(model):
    """Each LoRA layer's nn.Dropout -> Dropout (the same rate; a different, cheaper random stream). -> model."""
    for _, m in M.lora_layers(model):
        if isinstance(m.lora_dropout, nn.Dropout):
            m.lora_dropout = Dropout(m.lora_dropout.p)
    return model

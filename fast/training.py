"""
The training speed paths, as swaps train.py applies unless --plain: the precision policy (a bf16 frozen base where
the CPU has native bf16), fast attention and cheap dropout masks, int8 SmoothQuant frozen GEMMs (--quant int8), the
loss compiled by region (--compile), and MFU. Speed layer: imports common and core (model), never train.py (the
loss functions are passed in).

    from fast import training
    dtype = training.precision(cfg, device)                     # before the model loads: checks --compile/--quant
    loss = training.for_training(model, cfg, autocast, calib, train.loss_sum, train.head_loss)
    mfu = training.mfu_meter(model, device)                     # None where the peak is unknown (CPUs)
"""
import functools

import torch

from fast import attention, cpu, linear
from model import lora_layers


def precision(cfg, device, log=print) -> torch.dtype:
    """The frozen base's dtype for train.py's fast path (cpu.best_dtype: bf16 on CUDA and on CPUs with native bf16,
    else fp32), with the checks that must come before anything loads: a C++ compiler for --compile on CPU, and
    --quant int8's hardware. Logs the CPU line on CPU."""
    if cfg.compile:
        cpu.require_compiler(device.type)
    dtype = cpu.best_dtype(cfg.dtype, device, train=True)
    if cfg.quant and not (device.type == "cpu" and dtype == torch.bfloat16 and cpu.native_bf16()
                          and cpu.cpu_info()["vnni"]):
        raise ValueError(f"--quant int8: for a CPU with VNNI and native bf16, with the bf16 base (--dtype bfloat16 "
                         f"or the default); here: device {device}, base {dtype}")
    if device.type == "cpu":
        log(cpu.cpu_report(dtype, quant=cfg.quant, train=True).replace("path:", "training path:"))
    return dtype


COMPILE_MIN_STEPS = 100  # CPU runs this long repay the compile (~1 min) with faster steps (docs/benchmarks.md)


def auto_compile(cfg, device, steps: int, log=print) -> bool:
    """--compile left unset: on for LoRA runs on CPU of >= COMPILE_MIN_STEPS optimizer steps (cpu.compile_by_default:
    a C++ compiler there); off for short runs, --full and GPUs."""
    if steps < COMPILE_MIN_STEPS or cfg.full or not cpu.compile_by_default(device, f"{steps} steps", log):
        return False
    log(f"compile: on ({steps} steps on CPU repay its ~1 min; --no-compile turns it off)")
    return True


def for_training(model, cfg, autocast, calib, loss_sum, head_loss, log=print):
    """Apply the fast path to a model with LoRA applied (or --full), in place: the attention kernels
    (fast.attention), the cheap LoRA dropout and prepacked frozen weights for validation's no-grad forwards
    (fast.linear; steps keep F.linear), int8 frozen GEMMs smoothed on calib [(x, y)] (--quant int8), and the loss
    compiled by region (--compile). -> the loss function to step and validate with."""
    attention.swap_attention(model)
    linear.swap_dropout(model)
    linear.pack(model, True)
    if cfg.quant:
        worst = calibrate_int8(model, calib, autocast)
        log(f"--quant int8: frozen matmuls in int8, smoothed on {len(calib)} micro-batches (largest input channel "
            f"up to {worst:.0f}x its layer's median)")
    return compile_loss(model, loss_sum, head_loss) if cfg.compile else loss_sum


def compile_loss(model, loss_sum, head_loss):
    """--compile: loss_sum through torch.compile by region. Each decoder block is one graph (compiled in place,
    Module.compile; dynamic: batch shapes vary), compiled once and reused by every block (same code, same
    shapes), and head_loss (the head + cross-entropy) another. One graph of the whole model compiles ~4x longer."""
    for block in model.model.layers:
        block.compile(dynamic=True)
    return functools.partial(loss_sum, head_loss=torch.compile(head_loss, dynamic=True))


# ----------------------------------------------------------------------- int8 frozen matmuls (LoRA training)
# With VNNI, int8 GEMMs run at twice bf16's rate on CPU. LoRA training never needs the frozen weights' own
# gradient, only the input's, so both GEMMs a frozen linear does per step (forward, input gradient) can run in
# int8, as in SwitchBack (Wortsman et al. 2023): activations and output gradients quantized per row (token), the
# weight per output channel. A few input channels carry outliers, so each layer is smoothed first (SmoothQuant,
# Xiao et al. 2022): x / s and W * s, s = absmax(x)^a / absmax(W)^(1-a) per input channel, absmax(x) calibrated on
# the first training batches.

def quantize_rows(x):
    """x [M, K] -> (int8 [M, K], fp32 scale [M, 1]): symmetric, each row's absmax to 127."""
    s = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-8) / 127
    return torch.round(x.float() / s).to(torch.int8), s


class Int8Matmul(torch.autograd.Function):
    """(x / smooth) @ wq^T * ws: x [M, K], wq [N, K] int8 = round(W * smooth / ws), ws [N], smooth [K] -> [M, N]
    in x's dtype. Gradient for x only (W is frozen): dx = ((dy * ws) @ wq) / smooth, also one int8 GEMM."""
    @staticmethod
    def forward(ctx, x, wq, ws, smooth):
        xq, xs = quantize_rows(x.float() / smooth)
        ctx.save_for_backward(wq, ws, smooth)
        return (torch._int_mm(xq, wq.t()) * xs * ws).to(x.dtype)          # int32 [M, N] -> scaled

    @staticmethod
    def backward(ctx, dy):
        wq, ws, smooth = ctx.saved_tensors
        gq, gs = quantize_rows(dy.float() * ws)                           # ws folded into dy's columns
        return (torch._int_mm(gq, wq) * gs / smooth).to(dy.dtype), None, None, None


def int8_linear(x, wq, ws, smooth, bias=None):
    """F.linear's stand-in: x [..., K] -> [..., N] (bf16 activations in and out, the training base's dtype)."""
    y = Int8Matmul.apply(x.to(torch.bfloat16).reshape(-1, x.shape[-1]), wq, ws, smooth)
    y = y.view(*x.shape[:-1], wq.shape[0])
    return y if bias is None else y + bias


class Int8Frozen:
    """The swap for a LoRALinear (linear.swap_class): its frozen part through int8_linear (wq, ws, smooth set by
    quantize_frozen), the LoRA term as before. The same module and parameters: the adapter saves unchanged."""
    def forward(self, x):
        y = int8_linear(x, self.wq, self.ws, self.smooth, self.bias)
        return y if self.merged else self.add_lora(x, y)


@torch.no_grad()
def quantize_frozen(model, x_absmax: dict, alpha=0.5):
    """Give each LoRA layer its int8 frozen weight and the Int8Frozen swap: x_absmax {layer name: [K] per-channel
    absmax of its input}. alpha 0.5 (SmoothQuant's default) splits the outliers between activations and weights."""
    for name, m in lora_layers(model):
        w = m.weight.float()                                                          # [N, K]
        s = x_absmax[name].float().clamp(min=1e-5) ** alpha / w.abs().amax(0).clamp(min=1e-5) ** (1 - alpha)
        wq, ws = quantize_rows(w * s)                                                 # per output channel
        m.wq, m.ws, m.smooth = wq, ws[:, 0], s
        linear.swap_class(m, Int8Frozen)


@torch.no_grad()
def calibrate_int8(model, batches, autocast):
    """--quant int8: each LoRA layer's input absmax per channel over batches [(x, y)] (bf16 forward, hooks),
    then quantize_frozen. -> the largest channel's ratio to the median channel, the worst layer's."""
    amax, hooks = {}, []
    for name, m in lora_layers(model):
        def hook(mod, args, name=name):
            a = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).amax(0)   # [K]
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with autocast:
            for x, _ in batches:
                model.hidden(x)
    finally:
        for h in hooks:
            h.remove()
    quantize_frozen(model, amax)
    return max(float(a.max() / a.median().clamp(min=1e-8)) for a in amax.values())


# ------------------------------------------------------------------------------------------------------ MFU
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
             "L4": 121e12, "A10G": 70e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12,
             "T4": 65e12}


def peak_flops(device):
    """Dense bf16 peak of this GPU by name (None when unknown or on CPU): the denominator of MFU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def train_flops(model, n_tokens, n_sup, seq_len):
    """FLOPs of one LoRA step. Frozen weights need forward (2N) and the input gradient (2N) but no weight
    gradient, so 4N per token, not 6N; the head only runs at supervised tokens; attention scores and values
    cost 4*T*d per token per layer forward and twice that backward (causal halves it)."""
    c = model.config
    n_head = c.vocab_size * c.hidden_size
    n_body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    attn = 6 * c.num_hidden_layers * seq_len * c.num_attention_heads * c.head_dim
    return 4 * n_body * n_tokens + 4 * n_head * n_sup + attn * n_tokens


def mfu_meter(model, device, world=1):
    """-> mfu(n_tokens, n_sup, seq_len, seconds): a step's model FLOPs utilisation over `world` devices, or None
    where the peak is unknown (CPUs, unlisted GPUs)."""
    peak = peak_flops(device)
    if not peak:
        return None
    return lambda n_tok, n_sup, seq, dt: round(train_flops(model, n_tok, n_sup, seq) / dt / (peak * world), 4)

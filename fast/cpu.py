"""
What this CPU runs natively, detected and never assumed, and the precision policy that follows from it. Speed layer.

    from fast import cpu
    print(cpu.cpu_report(torch.float32))                 # cpu: AMD EPYC, ... path: fp32, frozen linears prepacked ...
    dtype = cpu.best_dtype("", "cpu", train=True)        # bf16 where the CPU has native bf16 matmuls, else fp32
"""
import os
import shutil

import torch

import model as M

def require_compiler(device_type: str):
    """torch.compile on CPU builds C++ (inductor, with $CXX or g++): a missing compiler is one clear error up front
    (`--compile` of train.py, eval, ask, serve), not a traceback at the first step."""
    cxx = os.environ.get("CXX", "g++")
    if device_type == "cpu" and not shutil.which(cxx):
        raise ValueError(f"--compile: torch.compile on CPU needs a C++ compiler ({cxx} not found; install g++, or "
                         "set CXX), or leave --compile off")

def cpu_info() -> dict:
    """What this CPU can do, detected, never assumed (machines differ): its name, torch's capability string,
    the ISA extensions that decide the fast path, and whether oneDNN is there."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = val.strip()
                elif key.strip() in ("flags", "Features"):
                    flags = set(val.split())
                    break
    except OSError:  # not Linux: torch's own cpuinfo probes below still answer
        pass
    probe = lambda f: bool(getattr(torch.cpu, f, lambda: False)())
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    return {"name": name or "unknown CPU", "capability": torch.backends.cpu.get_cpu_capability(),
            "avx2": "avx2" in flags or probe("_is_avx2_supported"),
            "avx512": "avx512f" in flags or probe("_is_avx512_supported"),
            "avx512_bf16": "avx512_bf16" in flags or probe("_is_avx512_bf16_supported"),
            "amx_bf16": "amx_bf16" in flags or probe("_is_amx_tile_supported"),
            "vnni": bool({"avx512_vnni", "avx_vnni"} & flags) or probe("_is_vnni_supported"),
            "onednn": onednn, "onednn_bf16": onednn and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}

def native_bf16(info=None) -> bool:
    """bf16 matmuls in hardware (AVX512_BF16 or AMX) through oneDNN. Elsewhere bf16 is emulated: measured on an
    AVX2 EPYC, far slower than fp32, so nothing picks it there."""
    info = info or cpu_info()
    return info["onednn_bf16"] and (info["avx512_bf16"] or info["amx_bf16"])

def cpu_report(dtype=torch.float32, info=None, quant="", train=False, compiled=False) -> str:
    """One line: the CPU, what it has, and the path this process takes on it (inference, or train=True)."""
    info = info or cpu_info()
    isa = [k for k in ("avx2", "avx512", "avx512_bf16", "amx_bf16", "vnni") if info[k]]
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype).removeprefix("torch."))
    emulated = " (EMULATED on this CPU: slower than fp32)" if dtype == torch.bfloat16 and not native_bf16(info) else ""
    if train:
        path = ("bf16 frozen base under autocast, fp32 LoRA/trained weights and AdamW" + emulated
                if dtype == torch.bfloat16 else f"{dt}, F.linear (MKL)")
        if quant:
            path += f"; frozen matmuls as {quant} GEMMs (per-token activations, SmoothQuant-smoothed)"
    elif quant:
        path = (f"{quant} weights (group {INT4_GROUP}, bf16 activations) for the layers' linears at <= "
                f"{PACKED_MAX_ROWS} rows (decode), {dt} head, norms, attention and LoRA; {dt} prefill{emulated}")
    elif dtype == torch.float32:
        path = ("fp32, frozen linears prepacked for oneDNN (decode and prefill: AVX-512)" if PACKED_FP32_ANY_ROWS
                else f"fp32, frozen linears prepacked for oneDNN at <= {PACKED_MAX_ROWS} rows (decode), MKL above"
                if ONEDNN else "fp32, F.linear (no oneDNN in this torch)")
    elif dtype == torch.bfloat16 and ONEDNN and native_bf16(info):
        path = f"bf16 (native), frozen linears prepacked for oneDNN at <= {PACKED_MAX_ROWS} rows (decode), oneDNN above"
    else:
        path = dt + emulated
    if compiled and not train:
        path += ("; one-row decode steps compiled (torch.compile)" if quant else
                 "; decode steps compiled (torch.compile, weights frozen, max-autotune GEMMs)")
    return (f"cpu: {info['name']}, torch capability {info['capability']}, {' '.join(isa) or 'no AVX2'}, "
            f"oneDNN {'yes' if info['onednn'] else 'no'} (bf16 {'native' if native_bf16(info) else 'not native'}); "
            f"path: {path}")

def best_dtype(name: str, device, train: bool = False) -> torch.dtype:
    """--dtype for the fast path: a name, or "" = model.pick_dtype's choice, except training on a CPU with native
    bf16 matmuls (AVX512_BF16 or AMX): there the frozen base is bf16 under autocast (faster, the same scores within
    the gate; docs). Where bf16 is emulated it is far slower, so fp32 stays."""
    if not name and train and torch.device(device).type == "cpu" and native_bf16():
        return torch.bfloat16
    return M.pick_dtype(name, device)

# the packed linears' kernels and row limits on this CPU (fast.linear uses them, cpu_report describes them)
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") \
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_BF16 = ONEDNN and native_bf16()  # bf16 weights packed too (bitwise bf16 F.linear's result, ~2x faster)
PACKED_MAX_ROWS = 16  # oneDNN's prepacked kernel beats MKL's sgemm at decode's few rows on every CPU measured
PACKED_FP32_ANY_ROWS = ONEDNN and cpu_info()["avx512"]  # ... and with AVX-512 at prefill's many rows too
INT4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten,
                                                                          "_convert_weight_to_int4pack_for_cpu")
INT4_GROUP = 32  # inputs per (scale, zero): GGUF Q4_0/Q4_1's block

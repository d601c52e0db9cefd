"""
What this CPU runs natively, detected and never assumed, and the precision policy that follows from it. Speed layer.
ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS / ATEN_CPU_CAPABILITY holds count: held at AVX2, an AVX-512 CPU takes
an AVX2-only CPU's path and cpu_report says so (how the AVX2 kind is measured where none is at hand).

    from fast import cpu
    print(cpu.cpu_report(torch.float32))                 # cpu: AMD EPYC, ... path: fp32, frozen linears prepacked ...
    dtype = cpu.best_dtype("", "cpu")                    # bf16 where the CPU has native bf16 matmuls, else fp32
"""
import os
import shutil

import torch

import model as M

def has_compiler() -> bool:
    """torch.compile on CPU builds C++ (inductor, with $CXX or g++): is that compiler on PATH?"""
    return bool(shutil.which(os.environ.get("CXX", "g++")))

def require_compiler(device_type: str):
    """--compile asked for: a missing compiler is one clear error up front (`--compile` of train.py, eval, ask,
    serve), not a traceback at the first step."""
    if device_type == "cpu" and not has_compiler():
        raise ValueError(f"--compile: torch.compile on CPU needs a C++ compiler ({os.environ.get('CXX', 'g++')} not "
                         "found; install g++, or set CXX), or leave --compile off")

def compile_by_default(device, what: str, log=print) -> bool:
    """The compile half of the policy, for a job long enough to repay it (the caller decides that): on for CPU
    where a C++ compiler is there (one line says so when it is missing), off on GPUs and MPS (not measured there
    as a default)."""
    if torch.device(device).type != "cpu":
        return False
    if not has_compiler():
        log(f"compile: off ({what} would repay it, but no C++ compiler was found; install g++)")
        return False
    return True

# Holding the libraries below the CPU (to simulate an AVX2-only CPU on an AVX-512 one, issue 35): each variable
# -> its values -> the highest ISA level it leaves, 0 below AVX2, 1 AVX2, 2 AVX-512, 3 + VNNI, 4 + BF16, 5 + AMX.
ISA_LEVELS = ("below AVX2", "AVX2", "AVX-512", "AVX-512 VNNI", "AVX-512 BF16", "AMX")
ISA_HOLDS = {
    "ONEDNN_MAX_CPU_ISA": {"SSE41": 0, "AVX": 0, "AVX2": 1, "AVX2_VNNI": 1, "AVX2_VNNI_2": 1, "AVX512_CORE": 2,
                           "AVX512_CORE_VNNI": 3, "AVX512_CORE_BF16": 4, "AVX512_CORE_FP16": 4, "AVX10_1_512": 4},
    "DNNL_MAX_CPU_ISA": None,  # oneDNN's older name: the same values
    "MKL_ENABLE_INSTRUCTIONS": {"SSE4_2": 0, "AVX": 0, "AVX2": 1, "AVX2_E1": 1, "AVX512": 2, "AVX512_E1": 3,
                                "AVX512_E2": 3, "AVX512_E3": 4},
    "ATEN_CPU_CAPABILITY": {"default": 0, "avx2": 1, "avx512": 2}}

def isa_hold() -> tuple[int, list[str]]:
    """(the highest ISA level the libraries may use, ['VAR=value' that hold it]). Any value not listed (ALL,
    AVX512_CORE_AMX, unset) holds nothing. The lowest hold wins for every flag: the variables are set together to
    simulate a CPU (bench/*.py, docs/benchmarks.md), and a process held by one of them runs that CPU's kernels there."""
    level, by = len(ISA_LEVELS) - 1, {}
    for var, values in ISA_HOLDS.items():
        val = os.environ.get(var, "").strip()
        values = values or ISA_HOLDS["ONEDNN_MAX_CPU_ISA"]
        lvl = values.get(val.lower() if var == "ATEN_CPU_CAPABILITY" else val.upper())
        if lvl is not None:
            by[var] = (lvl, val)
            level = min(level, lvl)
    return level, [f"{v}={val}" for v, (lvl, val) in by.items() if lvl == level]

def cpu_info() -> dict:
    """What this CPU can do, detected, never assumed (machines differ): its name, torch's capability string,
    the ISA extensions that decide the fast path, and whether oneDNN is there. Extensions above a hold of
    ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS / ATEN_CPU_CAPABILITY (isa_hold) count as absent: the process takes
    the path of the CPU it simulates; "held" names the hold and "cpu_flags" what /proc/cpuinfo lists."""
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
    cpu = {"avx2": "avx2" in flags or probe("_is_avx2_supported"),
           "avx512": "avx512f" in flags or probe("_is_avx512_supported"),
           "avx512_bf16": "avx512_bf16" in flags or probe("_is_avx512_bf16_supported"),
           "amx_bf16": "amx_bf16" in flags or probe("_is_amx_tile_supported"),
           "vnni": bool({"avx512_vnni", "avx_vnni"} & flags) or probe("_is_vnni_supported")}
    level, held = isa_hold()
    has = {"avx2": cpu["avx2"] and level >= 1, "avx512": cpu["avx512"] and level >= 2,
           "avx512_bf16": cpu["avx512_bf16"] and level >= 4, "amx_bf16": cpu["amx_bf16"] and level >= 5,
           "vnni": cpu["vnni"] and level >= 3}  # held below it, AVX-VNNI counts as absent too (int8 needs AVX-512)
    lost = [k for k in cpu if cpu[k] and not has[k]]
    return {"name": name or "unknown CPU", "capability": torch.backends.cpu.get_cpu_capability(), **has,
            "onednn": onednn, "onednn_bf16": onednn and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "held": f"{ISA_LEVELS[level]} held by {', '.join(held)}" if lost else "",
            "cpu_flags": [k for k in cpu if cpu[k]]}

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
    held = (f" ({info['held']}; the CPU has {' '.join(info.get('cpu_flags') or [])})"
            if info.get("held") else "")
    return (f"cpu: {info['name']}, torch capability {info['capability']}, {' '.join(isa) or 'no AVX2'}{held}, "
            f"oneDNN {'yes' if info['onednn'] else 'no'} (bf16 {'native' if native_bf16(info) else 'not native'}); "
            f"path: {path}")

def best_dtype(name: str, device, train: bool = False) -> torch.dtype:
    """--dtype for the fast path: a name, or "" = model.pick_dtype's choice, except on a CPU with native bf16
    matmuls (AVX512_BF16 or AMX): there the frozen base trains in bf16 under autocast, and eval / ask / serve /
    generate decode in bf16 (faster at the same scores within the gates: docs/benchmarks.md, the policy table).
    Where bf16 is emulated it is far slower, so fp32 stays. `train` is kept for the callers' clarity."""
    if not name and torch.device(device).type == "cpu" and native_bf16():
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

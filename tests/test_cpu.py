"""CPU detection honours the ISA holds that simulate another CPU kind (issue 35): ONEDNN_MAX_CPU_ISA,
MKL_ENABLE_INSTRUCTIONS and ATEN_CPU_CAPABILITY held at AVX2 make fast.cpu take an AVX2-only CPU's path and say so.
Each case runs in a subprocess: the libraries read these variables once, at start.

    python -m pytest -q tests/test_cpu.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fast import cpu as FC

ROOT = Path(__file__).resolve().parent.parent
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
HOLDS = (*AVX2, "DNNL_MAX_CPU_ISA")
PROBE = """
import json, sys, torch
sys.path.insert(0, {root!r})
from fast import cpu
info = cpu.cpu_info()
print(json.dumps({{"info": info, "native": cpu.native_bf16(), "packed_any_rows": bool(cpu.PACKED_FP32_ANY_ROWS),
                  "onednn_bf16": bool(cpu.ONEDNN_BF16), "best_train": str(cpu.best_dtype("", "cpu", train=True)),
                  "best_infer": str(cpu.best_dtype("", "cpu")), "asked": str(cpu.best_dtype("float32", "cpu")),
                  "report": cpu.cpu_report(torch.float32), "report_bf16": cpu.cpu_report(torch.bfloat16)}}))
"""


def probe(**env) -> dict:
    """fast.cpu's view in a fresh process with exactly these holds set (the others removed)."""
    e = {k: v for k, v in os.environ.items() if k not in HOLDS} | env
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT))], capture_output=True, text=True,
                         env=e, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def unheld():
    return probe()


def test_no_hold_reports_the_cpu_as_it_is(unheld):
    info = unheld["info"]
    assert info["held"] == "" and "held by" not in unheld["report"]
    assert [k for k in ("avx2", "avx512", "avx512_bf16", "amx_bf16", "vnni") if info[k]] == info["cpu_flags"]


def test_avx2_hold_takes_the_avx2_path_and_says_so(unheld):
    """Held at AVX2 the process sees what an AVX2-only CPU has: no AVX-512, no native bf16, no VNNI; the packed fp32
    linears stay at decode's rows, training stays fp32, bf16 is reported EMULATED, and the line names the hold."""
    held = probe(**AVX2)
    info = held["info"]
    assert info["capability"] == "AVX2"  # torch's own view under ATEN_CPU_CAPABILITY
    assert info["avx2"] == unheld["info"]["avx2"] and not (info["avx512"] or info["avx512_bf16"] or info["amx_bf16"]
                                                           or info["vnni"])
    assert not held["native"] and not held["onednn_bf16"] and not held["packed_any_rows"]
    assert held["best_train"] == held["best_infer"] == "torch.float32" and "EMULATED" in held["report_bf16"]
    if unheld["info"]["avx512"]:  # the hold is visible only where the CPU has more than AVX2
        assert "AVX2 held by ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2, ATEN_CPU_CAPABILITY=avx2" \
            in held["report"], held["report"]
        assert info["cpu_flags"] == unheld["info"]["cpu_flags"]  # what the CPU has is still said
        assert "prepacked for oneDNN at <= 16 rows" in held["report"]


@pytest.mark.parametrize("var,value", [("ONEDNN_MAX_CPU_ISA", "AVX2"), ("DNNL_MAX_CPU_ISA", "avx2"),
                                       ("MKL_ENABLE_INSTRUCTIONS", "AVX2"), ("ATEN_CPU_CAPABILITY", "avx2")])
def test_each_hold_alone_is_honoured_and_named(unheld, var, value):
    info = probe(**{var: value})["info"]
    assert not (info["avx512"] or info["avx512_bf16"] or info["vnni"])
    if unheld["info"]["avx512"]:
        assert info["held"] == f"AVX2 held by {var}={value}"


def test_partial_holds_keep_what_they_allow(monkeypatch):
    """The lowest hold wins; a hold above what the CPU has, or a value that holds nothing (ALL), changes nothing."""
    for k in HOLDS:
        monkeypatch.delenv(k, raising=False)
    top = len(FC.ISA_LEVELS) - 1
    assert FC.isa_hold() == (top, [])
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert FC.isa_hold() == (top, [])
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert FC.isa_hold() == (3, ["ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI"])
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX512")
    assert FC.isa_hold() == (2, ["MKL_ENABLE_INSTRUCTIONS=AVX512"])
    info = FC.cpu_info()
    assert not (info["avx512_bf16"] or info["vnni"]) and info["avx512"] == ("avx512" in info["cpu_flags"])
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert FC.isa_hold()[0] == 0 and not FC.cpu_info()["avx2"]


def test_the_dtype_policy_follows_native_bf16(unheld):
    """The entry points' dtype (fast.cpu.best_dtype, ""): bf16 for training and for decoding exactly where the CPU
    has native bf16 matmuls, fp32 elsewhere; a named dtype is always taken as asked."""
    want = "torch.bfloat16" if unheld["native"] else "torch.float32"
    assert unheld["best_train"] == unheld["best_infer"] == want
    assert unheld["asked"] == "torch.float32"


def test_auto_compile_only_where_a_run_repays_it(monkeypatch):
    """train.py's --compile left unset: on for long LoRA runs on CPU with a C++ compiler; off for short runs, --full,
    GPUs, and without a compiler (said in one line)."""
    import torch
    from fast import training
    from train import TrainConfig
    cpu, said = torch.device("cpu"), []
    n = training.COMPILE_MIN_STEPS
    monkeypatch.setenv("CXX", sys.executable)  # a file that exists: the check looks for the compiler only
    assert training.auto_compile(TrainConfig(), cpu, n, said.append) is True and "compile: on" in said[-1]
    assert training.auto_compile(TrainConfig(), cpu, n - 1, said.append) is False
    assert training.auto_compile(TrainConfig(full=True), cpu, 10 * n, said.append) is False
    assert training.auto_compile(TrainConfig(), torch.device("cuda"), 10 * n, said.append) is False
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert training.auto_compile(TrainConfig(), cpu, n, said.append) is False and "no C++ compiler" in said[-1]

"""
A one-minute check that the whole pipeline runs on a device (the CUDA paths the CPU test suite cannot reach): a
tiny random Llama is LoRA-trained and fully fine-tuned a few steps there, saved, and evaluated on toy questions
through the agent loop (fine-tuned and few-shot), with the same commands the experiments grid runs; first, the
plain generate (model.generate) and the fast path's (fast.for_inference) must give the same greedy tokens there.

    python bench/smoke_device.py --device cuda
    python bench/smoke_device.py --device cpu

Prints one line per stage and `smoke ok on DEVICE` at the end; any failure is a traceback and a non-zero exit.
Needs transformers (the tiny checkpoint is written with it, as in the tests).
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import fast  # noqa: E402
import fireact  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402
from conftest import make_tiny_llama  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description="pipeline smoke check on one device")
    ap.add_argument("--device", default="cuda")
    dev = ap.parse_args().device
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tiny = make_tiny_llama(d / "tiny", std=0.3)
        net, tok = M.load_model(str(tiny), dev, M.pick_dtype("float32", dev))
        prompts = ["Question: What is the capital of France? Thought:", "Hi", "The quick brown fox"]
        plain = M.generate(net, tok, prompts, max_new_tokens=16)
        assert fast.for_inference(net)(net, tok, prompts, max_new_tokens=16) == plain, "plain and fast disagree"
        print(f"generate: plain and fast agree on {dev} (fp32, batch {len(prompts)})", flush=True)
        recipe = ["--epochs", "1", "--batch-size", "4", "--micro-batch", "4", "--max-steps", "3", "--no-progress",
                  "--device", dev, "--model", str(tiny), "--data", str(ROOT / "data/toy/train.jsonl:12")]
        for name, extra in (("lora", []), ("full", ["--full"])):
            t0 = time.time()
            train.main(recipe + ["--out", str(d / name), *extra])
            rows = [r for r in map(json.loads, (d / name / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
            assert rows[-1]["step"] == 3, rows
            print(f"train {name}: 3 steps in {time.time() - t0:.1f}s, last loss {rows[-1].get('loss')}", flush=True)
        ev = ["eval", "--task", "toy", "--split", "dev", "--n", "6", "--max-new-tokens", "24", "--max-steps", "3",
              "--device", dev]
        for name, extra in (("fine-tuned", ["--model", str(tiny), "--adapter", str(d / "lora")]),
                            ("full", ["--model", str(d / "full" / "model"), "--zero-shot"]),
                            ("prompted", ["--model", str(tiny)]),
                            ("noisy", ["--model", str(tiny), "--adapter", str(d / "lora"), "--noise", "0.5"])):
            t0 = time.time()
            fireact.main(ev + extra + ["--out", str(d / f"{name}.json")])
            s = json.loads((d / f"{name}.summary.json").read_text())
            assert s["n"] == 6 and s["failures"] == 0, s
            print(f"eval {name}: 6 episodes in {time.time() - t0:.1f}s", flush=True)
    print(f"smoke ok on {dev}")


if __name__ == "__main__":
    main()

"""
LoRA fine-tuning on agent trajectories, with observation masking: the student learns to think and act, not to
imitate the tool. One readable PyTorch loop; no Trainer.

    python train.py                                  # embedded SmolLM2-135M-Instruct on data/toy/train.jsonl
    python train.py --data ../shared/data/fireact/finetune/alpaca_format/hotpotqa.json:200 \\
        ../shared/data/fireact/finetune/gpt_format/multitask.jsonl --epochs 1 --out out/mix
    python train.py --data FILE --show-mask 3        # print record 3 with the trained tokens highlighted
    python train.py --data FILE --show-mask 3 --html mask.html   # ... and as a web page
    python train.py --data FILE --max-steps 5        # smoke run
    python train.py --resume                         # continue an interrupted run in --out exactly
    python train.py --config out/train/config.json --out out/again   # rerun a run's recorded settings
    python train.py --recipe fireact --data FILE     # FireAct's own settings (LoRA r=8 on q/v, lr 3e-4, ...)
    python train.py --merge                          # also write a full HF checkpoint to OUT/merged
    python train.py --compile --quant int8           # fastest on a CPU with VNNI: frozen GEMMs in int8 (README §5)
    torchrun --nproc_per_node=2 train.py ...         # data parallel (gloo on CPU, NCCL on GPU)

Data files (mix several; `FILE:N` samples N records from FILE): our trajectory JSONL, FireAct's alpaca JSON
and FireAct's gpt-format JSONL. Every record is rendered by `render` (the same function inference uses):

    Question: {question}\\n                       <- masked
    Thought: {thought}\\nAction: {action}\\n        <- trained
    Observation: {observation}\\n                  <- masked
    ...
    Thought: {thought}\\nAction: finish[{answer}]<eos>   <- trained
"""
import dataclasses
import functools
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import cli, files
from fireact import mask_pieces, read_records, render, show_mask
from model import (apply_lora, cpu_info, cpu_report, load_model, lora_layers, native_bf16, pick_device, pick_dtype,
                   quantize_frozen, require_compiler, save_adapter, save_checkpoint)

REPO = Path(__file__).resolve().parent
DEFAULT_DATA = "data/toy/train.jsonl"
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    # `python train.py --help` shows each setting with the comment on its line. The defaults make `python train.py`
    # the offline toy demo (README): <= 15 min on a 2-core CPU with a falling loss. The toy set is 545 trajectories
    # x ~290 tokens = ~160k tokens; an idle 2-core CPU trains SmolLM2-135M at ~220 tokens/s (fp32; frozen weights
    # still cost 4N FLOPs/token). Measured on the toy test split (README): what the student needs in so little
    # compute is many updates on varied data. 196 trajectories x 3 epochs in steps of 8 gave EM 49; 518 x 1 epoch
    # in steps of 8, EM 58; the same in steps of 4 (twice the updates, same tokens), EM 86.
    model: str = ""                     # HF checkpoint dir, a .gguf file or a hub id org/name; "" = the embedded
                                        # SmolLM2-135M-Instruct (offline; the demo's student)
    data: list = field(default_factory=lambda: [DEFAULT_DATA])  # trajectory files (our JSONL, FireAct's alpaca
                                        # JSON or gpt JSONL), mixed; FILE:N samples N records of FILE
    val_data: list = field(default_factory=list)  # validation files; none = hold out --val-frac of --data
    val_frac: float = 0.05              # share of --data held out for validation (only with >= 10 records)
    val_max: int = 64                   # cap on held-out records: validation runs every --eval-every steps
    out: str = "out/train"              # run dir: adapter, config.json, run.json, metrics.jsonl, state.pt
    recipe: Literal["default", "fireact"] = "default"  # presets for the settings below that are not given:
                                        # default = the field defaults; fireact = what FireAct's code did: LoRA r=8,
                                        # alpha 16, dropout 0.05 on q_proj,v_proj, lr 3e-4, max_len 512 (its
                                        # cutoff), train_on all (its mask was built and never used), template alpaca
    template: Literal["react", "alpaca"] = "react"  # prompt around the question, at training and inference:
                                        # react = ours (Question: ... then the steps), alpaca = FireAct's Alpaca
                                        # template (what its Llama adapters were trained with)
    train_on: Literal["actions", "all"] = "actions"  # trained tokens: actions = Thought/Action only (the
                                        # observations are the tool's words, not the student's); all = every token
                                        # (FireAct's actual behaviour; its authors never settled the ablation)
    max_len: int = 1024                 # tokens per example: toy trajectories are ~290 and most of FireAct's fit
                                        # (FireAct cut at 512)
    overlong: Literal["truncate", "skip"] = "truncate"  # examples over --max-len: keep their start, or drop them
    # LoRA: all seven projections give more capacity per step than FireAct's q/v only (~1% more FLOPs at r=16),
    # and the demo has few steps; FireAct's 3e-4 lr was for 7B+ models and 3+ epochs.
    lora_targets: str = ",".join(LLAMA_PROJECTIONS)  # comma-separated Llama projections that get LoRA: all
                                        # seven (measured on the toy demo; FireAct: q_proj,v_proj)
    lora_r: int = 16                    # LoRA rank: 16 measured on the toy demo (FireAct: 8)
    lora_alpha: int = 32                # LoRA scale is alpha / r: 2, as FireAct's 16 / 8
    lora_dropout: float = 0.0           # dropout on the LoRA input: off, torchtune's and PEFT's default. Chosen on
                                        # the toy dev split: 82 EM vs 71 with 0.05 (FireAct's and alpaca-lora's
                                        # value), and a step ~1.2x faster (1.4x with --compile; bench/train.py)
    lr: float = 0.0                     # peak learning rate; 0 = by model size: 2e-3 up to 1B parameters (measured
                                        # on the toy demo: few steps need a high rate), 3e-4 above (FireAct's and
                                        # alpaca-lora's value for 7B+)
    min_lr_frac: float = 0.1            # cosine decays to lr x min_lr_frac (nanoGPT's choice)
    warmup: int = 10                    # linear warmup, optimizer steps (capped at a fifth of short runs)
    weight_decay: float = 0.0           # AdamW weight decay: 0 as in alpaca-lora (LoRA B starts at zero)
    grad_clip: float = 1.0              # clip the gradient norm to this (0 = off): guards the high lr
    epochs: int = 0                     # passes over --data; 0 = 1 on CPU (the 15-minute demo), 3 on CUDA (FireAct)
    batch_size: int = 0                 # sequences per optimizer step (global); 0 = micro_batch x processes (many
                                        # small updates: steps of 4 gave EM 86 vs 58 with steps of 8 on the demo)
    micro_batch: int = 0                # sequences per forward per process; 0 = 4 on CPU, 16 on CUDA
    max_steps: int = 0                  # > 0: the run (and its lr schedule) is this many optimizer steps;
                                        # 0 = --epochs decide (a smoke run: --max-steps 5)
    stop_after: int = 0                 # > 0: stop after N steps but keep the schedule (continue with --resume)
    eval_every: int = 50                # validation loss every N optimizer steps, and at the end
    save_every: int = 100               # adapter + resumable state every N optimizer steps
    seed: int = 0                       # data order, validation split and dropout masks = f(seed, step)
    device: str = ""                    # cpu | cuda | cuda:N | mps; "" = the best available
    dtype: Literal["", "float32", "bfloat16"] = ""  # the frozen base's dtype, matmuls under bf16 autocast (trained
                                        # weights, their gradients and AdamW stay fp32); "" = bfloat16 on CUDA,
                                        # and on CPUs with native bf16 (AVX512_BF16/AMX: 1.47x faster, dev EM within
                                        # 1 point over four seeds, README §5), float32 on other CPUs
    quant: Literal["", "int8"] = ""     # int8 = the frozen matmuls (forward and input gradient) as int8 GEMMs,
                                        # tokens quantized per row, each layer SmoothQuant-smoothed on the first
                                        # --calib-batches micro-batches: LoRA on a CPU with VNNI and native bf16
                                        # (README §5: speed and dev EM)
    calib_batches: int = 8              # with --quant int8: micro-batches whose activations set the smoothing
    grad_checkpointing: bool = False    # recompute activations in backward: less memory, more time
    compile: bool = False               # torch.compile each decoder block and the loss: ~1 min to start (~20 s
                                        # with torch's on-disk cache), then fused small ops (CPU, dropout off:
                                        # 1.03-1.22x a step, half the memory, README §5;
                                        # bench/train.py --compile 1)
    resume: bool = False                # continue the run in --out exactly (refused if a setting that changes
                                        # the result differs from its config.json)
    merge: bool = False                 # also write a full HF checkpoint (LoRA merged) to OUT/merged, in the
                                        # frozen base's dtype (bf16 where it trained in bf16; --dtype float32 for fp32)
    full: bool = False                  # full fine-tuning (FireAct's other arm): every weight trained, no LoRA; the
                                        # model is saved as a full checkpoint in OUT/model (eval --model OUT/model --zero-shot)
    show_mask: int = -1                 # >= 0: print that record's rendering, trained tokens highlighted, and exit
    html: str = ""                      # with --show-mask: also write it as a self-contained HTML page here
    progress: bool = True               # progress bar

    def check(self):
        """Ranges and paths, checked before anything expensive (cli.parse_config and train call it)."""
        rules = [("max_steps", self.max_steps >= 0, ">= 0"), ("stop_after", self.stop_after >= 0, ">= 0"),
                 ("save_every", self.save_every >= 1, ">= 1"), ("eval_every", self.eval_every >= 1, ">= 1"),
                 ("lora_r", self.lora_r >= 1, ">= 1"), ("lora_alpha", self.lora_alpha > 0, "> 0"),
                 ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"), ("lr", self.lr >= 0, "> 0 (0 = auto)"),
                 ("min_lr_frac", 0 <= self.min_lr_frac <= 1, "in [0, 1]"), ("warmup", self.warmup >= 0, ">= 0"),
                 ("weight_decay", self.weight_decay >= 0, ">= 0"), ("grad_clip", self.grad_clip >= 0, ">= 0"),
                 ("epochs", self.epochs >= 0, ">= 0"), ("batch_size", self.batch_size >= 0, ">= 0"),
                 ("micro_batch", self.micro_batch >= 0, ">= 0"), ("val_frac", 0 <= self.val_frac < 1, "in [0, 1)"),
                 ("val_max", self.val_max >= 0, ">= 0"), ("max_len", self.max_len >= 16, ">= 16"),
                 ("show_mask", self.show_mask >= -1, ">= 0, or -1 (off)"),
                 ("calib_batches", self.calib_batches >= 1, ">= 1")]
        for name, ok, want in rules:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be {want}")
        if self.quant and self.full:
            raise ValueError("--quant int8 quantizes the frozen weights: it goes with LoRA, not --full")
        if self.html and self.show_mask < 0:
            raise ValueError(f"--html {self.html}: goes with --show-mask N (the record to render)")
        if self.batch_size and self.micro_batch and self.batch_size % self.micro_batch:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --micro-batch {self.micro_batch}")
        targets = self.lora_targets.split(",")
        if not all(t in LLAMA_PROJECTIONS for t in targets):
            raise ValueError(f"--lora-targets {self.lora_targets}: choose from {','.join(LLAMA_PROJECTIONS)}")
        if not re.fullmatch(r"|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"--device {self.device}: expected cpu, cuda, cuda:N or mps")
        if not self.data:
            raise ValueError("--data: give at least one file")
        for flag, specs in (("--data", self.data), ("--val-data", self.val_data)):
            for spec in specs:
                path, n = split_spec(spec) if flag == "--data" else (spec, None)
                if path == str(REPO / DEFAULT_DATA) and not Path(path).exists():
                    raise ValueError(f"no training data at {DEFAULT_DATA}: build the offline default task with "
                                     f"`python toyworld.py`, then `python fireact.py generate --task toy --split "
                                     f"train --teacher-model oracle ...` -> filter -> mix (README, the demo); or "
                                     f"pass --data FILE")
                if not Path(path).exists():
                    raise ValueError(f"{flag} {path}: no such file")
                if not Path(path).is_file():
                    raise ValueError(f"{flag} {path}: not a file (a directory?); pass the trajectory file itself")
                if n == 0:
                    raise ValueError(f"{flag} {spec}: FILE:N needs N >= 1")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: is a file; --out is the run directory")
        if self.resume and not (out / "state.pt").is_file():
            raise ValueError(f"--resume: no {out / 'state.pt'} (nothing to resume in --out {out})")


# --recipe: values for the settings the user did not give explicitly (cli.explicit); "default" = the field defaults
RECIPES = {"default": {},
           "fireact": dict(lora_r=8, lora_alpha=16, lora_dropout=0.05, lora_targets="q_proj,v_proj", lr=3e-4,
                           max_len=512, train_on="all", template="alpaca")}
# the settings a resumed run may change: they do not change the trained weights (every other one does)
RESUME_FREE = {"recipe", "out", "eval_every", "save_every", "stop_after", "device", "grad_checkpointing", "compile",
               "resume", "merge", "show_mask", "html", "progress"}


def default_lr(n_params, full=False):
    """--lr 0: LoRA 2e-3 up to 1B parameters (measured on the toy demo), 3e-4 above (FireAct's and alpaca-lora's
    7B+). Full fine-tuning moves every weight, so it takes a rate ~20x lower: 1e-4 (2e-5 above 1B, alpaca's 7B)."""
    if full:
        return 1e-4 if n_params <= 1e9 else 2e-5
    return 2e-3 if n_params <= 1e9 else 3e-4


def apply_recipe(cfg):
    """Fill in cfg.recipe's values for the settings not given explicitly (on the command line, in --config or,
    for a config built in code, by differing from the default)."""
    given = cli.explicit(cfg)
    for k, v in RECIPES[cfg.recipe].items():
        if k not in given:
            setattr(cfg, k, v)
    return cfg


# ------------------------------------------------------------------------------------------------------ data
# The trajectory format (readers of the three file formats, render + mask, the mask visualiser) has one owner,
# fireact.py, torch-free, so that `fireact.py mix` needs no torch and inference renders exactly as training.


def encode_records(recs, tokenizer, cfg):
    """Records -> list of (ids, mask) clipped to max_len; returns (examples, n_truncated, n_skipped)."""
    out, trunc, skip = [], 0, 0
    for r in recs:
        ids, mask = render(r["question"], r["steps"], tokenizer, cfg.train_on, template=cfg.template)
        if len(ids) > cfg.max_len:
            if cfg.overlong == "skip":
                skip += 1
                continue
            ids, mask, trunc = ids[:cfg.max_len], mask[:cfg.max_len], trunc + 1
        if sum(mask[1:]) == 0:              # nothing to learn (the first token is never a target)
            skip += 1
            continue
        out.append((ids, mask))
    return out, trunc, skip


def split_spec(spec):
    """'FILE:N' -> (FILE, N); 'FILE' -> (FILE, None). The default data path resolves against the repo."""
    path, n = (spec.rsplit(":", 1)[0], int(spec.rsplit(":", 1)[1])) if re.search(r":\d+$", spec) else (spec, None)
    return (str(REPO / path) if path == DEFAULT_DATA else path), n


def read_data_file(path):
    """read_records (which names the file and line of any bad record), refusing a file with no records."""
    recs = read_records(path)
    if not recs:
        raise ValueError(f"{path}: no records (an empty file?)")
    return recs


def load_data(cfg, log=print):
    """Mix the data files (FILE:N samples N records), hold out a validation split. -> (train, val) records."""
    rng, train, val = random.Random(cfg.seed), [], []
    for spec in cfg.data:
        path, n = split_spec(spec)
        recs = read_data_file(path)
        if n:
            recs = rng.sample(recs, min(n, len(recs)))
        log(f"data: {path}: {len(recs)} records" + (f" (sampled {n})" if n else ""))
        train += recs
    for path in cfg.val_data:
        val += read_data_file(path)
    if not val and cfg.val_frac > 0 and len(train) >= 10:
        rng.shuffle(train)
        k = min(cfg.val_max, max(1, round(cfg.val_frac * len(train))))
        val, train = train[:k], train[k:]
    return train, val


def plan_epoch(lengths, cfg, epoch):
    """Length-grouped batches for one epoch -> steps[micro-batches[example indices]]. Shuffle, sort by length
    inside windows of 64 micro-batches (so batches stay random but hold similar lengths), cut micro-batches,
    group them into optimizer steps, shuffle the steps. Seeded by (seed, epoch), independent of world size:
    a resumed run and a torchrun run see exactly the same global batches."""
    g = random.Random(cfg.seed * 100003 + epoch)
    idx = list(range(len(lengths)))
    g.shuffle(idx)
    win = cfg.micro_batch * 64
    idx = [i for w in range(0, len(idx), win) for i in sorted(idx[w:w + win], key=lambda i: lengths[i])]
    micro = [idx[i:i + cfg.micro_batch] for i in range(0, len(idx), cfg.micro_batch)]
    k = cfg.batch_size // cfg.micro_batch
    steps = [micro[i:i + k] for i in range(0, len(micro), k)]
    g.shuffle(steps)
    return steps


def padding_waste(lengths, plan):
    real = sum(lengths[i] for st in plan for mb in st for i in mb)
    padded = sum(len(mb) * max(lengths[i] for i in mb) for st in plan for mb in st)
    return 1 - real / max(1, padded)


def collate(examples, pad_id, device):
    """[(ids, mask)] -> input ids [B, T] (right-padded) and targets [B, T]: the next token where it is trained,
    -100 elsewhere. Right padding needs no attention mask under causal attention."""
    T = max(len(ids) for ids, _ in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, (ids, mask) in enumerate(examples):
        x[b, :len(ids)] = torch.tensor(ids)
        y[b, :len(ids) - 1] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
    return x.to(device), y.to(device)


# -------------------------------------------------------------------------------------------------- the loop
def head_loss(model, h, y):
    """h [N, D] (final hidden states at supervised positions), y [N] -> summed cross-entropy. The LM head ([D, V],
    the biggest matmul at V=49k) runs only there: agent data is mostly prompt and observations, so this skips
    most of its cost and never materialises [B, T, V] logits."""
    return F.cross_entropy(model.head(h).float(), y, reduction="sum")   # logits [N, V]


def loss_sum(model, x, y, head_loss=head_loss):
    """Summed cross-entropy over supervised positions (y != -100)."""
    h = model.hidden(x)                                    # [B, T, D]
    sel = y != -100                                        # [B, T]
    return head_loss(model, h[sel], y[sel])


def loss_function(model, compile: bool):
    """The loss train() steps and validates with (and bench/train.py times): loss_sum, under --compile through
    torch.compile by region. Each decoder block is one graph (compiled in place, Module.compile; dynamic: batch
    shapes vary), compiled once and reused by all of them (same code, same shapes), and the head + cross-entropy
    another. One graph of the whole model compiles ~4x longer: 30 unrolled blocks, in each of which inductor
    recomputes the rope tables it inlines."""
    if not compile:
        return loss_sum
    for block in model.model.layers:
        block.compile(dynamic=True)
    return functools.partial(loss_sum, head_loss=torch.compile(head_loss, dynamic=True))


@torch.no_grad()
def calibrate_int8(model, batches, autocast):
    """--quant int8: each LoRA layer's input absmax per channel over batches [(x, y)] (bf16 forward, hooks),
    then model.quantize_frozen. -> the largest channel's ratio to the median channel, the worst layer's."""
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


def mixed_precision(model, dtype, device_type):
    """The trained weights (those that require grad) in fp32, whatever the frozen base's dtype; -> the autocast
    context every forward runs in: bf16 matmuls when the base is bf16 (pick_dtype), off otherwise."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def lr_at(step, total, cfg):
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_frac at the last step. Warmup is capped
    at a fifth of the run so that short runs still reach the peak."""
    warmup = min(cfg.warmup, total // 5)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup - 1)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


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


def setup_dist(cfg):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPU, gloo on CPU. -> (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(pick_device(cfg.device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: CUDA is not available here; use --device cpu (or leave it out)")
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return dist.get_rank(), world, dev
    return 0, 1, dev


def sync(lora_params, loss, world):
    """Sum the LoRA gradients and the loss over processes in one all-reduce. The loss of every micro-batch is
    already divided by the step's *global* supervised-token count, so the sum is exactly the one-process
    gradient (plain DDP averages instead, and would also need no_sync() around the accumulation)."""
    flat = torch.cat([p.grad.flatten() for p in lora_params] + [loss.view(1)])
    dist.all_reduce(flat)
    i = 0
    for p in lora_params:
        p.grad.copy_(flat[i:i + p.numel()].view_as(p))
        i += p.numel()
    return flat[-1]


@torch.no_grad()
def evaluate(model, val, cfg, device, pad_id, rank, world, autocast, loss):
    """Mean token loss over this process's share of the validation examples, summed over processes. loss: the
    one the steps take (loss_function), so that --compile's blocks and head serve both."""
    model.eval()
    tot = torch.zeros(2, dtype=torch.float64, device=device)
    mine = val[rank::world]
    for i in range(0, len(mine), cfg.micro_batch):
        x, y = collate(mine[i:i + cfg.micro_batch], pad_id, device)
        with autocast:
            tot[0] += loss(model, x, y).double()
        tot[1] += (y != -100).sum()
    if world > 1:
        dist.all_reduce(tot)
    model.train()
    return (tot[0] / tot[1].clamp(min=1)).item()


def read_metrics(path, warn=print):
    """metrics.jsonl -> [(line, row)]. A torn last line (a crash in mid-append) is cut off with a warning; a bad
    line before it means the history is damaged: an error naming file:line."""
    lines = [(i, l) for i, l in enumerate(files.read_text(path).split("\n"), 1) if l.strip()]
    rows = []
    for k, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("no integer 'step'")
        except ValueError as e:
            if k == len(lines) - 1:
                warn(f"warning: {path}:{i}: cut off a torn last line ({cli.one_line(e)}); its step reruns")
                break
            raise ValueError(f"{path}:{i}: corrupt metrics line ({cli.one_line(e)}); delete that line, or start "
                             f"afresh without --resume") from None
        rows.append((line, row))
    return rows


def plot_losses(out):
    """metrics.jsonl -> loss.png (skipped quietly when matplotlib is absent)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for _, r in read_metrics(out / "metrics.jsonl")]
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / supervised token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    return out / "loss.png"


def saved_config(out):
    """The config.json of the run in `out` (None for a run from before config.json existed)."""
    path = out / "config.json"
    if not path.exists():
        return None
    try:
        saved = json.loads(files.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); restore it, or delete it to resume unchecked") \
            from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a JSON object of settings")
    return saved


def check_resume(out, saved, cfg, skip=()):
    """Refuse to resume with a setting that changes the result (all but RESUME_FREE): one line naming each change
    with both values. A setting missing from an older config.json had its default then."""
    if saved is None:
        return
    default = dataclasses.asdict(TrainConfig())
    diff = [f"{k} {saved.get(k, default[k])!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
            if k not in RESUME_FREE and k not in skip and saved.get(k, default[k]) != v]
    if diff:
        raise ValueError(f"--resume: {out / 'config.json'} has other settings: {'; '.join(diff)}. Resuming would "
                         f"train something else: resume with `--config {out / 'config.json'} --resume`, or use "
                         f"a new --out")


def load_state(out, model, opt):
    """Restore the trained weights (LoRA, or all with --full: those that require grad), optimizer, step and RNG
    from out/state.pt (key "lora", kept for old runs) -> the step. A state of another model or
    LoRA shape is refused in one line (not a raw shape error)."""
    path = out / "state.pt"
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
        saved = st["lora"]
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({cli.one_line(e)}); start afresh without --resume") from None
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    bad = sorted(set(ours) ^ set(saved)) or [n for n in ours if ours[n].shape != saved[n].shape]
    if bad:
        n = bad[0]
        got = tuple(saved[n].shape) if n in saved else "absent"
        want = tuple(ours[n].shape) if n in ours else "absent"
        raise ValueError(f"{path}: made for another model or LoRA shape ({n}: saved {got}, now {want}); resume "
                         f"with its --model/--lora-r/--lora-targets, or use a new --out")
    with torch.no_grad():
        for n, p in ours.items():
            p.copy_(saved[n])
    opt.load_state_dict(st["optimizer"])
    torch.set_rng_state(st["rng"])
    random.seed(st["py_seed"])
    return st["step"]


def load_base(cfg, device=None, dtype=None):
    """load_model with its errors (missing files, bad config, unknown name) as one line naming --model."""
    try:
        return load_model(cfg.model or None, device=device, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"--model {cfg.model or '(embedded)'}: cannot load it: {cli.one_line(e)}") from None


def train(cfg):
    """Fine-tune per cfg. -> the output directory (adapter, config.json, run.json, metrics.jsonl, loss.png,
    state.pt). Bad settings or data raise a one-line ValueError before anything is written."""
    apply_recipe(cfg)
    cfg.check()
    rank, world, device = setup_dist(cfg)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    warn = (lambda m: print(m, file=sys.stderr)) if master else log
    cuda = device.type == "cuda"
    if cfg.compile:
        require_compiler(device.type)
    cfg.micro_batch = cfg.micro_batch or (16 if cuda else 4)
    cfg.batch_size = cfg.batch_size or cfg.micro_batch * world  # one micro-batch per process (more updates)
    cfg.epochs = cfg.epochs or (3 if cuda else 1)
    if cfg.batch_size % cfg.micro_batch:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch {cfg.micro_batch}")
    out = Path(cfg.out)
    saved, metrics = None, []
    if cfg.resume:   # what we resume must be what we would train: refuse early (lr=0 resolves after the load)
        saved = saved_config(out)
        check_resume(out, saved, cfg, skip=("lr",) if cfg.lr == 0 else ())
        if (out / "metrics.jsonl").exists():
            metrics = read_metrics(out / "metrics.jsonl", warn)
    torch.manual_seed(cfg.seed)   # CPU runs are bitwise deterministic (the resume test checks it): the data
    random.seed(cfg.seed)         # order and every dropout mask are functions of (seed, step, micro-batch)

    # data
    train_recs, val_recs = load_data(cfg, log)
    data_tools = {}  # which tools made the training observations: eval picks the same tool family
    for r in train_recs:
        data_tools[r.get("tool", "?")] = data_tools.get(r.get("tool", "?"), 0) + 1
    # the frozen base in bf16 on CUDA and on CPUs with native bf16 (model.pick_dtype); weights that are trained
    # stay fp32 (full fine-tuning: all of them, the matmuls still under bf16 autocast)
    dtype = pick_dtype(cfg.dtype, device, train=True)
    if cfg.quant and not (device.type == "cpu" and dtype == torch.bfloat16 and native_bf16() and cpu_info()["vnni"]):
        raise ValueError(f"--quant int8: for a CPU with VNNI and native bf16, with the bf16 base (--dtype bfloat16 "
                         f"or the default); here: device {device}, base {dtype}")
    if device.type == "cpu":
        log(cpu_report(dtype, quant=cfg.quant, train=True).replace("path:", "training path:"))
    model, tok = load_base(cfg, device=device, dtype=torch.float32 if cfg.full else dtype)
    n_params = sum(p.numel() for p in model.parameters())
    auto_lr = cfg.lr == 0
    if auto_lr:
        cfg.lr = default_lr(n_params, cfg.full)
    if cfg.resume:
        check_resume(out, saved, cfg)
    train_ex, trunc, skip = encode_records(train_recs, tok, cfg)
    val_ex, _, _ = encode_records(val_recs, tok, cfg)
    if not train_ex:
        raise ValueError("no trainable examples after rendering (all skipped as over-long or fully masked?)")
    lengths = [len(ids) for ids, _ in train_ex]
    plan0 = plan_epoch(lengths, cfg, 0)
    steps_per_epoch = len(plan0)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    n_sup = sum(sum(m[1:]) for _, m in train_ex)
    log(f"data: {len(train_ex)} train / {len(val_ex)} val examples, {sum(lengths)} tokens, {n_sup} trained "
        f"({n_sup / sum(lengths):.0%}); {trunc} truncated, {skip} skipped (--max-len {cfg.max_len}, "
        f"--overlong {cfg.overlong}); padding waste {padding_waste(lengths, plan0):.1%}")
    log(f"settings: --recipe {cfg.recipe}: lr {cfg.lr:g}"
        + (f" (by model size: {n_params / 1e6:.1f}M parameters)" if auto_lr else "")
        + f", LoRA r={cfg.lora_r} alpha {cfg.lora_alpha} dropout {cfg.lora_dropout}, --max-len {cfg.max_len}, "
          f"--train-on {cfg.train_on}, --template {cfg.template}, {cfg.epochs} epoch(s)")

    # model: LoRA on the targets, everything else frozen. LoRA weights stay fp32 under bf16 autocast.
    # what is trained is what requires grad: the LoRA weights (apply_lora freezes the rest), or with --full all
    if cfg.full:
        for p in model.parameters():
            p.requires_grad = True
    else:
        apply_lora(model, targets=tuple(cfg.lora_targets.split(",")), r=cfg.lora_r, alpha=cfg.lora_alpha,
                   dropout=cfg.lora_dropout)
    autocast = mixed_precision(model, dtype, device.type)
    if cfg.quant:   # on the first micro-batches of the (seeded) plan: the same smoothing when resumed
        micro = [mb for st in plan0 for mb in st][:cfg.calib_batches]
        worst = calibrate_int8(model, [collate([train_ex[j] for j in mb], tok.pad_id, device) for mb in micro],
                               autocast)
        log(f"--quant int8: frozen matmuls in int8, smoothed on {len(micro)} micro-batches (largest input channel "
            f"up to {worst:.0f}x its layer's median)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.grad_checkpointing = cfg.grad_checkpointing
    model.train()
    step_loss = loss_function(model, cfg.compile)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    log(f"model: {cfg.model or 'SmolLM2-135M-Instruct (embedded)'}, "
        + ("full fine-tuning: " if cfg.full else f"LoRA r={cfg.lora_r} on {cfg.lora_targets}: ") +
        f"{sum(p.numel() for p in trainable):,} trainable params; {total} steps of {cfg.batch_size} sequences "
        f"({cfg.batch_size // cfg.micro_batch} micro-batches of {cfg.micro_batch}, {world} process(es)), "
        f"device {device}{' bf16' if dtype == torch.bfloat16 else ' fp32'}")

    # resume: LoRA weights, optimizer, step and RNG. The data order and dropout masks are functions of
    # (seed, step), so restoring the step restores them exactly.
    step = 0
    if cfg.resume:
        step = load_state(out, model, opt)
        log(f"resumed from {out / 'state.pt'} at step {step}")
    if master:   # what made this run: every setting (resolved) and the code, torch and python versions
        out.mkdir(parents=True, exist_ok=True)
        # resume and stop_after say how this session ran, not what it trains: `--config OUT/config.json` reruns
        # the whole run afresh, `--config OUT/config.json --resume` continues it
        files.atomic_write(out / "config.json", json.dumps({**dataclasses.asdict(cfg), "resume": False, "stop_after": 0},
                                                         indent=1))
        runs = []
        if cfg.resume and (out / "run.json").exists():
            try:
                runs = json.loads(files.read_text(out / "run.json"))["sessions"]
            except (ValueError, KeyError, TypeError):
                warn(f"warning: {out / 'run.json'}: unreadable; its earlier sessions are dropped")
        runs.append({**cli.provenance(), "start_step": step, "steps": total, "device": str(device),
                     "processes": world, "model_parameters": n_params})
        files.atomic_write(out / "run.json", json.dumps({"sessions": runs}, indent=1))
        files.atomic_write(out / "metrics.jsonl", "".join(line + "\n" for line, r in metrics if r["step"] <= step))

    def save(final=False):
        """Adapter (PEFT format) + resumable state, flushed to disk before it replaces the old one; periodic
        adapters under OUT/checkpoints/."""
        if not master:
            return
        # the card and config say what made the adapter: the run's settings (eval follows its template) and step
        meta = {"step": step, "template": cfg.template, "train_on": cfg.train_on, "data": cfg.data,
                "data_tools": data_tools, "config": dataclasses.asdict(cfg), "provenance": cli.provenance()}
        if cfg.full:  # a full checkpoint, with the same record of what made it as an adapter's card
            save_checkpoint(model, tok, out / "model")
            files.atomic_write(out / "model" / "fireact.json", json.dumps(meta, indent=1))
        else:
            save_adapter(model, out, base_model=cfg.model or "", meta=meta)
            if not final:
                save_adapter(model, out / "checkpoints" / f"step_{step:06d}", base_model=cfg.model or "", meta=meta)
        state = {"lora": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                 "optimizer": opt.state_dict(), "step": step, "rng": torch.get_rng_state(),
                 "py_seed": cfg.seed + step}
        files.atomic_write(out / "state.pt", lambda f: torch.save(state, f))

    def log_metrics(row):
        if master:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    peak = peak_flops(device) and peak_flops(device) * world
    plans = {0: plan0}
    last = cfg.stop_after and min(cfg.stop_after, total) or total
    bar = None
    if master and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True)
    t_start, loss_val = time.time(), None
    try:
        while step < last:
            epoch, i = divmod(step, steps_per_epoch)
            plan = plans.setdefault(epoch, plan_epoch(lengths, cfg, epoch))
            micro = plan[i]
            lr = lr_at(step, total, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            # the normaliser: supervised tokens over ALL micro-batches of the step on ALL processes (torchtune)
            n_sup = sum(sum(train_ex[j][1][1:]) for mb in micro for j in mb)
            n_tok = sum(lengths[j] for mb in micro for j in mb)
            t0 = time.time()
            opt.zero_grad(set_to_none=False)
            loss = torch.zeros((), device=device)
            for k in range(rank, len(micro), world):
                torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + k)  # dropout mask = f(seed, step, k)
                x, y = collate([train_ex[j] for j in micro[k]], tok.pad_id, device)
                with autocast:
                    l = step_loss(model, x, y) / n_sup
                l.backward()
                loss += l.detach().float()
            if world > 1:
                for p in trainable:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                loss = sync(trainable, loss, world)
            gnorm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip > 0 else None
            opt.step()
            step += 1
            if cuda:
                torch.cuda.synchronize()
            dt, loss_val = time.time() - t0, loss.item()
            row = {"step": step, "loss": round(loss_val, 5), "lr": lr, "tokens": n_tok, "sup_tokens": n_sup,
                   "tok_s": round(n_tok / dt, 1), "sup_tok_s": round(n_sup / dt, 1),
                   "grad_norm": round(gnorm.item(), 4) if gnorm is not None else None,
                   "time": round(time.time() - t_start, 2)}
            if peak:
                seq = n_tok / sum(len(mb) for mb in micro)
                row["mfu"] = round(train_flops(model, n_tok, n_sup, seq) / dt / peak, 4)
            log_metrics(row)
            if bar:
                bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.1e}", tok_s=f"{row['tok_s']:.0f}",
                                sup_s=f"{row['sup_tok_s']:.0f}", **({"mfu": row["mfu"]} if peak else {}))
                bar.update(1)
            if val_ex and (step % cfg.eval_every == 0 or step == total):
                v = evaluate(model, val_ex, cfg, device, tok.pad_id, rank, world, autocast, step_loss)
                log_metrics({"step": step, "val_loss": round(v, 5)})
                (bar.write if bar else log)(f"step {step}: train loss {loss_val:.4f}, val loss {v:.4f}")
            if step % cfg.save_every == 0 and step < total:
                save()
    except KeyboardInterrupt:
        save()
        log(f"\ninterrupted at step {step}: state saved to {out}; continue with --resume")
        raise SystemExit(130)
    if bar:
        bar.close()
    save(final=step >= total)
    if master:
        png = plot_losses(out)
        log(f"done: {step} steps in {time.time() - t_start:.0f}s, last loss "
            f"{loss_val if loss_val is not None else float('nan'):.4f}; "
            f"{'model: ' + str((out / 'model').resolve()) if cfg.full else 'adapter: ' + str(out.resolve())}"
            + (f", loss curve: {png}" if png else ""))
        if cfg.merge and step >= total:
            save_checkpoint(model, tok, out / "merged")
            log(f"merged checkpoint: {(out / 'merged').resolve()}")
    if world > 1:
        dist.destroy_process_group()
    return out


# ------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    """CLI flags generated from TrainConfig's fields (cli.parse_config): --lora-r 16, --data A B, --merge,
    --no-progress, --config OUT/config.json; checked by TrainConfig.check before anything loads."""
    return cli.parse_config(TrainConfig, argv, description=__doc__.split("\n\n")[1])


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.show_mask >= 0:   # records of all --data files in order (no sampling), after the per-file counts
        apply_recipe(cfg)
        recs = []
        for d in cfg.data:
            recs += read_data_file(split_spec(d)[0])
            print(f"data: {split_spec(d)[0]}: {len(recs)} records so far")
        if cfg.show_mask >= len(recs):
            raise ValueError(f"--show-mask {cfg.show_mask}: only {len(recs)} records")
        _, tok = load_base(cfg)
        show_mask(recs[cfg.show_mask], tok, cfg.train_on, template=cfg.template)
        if cfg.html:
            import report
            pieces, n, trained = mask_pieces(recs[cfg.show_mask], tok, cfg.train_on, cfg.template)
            files.atomic_write(cfg.html, report.mask_html(pieces, f"record {cfg.show_mask}: the loss mask",
                                                        f"{n} tokens, {trained} trained (train_on={cfg.train_on}, "
                                                        f"template={cfg.template})."))
            print(f"{cfg.html}: written")
        return
    train(cfg)


if __name__ == "__main__":
    cli.run(main)

"""
LoRA fine-tuning on agent trajectories, with observation masking: the student learns to think and act, not to
imitate the tool. One readable PyTorch loop (`train_loop`, below the config); no Trainer.

    python train.py                                  # embedded SmolLM2-135M-Instruct on data/toy/train.jsonl
    python train.py --data ../shared/data/fireact/finetune/alpaca_format/hotpotqa.json:200 \\
        ../shared/data/fireact/finetune/gpt_format/multitask.jsonl --epochs 1 --out out/mix
    python train.py --data FILE --show-mask 3        # print record 3 with the trained tokens highlighted
    python train.py --data FILE --show-mask 3 --html mask.html   # ... and as a web page (python -m extras mask-html)
    python train.py --data FILE --max-steps 5        # smoke run
    python train.py --plain                          # the teaching path only: fp32 on CPU, eager, no fast kernels
    python train.py --resume                         # continue an interrupted run in --out exactly
    python train.py --config out/train/config.json --out out/again   # rerun a run's recorded settings
    python train.py --recipe fireact --data FILE     # FireAct's own settings (LoRA r=8 on q/v, lr 3e-4, ...)
    python train.py --merge                          # also write a full HF checkpoint to OUT/merged
    python train.py --compile --quant int8           # fastest on a CPU with VNNI: frozen GEMMs in int8
    torchrun --nproc_per_node=2 train.py ...         # data parallel (gloo on CPU, NCCL on GPU)

Data files (mix several; `FILE:N` samples N records from FILE): our trajectory JSONL, FireAct's alpaca JSON
and FireAct's gpt-format JSONL. Every record is rendered by `render` (the same function inference uses):

    Question: {question}\\n                       <- masked
    Thought: {thought}\\nAction: {action}\\n        <- trained
    Observation: {observation}\\n                  <- masked
    ...
    Thought: {thought}\\nAction: finish[{answer}]<eos>   <- trained

This file owns the training run: config, batches, the masked loss, the loop, validation, save/resume. The speed paths
(bf16 policy, fast attention, int8 frozen GEMMs, the compiled loss, MFU) are swaps in fast/training.py that train()
applies unless --plain.
"""
import dataclasses
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
from fireact import render, show_mask
from model import apply_lora, load_model, pick_device, pick_dtype, save_adapter, save_checkpoint
from tasks import read_training_records

REPO = Path(__file__).resolve().parent
DEFAULT_DATA = "data/toy/train.jsonl"
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    # `python train.py --help` shows each setting with the comment on its line; the defaults are the toy demo
    model: str = ""                     # HF checkpoint dir, .gguf file or hub id org/name; "" = embedded SmolLM2-135M
    data: list = field(default_factory=lambda: [DEFAULT_DATA])  # trajectory files, mixed; FILE:N samples N records
    val_data: list = field(default_factory=list)  # validation files; none = hold out --val-frac of --data
    val_frac: float = 0.05              # share of --data held out for validation (only with >= 10 records)
    val_max: int = 64                   # cap on held-out records: validation runs every --eval-every steps
    out: str = "out/train"              # run dir: adapter, config.json, run.json, metrics.jsonl, state.pt
    recipe: Literal["default", "fireact"] = "default"  # presets for settings not given: fireact = FireAct's own
    keep_failed: bool = False           # keep FireAct's released rows that end `reward = False` (dropped by default)
    template: Literal["react", "alpaca"] = "react"  # prompt around the question (training and inference)
    train_on: Literal["actions", "all"] = "actions"  # trained tokens: actions = Thought/Action only; all = every token
    max_len: int = 1024                 # tokens per example (FireAct cut at 512)
    overlong: Literal["truncate", "skip"] = "truncate"  # examples over --max-len: keep their start, or drop them
    lora_targets: str = ",".join(LLAMA_PROJECTIONS)  # comma-separated projections with LoRA (FireAct: q_proj,v_proj)
    lora_r: int = 16                    # LoRA rank (FireAct: 8)
    lora_alpha: int = 32                # LoRA scale is alpha / r: 2, as FireAct's 16 / 8
    lora_dropout: float = 0.0           # dropout on the LoRA input (FireAct: 0.05)
    lr: float = 0.0                     # peak learning rate; 0 = by model size: 2e-3 up to 1B parameters, 3e-4 above
    min_lr_frac: float = 0.1            # cosine decays to lr x min_lr_frac (nanoGPT's choice)
    warmup: int = 10                    # linear warmup, optimizer steps (capped at a fifth of short runs)
    weight_decay: float = 0.0           # AdamW weight decay: 0 as in alpaca-lora (LoRA B starts at zero)
    grad_clip: float = 1.0              # clip the gradient norm to this (0 = off): guards the high lr
    epochs: int = 0                     # passes over --data; 0 = 1 on CPU (the 15-minute demo), 3 on CUDA (FireAct)
    batch_size: int = 0                 # sequences per optimizer step (global); 0 = micro_batch x processes
    micro_batch: int = 0                # sequences per forward per process; 0 = 2 on CPU, 16 on CUDA
    max_steps: int = 0                  # > 0: the run (and its lr schedule) is this many steps; 0 = --epochs decide
    stop_after: int = 0                 # > 0: stop after N steps but keep the schedule (continue with --resume)
    eval_every: int = 50                # validation loss every N optimizer steps, and at the end
    save_every: int = 100               # adapter + resumable state every N optimizer steps
    seed: int = 0                       # data order, validation split and dropout masks = f(seed, step)
    device: str = ""                    # cpu | cuda | cuda:N | mps; "" = the best available
    dtype: Literal["", "float32", "bfloat16"] = ""  # the frozen base's dtype (trained weights stay fp32); "" = auto
    quant: Literal["", "int8"] = ""     # int8 = the frozen matmuls as smoothed int8 GEMMs (CPU with VNNI, native bf16)
    calib_batches: int = 8              # with --quant int8: micro-batches whose activations set the smoothing
    grad_checkpointing: bool = False    # recompute activations in backward: less memory, more time
    compile: bool | None = None         # torch.compile each decoder block and the loss; auto = on for CPU runs of >= 100 steps
    plain: bool = False                 # the teaching path only: model.pick_dtype, eager, no fast kernels
    resume: bool = False                # continue the run in --out exactly (refused if a setting that matters differs)
    merge: bool = False                 # also write a full HF checkpoint (LoRA merged) to OUT/merged
    full: bool = False                  # full fine-tuning: every weight trained, no LoRA; the model saved in OUT/model
    show_mask: int = -1                 # >= 0: print that record's rendering, trained tokens highlighted, and exit
    html: str = ""                      # with --show-mask: also write it as a self-contained HTML page here
    progress: bool = True               # progress bar

    def check(self):
        """Ranges and paths, checked before anything expensive (cli.parse_config and train call it)."""
        check_config(self)


# ------------------------------------------------------------------------- records -> (ids, mask) -> batches
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


# ------------------------------------------------------------------------------------------- the masked loss
def head_loss(model, h, y):
    """h [N, D] (final hidden states at supervised positions), y [N] -> summed cross-entropy. The LM head runs only
    there: agent data is mostly prompt and observations, so this skips most of the biggest matmul."""
    return F.cross_entropy(model.head(h).float(), y, reduction="sum")   # logits [N, V]


def loss_sum(model, x, y, head_loss=head_loss):
    """Summed cross-entropy over supervised positions (y != -100)."""
    h = model.hidden(x)                                    # [B, T, D]
    sel = y != -100                                        # [B, T]
    return head_loss(model, h[sel], y[sel])


# -------------------------------------------------------------------------------------- AdamW + the schedule
def make_optimizer(params, cfg):
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)


def lr_at(step, total, cfg):
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_frac at the last step. Warmup is capped
    at a fifth of the run so that short runs still reach the peak."""
    warmup = min(cfg.warmup, total // 5)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup - 1)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# -------------------------------------------------------------------------------------------------- the loop
def train_loop(run, model, opt, step=0):
    """Optimizer steps from `step` to the run's end (or --stop-after): each step accumulates the gradient of
    its micro-batches (this process's share), normalised by the step's supervised tokens, then clips and steps
    AdamW. Validates every --eval-every steps, saves every --save-every. -> the step reached."""
    cfg, trainable = run.cfg, [p for p in model.parameters() if p.requires_grad]
    last = cfg.stop_after and min(cfg.stop_after, run.total) or run.total
    try:
        while step < last:
            micro = step_batches(run, step)                # [micro-batch [example index]]
            lr = lr_at(step, run.total, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            # the normaliser: supervised tokens over ALL micro-batches of the step on ALL processes (torchtune)
            n_sup = sum(sum(run.train_ex[j][1][1:]) for mb in micro for j in mb)
            t0 = time.time()
            opt.zero_grad(set_to_none=False)
            loss = torch.zeros((), device=run.device)
            for k in range(run.rank, len(micro), run.world):
                torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + k)  # dropout mask = f(seed, step, k)
                x, y = collate([run.train_ex[j] for j in micro[k]], run.pad_id, run.device)
                with run.autocast:
                    l = run.loss(model, x, y) / n_sup
                l.backward()
                loss += l.detach().float()
            if run.world > 1:
                loss = sync(trainable, loss, run.world)
            gnorm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip > 0 else None
            opt.step()
            step += 1
            log_step(run, step, loss, lr, micro, n_sup, t0, gnorm)
            if run.val_ex and (step % cfg.eval_every == 0 or step == run.total):
                v = validate(model, run)
                append_metrics(run, {"step": step, "val_loss": round(v, 5)})
                (run.bar.write if run.bar else run.log)(f"step {step}: train loss {run.loss_val:.4f}, val loss {v:.4f}")
            if step % cfg.save_every == 0 and step < run.total:
                save(run, model, opt, step)
    except KeyboardInterrupt:
        save(run, model, opt, step)
        run.log(f"\ninterrupted at step {step}: state saved to {run.out}; continue with --resume")
        raise SystemExit(130)
    return step


@torch.no_grad()
def validate(model, run):
    """Mean token loss over this process's share of the validation examples, summed over processes, with the
    loss the steps take (so that --compile's blocks and head serve both)."""
    model.eval()
    tot = torch.zeros(2, dtype=torch.float64, device=run.device)
    mine = run.val_ex[run.rank::run.world]
    for i in range(0, len(mine), run.cfg.micro_batch):
        x, y = collate(mine[i:i + run.cfg.micro_batch], run.pad_id, run.device)
        with run.autocast:
            tot[0] += run.loss(model, x, y).double()
        tot[1] += (y != -100).sum()
    if run.world > 1:
        dist.all_reduce(tot)
    model.train()
    return (tot[0] / tot[1].clamp(min=1)).item()


# ------------------------------------------------------------------------------- the run: setup around the loop
@dataclass
class Run:
    """What the loop reads besides the model and the optimizer (train() builds it)."""
    cfg: TrainConfig
    out: Path
    train_ex: list                      # [(ids, mask)]
    val_ex: list
    lengths: list                       # tokens of each training example
    steps_per_epoch: int
    total: int                          # optimizer steps of the whole run (the lr schedule's length)
    device: torch.device
    pad_id: int
    tok: object
    rank: int = 0
    world: int = 1
    log: object = print                 # prints on rank 0 only
    autocast: object = None             # the context every forward runs in (mixed_precision)
    loss: object = loss_sum             # loss_sum, or fast/training.py's compiled version
    mfu: object = None                  # fast/training.py: model FLOPs utilisation of a step, or None
    bar: object = None
    meta: dict = field(default_factory=dict)   # what made the adapter (its card and config)
    plans: dict = field(default_factory=dict)  # epoch -> plan_epoch
    t_start: float = 0.0
    loss_val: float = None              # the last step's loss

    @property
    def master(self):
        return self.rank == 0


def step_batches(run, step):
    """The micro-batches of optimizer step `step`: its epoch's plan (made once per epoch)."""
    epoch, i = divmod(step, run.steps_per_epoch)
    if epoch not in run.plans:
        run.plans[epoch] = plan_epoch(run.lengths, run.cfg, epoch)
    return run.plans[epoch][i]


def train(cfg):
    """Fine-tune per cfg. -> the output directory (adapter, config.json, run.json, metrics.jsonl, loss.png,
    state.pt). Bad settings or data raise a one-line ValueError before anything is written."""
    apply_recipe(cfg)
    cfg.check()
    rank, world, device = setup_dist(cfg)
    log = print if rank == 0 else (lambda *a, **k: None)
    warn = (lambda m: print(m, file=sys.stderr)) if rank == 0 else log
    cuda = device.type == "cuda"
    cfg.micro_batch = cfg.micro_batch or (16 if cuda else 2)  # CPU: the demo's recipe, chosen on dev (docs)
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

    train_recs, val_recs = load_data(cfg, log)
    dtype = pick_precision(cfg, device, log)   # fast: bf16 where the CPU has it; checks --compile and --quant
    model, tok = load_base(cfg, device=device, dtype=torch.float32 if cfg.full else dtype)
    n_params = sum(p.numel() for p in model.parameters())
    auto_lr = cfg.lr == 0
    if auto_lr:
        cfg.lr = default_lr(n_params, cfg.full)
    if cfg.resume:
        check_resume(out, saved, cfg)
    run = encode_data(cfg, train_recs, val_recs, tok, out, device, rank, world, log)
    log(f"settings: --recipe {cfg.recipe}: lr {cfg.lr:g}"
        + (f" (by model size: {n_params / 1e6:.1f}M parameters)" if auto_lr else "")
        + f", LoRA r={cfg.lora_r} alpha {cfg.lora_alpha} dropout {cfg.lora_dropout}, --max-len {cfg.max_len}, "
          f"--train-on {cfg.train_on}, --template {cfg.template}, {cfg.epochs} epoch(s)")

    # what is trained is what requires grad: the LoRA weights (apply_lora freezes the rest), or with --full all
    if cfg.full:
        for p in model.parameters():
            p.requires_grad = True
    else:
        apply_lora(model, targets=tuple(cfg.lora_targets.split(",")), r=cfg.lora_r, alpha=cfg.lora_alpha,
                   dropout=cfg.lora_dropout)
    run.autocast = mixed_precision(model, dtype, device.type)
    if not cfg.plain:
        run.loss, run.mfu = speed_up(model, run)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.grad_checkpointing = cfg.grad_checkpointing
    model.train()
    opt = make_optimizer(trainable, cfg)
    log(f"model: {cfg.model or 'SmolLM2-135M-Instruct (embedded)'}, "
        + ("full fine-tuning: " if cfg.full else f"LoRA r={cfg.lora_r} on {cfg.lora_targets}: ") +
        f"{sum(p.numel() for p in trainable):,} trainable params; {run.total} steps of {cfg.batch_size} sequences "
        f"({cfg.batch_size // cfg.micro_batch} micro-batches of {cfg.micro_batch}, {world} process(es)), "
        f"device {device}{' bf16' if dtype == torch.bfloat16 else ' fp32'}" + (" (--plain)" if cfg.plain else ""))

    # resume: trained weights, optimizer, step and RNG. The data order and dropout masks are functions of
    # (seed, step), so restoring the step restores them exactly.
    step = 0
    if cfg.resume:
        step = load_state(out, model, opt)
        log(f"resumed from {out / 'state.pt'} at step {step}")
    if run.master:
        start_run_dir(run, step, metrics, n_params)
        if cfg.progress:
            from tqdm import tqdm
            run.bar = tqdm(total=run.total, initial=step, desc="train", dynamic_ncols=True)
    run.t_start = time.time()
    step = train_loop(run, model, opt, step)
    finish(run, model, opt, step)
    if world > 1:
        dist.destroy_process_group()
    return out


def pick_precision(cfg, device, log):
    """The frozen base's dtype. --plain: model.pick_dtype (fp32 on CPU, bf16 on CUDA); else fast/training.py's
    policy (bf16 where the CPU has native bf16 too), which also checks --compile and --quant before anything loads."""
    if cfg.plain:
        return pick_dtype(cfg.dtype, device)
    from fast import training
    return training.precision(cfg, device, log)


def speed_up(model, run):
    """Not --plain: fast/training.py's swaps on the model (LoRA already applied), in place -> (the loss to step
    and validate with, mfu(tokens, supervised tokens, sequence length, seconds) or None)."""
    from fast import training
    cfg = run.cfg
    if cfg.compile is None:   # the policy (fast/training.py): compile where the run repays it
        cfg.compile = training.auto_compile(cfg, run.device, run.total, run.log)
    calib = []
    if cfg.quant:   # the first micro-batches of the (seeded) plan: the same smoothing when resumed
        micro = [mb for st in run.plans[0] for mb in st][:cfg.calib_batches]
        calib = [collate([run.train_ex[j] for j in mb], run.pad_id, run.device) for mb in micro]
    loss = training.for_training(model, cfg, run.autocast, calib, loss_sum, head_loss, run.log)
    return loss, training.mfu_meter(model, run.device, run.world)


def mixed_precision(model, dtype, device_type):
    """The trained weights (those that require grad) in fp32, whatever the frozen base's dtype; -> the autocast
    context every forward runs in: bf16 matmuls when the base is bf16, off otherwise."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def encode_data(cfg, train_recs, val_recs, tok, out, device, rank, world, log):
    """Records -> examples, the epoch plan and the step count, logged -> a Run (without its model parts)."""
    data_tools = {}  # which tools made the training observations: eval picks the same tool family
    for r in train_recs:
        data_tools[r.get("tool", "?")] = data_tools.get(r.get("tool", "?"), 0) + 1
    train_ex, trunc, skip = encode_records(train_recs, tok, cfg)
    val_ex, _, _ = encode_records(val_recs, tok, cfg)
    if not train_ex:
        raise ValueError("no trainable examples after rendering (all skipped as over-long or fully masked?)")
    lengths = [len(ids) for ids, _ in train_ex]
    plan0 = plan_epoch(lengths, cfg, 0)
    n_sup = sum(sum(m[1:]) for _, m in train_ex)
    log(f"data: {len(train_ex)} train / {len(val_ex)} val examples, {sum(lengths)} tokens, {n_sup} trained "
        f"({n_sup / sum(lengths):.0%}); {trunc} truncated, {skip} skipped (--max-len {cfg.max_len}, "
        f"--overlong {cfg.overlong}); padding waste {padding_waste(lengths, plan0):.1%}")
    meta = {"template": cfg.template, "train_on": cfg.train_on, "data": cfg.data, "data_tools": data_tools}
    return Run(cfg, out, train_ex, val_ex, lengths, len(plan0), cfg.max_steps or cfg.epochs * len(plan0), device,
               tok.pad_id, tok, rank, world, log, meta=meta, plans={0: plan0})


def padding_waste(lengths, plan):
    real = sum(lengths[i] for st in plan for mb in st for i in mb)
    padded = sum(len(mb) * max(lengths[i] for i in mb) for st in plan for mb in st)
    return 1 - real / max(1, padded)


def log_step(run, step, loss, lr, micro, n_sup, t0, gnorm):
    """One metrics.jsonl row per optimizer step (loss, lr, throughput, gradient norm, MFU where known)."""
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    dt, run.loss_val = time.time() - t0, loss.item()
    n_tok = sum(run.lengths[j] for mb in micro for j in mb)
    row = {"step": step, "loss": round(run.loss_val, 5), "lr": lr, "tokens": n_tok, "sup_tokens": n_sup,
           "tok_s": round(n_tok / dt, 1), "sup_tok_s": round(n_sup / dt, 1),
           "grad_norm": round(gnorm.item(), 4) if gnorm is not None else None,
           "time": round(time.time() - run.t_start, 2)}
    if run.mfu:
        row["mfu"] = run.mfu(n_tok, n_sup, n_tok / sum(len(mb) for mb in micro), dt)
    append_metrics(run, row)
    if run.bar:
        run.bar.set_postfix(loss=f"{run.loss_val:.3f}", lr=f"{lr:.1e}", tok_s=f"{row['tok_s']:.0f}",
                            sup_s=f"{row['sup_tok_s']:.0f}", **({"mfu": row["mfu"]} if "mfu" in row else {}))
        run.bar.update(1)


def append_metrics(run, row):
    if run.master:
        with open(run.out / "metrics.jsonl", "a") as f:
            files.append_jsonl(f, row)


# ------------------------------------------------------------------------------------------------- save/resume
def start_run_dir(run, step, metrics, n_params):
    """What made this run: every setting (resolved) and the code, torch and python versions; the metrics of a
    resumed run up to its step. resume and stop_after say how this session ran, not what it trains:
    `--config OUT/config.json` reruns the whole run afresh, `--config OUT/config.json --resume` continues it."""
    out, cfg = run.out, run.cfg
    out.mkdir(parents=True, exist_ok=True)
    files.atomic_write(out / "config.json", json.dumps({**dataclasses.asdict(cfg), "resume": False, "stop_after": 0},
                                                       indent=1))
    runs = []
    if cfg.resume and (out / "run.json").exists():
        try:
            runs = files.read_json(out / "run.json", want=dict)["sessions"]
        except (ValueError, KeyError, TypeError):
            print(f"warning: {out / 'run.json'}: unreadable; its earlier sessions are dropped", file=sys.stderr)
    runs.append({**cli.provenance(), "start_step": step, "steps": run.total, "device": str(run.device),
                 "processes": run.world, "model_parameters": n_params})
    files.atomic_write(out / "run.json", json.dumps({"sessions": runs}, indent=1))
    files.atomic_write(out / "metrics.jsonl", "".join(line + "\n" for line, r in metrics if r["step"] <= step))


def save(run, model, opt, step, final=False):
    """Adapter (PEFT format) + resumable state, flushed to disk before it replaces the old one; periodic
    adapters under OUT/checkpoints/."""
    if not run.master:
        return
    cfg, out = run.cfg, run.out
    # the card and config say what made the adapter: the run's settings (eval follows its template) and step
    meta = {"step": step, **run.meta, "config": dataclasses.asdict(cfg), "provenance": cli.provenance()}
    if cfg.full:  # a full checkpoint, with the same record of what made it as an adapter's card
        save_checkpoint(model, run.tok, out / "model")
        files.atomic_write(out / "model" / "fireact.json", json.dumps(meta, indent=1))
    else:
        save_adapter(model, out, base_model=cfg.model or "", meta=meta)
        if not final:
            save_adapter(model, out / "checkpoints" / f"step_{step:06d}", base_model=cfg.model or "", meta=meta)
    state = {"lora": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
             "optimizer": opt.state_dict(), "step": step, "rng": torch.get_rng_state(), "py_seed": cfg.seed + step}
    files.atomic_write(out / "state.pt", lambda f: torch.save(state, f))


def finish(run, model, opt, step):
    """The last save, the loss curve and the closing line; --merge writes the merged checkpoint."""
    if run.bar:
        run.bar.close()
    save(run, model, opt, step, final=step >= run.total)
    if not run.master:
        return
    out, png = run.out, plot_losses(run.out)
    run.log(f"done: {step} steps in {time.time() - run.t_start:.0f}s, last loss "
            f"{run.loss_val if run.loss_val is not None else float('nan'):.4f}; "
            f"{'model: ' + str((out / 'model').resolve()) if run.cfg.full else 'adapter: ' + str(out.resolve())}"
            + (f", loss curve: {png}" if png else ""))
    if run.cfg.merge and step >= run.total:
        save_checkpoint(model, run.tok, out / "merged")
        run.log(f"merged checkpoint: {(out / 'merged').resolve()}")


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


# the settings a resumed run may change: they do not change the trained weights (every other one does)
RESUME_FREE = {"recipe", "out", "eval_every", "save_every", "stop_after", "device", "grad_checkpointing", "compile",
               "resume", "merge", "show_mask", "html", "progress"}


def saved_config(out):
    """The config.json of the run in `out` (None for a run from before config.json existed)."""
    path = out / "config.json"
    if not path.exists():
        return None
    return files.read_json(path, want=dict, hint="restore it, or delete it to resume unchecked")


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


def read_metrics(path, warn=print):
    """metrics.jsonl -> [(line, row)]. A torn last line (a crash in mid-append) is cut off with a warning; a bad
    line before it means the history is damaged: an error naming file:line. (Not files.read_jsonl: a resumed run
    keeps the rows up to its step, rewritten as they were, and a whole last line that is bad counts as torn.)"""
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


# ------------------------------------------------------------------------------------- data files, processes
def split_spec(spec):
    """'FILE:N' -> (FILE, N); 'FILE' -> (FILE, None). The default data path resolves against the repo."""
    path, n = (spec.rsplit(":", 1)[0], int(spec.rsplit(":", 1)[1])) if re.search(r":\d+$", spec) else (spec, None)
    return (str(REPO / path) if path == DEFAULT_DATA else path), n


def read_data_file(path, keep_failed=False, log=print):
    """read_records (tasks.py owns the formats; it names the file and line of any bad record), refusing a file with
    no records, less the failed trajectories (FireAct's `reward = False` rows) unless keep_failed."""
    recs = read_training_records(path, keep_failed, log)
    if not recs:
        raise ValueError(f"{path}: no records (an empty file?)")
    return recs


def load_data(cfg, log=print):
    """Mix the data files (FILE:N samples N records), hold out a validation split. -> (train, val) records."""
    rng, train, val = random.Random(cfg.seed), [], []
    for spec in cfg.data:
        path, n = split_spec(spec)
        recs = read_data_file(path, cfg.keep_failed, log)
        if n:
            recs = rng.sample(recs, min(n, len(recs)))
        log(f"data: {path}: {len(recs)} records" + (f" (sampled {n})" if n else ""))
        train += recs
    for path in cfg.val_data:
        val += read_data_file(path, cfg.keep_failed, log)
    if not val and cfg.val_frac > 0 and len(train) >= 10:
        rng.shuffle(train)
        k = min(cfg.val_max, max(1, round(cfg.val_frac * len(train))))
        val, train = train[:k], train[k:]
    return train, val


def load_base(cfg, device=None, dtype=None):
    """load_model with its errors (missing files, bad config, unknown name) as one line naming --model."""
    try:
        return load_model(cfg.model or None, device=device, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"--model {cfg.model or '(embedded)'}: cannot load it: {cli.one_line(e)}") from None


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


def sync(params, loss, world):
    """Sum the trained weights' gradients and the loss over processes in one all-reduce. The loss of every
    micro-batch is already divided by the step's *global* supervised-token count, so the sum is exactly the
    one-process gradient (plain DDP averages instead, and would also need no_sync() around the accumulation)."""
    for p in params:
        if p.grad is None:      # a process whose micro-batches never reached this weight
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params] + [loss.view(1)])
    dist.all_reduce(flat)
    i = 0
    for p in params:
        p.grad.copy_(flat[i:i + p.numel()].view_as(p))
        i += p.numel()
    return flat[-1]


# ---------------------------------------------------------------------------------------- settings and the CLI
# --recipe: values for the settings the user did not give explicitly (cli.explicit); "default" = the field defaults
RECIPES = {"default": {},
           "fireact": dict(lora_r=8, lora_alpha=16, lora_dropout=0.05, lora_targets="q_proj,v_proj", lr=3e-4,
                           max_len=512, train_on="all", template="alpaca")}


def apply_recipe(cfg):
    """Fill in cfg.recipe's values for the settings not given explicitly (on the command line, in --config or,
    for a config built in code, by differing from the default)."""
    given = cli.explicit(cfg)
    for k, v in RECIPES[cfg.recipe].items():
        if k not in given:
            setattr(cfg, k, v)
    return cfg


def default_lr(n_params, full=False):
    """--lr 0: LoRA 2e-3 up to 1B parameters, 3e-4 above; full fine-tuning moves every weight, so ~20x lower:
    1e-4 (2e-5 above 1B)."""
    if full:
        return 1e-4 if n_params <= 1e9 else 2e-5
    return 2e-3 if n_params <= 1e9 else 3e-4


def check_config(cfg):
    """TrainConfig.check: every range and path, as a one-line ValueError naming the flag."""
    rules = [("max_steps", cfg.max_steps >= 0, ">= 0"), ("stop_after", cfg.stop_after >= 0, ">= 0"),
             ("save_every", cfg.save_every >= 1, ">= 1"), ("eval_every", cfg.eval_every >= 1, ">= 1"),
             ("lora_r", cfg.lora_r >= 1, ">= 1"), ("lora_alpha", cfg.lora_alpha > 0, "> 0"),
             ("lora_dropout", 0 <= cfg.lora_dropout < 1, "in [0, 1)"), ("lr", cfg.lr >= 0, "> 0 (0 = auto)"),
             ("min_lr_frac", 0 <= cfg.min_lr_frac <= 1, "in [0, 1]"), ("warmup", cfg.warmup >= 0, ">= 0"),
             ("weight_decay", cfg.weight_decay >= 0, ">= 0"), ("grad_clip", cfg.grad_clip >= 0, ">= 0"),
             ("epochs", cfg.epochs >= 0, ">= 0"), ("batch_size", cfg.batch_size >= 0, ">= 0"),
             ("micro_batch", cfg.micro_batch >= 0, ">= 0"), ("val_frac", 0 <= cfg.val_frac < 1, "in [0, 1)"),
             ("val_max", cfg.val_max >= 0, ">= 0"), ("max_len", cfg.max_len >= 16, ">= 16"),
             ("show_mask", cfg.show_mask >= -1, ">= 0, or -1 (off)"),
             ("calib_batches", cfg.calib_batches >= 1, ">= 1")]
    for name, ok, want in rules:
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be {want}")
    if cfg.quant and cfg.full:
        raise ValueError("--quant int8 quantizes the frozen weights: it goes with LoRA, not --full")
    if cfg.plain and (cfg.quant or cfg.compile):
        raise ValueError(f"--plain is the teaching path: it takes no {'--quant' if cfg.quant else '--compile'}")
    if cfg.html and cfg.show_mask < 0:
        raise ValueError(f"--html {cfg.html}: goes with --show-mask N (the record to render)")
    if cfg.batch_size and cfg.micro_batch and cfg.batch_size % cfg.micro_batch:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch {cfg.micro_batch}")
    if not all(t in LLAMA_PROJECTIONS for t in cfg.lora_targets.split(",")):
        raise ValueError(f"--lora-targets {cfg.lora_targets}: choose from {','.join(LLAMA_PROJECTIONS)}")
    if not re.fullmatch(r"|cpu|mps|cuda(:\d+)?", cfg.device):
        raise ValueError(f"--device {cfg.device}: expected cpu, cuda, cuda:N or mps")
    if not cfg.data:
        raise ValueError("--data: give at least one file")
    for flag, specs in (("--data", cfg.data), ("--val-data", cfg.val_data)):
        for spec in specs:
            path, n = split_spec(spec) if flag == "--data" else (spec, None)
            if path == str(REPO / DEFAULT_DATA) and not Path(path).exists():
                raise ValueError(f"no training data at {DEFAULT_DATA}: build the offline default task with "
                                 f"`python toyworld.py`, then `python fireact.py generate --task toy --split "
                                 f"train --teacher-model oracle ...` -> filter -> mix (docs/experiments.md); or "
                                 f"pass --data FILE")
            if not Path(path).exists():
                raise ValueError(f"{flag} {path}: no such file")
            if not Path(path).is_file():
                raise ValueError(f"{flag} {path}: not a file (a directory?); pass the trajectory file itself")
            if n == 0:
                raise ValueError(f"{flag} {spec}: FILE:N needs N >= 1")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; --out is the run directory")
    if cfg.resume and not (out / "state.pt").is_file():
        raise ValueError(f"--resume: no {out / 'state.pt'} (nothing to resume in --out {out})")


def parse_args(argv=None):
    """CLI flags generated from TrainConfig's fields (cli.parse_config): --lora-r 16, --data A B, --merge,
    --no-progress, --config OUT/config.json; checked by TrainConfig.check before anything loads."""
    return cli.parse_config(TrainConfig, argv, description=__doc__.split("\n\n")[1])


def mask_record(cfg, log=print):
    """--show-mask N: record N of all --data files in order (no sampling) -> (record, tokenizer)."""
    apply_recipe(cfg)
    recs = []
    for d in cfg.data:
        recs += read_data_file(split_spec(d)[0], cfg.keep_failed, log)
        log(f"data: {split_spec(d)[0]}: {len(recs)} records so far")
    if cfg.show_mask >= len(recs):
        raise ValueError(f"--show-mask {cfg.show_mask}: only {len(recs)} records")
    return recs[cfg.show_mask], load_base(cfg)[1]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    if cfg.show_mask < 0:
        return train(cfg)
    rec, tok = mask_record(cfg)
    show_mask(rec, tok, cfg.train_on, template=cfg.template)
    if cfg.html:   # the web page is an extra: a process of its own (nothing in the core imports the extras)
        try:
            cli.hand_off(["mask-html", *argv])
        except SystemExit as e:
            if e.code:
                raise


if __name__ == "__main__":
    cli.run(main)

"""
LoRA fine-tuning on agent trajectories, with observation masking: the student learns to think and act, not to
imitate the tool. One readable PyTorch loop; no Trainer.

    python train.py                                  # embedded SmolLM2-135M-Instruct on data/toy/train.jsonl
    python train.py --data ../shared/data/fireact/finetune/alpaca_format/hotpotqa.json:200 \\
        ../shared/data/fireact/finetune/gpt_format/multitask.jsonl --epochs 1 --out out/mix
    python train.py --data FILE --show-mask 3        # print record 3 with the trained tokens highlighted
    python train.py --data FILE --max-steps 5        # smoke run
    python train.py --resume                         # continue an interrupted run in --out exactly
    python train.py --merge                          # also write a full HF checkpoint to OUT/merged
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
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import apply_lora, load_model, save_adapter, save_checkpoint
from tools import parse_config

REPO = Path(__file__).resolve().parent
DEFAULT_DATA = "data/toy/train.jsonl"


@dataclass
class TrainConfig:
    model: str = ""                     # HF dir or org/name; "" = embedded SmolLM2-135M-Instruct
    data: list = field(default_factory=lambda: [DEFAULT_DATA])  # FILE or FILE:N (sample N records)
    val_data: list = field(default_factory=list)  # separate validation files; else hold out val_frac
    val_frac: float = 0.05
    val_max: int = 64                   # cap on held-out records (validation runs every eval_every steps)
    out: str = "out/train"
    train_on: str = "actions"           # "actions" (Thought/Action only) | "all" (FireAct's own behaviour)
    max_len: int = 1024                 # tokens per example
    overlong: str = "truncate"          # "truncate" | "skip"
    # Defaults, chosen so `python train.py` finishes in <= 15 min on a 2-core CPU with a falling loss. The toy
    # set is 518 trajectories x ~290 tokens = ~150k tokens; an idle 2-core CPU trains SmolLM2-135M at ~220
    # tokens/s (fp32, frozen weights still cost 4N FLOPs/token): one epoch, 130 steps of 4, takes ~13 min.
    # Measured on the toy test split (README): what the student needs in so little compute is many updates on
    # varied data. 196 trajectories x 3 epochs in steps of 8 gave EM 49; 518 x 1 epoch in steps of 8, EM 58;
    # the same in steps of 4 (twice the updates, same tokens), EM 86. Also for few steps: LoRA on all seven
    # projections (more capacity per step than FireAct's q/v-only; ~1% more FLOPs at r=16) and a high LR
    # (2e-3 suits LoRA on a 135M model; FireAct's 3e-4 was for 7B+ and 3+ epochs).
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lr: float = 2e-3
    min_lr_frac: float = 0.1            # cosine decays to lr * min_lr_frac
    warmup: int = 10                    # optimizer steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    epochs: int = 0                     # 0 = 1 on CPU (the 15-minute budget), 3 on CUDA
    batch_size: int = 0                 # sequences per optimizer step (global); 0 = micro_batch x processes
    micro_batch: int = 0                # sequences per forward per process; 0 = 4 on CPU, 16 on CUDA
    max_steps: int = 0                  # >0: the run (and its schedule) is this many optimizer steps
    stop_after: int = 0                 # >0: stop after N steps keeping the schedule (an interruption)
    eval_every: int = 50
    save_every: int = 100
    seed: int = 0
    device: str = ""                    # "" = cuda if available else cpu
    grad_checkpointing: bool = False
    compile: bool = False
    resume: bool = False
    merge: bool = False                 # also write a full HF checkpoint (LoRA merged) to OUT/merged
    show_mask: int = -1                 # >=0: print that record's rendering with trained tokens highlighted
    progress: bool = True


# ------------------------------------------------------------------------------------------------------ data
# The trajectory format (readers of the three file formats, render + mask, the mask visualiser) has one owner,
# fireact.py, torch-free, so that `fireact.py mix` needs no torch and inference renders exactly as training.
from fireact import read_records, render, show_mask  # noqa: E402


def encode_records(recs, tokenizer, cfg):
    """Records -> list of (ids, mask) clipped to max_len; returns (examples, n_truncated, n_skipped)."""
    out, trunc, skip = [], 0, 0
    for r in recs:
        ids, mask = render(r["question"], r["steps"], tokenizer, cfg.train_on)
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


def load_data(cfg, log=print):
    """Mix the data files (FILE:N samples N records), hold out a validation split. -> (train, val) records."""
    rng, train, val = random.Random(cfg.seed), [], []
    for spec in cfg.data:
        path, n = split_spec(spec)
        recs = read_records(path)
        if n:
            recs = rng.sample(recs, min(n, len(recs)))
        log(f"data: {path}: {len(recs)} records" + (f" (sampled {n})" if n else ""))
        train += recs
    for path in cfg.val_data:
        val += read_records(path)
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
def loss_sum(model, x, y):
    """Summed cross-entropy over supervised positions. The LM head ([D, V], the biggest matmul at V=49k) runs
    only where y != -100: agent data is mostly prompt and observations, so this skips most of its cost and
    never materialises [B, T, V] logits."""
    h = model.hidden(x)                                    # [B, T, D]
    sel = y != -100                                        # [B, T]
    logits = model.head(h[sel])                            # [N, V], N = supervised tokens
    return F.cross_entropy(logits.float(), y[sel], reduction="sum")


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
    dev = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1:
        if dev == "cuda":
            dev = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
        return dist.get_rank(), world, torch.device(dev)
    return 0, 1, torch.device(dev)


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
def evaluate(model, val, cfg, device, pad_id, rank, world, autocast):
    """Mean token loss over this process's share of the validation examples, summed over processes."""
    model.eval()
    tot = torch.zeros(2, dtype=torch.float64, device=device)
    mine = val[rank::world]
    for i in range(0, len(mine), cfg.micro_batch):
        x, y = collate(mine[i:i + cfg.micro_batch], pad_id, device)
        with autocast:
            tot[0] += loss_sum(model, x, y).double()
        tot[1] += (y != -100).sum()
    if world > 1:
        dist.all_reduce(tot)
    model.train()
    return (tot[0] / tot[1].clamp(min=1)).item()


def atomic_save(obj, path):
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def plot_losses(out):
    """metrics.jsonl -> loss.png (skipped quietly when matplotlib is absent)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
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


def train(cfg):
    """Fine-tune per cfg. -> the output directory (adapter, metrics.jsonl, loss.png, state.pt)."""
    rank, world, device = setup_dist(cfg)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    cuda = device.type == "cuda"
    cfg.micro_batch = cfg.micro_batch or (16 if cuda else 4)
    cfg.batch_size = cfg.batch_size or cfg.micro_batch * world  # one micro-batch per process (more updates)
    cfg.epochs = cfg.epochs or (3 if cuda else 1)
    if cfg.batch_size % cfg.micro_batch:
        raise SystemExit(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch {cfg.micro_batch}")
    if cfg.train_on not in ("actions", "all") or cfg.overlong not in ("truncate", "skip"):
        raise SystemExit("--train-on must be actions|all and --overlong truncate|skip")
    if cfg.data == [DEFAULT_DATA] and not (REPO / DEFAULT_DATA).exists():
        raise SystemExit(f"no training data at {DEFAULT_DATA}: build the offline default task with "
                         f"`python toyworld.py`, then `python fireact.py generate --task toy --split train "
                         f"--teacher-model oracle ...` -> filter -> mix (README, the demo); or pass --data FILE")
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)   # CPU runs are bitwise deterministic (the resume test checks it): the data
    random.seed(cfg.seed)         # order and every dropout mask are functions of (seed, step, micro-batch)

    # data
    try:
        train_recs, val_recs = load_data(cfg, log)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    model, tok = load_model(cfg.model or None, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    train_ex, trunc, skip = encode_records(train_recs, tok, cfg)
    val_ex, _, _ = encode_records(val_recs, tok, cfg)
    if not train_ex:
        raise SystemExit("no trainable examples after rendering (all skipped as over-long or fully masked?)")
    lengths = [len(ids) for ids, _ in train_ex]
    plan0 = plan_epoch(lengths, cfg, 0)
    steps_per_epoch = len(plan0)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    n_sup = sum(sum(m[1:]) for _, m in train_ex)
    log(f"data: {len(train_ex)} train / {len(val_ex)} val examples, {sum(lengths)} tokens, {n_sup} trained "
        f"({n_sup / sum(lengths):.0%}); {trunc} truncated, {skip} skipped (--max-len {cfg.max_len}, "
        f"--overlong {cfg.overlong}); padding waste {padding_waste(lengths, plan0):.1%}")

    # model: LoRA on the targets, everything else frozen. LoRA weights stay fp32 under bf16 autocast.
    apply_lora(model, targets=tuple(cfg.lora_targets.split(",")), r=cfg.lora_r, alpha=cfg.lora_alpha,
               dropout=cfg.lora_dropout)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.data = p.data.float()
    model.grad_checkpointing = cfg.grad_checkpointing
    model.train()
    step_loss = torch.compile(loss_sum, dynamic=True) if cfg.compile else loss_sum
    opt = torch.optim.AdamW(lora, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    log(f"model: {cfg.model or 'SmolLM2-135M-Instruct (embedded)'}, LoRA r={cfg.lora_r} on {cfg.lora_targets}: "
        f"{sum(p.numel() for p in lora):,} trainable params; {total} steps of {cfg.batch_size} sequences "
        f"({cfg.batch_size // cfg.micro_batch} micro-batches of {cfg.micro_batch}, {world} process(es)), "
        f"device {device}{' bf16' if cuda else ' fp32'}")

    # resume: LoRA weights, optimizer, step and RNG. The data order and dropout masks are functions of
    # (seed, step), so restoring the step restores them exactly.
    step = 0
    if cfg.resume:
        if not (out / "state.pt").exists():
            raise SystemExit(f"--resume: no {out / 'state.pt'} (nothing to resume in --out {out})")
        st = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in st["lora"]:
                    p.copy_(st["lora"][n])
        opt.load_state_dict(st["optimizer"])
        step = st["step"]
        torch.set_rng_state(st["rng"])
        random.seed(st["py_seed"])
        log(f"resumed from {out / 'state.pt'} at step {step}")
    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        mpath = out / "metrics.jsonl"
        keep = [l for l in mpath.read_text().splitlines() if json.loads(l)["step"] <= step] \
            if cfg.resume and mpath.exists() else []
        mpath.write_text("".join(l + "\n" for l in keep))

    def save(final=False):
        """Adapter (PEFT format, atomic) + resumable state; periodic adapters under OUT/checkpoints/."""
        if not master:
            return
        save_adapter(model, out, base_model=cfg.model or "HuggingFaceTB/SmolLM2-135M-Instruct")
        if not final:
            save_adapter(model, out / "checkpoints" / f"step_{step:06d}", base_model=cfg.model or "")
        atomic_save({"lora": {n: p.detach().cpu() for n, p in model.named_parameters() if "lora_" in n},
                     "optimizer": opt.state_dict(), "step": step, "rng": torch.get_rng_state(),
                     "py_seed": cfg.seed + step}, out / "state.pt")

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
                for p in lora:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                loss = sync(lora, loss, world)
            gnorm = torch.nn.utils.clip_grad_norm_(lora, cfg.grad_clip) if cfg.grad_clip > 0 else None
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
                v = evaluate(model, val_ex, cfg, device, tok.pad_id, rank, world, autocast)
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
            f"{loss_val if loss_val is not None else float('nan'):.4f}; adapter: {out.resolve()}"
            + (f", loss curve: {png}" if png else ""))
        if cfg.merge and step >= total:
            save_checkpoint(model, tok, out / "merged")
            log(f"merged checkpoint: {(out / 'merged').resolve()}")
    if world > 1:
        dist.destroy_process_group()
    return out


# ------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    """CLI flags generated from TrainConfig's fields: --lora-r 16, --data A B, --merge, --no-progress."""
    return parse_config(TrainConfig, argv, description=__doc__.split("\n\n")[1])


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.show_mask >= 0:   # records of all --data files in order (no sampling), after the per-file counts
        recs = []
        for d in cfg.data:
            try:
                recs += read_records(split_spec(d)[0])
            except ValueError as e:
                raise SystemExit(str(e)) from None
            print(f"data: {split_spec(d)[0]}: {len(recs)} records so far")
        if cfg.show_mask >= len(recs):
            raise SystemExit(f"--show-mask {cfg.show_mask}: only {len(recs)} records")
        _, tok = load_model(cfg.model or None)
        show_mask(recs[cfg.show_mask], tok, cfg.train_on)
        return
    train(cfg)


if __name__ == "__main__":
    main()

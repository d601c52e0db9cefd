"""
Attention kernels for the CPU, as a swap of Attention.attend (swap_attention): a prefix every row shares attended
to once (shared_prefix_attention, also bf16 decode's kernel), and causal attention for bf16 training with a faster
blocked backward (the causal_attention custom op). Everything else goes to the model's own SDPA attend.

    import fast.attention
    fast.attention.swap_attention(model)   # train.py and fast.for_inference apply it
"""
import torch

import model as M
from fast.linear import swap_class

def shared_prefix_attention(q, k, v, mask, pk=None, pv=None):
    """Attention over [a prefix every row shares ; each row's own keys], exact up to float rounding: one softmax
    (fp32) over both parts' scores. q [B, nh, T, hd]; k, v [B, nkv, S, hd] (own); mask [B, 1, T, S] bool or None
    (causal); pk, pv [1, nkv, P, hd], or None (no prefix: plain grouped attention). The prefix is read once for
    all rows, as one GEMM per kv head with the B*g*T queries that share it as rows, instead of B GEMVs over B
    copies. With no prefix it is bf16 decode's attention on CPU (SDPA's bf16 CPU kernel is slow at one query)."""
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

# Causal attention for CPU training in bf16: SDPA's forward, and a backward faster than SDPA's up to ~640 tokens
# (python bench/attention.py; docs): so bf16 and T <= ATTN_MAX_T only.
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
    head), the g query heads that share a kv head stacked as rows (GQA without copies of k, v): a block's scores
    stay in cache. ds = P * (dP - rowsum(dO * O)), then dq = ds k, dk = ds^T q, dv = P^T dO."""
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


class FastAttend:
    """Attention.attend, routed to the kernel that wins for the case; the model's SDPA otherwise."""
    def attend(self, q, k, v, mask, cache):
        T, cpu_bf16 = q.shape[2], q.dtype == torch.bfloat16 and q.device.type == "cpu"
        prefix = cache.prefix(self.idx) if getattr(cache, "shared", None) is not None else None
        if prefix is not None:  # keys/values every row shares, stored once (a shared prompt prefix)
            return shared_prefix_attention(q, k, v, mask, *prefix)
        if T == 1 and cpu_bf16 and not torch.is_grad_enabled():  # bf16 decode: SDPA's bf16 kernel is slow at 1 query
            return shared_prefix_attention(q, k, v, mask)
        if self.training and torch.is_grad_enabled() and mask is None and cache is None and cpu_bf16 \
                and 1 < T <= ATTN_MAX_T:
            return causal_attention(q, k, v)[0]    # CPU bf16 training: SDPA's forward, a faster backward
        return super().attend(q, k, v, mask, cache)

def swap_attention(model):
    """Every Attention of model routes through FastAttend (idempotent). -> model."""
    for m in model.modules():
        if isinstance(m, M.Attention):
            swap_class(m, FastAttend)
    return model

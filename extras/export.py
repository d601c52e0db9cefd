"""
The student outside this repository: a merged Hugging Face checkpoint, or one GGUF file for llama.cpp / Ollama with
an Ollama Modelfile beside it.

    python -m extras export --adapter runs/toy_default --out runs/student_hf                  # merged HF safetensors
    python -m extras export --adapter runs/toy_default --out runs/student.gguf --format gguf --outtype q8_0
    (`python model.py export ...` hands the same command line over to this module)

Owns: ExportConfig, merged_model (base + LoRA merged, fp32 on CPU), the GGUF writer (gguf_vocab, permute_qk,
write_gguf: llama / qwen2 / qwen3 arch, byte-level BPE tokenizers), modelfile (Ollama) and export(). Reading a GGUF back is
common.weights.convert_gguf's; the HF checkpoint is written by model.save_checkpoint (as train.py --merge does).

Exports never leave a half-written result where a retry trips on it: the HF folder is written beside --out and
renamed into place (a non-empty --out is refused unless --force), the GGUF file through files.atomic_write; what
they write is readable by others (0644 under the usual umask), and a second GGUF in a folder gets its own
<name>.Modelfile instead of taking over the first one's Modelfile.
"""
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from common import files, weights
import fireact
import model as M


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class ExportConfig:
    out: str                      # hf: the checkpoint folder; gguf: the .gguf file (a Modelfile is written beside it)
    adapter: str = ""             # LoRA adapter dir to merge in; "" = export the base model
    model: str = ""               # the base; "" = the embedded SmolLM2-135M-Instruct
    format: Literal["hf", "gguf"] = "hf"  # hf: merged safetensors (as train.py --merge) | gguf: llama.cpp, Ollama
    outtype: Literal["f16", "q8_0", "f32"] = "f16"  # gguf: the type of the 2-D weights (norms stay f32)
    force: bool = False           # hf: replace an --out folder that exists and is not empty

    def check(self):
        if self.adapter and not Path(self.adapter).is_dir():
            raise ValueError(f"--adapter {self.adapter}: no such directory")
        if self.format == "gguf" and not self.out.endswith(".gguf"):
            raise ValueError(f"--out {self.out}: a GGUF export is one file; name it *.gguf")
        out = Path(self.out)
        if self.format == "hf" and out.exists():   # a folder: written beside it, renamed into place
            if not out.is_dir():
                raise ValueError(f"--out {self.out}: is a file; an hf export is a folder (give a new folder)")
            if any(out.iterdir()) and not self.force:
                raise ValueError(f"--out {self.out}: the folder exists and is not empty; pass --force to replace it "
                                 "with the export, or give a new folder")
            if not os.access(out.absolute().parent, os.W_OK):
                raise ValueError(f"--out {self.out}: {out.absolute().parent} is not writable")
        else:
            fireact.check_out_path(self.out)


# ------------------------------------------------------------------------------------------------------ export
def merged_model(cfg: ExportConfig):
    """The base with the adapter's LoRA merged into its weights, fp32 on CPU (what both formats write)."""
    model, tok = M.load_model(cfg.model or None, "cpu", torch.float32)
    if cfg.adapter:
        M.load_adapter(model, cfg.adapter, merge=True)
    return model, tok


def gguf_vocab(tok, vocab_size):
    """tokenizer.json (byte-level BPE) -> GGUF's tokens, token types, merges and pre-tokenizer name; what
    common.weights.convert_gguf reads back."""
    path = Path(tok.dir) / "tokenizer.json"
    if tok.hf is None or not path.exists():
        raise ValueError(f"{tok.dir}: GGUF export needs a byte-level BPE tokenizer.json (sentencepiece is not "
                         "supported)")
    tj = files.read_json(path, want=dict)
    if tj["model"].get("type") != "BPE":
        raise ValueError(f"{path}: GGUF export supports BPE tokenizers, not {tj['model'].get('type')}")
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(p.get("type"), p.get("individual_digits")) for p in parts]
    if kinds == [("Digits", True), ("ByteLevel", None)]:
        pre_name = "smollm"   # llama.cpp's name for SmolLM2's: single digits, then GPT-2's regex
    elif kinds == [("ByteLevel", None)]:
        pre_name = "gpt-2"
    elif kinds == [("Split", None), ("ByteLevel", None)] and parts[0].get("pattern") == {"Regex": weights.QWEN2_SPLIT} \
            and parts[1].get("use_regex") is False:
        pre_name = "qwen2"    # Qwen2/2.5/3's: their split regex, then byte-level without GPT-2's
    else:
        raise ValueError(f"{path}: pre-tokenizer {kinds} has no llama.cpp equivalent we know; GGUF export supports "
                         "SmolLM2's, GPT-2's and Qwen2's")
    tokens = [None] * vocab_size
    for t, i in tj["model"]["vocab"].items():
        tokens[i] = t
    special = {a["id"]: a.get("special", False) for a in tj.get("added_tokens", [])}
    for a in tj.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
    types = [1] * vocab_size   # llama.cpp: 1 normal, 3 control, 4 user defined, 5 unused
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", 5
        elif i in special:
            types[i] = 3 if special[i] else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    return tokens, types, merges, pre_name


def permute_qk(w, n_head):
    """llama.cpp's convert_hf_to_gguf permute (common.weights.unpermute_qk undoes it): each head's rotary halves are
    interleaved, as llama.cpp's rope expects."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tokenizer_config(tok) -> dict:
    """The tokenizer's tokenizer_config.json ({} when it has none): the chat template lives there."""
    path = Path(tok.dir) / "tokenizer_config.json"
    return files.read_json(path, want=dict) if path.exists() else {}


def write_gguf(model, tok, path, outtype="f16", name="fireact-student"):
    """The merged model as one GGUF file, written atomically (files.atomic_write). As llama.cpp converts: llama
    and mistral as the llama arch (q/k rows permuted), qwen2 / qwen3 as their own (not permuted)."""
    import gguf
    import numpy as np
    c = model.config
    if (c.rope_scaling or {}).get("rope_type", (c.rope_scaling or {}).get("type")) == "llama3":
        raise ValueError("GGUF export of llama3 rope scaling (rope_freqs) is not supported")
    inv = {hf: g for g, hf in weights.GGUF_NAMES.items()}
    Q = gguf.GGMLQuantizationType
    arch = {"mistral": "llama"}.get(c.model_type, c.model_type)   # llama, qwen2, qwen3: weights.GGUF_ARCHS
    w = gguf.GGUFWriter(None, arch)   # no path: it writes into atomic_write's temporary file (below)
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    if c.rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scaling["factor"])
    w.add_vocab_size(c.vocab_size)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges, pre = gguf_vocab(tok, c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        if i is not None:
            getattr(w, f"add_{key}_token_id")(i)
    w.add_add_bos_token(bool(tok.add_bos))
    chat = tokenizer_config(tok).get("chat_template")
    if isinstance(chat, str):
        w.add_chat_template(chat)
    for n, t in model.state_dict().items():
        if ".lora_" in n or (n == "lm_head.weight" and c.tie_word_embeddings):
            continue
        parts = n.split(".")   # model.layers.3.self_attn.q_proj.weight | model.embed_tokens.weight
        gname = f"blk.{parts[2]}.{inv['.'.join(parts[3:-1])]}.{parts[-1]}" if parts[1:2] == ["layers"] \
            else f"{inv['.'.join(parts[:-1])]}.{parts[-1]}"
        t = t.detach().float().cpu()
        if gname.split(".")[-2] in ("attn_q", "attn_k") and arch == "llama":
            t = permute_qk(t, c.num_attention_heads if "attn_q" in gname else c.num_key_value_heads)
        a = t.numpy()
        if a.ndim == 1 or outtype == "f32":
            w.add_tensor(gname, a.astype(np.float32))
        elif outtype == "q8_0" and a.shape[-1] % 32 == 0:
            w.add_tensor(gname, gguf.quants.quantize(a, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:   # f16, or a row length q8_0's blocks of 32 do not divide
            w.add_tensor(gname, a.astype(np.float16))

    def write(f):   # the writer opens files by name; handed atomic_write's open file instead, it writes there
        w.fout, w.state = [f], gguf.WriterState.EMPTY
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.fout = None   # atomic_write flushes, fsyncs, closes and renames it
    return files.atomic_write(path, write)


def modelfile(gguf_name, tok, adapter_template):
    """Ollama's Modelfile: the student's trajectory layout (adapter_template, react or alpaca) or ChatML as a Go
    template, and the stops: `\\nObservation:` (the tool answers, not the model), for the student `\\nThought:`
    (its next turn: it never learned to write Observation lines) and eos."""
    if adapter_template:
        head = fireact.segments("{{ $m.Content }}", [], for_inference=True, template=adapter_template)[0][0]
        tpl = ("{{- range $i, $m := .Messages }}{{ if eq $i 0 }}" + head +
               "{{ else }}{{ $m.Content }}\n{{ end }}{{ end }}")
    else:
        tpl = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n")
    stops = ["\\nObservation:"] + ["\\nThought:"] * bool(adapter_template) + \
        ([tok.decode([tok.eos_id])] if tok.eos_id is not None else [])   # \nThought: one turn, as `serve` ends it
    return (f"# ollama create student -f Modelfile && ollama run student\nFROM ./{gguf_name}\n"
            f'TEMPLATE """{tpl}"""\n' + "".join(f'PARAMETER stop "{s}"\n' for s in stops) +
            "PARAMETER temperature 0\n")


def save_folder(model, tok, out, force=False) -> Path:
    """The merged HF checkpoint (model.save_checkpoint, as train.py --merge) written into the sibling
    <out>.tmp<pid>, made readable by others (files 0644, folders 0755 under the umask; some writers make 0600),
    then renamed onto out (an old out is moved aside and removed after). A failed export removes its temporary
    folder; a killed one leaves it for the next run to remove (files.remove_stale_tmp): never a half-written
    out that blocks the retry."""
    out = Path(out)
    files.remove_stale_tmp(out)
    tmp, old = out.with_name(f"{out.name}.tmp{os.getpid()}"), out.with_name(f"{out.name}.tmp{os.getpid()}old")
    try:
        M.save_checkpoint(model, tok, tmp)
        umask = os.umask(0)
        os.umask(umask)
        for f in [tmp, *tmp.rglob("*")]:
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        if out.exists():
            if any(out.iterdir()) and not force:
                raise ValueError(f"--out {out}: the folder exists and is not empty; pass --force to replace it")
            os.rename(out, old)
        os.rename(tmp, out)
        files.fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.rename(old, out)   # the old folder back in place
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def export(cfg: ExportConfig) -> Path:
    model, tok = merged_model(cfg)
    if cfg.format == "hf":
        out = save_folder(model, tok, cfg.out, cfg.force)
    else:
        name = Path(cfg.adapter or cfg.model or "SmolLM2-135M-Instruct").name
        out = write_gguf(model, tok, cfg.out, cfg.outtype, name)
        template = (fireact.adapter_training(cfg.adapter).get("template", "react") if cfg.adapter else "")
        chatml = "<|im_start|>" in (tokenizer_config(tok).get("chat_template") or "")
        if template or chatml:   # a Modelfile that FROMs another GGUF of this folder stays that one's
            mf = out.parent / "Modelfile"
            if mf.exists() and f"FROM ./{out.name}\n" not in files.read_text(mf):
                mf = out.parent / f"{out.stem}.Modelfile"
                print(f"{out.parent / 'Modelfile'} is another GGUF's: this one's is {mf}", file=sys.stderr)
            files.atomic_write(mf, modelfile(out.name, tok, template).replace("-f Modelfile", f"-f {mf.name}"))
    print(f"{out}: {cfg.format}{' ' + cfg.outtype if cfg.format == 'gguf' else ''}"
          f"{', LoRA merged from ' + cfg.adapter if cfg.adapter else ''}")
    return Path(out)


COMMANDS = {"export": (ExportConfig, export, "the merged model as an HF checkpoint or a GGUF file")}

"""Shared pytest fixtures: tiny random HF Llama checkpoints and a tiny byte-level BPE tokenizer.

    from conftest import make_tiny_llama          # or use the `tiny_llama` fixture (a session-wide checkpoint dir)
    d = make_tiny_llama(tmp_path / "m", num_key_value_heads=1, tie_word_embeddings=True)
    model, tok = model.load_model(str(d))
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, so tests can `import model`

@pytest.fixture(autouse=True)
def quick_compile(monkeypatch):
    """The compiled decode step's frozen graph (fast.decode.CompiledDecode) without max-autotune's GEMM timing (a
    minute per test saved): what can go wrong is the freezing (weights held as constants), which stays on;
    max-autotune is speed (bench/generate.py)."""
    import fast.decode
    monkeypatch.setitem(fast.decode.FROZEN_COMPILE, "max_autotune", False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from 2 threads, and on a shared 2-core CPU oversubscribed threads spin (10x slower).
    A test module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = """Question: What is the capital of France? Thought: I need to search France.
Action: search[France] Observation: France is a country in Western Europe. Its capital is Paris.
Thought: The answer is Paris. Action: finish[Paris] Action: lookup[capital] 1234567890 2023 1999.
The quick brown fox jumps over the lazy dog. Hello world, hello there! Numbers 42, 3.14 and 100%."""


def make_tokenizer(out_dir, vocab_size=400, add_bos=False) -> Path:
    """Train a tiny byte-level BPE (SmolLM2-like: single digits, GPT-2 regex, <|endoftext|>=0 bos, <|im_start|>=1, <|im_end|>=2 eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 20, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIAL[0], "eos_token": SPECIAL[2], "pad_token": SPECIAL[0], "add_bos_token": add_bos}))
    return out_dir


def make_tiny_llama(out_dir, seed=0, tokenizer=True, max_shard_size=None, std=0.1, **config) -> Path:
    """Save a random transformers.LlamaForCausalLM (dim 64, 2 layers, GQA 4/2 by default) as safetensors.

    config overrides LlamaConfig fields (e.g. num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
    attention_bias=True, rope_scaling={...}). std: weight init std (larger -> decisive greedy argmaxes).
    With tokenizer=True the tiny BPE tokenizer is written too and vocab_size matches it.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    out_dir = Path(out_dir)
    vocab = 400
    if tokenizer:
        from tokenizers import Tokenizer
        vocab = Tokenizer.from_file(str(make_tokenizer(out_dir) / "tokenizer.json")).get_vocab_size()
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=2,
              pad_token_id=0, initializer_range=std, tie_word_embeddings=False)
    kw.update(config)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them so parity tests can see them
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.normal_(1.0 if n.endswith("norm.weight") else 0.0, 0.1)
    m.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return out_dir


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tiny_chat_llama(out_dir) -> Path:
    """make_tiny_llama (std 0.2: decisive greedy tokens) whose tokenizer_config carries a ChatML template: the
    server's tests."""
    d = make_tiny_llama(out_dir, std=0.2)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(dict(tc, chat_template=CHATML)))
    return d


def send_json(handler, status, obj):
    """Reply from a loopback http.server handler with a JSON body (the fake OpenAI-style servers of the tests)."""
    data = json.dumps(obj).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A session-wide tiny random Llama checkpoint dir (config.json, model.safetensors, tokenizer files)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))

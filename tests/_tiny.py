"""Tiny random-init models for tests, saved (with a tokenizer) to folders `load_model` accepts.

    from _tiny import tiny_llama, tiny_opt
    model, tok = load_model(tiny_llama())

Each builder is cached per process: the first call writes a folder under one temp dir
(removed at exit), later calls return the same path. Keyword overrides go into the config,
e.g. ``tiny_llama(num_hidden_layers=4)`` (a separate folder per distinct override set).
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"

VOCAB = 512
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

_FALLBACK_TEXT = (
    "The quick brown fox jumps over the lazy dog . A model of language predicts the next word "
    "from the words before it , and compression removes weights while keeping the predictions . "
) * 40


@functools.lru_cache(maxsize=None)
def _root() -> Path:
    d = Path(tempfile.mkdtemp(prefix="raypress-tiny-"))
    atexit.register(shutil.rmtree, d, True)
    return d


def training_text(n_chars: int = 40_000) -> str:
    """A few KB of English (wikitext-2 valid if present, else a fixed paragraph)."""
    if WIKITEXT.is_file():
        with open(WIKITEXT, encoding="utf-8") as fh:
            return fh.read(n_chars)
    return _FALLBACK_TEXT


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_dir() -> Path:
    """A byte-level BPE tokenizer (vocab 512) trained offline on a few KB of text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = training_text()
    tok.train_from_iterator([text[i:i + 1000] for i in range(0, len(text), 1000)], trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=1_000_000)
    out = _root() / "tokenizer"
    fast.save_pretrained(str(out))
    return out


def _save(model, name: str) -> str:
    from transformers import AutoTokenizer

    out = _root() / name
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir())).save_pretrained(str(out))
    return str(out)


def _name(kind: str, overrides: tuple) -> str:
    return kind + "".join(f"-{k}={v}" for k, v in overrides)


@functools.lru_cache(maxsize=None)
def _tiny_llama(overrides: tuple) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
              bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)
    kw.update(dict(overrides))
    torch.manual_seed(0)
    return _save(LlamaForCausalLM(LlamaConfig(**kw)).eval(), _name("llama", overrides))


@functools.lru_cache(maxsize=None)
def _tiny_opt(overrides: tuple) -> str:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
              word_embed_proj_dim=64, max_position_embeddings=1024,
              bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    kw.update(dict(overrides))
    torch.manual_seed(0)
    return _save(OPTForCausalLM(OPTConfig(**kw)).eval(), _name("opt", overrides))


@functools.lru_cache(maxsize=None)
def _tiny_qwen3(overrides: tuple) -> str:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
              bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)
    kw.update(dict(overrides))
    torch.manual_seed(0)
    return _save(Qwen3ForCausalLM(Qwen3Config(**kw)).eval(), _name("qwen3", overrides))


@functools.lru_cache(maxsize=None)
def _tiny_gemma3(overrides: tuple) -> str:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # layer 1 is a full-attention layer, the others slide over 16 tokens: blocks get different masks
    # and rotary embeddings (what per-block kwargs capture must get right)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
              sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=True)
    kw.update(dict(overrides))
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**kw)).eval()
    with torch.no_grad():  # random-init norms are zeros-centred (weight + 1): perturb them to matter
        for n, prm in model.named_parameters():
            if "norm" in n:
                prm.normal_(0.0, 0.3)
    return _save(model, _name("gemma3", overrides))


@functools.lru_cache(maxsize=None)
def _tiny_gpt2(overrides: tuple) -> str:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    kw = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512,
              bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    kw.update(dict(overrides))
    torch.manual_seed(0)
    return _save(GPT2LMHeadModel(GPT2Config(**kw)).eval(), _name("gpt2", overrides))


def tiny_llama(**overrides) -> str:
    """Folder of a random LlamaForCausalLM: hidden 64, 2 layers, 4 heads / 2 kv heads, mlp 128, vocab 512."""
    return _tiny_llama(tuple(sorted(overrides.items())))


def tiny_opt(**overrides) -> str:
    """Folder of a random OPTForCausalLM: hidden 64, 2 layers, 4 heads, ffn 128, vocab 512."""
    return _tiny_opt(tuple(sorted(overrides.items())))


def tiny_qwen3(**overrides) -> str:
    """Folder of a random Qwen3ForCausalLM (llama family adapter; q/k norms)."""
    return _tiny_qwen3(tuple(sorted(overrides.items())))


def tiny_gemma3(**overrides) -> str:
    """Folder of a random Gemma3ForCausalLM (gemma3_text): hidden 64, 3 layers (sliding, full, sliding)."""
    return _tiny_gemma3(tuple(sorted(overrides.items())))


def tiny_gpt2(**overrides) -> str:
    """Folder of a random GPT2LMHeadModel: an architecture RayPress does NOT support (error tests)."""
    return _tiny_gpt2(tuple(sorted(overrides.items())))


def load_tiny(kind: str = "llama", **overrides):
    """(model, tokenizer) of a tiny model via raypress.models.load_model."""
    from raypress.models import load_model

    builders = {"llama": tiny_llama, "opt": tiny_opt, "qwen3": tiny_qwen3, "gemma3": tiny_gemma3, "gpt2": tiny_gpt2}
    return load_model(builders[kind](**overrides))

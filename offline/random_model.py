"""Random-weight Llama-family checkpoints for tests and speed benchmarks (no model hub needed).

The tokenizer is copied from a local HF folder (by default the default model's), so the result loads in transformers
and vLLM like any checkpoint. Weights are drawn with a realistic scale (std 0.02, like Llama's initializer) so pruning,
outlier selection and kernels see ordinary magnitudes.

``--config-only`` (:func:`write_llama_config`) writes just config.json + generation_config.json (no weights, no
tokenizer unless ``--tokenizer-from`` is given): a folder for vLLM's ``load_format="dummy"`` with
``skip_tokenizer_init``, e.g. a Llama-3-8B-shaped engine on a host with no room or time for the weights.
``--synthetic-tokenizer`` (:func:`write_synthetic_tokenizer`) adds a tokenizer made on the spot for hosts without one:
byte-level, covering the whole vocabulary with Llama-3's special-token ids and a Llama-3-style chat template, so
``vllm serve`` of a dummy-loaded folder answers chat requests (with random words: the weights are random).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from offline.assets import default_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# Named shapes: (hidden, intermediate, layers, heads, kv_heads)
PRESETS = {
    "tiny": (64, 128, 2, 4, 2),
    "small": (256, 512, 4, 8, 4),
    "llama3-8b": (4096, 14336, 32, 32, 8),
    "llama3-70b": (8192, 28672, 80, 64, 8),
}
PRESET_VOCAB = {"llama3-8b": 128256, "llama3-70b": 128256}
PRESET_MAX_POSITIONS = {"llama3-8b": 8192, "llama3-70b": 8192}

# Llama-3's special tokens: ids 128000.. (the others of the 256 are reserved tokens)
LLAMA3_SPECIAL_BASE = 128000
LLAMA3_SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
                   128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>"}
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SYNTHETIC_SPECIAL_IDS = {"bos_token_id": 128000, "eos_token_id": 128009}  # as written by write_synthetic_tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE tokenizers)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_synthetic_tokenizer(out_dir: str | Path, vocab_size: int = 128256) -> Path:
    """Write a tokenizer made on the spot (no files needed) for config-only folders on hosts without one:
    byte-level BPE without merges (ids 0-255 are the bytes, so any text encodes), ids 256.. up to the specials decode
    as words `` w<id>``, and ids from 128000 are Llama-3's special tokens (begin/end of text, headers, eot; the rest
    reserved) with a Llama-3-style chat template. Files: tokenizer.json, tokenizer_config.json (class
    PreTrainedTokenizerFast), special_tokens_map.json, chat_template.jinja. Needs only the ``tokenizers`` package."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if vocab_size <= max(LLAMA3_SPECIALS):
        raise ValueError(f"vocab_size {vocab_size} leaves no room for Llama-3's special ids (up to "
                         f"{max(LLAMA3_SPECIALS)})")
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    vocab.update({f"\u0120w{i}": i for i in range(256, LLAMA3_SPECIAL_BASE)})  # \u0120 = byte-level space
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [LLAMA3_SPECIALS.get(i, f"<|reserved_special_token_{i - LLAMA3_SPECIAL_BASE}|>")
                for i in range(LLAMA3_SPECIAL_BASE, vocab_size)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    assert tok.get_vocab_size() == vocab_size and tok.token_to_id("<|eot_id|>") == 128009
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **names, "model_max_length": 131072,
         "clean_up_tokenization_spaces": False, "chat_template": LLAMA3_CHAT_TEMPLATE}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(LLAMA3_CHAT_TEMPLATE)
    return out


def write_llama_config(out_dir: str | Path, *, hidden: int = 64, intermediate: int = 128, layers: int = 2,
                       heads: int = 4, kv_heads: int = 2, dtype: str = "bfloat16",
                       tokenizer_from: str | Path | None = None, tie_word_embeddings: bool = False,
                       max_position_embeddings: int = 2048, vocab_size: int | None = None,
                       special_token_ids: dict[str, int] | None = None) -> Path:
    """Write only config.json + generation_config.json of a Llama (no weights): for dummy-loaded vLLM engines.
    With ``tokenizer_from`` the vocabulary size (unless given) and special token ids come from that tokenizer, whose
    files are copied too; without it the vocabulary is ``vocab_size`` (default 32000), the special ids are
    ``special_token_ids`` (e.g. ``{"bos_token_id": 1, "eos_token_id": 2}``) and no tokenizer is written."""
    from transformers import GenerationConfig, LlamaConfig

    special = dict(special_token_ids or {})
    if tokenizer_from:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_from)
        vocab_size = vocab_size or len(tok)
        special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = LlamaConfig(vocab_size=vocab_size or 32000, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                      initializer_range=0.02, **special)
    cfg.torch_dtype = dtype
    cfg.architectures = ["LlamaForCausalLM"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    GenerationConfig.from_model_config(cfg).save_pretrained(out)
    if tokenizer_from:
        tok.save_pretrained(out)
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).is_file() and not (out / name).is_file():
                shutil.copy(Path(tokenizer_from) / name, out / name)
    return out


def make_random_llama(out_dir: str | Path, *, hidden: int = 64, intermediate: int = 128, layers: int = 2,
                      heads: int = 4, kv_heads: int = 2, seed: int = 0, dtype: str = "bfloat16",
                      tokenizer_from: str | Path | None = None, tie_word_embeddings: bool = False,
                      max_position_embeddings: int = 2048, vocab_size: int | None = None,
                      device: str = "cpu") -> Path:
    """Write a random Llama to ``out_dir``. ``vocab_size`` may exceed the tokenizer's (rows past it are never used),
    e.g. 128256 to give a Llama-3-8B-sized embedding/lm_head; ``device="cuda"`` draws the weights on the GPU (fast for
    8B-sized models)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    src = Path(tokenizer_from) if tokenizer_from else default_model_dir()
    if not (src / "tokenizer.json").is_file():
        raise SystemExit(f"error: no tokenizer.json in {src} (run `make setup` or pass tokenizer_from)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    cfg = LlamaConfig(vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, initializer_range=0.02)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                r = torch.randn(p.shape, generator=gen, dtype=torch.float32, device=device).mul_(0.02)
                p.copy_(r.to(p.dtype).cpu())
    model.config.torch_dtype = dtype
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (out / name).is_file():
            shutil.copy(src / name, out / name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write a random-weight Llama checkpoint (bf16 safetensors + tokenizer).")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--layers", type=int, help="override the preset's layer count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", type=Path, default=None)
    ap.add_argument("--device", default="cpu", help="where to draw the random weights (cpu|cuda)")
    ap.add_argument("--config-only", action="store_true",
                    help="write only config.json + generation_config.json (no weights; a tokenizer only with "
                         "--tokenizer-from or --synthetic-tokenizer): a folder for vLLM --load-format dummy "
                         "(--skip-tokenizer-init when there is no tokenizer)")
    ap.add_argument("--synthetic-tokenizer", action="store_true",
                    help="with --config-only: write a tokenizer made on the spot (byte-level, the whole vocabulary, "
                         "Llama-3 special ids and chat template) so `vllm serve` answers chat with no tokenizer files")
    args = ap.parse_args(argv)
    hidden, inter, layers, heads, kv = PRESETS[args.preset]
    max_pos = PRESET_MAX_POSITIONS.get(args.preset, 2048)
    if args.synthetic_tokenizer and not args.config_only:
        ap.error("--synthetic-tokenizer needs --config-only")
    if args.synthetic_tokenizer and args.tokenizer_from:
        ap.error("--synthetic-tokenizer and --tokenizer-from exclude each other")
    if args.config_only:
        vocab = PRESET_VOCAB.get(args.preset)
        if args.synthetic_tokenizer:
            vocab = vocab or LLAMA3_SPECIAL_BASE + 256
        out = write_llama_config(args.out_dir, hidden=hidden, intermediate=inter, layers=args.layers or layers,
                                 heads=heads, kv_heads=kv, tokenizer_from=args.tokenizer_from, vocab_size=vocab,
                                 max_position_embeddings=max_pos,
                                 special_token_ids=SYNTHETIC_SPECIAL_IDS if args.synthetic_tokenizer else None)
        if args.synthetic_tokenizer:
            write_synthetic_tokenizer(out, vocab)
        print(out)
        return 0
    out = make_random_llama(args.out_dir, hidden=hidden, intermediate=inter, layers=args.layers or layers,
                            heads=heads, kv_heads=kv, seed=args.seed, tokenizer_from=args.tokenizer_from,
                            vocab_size=PRESET_VOCAB.get(args.preset), device=args.device,
                            max_position_embeddings=max_pos)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Random-weight Llama-family checkpoints for tests and speed benchmarks (no model hub needed).

The tokenizer is copied from a local HF folder (by default the default model's), so the result loads in transformers
and vLLM like any checkpoint. Weights are drawn with a realistic scale (std 0.02, like Llama's initializer) so pruning,
outlier selection and kernels see ordinary magnitudes.

``--config-only`` (:func:`write_llama_config`) writes just config.json + generation_config.json (no weights, no
tokenizer unless ``--tokenizer-from`` is given): a folder for vLLM's ``load_format="dummy"`` with
``skip_tokenizer_init``, e.g. a Llama-3-8B-shaped engine on a host with no room or time for the weights.
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
}
PRESET_VOCAB = {"llama3-8b": 128256}


def write_llama_config(out_dir: str | Path, *, hidden: int = 64, intermediate: int = 128, layers: int = 2,
                       heads: int = 4, kv_heads: int = 2, dtype: str = "bfloat16",
                       tokenizer_from: str | Path | None = None, tie_word_embeddings: bool = False,
                       max_position_embeddings: int = 2048, vocab_size: int | None = None) -> Path:
    """Write only config.json + generation_config.json of a Llama (no weights): for dummy-loaded vLLM engines.
    With ``tokenizer_from`` the vocabulary size (unless given) and special token ids come from that tokenizer, whose
    files are copied too; without it the vocabulary is ``vocab_size`` (default 32000) and no tokenizer is written."""
    from transformers import GenerationConfig, LlamaConfig

    special = {}
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
                         "--tokenizer-from): a folder for vLLM --load-format dummy --skip-tokenizer-init")
    args = ap.parse_args(argv)
    hidden, inter, layers, heads, kv = PRESETS[args.preset]
    if args.config_only:
        out = write_llama_config(args.out_dir, hidden=hidden, intermediate=inter, layers=args.layers or layers,
                                 heads=heads, kv_heads=kv, tokenizer_from=args.tokenizer_from,
                                 vocab_size=PRESET_VOCAB.get(args.preset),
                                 max_position_embeddings=8192 if args.preset == "llama3-8b" else 2048)
        print(out)
        return 0
    out = make_random_llama(args.out_dir, hidden=hidden, intermediate=inter, layers=args.layers or layers,
                            heads=heads, kv_heads=kv, seed=args.seed, tokenizer_from=args.tokenizer_from,
                            vocab_size=PRESET_VOCAB.get(args.preset), device=args.device,
                            max_position_embeddings=8192 if args.preset == "llama3-8b" else 2048)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

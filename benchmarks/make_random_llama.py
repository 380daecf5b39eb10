"""Write a random-weight Llama checkpoint for speed tests (bf16 safetensors + a local tokenizer; no hub).

    python benchmarks/make_random_llama.py OUT_DIR --preset llama3-8b --device cuda --tokenizer-from TOKDIR

Presets: tiny, small, llama3-8b (hidden 4096, intermediate 14336, 32 layers, 32/8 heads, vocab 128256 so the
embedding and lm_head have Llama-3-8B's size; the tokenizer is the default model's, rows past it are never used).
"""
import sys

from offline.random_model import main

if __name__ == "__main__":
    sys.exit(main())

"""Calibration samples: ``nsamples`` random windows of ``seqlen`` tokens from a text file or a folder of .txt files.

Long corpora are not tokenized whole (the default calibration split is 11 MB): each sample tokenizes a random character
span long enough for ``seqlen`` tokens (starting at a word boundary, dropping the first token so no sample begins
mid-word). Short texts are tokenized whole and windows drawn from the token ids. Both are deterministic given ``seed``.
The text must hold at least ``nsamples * seqlen`` tokens, so the samples can be disjoint; otherwise
:class:`CalibrationError` says how much is needed.
"""

from __future__ import annotations

import random
from pathlib import Path

WHOLE_TOKENIZE_CHARS = 2_000_000


class CalibrationError(ValueError):
    pass


def read_calibration_text(path) -> str:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise CalibrationError(f"calibration folder {p} holds no .txt files")
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    if not p.is_file():
        raise CalibrationError(f"calibration text {p} does not exist")
    return p.read_text(encoding="utf-8")


def calibration_samples(tokenizer, path, nsamples: int, seqlen: int, seed: int = 0):
    """LongTensor [nsamples, seqlen]."""
    import torch

    if nsamples < 1 or seqlen < 2:
        raise CalibrationError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    text = read_calibration_text(path)
    need = nsamples * seqlen
    rng = random.Random(seed)
    if len(text) <= WHOLE_TOKENIZE_CHARS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < need:
            raise CalibrationError(
                f"calibration text {path} has {len(ids)} tokens; {need} are needed ({nsamples} samples x {seqlen} "
                f"tokens): give more text or lower --nsamples/--seqlen")
        starts = [rng.randrange(0, len(ids) - seqlen + 1) for _ in range(nsamples)]
        return torch.tensor([ids[s:s + seqlen] for s in starts], dtype=torch.long)
    probe = tokenizer(text[:100_000], add_special_tokens=False)["input_ids"]
    chars_per_token = min(100_000, len(text)) / max(len(probe), 1)
    span = int(seqlen * chars_per_token * 1.5) + 256
    if len(text) < need * chars_per_token:
        raise CalibrationError(f"calibration text {path} holds about {int(len(text) / chars_per_token)} tokens; "
                               f"{need} are needed ({nsamples} x {seqlen})")
    samples = []
    while len(samples) < nsamples:
        start = rng.randrange(0, max(len(text) - span, 1))
        ws = text.find(" ", start)
        start = ws if 0 <= ws < start + 200 else start
        ids = tokenizer(text[start:start + span], add_special_tokens=False)["input_ids"][1:]
        if len(ids) >= seqlen:
            samples.append(ids[:seqlen])
    return torch.tensor(samples, dtype=torch.long)

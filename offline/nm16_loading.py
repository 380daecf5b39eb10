"""Read an nm16 checkpoint back as dense tensors (for transformers evaluation, tests and `nm16-compress` checks)."""

from __future__ import annotations

from pathlib import Path


def read_safetensors_folder(model_dir) -> dict:
    """All tensors of every ``*.safetensors`` file in a folder (a checkpoint is small enough for this here)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no .safetensors files")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def validate_checkpoint(model_dir) -> int:
    """Validate every packed layer of an nm16 checkpoint against the spec (shapes from the tensors, in_features from
    the mask). Returns the number of packed layers; raises ``NM16FormatError`` naming the first bad tensor."""
    from vllm_nm16 import format as fmt

    spec = fmt.read_spec(model_dir)
    layers = fmt.split_layer_tensors(read_safetensors_folder(model_dir))
    for prefix, tensors in layers.items():
        if prefix in spec.ignore:
            raise fmt.NM16FormatError(f"nm16: {prefix}: listed in 'ignore' but stored packed")
        values = tensors.get(fmt.VALUES)
        mask = tensors.get(fmt.MASK)
        if values is None or mask is None:
            raise fmt.NM16FormatError(f"nm16: {prefix}: missing weight_values or weight_mask")
        fmt.validate_layer(tensors, spec, name=prefix, out_features=values.shape[0],
                           in_features=mask.shape[1] * spec.m)
    return len(layers)


def load_nm16_state_dict(model_dir, dtype=None):
    """(dense state dict, {prefix: shift}) of an nm16 checkpoint: packed layers become ``PREFIX.weight`` =
    effective dense weight; shifts are returned separately (the caller adds them as a bias)."""
    import torch

    from vllm_nm16 import format as fmt

    dtype = dtype or torch.float32
    spec = fmt.read_spec(model_dir)
    state = read_safetensors_folder(model_dir)
    layers = fmt.split_layer_tensors(state)
    out: dict = {}
    for key, t in state.items():
        prefix, _, suffix = key.rpartition(".")
        if prefix in layers and suffix in layers[prefix]:
            continue
        out[key] = t.to(dtype) if t.is_floating_point() else t
    shifts = {}
    for prefix, tensors in layers.items():
        mask = tensors[fmt.MASK]
        in_f = mask.shape[1] * spec.m
        fmt.validate_layer(tensors, spec, name=prefix, out_features=mask.shape[0], in_features=in_f)
        up = fmt.unpack(tensors, spec, in_features=in_f)
        out[f"{prefix}.weight"] = up.effective_weight(dtype)
        if up.shift is not None:
            shifts[prefix] = up.shift.to(dtype)
    return out, shifts

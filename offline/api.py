"""``compress``: a Hugging Face causal-LM folder in, an nm16 checkpoint folder out (the CLI's engine)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from offline.models import architecture_of
from offline.recipe import Recipe, recipe_options

log = logging.getLogger("offline")


class CompressError(ValueError):
    """Bad input to the compressor; the message is one line that names the problem."""


def check_model_dir(model_dir: Path) -> dict:
    """The source config, after checking the folder is a supported, safetensors HF causal LM."""
    if not model_dir.exists():
        raise CompressError(f"model folder {model_dir} does not exist")
    if not model_dir.is_dir():
        raise CompressError(f"{model_dir} is not a folder")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise CompressError(f"{model_dir} has no config.json (is it a Hugging Face model folder?)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CompressError(f"{cfg_path} is not valid JSON: {e}") from None
    if "quantization_config" in config:
        raise CompressError(f"{model_dir} is already quantized/compressed "
                            f"({config['quantization_config'].get('quant_method')!r}): give a dense model")
    try:
        architecture_of(config)
    except ValueError as e:
        raise CompressError(str(e)) from None
    if not list(model_dir.glob("*.safetensors")):
        if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")) or list(model_dir.glob("*.pth")):
            raise CompressError(f"{model_dir} holds pickle weights (.bin/.pt) only: they are refused for safety; "
                                f"convert the model to safetensors first")
        raise CompressError(f"{model_dir} holds no .safetensors weights")
    check_safetensors_files(model_dir)
    return config


def check_device(device: str) -> None:
    """Refuse a device this machine cannot compress on before any work (cpu, cuda or cuda:N)."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CompressError(f"device {device!r} is not a torch device (cpu | cuda | cuda:N)") from None
    if d.type == "cpu":
        return
    if d.type != "cuda":
        raise CompressError(f"device {device!r}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise CompressError(f"device {device!r}: no CUDA device is available on this machine")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise CompressError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


# Bytes per element of the safetensors dtypes a model folder may hold.
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors_file(path: Path) -> int:
    """Check a safetensors file's header against its size before anything reads it: every tensor's byte range must
    lie inside the file and match its dtype and shape. A truncated file (an interrupted download or copy) is refused
    naming the first tensor that is cut off. Returns the number of tensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CompressError(f"{path} is truncated: {size} bytes, not even a safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100 * 2**20:
            raise CompressError(f"{path} is truncated or not a safetensors file: its header claims {n} bytes, "
                                f"the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CompressError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CompressError(f"{path}: unreadable safetensors header (not a JSON object)")
    data = size - 8 - n
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise CompressError(f"{path}: tensor {name}: malformed header entry {info!r}") from None
        entries.append((int(begin), int(end), name, dtype, shape, numel))
    for begin, end, name, dtype, shape, numel in sorted(entries):
        if end > data:
            raise CompressError(f"{path} is truncated: tensor {name} ({dtype} {list(shape)}) needs bytes "
                                f"{begin}..{end} of the data, the file holds {max(data, 0)} (re-copy or re-download "
                                f"the model)")
        item = _ST_ITEMSIZE.get(dtype)
        if item is not None and (end - begin != numel * item or begin > end):
            raise CompressError(f"{path}: tensor {name} ({dtype} {list(shape)}) should take {numel * item} bytes, "
                                f"its header says {end - begin}")
    return len(entries)


def check_safetensors_files(model_dir: Path) -> None:
    """``check_safetensors_file`` on every shard; with an index, every tensor it lists must be in its shard."""
    names: dict[str, set] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        check_safetensors_file(f)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CompressError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
        for tensor, fname in weight_map.items():
            shard = model_dir / fname
            if not shard.is_file():
                raise CompressError(f"{index}: tensor {tensor} is in {fname}, which is missing")
            if fname not in names:
                with open(shard, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    names[fname] = set(json.loads(fh.read(n)))
            if tensor not in names[fname]:
                raise CompressError(f"{index}: tensor {tensor} is not in {fname}")


def check_finite(model) -> None:
    import torch

    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise CompressError(f"weight tensor {name} holds {bad} NaN/Inf value(s)")


def source_tensor_names(model_dir: Path) -> dict[str, Any]:
    """name -> dtype of every tensor in the source safetensors files."""
    from safetensors import safe_open

    names = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                names[k] = fh.get_slice(k).get_dtype()
    return names


def compress(model_dir, out_dir, *, device: str = "cpu", overwrite: bool = False, strict_divisible: bool = False,
             progress: bool = True, threads: int | None = None, **options) -> Path:
    """Compress ``model_dir`` into ``out_dir``; returns ``out_dir``. ``options`` are the fields of
    :class:`offline.recipe.Recipe` (pattern, method, outliers, ..., calib: the ``nm16-compress`` options; unset ones
    take the recipe's defaults); the named arguments change how the run goes, not its result."""
    unknown = sorted(set(options) - set(recipe_options()))
    if unknown:
        raise TypeError(f"compress() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline import writer
    from offline.assets import default_calib_path
    from offline.calibration import CalibrationError, calibration_samples
    from offline.compressor import compress_model
    from offline.faults import point
    from vllm_nm16 import format as fmt

    if threads:
        torch.set_num_threads(threads)
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()
    config = check_model_dir(model_dir)
    if out_dir == model_dir or model_dir in out_dir.parents:
        raise CompressError(f"output folder {out_dir} must not be (inside) the input model folder")
    if out_dir.exists() and not overwrite:
        raise CompressError(f"output folder {out_dir} already exists (pass --overwrite to replace it)")
    equalize = options.get("equalize")
    if equalize is not None and isinstance(equalize, str):
        options["equalize"] = None if equalize.lower() == "none" else float(equalize)
    calib_path = Path(options["calib"]) if options.get("calib") else default_calib_path()
    recipe = Recipe(**{**options, "calib": str(calib_path)})
    try:
        recipe.check()
    except ValueError as e:
        raise CompressError(str(e)) from None
    check_device(device)

    with writer.staging_folder(out_dir, overwrite) as tmp:
        tok = AutoTokenizer.from_pretrained(model_dir)
        try:
            samples = calibration_samples(tok, calib_path, recipe.nsamples, recipe.seqlen, recipe.seed)
        except CalibrationError as e:
            raise CompressError(str(e)) from None
        point("calibration")
        src_names = source_tensor_names(model_dir)
        src_dtype = next(iter(src_names.values())) if src_names else "BF16"
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(src_dtype, torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
        model.eval()
        check_finite(model)
        point("model-loaded")
        try:
            spec, results, ignore, info = compress_model(model, samples, recipe, device=device, progress=progress,
                                                         strict_divisible=strict_divisible)
        except ValueError as e:
            raise CompressError(str(e)) from None

        recipe_record = {**asdict(recipe), "outliers_resolved": info["outliers_kb"], "source": str(model_dir),
                         "tool": "vllm_nm16 offline.compress"}
        state = model.state_dict()
        tensors = {}
        for name in src_names:
            prefix = name.rpartition(".")[0]
            if spec is not None and name.endswith(".weight") and prefix in results:
                for suffix, t in results[prefix].tensors.items():
                    tensors[f"{prefix}.{suffix}"] = t.cpu()
            else:
                if name not in state:
                    raise CompressError(f"source tensor {name} has no counterpart in the loaded model")
                tensors[name] = state[name].detach().to(dtype if state[name].is_floating_point()
                                                        else state[name].dtype).cpu().clone()
        out_config = dict(config)
        if spec is not None:
            all_ignore = ["lm_head"] + [n for n in ignore if n != "lm_head"]
            spec = fmt.NM16Spec(n=spec.n, m=spec.m, outlier_block=spec.outlier_block,
                                outliers_per_block=spec.outliers_per_block, has_scale=spec.has_scale,
                                has_shift=spec.has_shift, ignore=tuple(all_ignore), recipe=recipe_record)
            out_config["quantization_config"] = spec.to_config()
        writer.save_shards(tensors, tmp)
        writer.write_json(tmp / "config.json", out_config)
        point("config")
        writer.copy_aux_files(model_dir, tmp)
        point("aux-files")
        report = build_report(results, tensors, src_names, state, ignore, recipe_record, info, spec is not None)
        writer.write_json(tmp / "nm16_report.json", report)
        point("report")
        if spec is not None:
            from offline.nm16_loading import validate_checkpoint
            validate_checkpoint(tmp)
            point("validated")
        if progress:
            print_summary(report)
    return out_dir


def build_report(results, tensors, src_names, state, ignore, recipe_record, info, packed: bool) -> dict:
    layers = {name: r.report for name, r in results.items()}
    lin_dense = sum(r["bytes"]["dense"] for r in layers.values())
    lin_bm = sum(r["bytes"]["bitmask"] for r in layers.values())
    lin_cb = sum(r["bytes"]["combinatorial"] for r in layers.values())
    n_weights = sum(r["shape"][0] * r["shape"][1] for r in layers.values())
    ign_bytes = 0
    for name in ignore:
        w = state.get(f"{name}.weight")
        if w is not None:
            ign_bytes += w.numel() * 2
            n_weights += w.numel()
    lin_dense += ign_bytes
    lin_bm += ign_bytes
    lin_cb += ign_bytes
    other = sum(t.numel() * t.element_size() for k, t in tensors.items()
                if k.rpartition(".")[0] not in results)
    other -= ign_bytes
    model_dense = other + lin_dense
    errs_b = [r["rel_error_before_correction"] for r in layers.values()]
    errs_a = [r["rel_error_after_correction"] for r in layers.values()]
    totals = {
        "linear_layers": len(layers), "linear_layers_dense_kept": len(ignore),
        "linear_dense_bytes": lin_dense, "linear_bytes_bitmask": lin_bm, "linear_bytes_combinatorial": lin_cb,
        "linear_ratio_bitmask": lin_bm / lin_dense, "linear_ratio_combinatorial": lin_cb / lin_dense,
        "linear_bytes_per_weight_bitmask": lin_bm / n_weights,
        "linear_bytes_per_weight_combinatorial": lin_cb / n_weights,
        "model_dense_bytes": model_dense, "model_bytes_bitmask": other + lin_bm,
        "model_ratio_bitmask": (other + lin_bm) / model_dense,
        "mean_rel_error_before_correction": sum(errs_b) / max(len(errs_b), 1),
        "mean_rel_error_after_correction": sum(errs_a) / max(len(errs_a), 1),
        "seconds": info["seconds"],
    }
    report = {"format": "nm16" if packed else "dense-effective", "recipe": recipe_record, "ignore": ignore,
              "totals": totals, "layers": layers}
    if info.get("reconstruction"):
        # per block: output error relative to the mean square of the dense block's update, before/after
        report["reconstruction"] = info["reconstruction"]
    return report


def print_summary(report: dict) -> None:
    kinds: dict[str, list[dict]] = {}
    for name, r in report["layers"].items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(r)
    print(f"{'layer':<10} {'count':>5} {'sparsity':>8} {'err before':>10} {'err after':>10} {'bytes/dense':>11}")
    for kind, rs in kinds.items():
        n = len(rs)
        print(f"{kind:<10} {n:>5} {sum(r['sparsity'] for r in rs) / n:>8.3f} "
              f"{sum(r['rel_error_before_correction'] for r in rs) / n:>10.4f} "
              f"{sum(r['rel_error_after_correction'] for r in rs) / n:>10.4f} "
              f"{sum(r['bytes']['bitmask'] for r in rs) / sum(r['bytes']['dense'] for r in rs):>11.3f}")
    t = report["totals"]
    print(f"linear layers: {t['linear_bytes_bitmask'] / 2**20:.1f} MiB vs {t['linear_dense_bytes'] / 2**20:.1f} MiB "
          f"dense ({t['linear_ratio_bitmask']:.3f}; {t['linear_bytes_per_weight_bitmask']:.3f} bytes/weight, "
          f"{t['linear_bytes_per_weight_combinatorial']:.3f} with the combinatorial code); whole model "
          f"{t['model_ratio_bitmask']:.3f} of dense; {t['seconds']:.0f} s")

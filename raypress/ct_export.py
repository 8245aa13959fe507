"""A quantization search's result in compressed-tensors format (what vLLM and llm-compressor load).

Every searched layer keeps the integer codes, scales and zero points of its level in the level
database — no re-quantization: the served weights are exactly the ones the search scored. Each
bitwidth becomes one compressed-tensors config group (int, group strategy, `pack-quantized`:
codes packed into int32) whose `targets` name its layers; the LM head, embeddings and layers at 16
bits stay dense and are listed in `ignore`. compressed-tensors itself packs the tensors
(`PackedQuantizationCompressor.compress`) and writes the `quantization_config`
(`ModelCompressor.update_config`): we assemble, the format's owner encodes.

Our grid and theirs: RayPress stores unsigned codes q in [0, 2^b) with a zero z (ŵ = s·(q − z));
compressed-tensors stores signed codes in [−2^(b−1), 2^(b−1)). On a symmetric grid our zero is
2^(b−1), so their code is q − 2^(b−1) and they store no zero point. Symmetric only: asymmetric
zero points are packed along the output dim by compressed-tensors but allocated unpacked by
transformers' loader (5.x with compressed-tensors 0.20), which then refuses the file.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import RayPressError
from .export import INFO_FILE, publish, staging_folder

FORMAT = "compressed-tensors"
SHARD_BYTES = 4 * 2**30


def _require():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise RayPressError("--format compressed-tensors needs the compressed-tensors package; "
                            "pip install compressed-tensors") from None


def packed_bytes(out_f: int, in_f: int, bits: int, group_size: int, symmetric: bool, scale_bytes: int = 2) -> int:
    """Bytes one layer takes in pack-quantized form: int32 words of packed codes (32 codes in `bits`
    words per row chunk), one scale per group (+ a packed zero point per group when asymmetric),
    and the int64 shape."""
    groups = -(-in_f // group_size)
    codes = out_f * -(-in_f * bits // 32) * 4
    zeros = 0 if symmetric else -(-out_f * bits // 32) * groups * 4
    return codes + out_f * groups * scale_bytes + zeros + 2 * 8


def export_compressed_tensors(model, adapter, layer_levels: dict, db, method, out_dir, *, tokenizer=None,
                              info: dict | None = None, overwrite: bool = False,
                              dtype: torch.dtype = torch.float16) -> tuple[Path, dict]:
    """Write `model` with every layer of `layer_levels` ({linear layer: level}) at its database
    level as a compressed-tensors folder; returns (folder, {"bytes", "predicted_bytes", "groups"})."""
    _require()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from safetensors.torch import save_file

    from .compress.quant import dequantize

    gs = int(method.group_size or -1)
    sym = bool(method.sym)
    if not sym:
        # compressed-tensors packs asymmetric zero points along the output dim, but transformers'
        # loader (5.x with compressed-tensors 0.20) allocates them unpacked and refuses the file
        raise RayPressError("compressed-tensors export needs a symmetric grid (database.symmetric=true: no zero "
                            "points, what vLLM's Marlin kernels serve); this search used min-max grids with zero "
                            "points, which transformers cannot load from pack-quantized files")
    linears = adapter.linear_layers()
    by_bits: dict[int, list[str]] = {}
    for layer, level in layer_levels.items():
        if layer not in linears:
            raise RayPressError(f"search-space layer '{layer}' is not a linear layer of this model; "
                                "export with the model the database was built for")
        if not db.is_packed(layer):
            raise RayPressError(f"layer '{layer}' is stored dense in the level database; compressed-tensors needs "
                                "its codes (rebuild the database with packed storage)")
        in_f = linears[layer].weight.shape[1]
        if gs <= 0 or in_f % gs:
            raise RayPressError(f"layer '{layer}' has {in_f} input columns, not a multiple of database.group_size="
                                f"{gs}; compressed-tensors (and vLLM) need whole groups: use a group size that "
                                "divides every layer's input width (e.g. 64 for SmolLM2)")
        by_bits.setdefault(int(round(float(db.level_values[layer][level]))), []).append(layer)

    def args(bits):
        return QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=gs)

    schemes = {b: QuantizationScheme(targets=sorted(ls), weights=args(b)) for b, ls in sorted(by_bits.items())}
    quantized = set(layer_levels)
    ignore = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]

    state: dict[str, torch.Tensor] = {}
    predicted = 0
    for bits, scheme in schemes.items():
        for layer in scheme.targets:
            stored = db.stored(layer)
            level = layer_levels[layer]
            codes = torch.from_numpy(np.array(stored["codes"][level]))
            scales = torch.from_numpy(np.array(stored["scales"][level]))
            zeros = torch.from_numpy(np.array(stored["zeros"][level]))
            w = dequantize(codes, scales, zeros, gs)  # exactly what the search evaluated (float32)
            sd = {"weight": w, "weight_scale": scales.to(dtype)}  # symmetric: our zero 2^(b-1) is their 0
            for k, v in PackedQuantizationCompressor.compress(sd, scheme).items():
                state[f"{layer}.{k}"] = v.contiguous()
            out_f, in_f = w.shape
            predicted += packed_bytes(out_f, in_f, bits, gs, sym)
    for name, t in model.state_dict().items():
        mod = name.rsplit(".", 1)[0]
        if mod in quantized and name.endswith(".weight"):
            continue
        state.setdefault(name, t.detach().to(dtype) if t.is_floating_point() else t.detach())
    # tied embeddings: save_pretrained drops the LM head's copy; so do we
    if getattr(model.config, "tie_word_embeddings", False):
        for k in [k for k in state if k.startswith("lm_head.")]:
            del state[k]
    predicted_dense = sum(t.numel() * t.element_size() for k, t in state.items()
                          if k.rsplit(".", 1)[0] not in quantized)

    out_dir = Path(out_dir)
    tmp = staging_folder(out_dir, overwrite)
    try:
        tmp.mkdir()
        _save_sharded(state, tmp, save_file)
        config = model.config.to_dict()
        config["torch_dtype"] = str(dtype).replace("torch.", "")
        config["dtype"] = config["torch_dtype"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        qc = QuantizationConfig(config_groups={f"group_{b}bit": s for b, s in schemes.items()},
                                format="pack-quantized", quantization_status="compressed", ignore=ignore)
        ModelCompressor(quantization_config=qc).update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = list(tmp.glob("*.safetensors"))
        sizes = {"bytes": sum(f.stat().st_size for f in files),
                 "tensor_bytes": sum(f.stat().st_size - 8 - _header_len(f) for f in files),
                 "quantized_bytes_predicted": predicted, "dense_bytes": predicted_dense,
                 "groups": {b: len(s.targets) for b, s in schemes.items()}}
        if info is not None:
            (tmp / INFO_FILE).write_text(json.dumps({**info, "format": FORMAT, "sizes": sizes}, indent=2) + "\n")
        publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir, sizes


def _header_len(path: Path) -> int:
    """Length of a safetensors file's JSON header (the 8 bytes before it hold it, little endian)."""
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def _save_sharded(state: dict, folder: Path, save_file) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index past SHARD_BYTES."""
    shards, cur, size = [], {}, 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = t, size + n
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    index = {}
    for i, sh in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(folder / name), metadata={"format": "pt"})
        index.update({k: name for k in sh})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": index}, indent=2))

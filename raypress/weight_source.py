"""Where a model's weights come from, one module at a time: so no process has to hold a model whole.

A model is built on the meta device (architecture from config.json, no memory), then its tensors are
*materialized* from a `WeightSource` module by module:

    RandomWeights        random:<arch>[@N] models (proving sizes without downloadable weights): every
                         tensor a pure function of (seed, its name), so the driver, every evaluator
                         and every rerun generate the same model. Their quality numbers are
                         meaningless; their time and memory are real.
    SafetensorsWeights   a Hugging Face folder, read lazily tensor by tensor (sharded or not).

`BlockLoader` materializes one decoder block when the streamed calibration / database build reaches
it and sends it back to the meta device when the build is done with it, so the driver's memory is
the embeddings + LM head + about one block, whatever the depth.
"""
from __future__ import annotations

import contextlib
import json
import zlib
from pathlib import Path

import torch
from torch import nn

from .errors import RayPressError

_CHUNK = 1 << 24  # elements generated at once (float32 scratch: 64 MiB)


class WeightSource:
    def tensor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The tensor `name` (shape and dtype of `like`, a meta tensor), on the CPU."""
        raise NotImplementedError


class RandomWeights(WeightSource):
    """Deterministic random weights: 2-D and larger ~ N(0, std²) (std = config.initializer_range),
    1-D weights (norms) = 1, biases = 0. Tensor `name` is drawn from a generator seeded by
    crc32(f"{seed}/{name}") in chunks, so it never needs a full float32 copy."""

    def __init__(self, seed: int = 0, std: float = 0.02):
        self.seed, self.std = int(seed), float(std)

    def tensor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        if like.dim() <= 1:
            fill = 0.0 if name.endswith("bias") else 1.0
            return torch.full(like.shape, fill, dtype=like.dtype)
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{name}".encode()))
        out = torch.empty(like.shape, dtype=like.dtype)
        flat = out.view(-1)
        for s in range(0, flat.numel(), _CHUNK):
            n = min(_CHUNK, flat.numel() - s)
            flat[s:s + n] = torch.randn(n, generator=g, dtype=torch.float32).mul_(self.std)
        return out


class SafetensorsWeights(WeightSource):
    """Tensors of a Hugging Face safetensors folder, opened lazily (memory-mapped), one at a time."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.file_of = {k: self.folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (self.folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(self.folder / "model.safetensors"), "pt") as f:
                self.file_of = {k: self.folder / "model.safetensors" for k in f.keys()}
        else:
            raise RayPressError(f"model folder '{folder}' has no safetensors weights; streamed loading reads "
                                "model.safetensors (or its sharded index): re-save the model with save_pretrained")

    def tensor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.file_of:
            raise RayPressError(f"'{name}' is not in the weights of {self.folder}; the folder does not match its "
                                "config.json (re-save the model)")
        with safe_open(str(self.file_of[name]), "pt") as f:
            t = f.get_tensor(name)
        if tuple(t.shape) != tuple(like.shape):
            raise RayPressError(f"'{name}' has shape {tuple(t.shape)} in {self.folder} but {tuple(like.shape)} in "
                                "its config.json; re-save the model")
        return t.to(like.dtype)


def materialize(module: nn.Module, prefix: str, source: WeightSource, device="cpu", skip=()) -> int:
    """Give every meta parameter of `module` (full names `prefix` + local name) its real tensor,
    except those in `skip` (parameters); returns the bytes materialized."""
    total = 0
    skip = {id(p) for p in skip}
    for local, p in list(module.named_parameters(recurse=True)):
        if p.device.type != "meta" or id(p) in skip:
            continue
        owner_name, _, attr = local.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        t = source.tensor(f"{prefix}{local}", p).to(device)
        owner._parameters[attr] = nn.Parameter(t, requires_grad=False)
        total += t.numel() * t.element_size()
    return total


def release(module: nn.Module) -> None:
    """Send every parameter of `module` back to the meta device (frees its memory)."""
    for local, p in list(module.named_parameters(recurse=True)):
        owner_name, _, attr = local.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


class BlockLoader:
    """Materializes decoder block i of a meta model on demand (`load`) and frees it again (`release`)."""

    def __init__(self, adapter, source: WeightSource, device="cpu"):
        self.adapter, self.source, self.device = adapter, source, device

    def load(self, i: int) -> None:
        materialize(self.adapter.blocks()[i], f"{self.adapter.block_prefix}.{i}.", self.source, self.device)

    def release(self, i: int) -> None:
        release(self.adapter.blocks()[i])


@contextlib.contextmanager
def block_turn(model, i: int):
    """Block i of `model` is materialized inside the `with` (a no-op unless the model was loaded
    streamed): what the streamed calibration and database build wrap around each block."""
    loader = getattr(model, "raypress_blocks", None)
    if loader is None:
        yield
        return
    loader.load(i)
    try:
        yield
    finally:
        loader.release(i)

"""Architecture adapters: where a causal LM keeps its blocks, linear layers, attention and MLP.

RayPress never hard-codes a model's layout: every family, the calibration and the evaluators ask a
`ModelAdapter` (`get_adapter(model)`, by the config's model_type) for the decoder blocks, their
linear layers, the attention / MLP sub-module names, how to run one block on captured inputs and
how to turn the last hidden state into logits.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import RayPressError


class _StopForward(Exception):
    """Sentinel raised by the block-0 pre-hook to stop the forward after the embeddings."""


def _batch_free(value, batch: int):
    """Shrink a kwarg's batch dim to 1 when all rows are equal (position ids, causal masks without
    padding), so kwargs captured on one batch broadcast over batches of any size."""
    if isinstance(value, tuple):
        return tuple(_batch_free(v, batch) for v in value)
    if isinstance(value, list):
        return [_batch_free(v, batch) for v in value]
    if torch.is_tensor(value) and batch > 1 and value.dim() >= 2 and value.shape[0] == batch:
        if bool((value == value[:1]).all()):
            return value[:1]
    return value


class ModelAdapter:
    family: str = ""
    model_types: tuple[str, ...] = ()
    block_prefix: str = ""
    linear_names: list[str] = []
    attn_name: str = "self_attn"
    mlp_name: str | None = "mlp"

    def __init__(self, model: nn.Module):
        self.model = model

    # -- structure ---------------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        return list(self.module(self.block_prefix))

    def num_blocks(self) -> int:
        return len(self.blocks())

    def module(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise RayPressError(f"'{name}' is not a module of this {self.family} model; use names such as "
                                f"{self.block_prefix}.0.{self.linear_names[0]}") from None

    def linear_layers(self) -> dict[str, nn.Linear]:
        out = {}
        for i, block in enumerate(self.blocks()):
            for rel in self.linear_names:
                out[f"{self.block_prefix}.{i}.{rel}"] = block.get_submodule(rel)
        return out

    def block_linears(self, index: int) -> dict[str, nn.Linear]:
        """Linear layers of block `index`, keyed by relative name (linear_names order)."""
        block = self.blocks()[index]
        return {rel: block.get_submodule(rel) for rel in self.linear_names}

    def block_index(self, name: str) -> int:
        """Block number of a full dotted name (``model.layers.3.mlp.up_proj`` -> 3)."""
        prefix = self.block_prefix + "."
        if not name.startswith(prefix):
            raise RayPressError(f"'{name}' is not inside a block (names start with '{prefix}')")
        return int(name[len(prefix):].split(".", 1)[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- block-streamed forward --------------------------------------------------------------
    @torch.no_grad()
    def capture_block_inputs(self, batches, offload_device=None, per_block: bool = False
                             ) -> tuple[list[torch.Tensor], dict | list[dict]]:
        """Hidden states entering block 0 for every batch, plus the kwargs block 0 received.

        Runs only the embeddings: every block's ``forward`` is swapped for a recorder that passes
        the hidden state through untouched (no block computes anything) and the last one stops the
        forward. The kwargs (attention mask, position embeddings, ...) come from the first batch;
        they are valid for every batch of the same sequence length. `offload_device` moves the
        captured hidden states (e.g. to "cpu") to spare accelerator memory.

        per_block=True returns one kwargs dict per block instead (models whose blocks get different
        masks / rotary embeddings by layer type: Gemma-3's sliding vs full attention, Qwen/Mistral
        sliding windows); values equal for all blocks are the same tensor objects.
        """
        blocks = self.blocks()
        device = self.device
        hiddens: list[torch.Tensor] = []
        captured: list[dict | None] = [None] * len(blocks)
        last = len(blocks) - 1 if per_block else 0

        def recorder(i):
            def forward(*args, **kwargs):
                h = args[0] if args else kwargs.pop("hidden_states")
                if args[1:]:
                    raise RuntimeError(f"block {i} received extra positional arguments; adapter needs an update")
                if i == 0:
                    hiddens.append(h.detach() if offload_device is None else h.detach().to(offload_device))
                if captured[i] is None:
                    captured[i] = dict(kwargs)
                if i == last:
                    raise _StopForward
                return h

            return forward

        saved = [b.__dict__.get("forward") for b in blocks[:last + 1]]  # accelerate hooks set instance forwards
        for i in range(last + 1):
            blocks[i].forward = recorder(i)
        try:
            for batch in batches:
                ids = torch.as_tensor(batch, dtype=torch.long)
                if ids.dim() == 1:
                    ids = ids.unsqueeze(0)
                try:
                    self.model(ids.to(device), use_cache=False)
                except _StopForward:
                    pass
                else:  # pragma: no cover
                    raise RuntimeError("the last block was never reached during capture_block_inputs")
        finally:
            for b, f in zip(blocks, saved):
                if f is None:
                    b.__dict__.pop("forward", None)
                else:
                    b.forward = f
        batch = hiddens[0].shape[0] if hiddens else 1
        memo: dict[int, object] = {}

        def clean(kw: dict) -> dict:
            out = {}
            for k, v in kw.items():
                if k == "use_cache":
                    out[k] = False
                    continue
                if id(v) not in memo:
                    memo[id(v)] = (_batch_free(v, batch), v)  # keep v alive: ids stay unique
                out[k] = memo[id(v)][0]
            return out

        per = [clean(kw or {}) for kw in captured[:last + 1]]
        return hiddens, (per if per_block else per[0])

    @staticmethod
    def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """One decoder block; unwraps the tuple older transformers return."""
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output of the last block -> logits (final norm + LM head)."""
        raise NotImplementedError

    @torch.no_grad()
    def blockwise_logits(self, batches) -> list[torch.Tensor]:
        """Logits computed one block at a time (equals model(ids).logits; for checks and streaming)."""
        hiddens, per_block = self.capture_block_inputs(batches, per_block=True)
        for block, kwargs in zip(self.blocks(), per_block):
            hiddens = [self.run_block(block, h, kwargs) for h in hiddens]
        return [self.final_logits(h) for h in hiddens]


class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    block_prefix = "model.layers"
    linear_names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    attn_name = "self_attn"
    mlp_name = "mlp"

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(hidden))


class Gemma3Adapter(LlamaAdapter):
    """Gemma-3 text models: llama module names plus q/k norms and four norms per block (no
    linears among them), a scaled embedding (inside embed_tokens, so captured block inputs are
    already scaled), sliding/full attention layers with their own masks and rotary embeddings
    (use capture_block_inputs(per_block=True) to run blocks one at a time), optional final
    logit soft-capping."""

    family = "gemma3"
    model_types = ("gemma3_text",)

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(self.model.model.norm(hidden))
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


class OPTAdapter(ModelAdapter):
    family = "opt"
    model_types = ("opt",)
    block_prefix = "model.decoder.layers"
    linear_names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"]
    attn_name = "self_attn"
    mlp_name = None

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        dec = self.model.model.decoder
        if getattr(dec, "final_layer_norm", None) is not None:
            hidden = dec.final_layer_norm(hidden)
        if getattr(dec, "project_out", None) is not None:
            hidden = dec.project_out(hidden)
        return self.model.lm_head(hidden).contiguous()


ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, Gemma3Adapter, OPTAdapter)


def supported_model_types() -> list[str]:
    return [t for cls in ADAPTERS for t in cls.model_types]


def get_adapter(model) -> ModelAdapter:
    """The adapter for `model`'s family; unsupported architectures -> RayPressError."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if mtype in cls.model_types:
            adapter = cls(model)
            try:
                adapter.module(adapter.block_prefix)
            except RayPressError:
                raise RayPressError(f"{type(model).__name__} has no '{adapter.block_prefix}'; load the causal-LM "
                                    "class (AutoModelForCausalLM), not the bare backbone") from None
            return adapter
    raise RayPressError(f"unsupported architecture '{mtype or type(model).__name__}'; RayPress supports "
                        f"{', '.join(supported_model_types())} models")

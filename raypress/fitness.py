"""Fitness: KL(dense ‖ candidate) of next-token distributions, and perplexity.

The teacher side is cached per token batch as either full log-probs or top-k
(log-prob values + indices + the remaining probability mass), so a stage's many
candidates pay for the dense forward once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Teacher:
    """Cached dense next-token distributions for one token batch."""

    logp: torch.Tensor | None  # [N, V] full log-probs, or None when top-k
    topk_logp: torch.Tensor | None = None  # [N, k]
    topk_idx: torch.Tensor | None = None  # [N, k]
    rest_mass: torch.Tensor | None = None  # [N] probability mass outside the top-k

    @property
    def nbytes(self) -> int:
        ts = [self.logp, self.topk_logp, self.topk_idx, self.rest_mass]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def teacher_rows(parts: list[tuple[Teacher, int, int]]) -> Teacher:
    """One teacher from the token rows [start, stop) of cached teachers, in order."""
    merged: list[list] = []
    for t, a, b in parts:  # adjacent ranges of one teacher are one slice
        if merged and merged[-1][0] is t and merged[-1][2] == a:
            merged[-1][2] = b
        else:
            merged.append([t, a, b])
    parts = [tuple(m) for m in merged]
    if len(parts) == 1:
        t, a, b = parts[0]
        if a == 0 and b == (t.logp if t.logp is not None else t.topk_logp).shape[0]:
            return t  # a whole cached teacher: no copy
    cat = {}
    for k in ("logp", "topk_logp", "topk_idx", "rest_mass"):
        vs = [getattr(t, k) for t, _, _ in parts]
        cat[k] = None if vs[0] is None else torch.cat([v[a:b] for v, (_, a, b) in zip(vs, parts)])
    return Teacher(**cat)


def _flat_logits(logits: torch.Tensor) -> torch.Tensor:
    """[B, T, V] -> [B*(T-1), V] float32: drop the last position (no next token)."""
    return logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()


# Rows of [tokens, vocab] float32 work at a time: the log-softmax and KL temporaries of a whole batch
# (4-5 float32 copies of batch x seq x vocab: ~20 GB at 8k tokens x 128k vocab) would dominate an
# evaluator's GPU peak; in chunks of ~2^26 elements (256 MB) they are a rounding error.
CHUNK_ELEMENTS = 1 << 26


def _row_chunks(logits: torch.Tensor):
    """(start, float32 [rows, V] chunk) over the next-token rows of logits [B, T, V]."""
    flat = logits[:, :-1, :].reshape(-1, logits.shape[-1])  # model dtype (one copy when not contiguous)
    step = max(1, CHUNK_ELEMENTS // flat.shape[-1])
    for i in range(0, flat.shape[0], step):
        yield i, flat[i : i + step].float()


def teacher_token_bytes(vocab: int, topk: int | None = None) -> int:
    """Bytes make_teacher keeps per token: float32 log-probs of the vocabulary, or k float32 values +
    k int64 indices + the float32 rest mass (what `raypress plan` budgets before any GPU exists)."""
    return 12 * topk + 4 if topk and topk < vocab else 4 * vocab


def make_teacher(logits: torch.Tensor, topk: int | None = None) -> Teacher:
    """Build the teacher cache from dense logits [B, T, V]."""
    parts = []
    for _, chunk in _row_chunks(logits):
        logp = F.log_softmax(chunk, dim=-1)
        if not topk or topk >= logp.shape[-1]:
            parts.append((logp,))
        else:
            vals, idx = logp.topk(topk, dim=-1)
            parts.append((vals, idx, (1.0 - vals.exp().sum(-1)).clamp_min(0.0)))
    if len(parts[0]) == 1:
        return Teacher(logp=torch.cat([p[0] for p in parts]))
    vals, idx, rest = (torch.cat(x) for x in zip(*parts))
    return Teacher(logp=None, topk_logp=vals, topk_idx=idx, rest_mass=rest)


def kl_from_teacher(teacher: Teacher, student_logits: torch.Tensor) -> float:
    """Mean over tokens of KL(teacher ‖ student), in nats.

    With a top-k teacher the tail is treated as one bucket: KL over the k kept tokens plus
    r·log(r / r_student), where r, r_student are the teacher's and student's mass outside the top-k.
    """
    total, n = 0.0, 0
    for i, chunk in _row_chunks(student_logits):
        s_logp = F.log_softmax(chunk, dim=-1)
        rows = slice(i, i + s_logp.shape[0])
        if teacher.logp is not None:
            t_logp = teacher.logp[rows].to(s_logp.device)
            kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
        else:
            idx = teacher.topk_idx[rows].to(s_logp.device)
            t_vals = teacher.topk_logp[rows].to(s_logp.device)
            s_vals = s_logp.gather(-1, idx)
            kl = (t_vals.exp() * (t_vals - s_vals)).sum(-1)
            r = teacher.rest_mass[rows].to(s_logp.device)
            r_s = (1.0 - s_vals.exp().sum(-1)).clamp_min(1e-12)
            kl = kl + torch.where(r > 1e-12, r * (torch.log(r.clamp_min(1e-12)) - torch.log(r_s)), torch.zeros_like(r))
        total += float(kl.sum())
        n += kl.shape[0]
    return total / n


def nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens."""
    target = input_ids[:, 1:].reshape(-1).to(logits.device)
    loss = F.cross_entropy(_flat_logits(logits), target, reduction="sum")
    return float(loss), int(target.numel())


@torch.no_grad()
def perplexity(model, tokens: np.ndarray | torch.Tensor, batch_size: int = 4, device=None) -> float:
    """Perplexity of `model` on rows of `tokens` [n, seq_len] (each row an independent window)."""
    device = device or next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], batch_size):
        batch = ids[i : i + batch_size].to(device)
        logits = model(batch).logits
        s, n = nll_sum(logits, batch)
        total, count = total + s, count + n
    return float(np.exp(total / max(count, 1)))

import numpy as np
import pytest
import torch

from raypress.fitness import kl_from_teacher, make_teacher, nll_sum


def _logits(seed, shape=(2, 9, 50), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def test_kl_of_identical_logits_is_zero_full_and_topk():
    x = _logits(0)
    assert abs(kl_from_teacher(make_teacher(x), x)) < 1e-6
    assert abs(kl_from_teacher(make_teacher(x, topk=10), x)) < 1e-6


def test_kl_matches_torch_reference_and_topk_approximates():
    t, s = _logits(1), _logits(2)
    ref = torch.nn.functional.kl_div(
        torch.log_softmax(s[:, :-1].reshape(-1, 50), -1), torch.log_softmax(t[:, :-1].reshape(-1, 50), -1),
        log_target=True, reduction="batchmean",
    )
    full = kl_from_teacher(make_teacher(t), s)
    assert abs(full - float(ref)) < 1e-5
    approx = kl_from_teacher(make_teacher(t, topk=40), s)
    assert 0 < approx <= full * 1.01 and approx > 0.5 * full


def test_nll_counts_next_tokens():
    x = _logits(3)
    ids = torch.randint(0, 50, (2, 9))
    total, n = nll_sum(x, ids)
    assert n == 16
    ref = torch.nn.functional.cross_entropy(x[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1), reduction="sum")
    assert np.isclose(total, float(ref), rtol=1e-5)


@pytest.mark.parametrize("topk", [None, 5])
def test_kl_in_row_chunks_equals_the_whole_batch(monkeypatch, topk):
    """Teacher and KL work on a few rows at a time (GPU memory); the answer must not change."""
    from raypress import fitness

    g = torch.Generator().manual_seed(0)
    t_logits, s_logits = torch.randn(3, 9, 40, generator=g), torch.randn(3, 9, 40, generator=g)
    whole = fitness.kl_from_teacher(fitness.make_teacher(t_logits, topk), s_logits)
    monkeypatch.setattr(fitness, "CHUNK_ELEMENTS", 40 * 5)  # 5 rows per chunk: 24 rows -> 5 chunks
    teacher = fitness.make_teacher(t_logits, topk)
    assert teacher.nbytes == fitness.make_teacher(t_logits, topk).nbytes
    chunked = fitness.kl_from_teacher(teacher, s_logits)
    assert chunked == pytest.approx(whole, rel=1e-6) and whole > 0.1


@pytest.mark.parametrize("topk", [None, 7, 64])
def test_the_plans_teacher_bytes_are_what_make_teacher_keeps(topk):
    """`raypress plan` budgets teacher pages with teacher_token_bytes: it must match the real cache
    (a top-k at or above the vocabulary keeps full log-probs)."""
    from raypress.fitness import teacher_token_bytes

    logits = torch.randn(2, 9, 50)
    assert make_teacher(logits, topk).nbytes == 2 * 8 * teacher_token_bytes(50, topk)

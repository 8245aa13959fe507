import numpy as np
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

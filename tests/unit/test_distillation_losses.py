"""Distillation losses against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from lit_compress.distillation.losses import (
    attention_map,
    attention_transfer,
    hint_loss,
    logit_mse,
    soft_target_kl,
)


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_soft_target_kl_matches_hand_computation_with_t_squared():
    s, t, temp = [1.0, 2.0, 0.5], [3.0, -1.0, 0.0], 4.0
    p = _softmax([v / temp for v in t])
    q = _softmax([v / temp for v in s])
    expected = temp**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    got = soft_target_kl(torch.tensor([s]), torch.tensor([t]), temp)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Batch mean: two copies give the same value.
    assert soft_target_kl(torch.tensor([s, s]), torch.tensor([t, t]), temp).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_soft_target_gradient_is_t_times_q_minus_p_over_batch():
    torch.manual_seed(0)
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10)
    temp = 5.0
    soft_target_kl(s, t, temp).backward()
    p, q = torch.softmax(t / temp, 1), torch.softmax(s.detach() / temp, 1)
    torch.testing.assert_close(s.grad, temp * (q - p) / 4)


def test_high_temperature_gradient_approaches_logit_matching():
    # Hinton et al. section 2.1: for large T and zero-mean logits, dC/ds_i ~ (s_i - t_i) / (N T) * T^2 / T.
    torch.manual_seed(1)
    s = torch.randn(1, 10)
    s = (s - s.mean()).requires_grad_(True)
    t = torch.randn(1, 10)
    t = t - t.mean()
    soft_target_kl(s, t, 1000.0).backward()
    torch.testing.assert_close(s.grad, (s.detach() - t) / 10, rtol=1e-2, atol=1e-5)


def test_zero_when_student_equals_teacher_and_positive_otherwise():
    t = torch.randn(3, 5)
    assert soft_target_kl(t.clone(), t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_target_kl(t + torch.randn(3, 5), t, 2.0).item() > 0


def test_logit_mse_and_hint_are_mean_squared_error():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    assert logit_mse(a, b).item() == pytest.approx((1 + 4) / 2)
    assert hint_loss(a, b).item() == pytest.approx((1 + 4) / 2)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 10\).*\(2, 5\)"):
        soft_target_kl(torch.zeros(2, 10), torch.zeros(2, 5), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        soft_target_kl(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


def test_attention_map_and_transfer_by_hand():
    f = torch.zeros(1, 2, 1, 2)
    f[0, 0, 0, 0], f[0, 1, 0, 1] = 2.0, 1.0  # mean_c f^2 = [2, 0.5] -> normalised [0.970, 0.243]
    norm = math.hypot(2.0, 0.5)
    torch.testing.assert_close(attention_map(f), torch.tensor([[2.0 / norm, 0.5 / norm]]))
    g = torch.ones(1, 3, 1, 2)  # uniform map [0.7071, 0.7071]; channel counts may differ
    expected = ((2.0 / norm - 0.5**0.5) ** 2 + (0.5 / norm - 0.5**0.5) ** 2) / 2
    assert attention_transfer(f, g).item() == pytest.approx(expected, rel=1e-5)
    # Different spatial sizes: the larger map is pooled to the smaller one.
    assert attention_transfer(torch.ones(1, 2, 4, 4), torch.ones(1, 2, 2, 2)).item() == pytest.approx(
        0.0, abs=1e-7
    )
    with pytest.raises(ValueError, match="B, C, H, W"):
        attention_transfer(torch.ones(2, 3), torch.ones(2, 3))

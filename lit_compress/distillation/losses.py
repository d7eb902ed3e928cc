"""Distillation losses: pure functions of student and teacher outputs.

=========  ========================================================  =================================
name       loss                                                      paper
=========  ========================================================  =================================
``kl``     ``T^2 * KL(softmax(t / T) || softmax(s / T))``, batch      Hinton, Vinyals, Dean 2015
``mse``    ``mean((s - t)^2)`` on logits                             Ba & Caruana 2014
hint       ``mean((adapter(f_s) - f_t)^2)`` on features              Romero et al. 2015 (FitNets)
attention  ``mean((a(f_s) - a(f_t))^2)``, ``a = l2norm(mean_c f^2)``  Zagoruyko & Komodakis 2017
=========  ========================================================  =================================

The ``T^2`` factor keeps the soft-target gradient magnitude independent of ``T`` (Hinton et al., section 2):
``d/ds_i [T^2 KL] = T (p_i - q_i)``, which for large ``T`` approaches ``(s_i - t_i) / N`` (zero-mean logits),
the logit-matching gradient.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOGIT_LOSSES", "attention_map", "attention_transfer", "hint_loss", "logit_mse", "soft_target_kl"]


def _check_same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: the student output has shape {tuple(student.shape)} but the teacher's has "
            f"{tuple(teacher.shape)}; they must match (same number of classes and batch). Check that the "
            "teacher was trained for the same task, or select matching outputs (student_module / hints)."
        )


def soft_target_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al.'s soft-target loss ``T^2 * KL(p_T || q_T)`` averaged over the batch.

    ``p_T = softmax(teacher / T)``, ``q_T = softmax(student / T)``. Logits are ``[B, C]`` or ``[B, C, ...]``
    (classes on dim 1; extra dims are averaged like extra examples).
    """
    _check_same_shape(student_logits, teacher_logits, "soft-target distillation")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=1)
    per_example = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return per_example.mean() * (t * t)


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Ba & Caruana's logit regression: mean squared difference of the logits (``temperature`` unused)."""
    _check_same_shape(student_logits, teacher_logits, "logit matching")
    return F.mse_loss(student_logits.float(), teacher_logits.float())


LOGIT_LOSSES = {"kl": soft_target_kl, "mse": logit_mse}


def hint_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """FitNets hint: mean squared error between the (adapted) student feature and the teacher feature."""
    _check_same_shape(student_feature, teacher_feature, "feature hint (after the adapter)")
    return F.mse_loss(student_feature.float(), teacher_feature.float())


def attention_map(feature: Tensor) -> Tensor:
    """Spatial attention of a ``[B, C, H, W]`` feature: ``l2-normalise(mean_c f^2)`` as ``[B, H*W]``."""
    if feature.dim() != 4:
        raise ValueError(f"attention transfer needs [B, C, H, W] features, got shape {tuple(feature.shape)}")
    return F.normalize(feature.float().pow(2).mean(dim=1).flatten(1), dim=1)


def attention_transfer(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Zagoruyko & Komodakis' attention transfer loss between two ``[B, C, H, W]`` features.

    Channel counts may differ (the map averages over channels); when the spatial sizes differ, the larger
    map is average-pooled to the smaller size first.
    """
    s, t = student_feature, teacher_feature
    if s.dim() != 4 or t.dim() != 4:
        raise ValueError(
            f"attention transfer needs [B, C, H, W] features, got student {tuple(s.shape)} and teacher "
            f"{tuple(t.shape)}"
        )
    if s.shape[-2:] != t.shape[-2:]:
        size = min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1])
        s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
    return (attention_map(s) - attention_map(t)).pow(2).mean()

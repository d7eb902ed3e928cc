"""Knowledge distillation: a frozen teacher's soft targets and feature hints as extra loss terms."""

from lit_compress.distillation.callback import Distillation, Hint
from lit_compress.distillation.losses import attention_transfer, hint_loss, logit_mse, soft_target_kl
from lit_compress.distillation.teacher import TeacherLoadError, load_teacher

__all__ = [
    "Distillation",
    "Hint",
    "TeacherLoadError",
    "attention_transfer",
    "hint_loss",
    "load_teacher",
    "logit_mse",
    "soft_target_kl",
]

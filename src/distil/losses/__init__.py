"""Pure loss functions in the style of torch.nn.functional: arguments are (student, teacher, ...)."""

from distil.losses.fused import DEFAULT_CHUNK_ELEMENTS, fused_linear_cross_entropy, fused_linear_divergence
from distil.losses.logits import (
    DIVERGENCES,
    LOG_PROB_FLOOR,
    distillation_loss,
    dkd,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    tvd,
)

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "fused_linear_cross_entropy",
    "fused_linear_divergence",
    "DIVERGENCES",
    "LOG_PROB_FLOOR",
    "distillation_loss",
    "dkd",
    "forward_kl",
    "generalized_jsd",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "tvd",
]

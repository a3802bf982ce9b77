"""distil: knowledge distillation for PyTorch and Hugging Face models.

    import distil
    result = distil.distill(teacher, student, train_data, steps=200, output_dir="runs/mine")

`distil.distill` (distil.api) trains a student from your models and data (`distil.load_lm_dataset` reads a chat,
instruction or text dataset from files for it); `distil.make_student` builds a smaller
student from a Hugging Face teacher's own layers; `distil.Teacher` freezes a model; the losses of distil.losses
(plain functions over tensors, arguments `(student, teacher, ...)`) are importable from here too.
"""

from distil.api import DistillResult, distill
from distil.data import load_lm_dataset
from distil.distill.pair import Teacher
from distil.losses import (
    attention_kl, attention_transfer, cached_divergence, distillation_loss, dkd, fitnets_hint, forward_kl,
    fused_linear_cross_entropy, fused_linear_divergence, generalized_jsd, hidden_cosine, hidden_mse,
    minilm_relations, reverse_kl, rkd_angle, rkd_distance, skew_kl, skew_reverse_kl, sparse_forward_kl, sparse_jsd,
    sparse_reverse_kl, tvd,
)
from distil.students import make_student

__version__ = "0.1.0"
__all__ = [
    "DistillResult", "Teacher", "__version__", "distill", "load_lm_dataset", "make_student",
    # losses
    "attention_kl", "attention_transfer", "cached_divergence", "distillation_loss", "dkd", "fitnets_hint",
    "forward_kl", "fused_linear_cross_entropy", "fused_linear_divergence", "generalized_jsd", "hidden_cosine",
    "hidden_mse", "minilm_relations", "reverse_kl", "rkd_angle", "rkd_distance", "skew_kl", "skew_reverse_kl",
    "sparse_forward_kl", "sparse_jsd", "sparse_reverse_kl", "tvd",
]

"""Pure loss functions in the style of torch.nn.functional: arguments are (student, teacher, ...)."""

from distil.losses.attention import attention_kl, minilm_relations
from distil.losses.features import attention_map, attention_transfer, fitnets_hint, hidden_cosine, hidden_mse
from distil.losses.fused import DEFAULT_CHUNK_ELEMENTS, fused_linear_cross_entropy, fused_linear_divergence
from distil.losses.cached import cached_divergence
from distil.losses.fused_sparse import fused_linear_cached_kd_and_ce
from distil.losses.logits import (
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
from distil.losses.multi_teacher import combine_teacher_logits, combine_teacher_logprobs, per_teacher_loss
from distil.losses.relations import rkd_angle, rkd_distance
from distil.losses.registry import DIVERGENCES, REGISTRY, SPARSE_DIVERGENCES, Divergence
from distil.losses.sparse import sampled_forward_kl, sparse_forward_kl, sparse_jsd, sparse_reverse_kl

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS", "DIVERGENCES", "LOG_PROB_FLOOR", "REGISTRY", "SPARSE_DIVERGENCES", "Divergence",
    # logits
    "distillation_loss", "dkd", "forward_kl", "generalized_jsd", "reverse_kl", "skew_kl", "skew_reverse_kl", "tvd",
    # chunked LM head
    "fused_linear_cached_kd_and_ce", "fused_linear_cross_entropy", "fused_linear_divergence",
    # cached (sparse) teacher targets
    "cached_divergence", "sampled_forward_kl", "sparse_forward_kl", "sparse_jsd", "sparse_reverse_kl",
    # features, attention, relations, several teachers
    "attention_kl", "attention_map", "attention_transfer", "fitnets_hint", "hidden_cosine", "hidden_mse",
    "minilm_relations", "rkd_angle", "rkd_distance",
    "combine_teacher_logits", "combine_teacher_logprobs", "per_teacher_loss",
]

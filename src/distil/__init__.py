"""distil: knowledge distillation for PyTorch and Hugging Face models."""

from distil.distill.pair import Teacher

__version__ = "0.1.0"
__all__ = ["Teacher", "__version__"]

"""distil: knowledge distillation for PyTorch and Hugging Face models."""

__version__ = "0.1.0"

"""Data: a user's language-model datasets (files, formats, packing), the recipe data sources, the batch stream."""

from distil.data.formats import Columns
from distil.data.lm_dataset import LMDataset, load_lm_dataset

__all__ = ["Columns", "LMDataset", "load_lm_dataset"]

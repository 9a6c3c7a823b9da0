"""Datasets and augmentations."""
from data.augment import MultiViewDataset, ViewSpec, view_specs, view_transform
from data.datasets import DATASETS, Split, TensorImages, load_split

__all__ = ["DATASETS", "MultiViewDataset", "Split", "TensorImages", "ViewSpec", "load_split", "view_specs",
           "view_transform"]

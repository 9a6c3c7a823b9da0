"""Datasets, augmentations and the pretraining loaders."""
from data.augment import MultiViewDataset, ViewSpec, symmetric_views, view_transform
from data.datasets import DATASETS, Split, TensorImages, load_split

__all__ = ["DATASETS", "MultiViewDataset", "Split", "TensorImages", "ViewSpec", "load_split", "symmetric_views",
           "view_transform"]

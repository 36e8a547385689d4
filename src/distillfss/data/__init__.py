"""Dataset folders and the tensors the models consume."""

from .folder import DataError, Sample, Split, load_image, load_mask, load_pair, load_split
from .tensors import class_sets, image_tensor, label_tensor, load_support_tensors, load_unlabeled

__all__ = [
    "DataError",
    "Sample",
    "Split",
    "class_sets",
    "image_tensor",
    "label_tensor",
    "load_image",
    "load_mask",
    "load_pair",
    "load_split",
    "load_support_tensors",
    "load_unlabeled",
]

"""Data: patch windows of the scenes (tiling), the leak-free split, augmentation and the patch datasets."""

"""Datasets (TFDS builders), the grain input pipeline and paired augmentation."""

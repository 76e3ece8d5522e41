"""Workflows: the training loop, native-resolution evaluation, lung boxes for cropping."""

"""A restored model at work: its forward pass (TTA, native-size masks), the portable export,
post-processing and overlays."""

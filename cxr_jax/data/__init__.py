"""Data: the dataset registry and TFDS builder, image codecs, preprocessing and the grain
input pipeline. No jax, flax or orbax (grain workers import it)."""

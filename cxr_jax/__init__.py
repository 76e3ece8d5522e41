"""cxr_jax: lung segmentation and normal/abnormal classification of chest X-rays in JAX."""

__version__ = "0.1.0"

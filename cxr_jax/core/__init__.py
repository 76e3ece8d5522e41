"""Core: models, losses, metrics, augmentation, sharding, checkpoints, the run directory and
inference. Imports only `cxr_jax.data` from this package."""

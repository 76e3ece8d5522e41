"""Core, in five rooms: `models` (the networks), `stats` (metrics, surface distances,
classification and paired statistics), `run` (the run directory, checkpoints, writers,
platform, sharding: what a run needs around the model), `training` (heads, losses,
augmentation, steps) and `inference` (a restored model's forward pass, export,
post-processing, overlays). A room imports only the rooms below it (pyproject.toml); core
imports only `cxr_jax.data` from this package."""

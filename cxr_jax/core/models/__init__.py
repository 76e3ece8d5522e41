"""Models: name -> class, and `create_model(config.model, rngs=...)`.

Every model is an `nnx.Module` called as `model(x [B, H, W, 1] float32, *, train: bool)`,
returning a dict with 'mask_logits' [B, H, W, 1] and/or 'class_logits' [B, num_classes],
float32. `train` switches BatchNorm to batch statistics (updating running averages) and
turns dropout on; dropout draws from the model's own 'dropout' rng stream, so the model works
under `nnx.split` / `nnx.merge` inside `jax.jit` (return the new state to keep the updates).
"""

import ml_collections
from flax import nnx

from cxr_jax import errors
from cxr_jax.core.models.attention_unet import AttentionUNet
from cxr_jax.core.models.classifier import Classifier
from cxr_jax.core.models.unet import MultiTaskUNet
from cxr_jax.core.models.unet import UNet

MODELS: dict[str, type[nnx.Module]] = {
  "unet": UNet,
  "attention_unet": AttentionUNet,
  "classifier": Classifier,
  "multitask": MultiTaskUNet,
}


def create_model(model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds `MODELS[model_config.name]` from `config.model`.

  `rngs` needs a 'params' stream and, for dropout > 0, a 'dropout' stream (an
  `nnx.Rngs(seed)` provides both through its default stream).
  """
  name = model_config.name
  if name not in MODELS:
    raise errors.ConfigError(
      f"Unknown model config.model.name={name!r}; valid names: {sorted(MODELS)}."
    )
  return MODELS[name].from_config(model_config, rngs=rngs)


__all__ = ["MODELS", "create_model", "UNet", "AttentionUNet", "Classifier", "MultiTaskUNet"]

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
from cxr_jax.core.models.bit import NAMES as BIT_NAMES
from cxr_jax.core.models.bit import bit_encoder
from cxr_jax.core.models.classifier import Classifier
from cxr_jax.core.models.densenet import densenet_encoder
from cxr_jax.core.models.encoder_models import create_encoder_model
from cxr_jax.core.models.resnet import resnet_encoder
from cxr_jax.core.models.unet import MultiTaskUNet
from cxr_jax.core.models.unet import UNet

MODELS: dict[str, type[nnx.Module]] = {
  "unet": UNet,
  "attention_unet": AttentionUNet,
  "classifier": Classifier,
  "multitask": MultiTaskUNet,
}

# config.model.encoder -> builder(in_features=, dtype=, rngs=) of an encoder returning the
# features at strides 2..32 (torchvision's and big_vision's layouts: pretrained.py loads
# their state dicts and .npz files).
# '' or 'unet': each model's own from-scratch encoder.
ENCODERS = {
  "resnet18": resnet_encoder("resnet18"),
  "resnet34": resnet_encoder("resnet34"),
  "resnet50": resnet_encoder("resnet50"),
  "densenet121": densenet_encoder("densenet121"),
  **{name: bit_encoder(name) for name in BIT_NAMES},
}
NATIVE_ENCODERS = ("", "unet")
DECODER_MODELS = ("unet", "attention_unet", "multitask")  # model.deep_supervision's


def create_model(model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds `MODELS[model_config.name]` from `config.model`.

  `rngs` needs a 'params' stream and, for dropout > 0, a 'dropout' stream (an
  `nnx.Rngs(seed)` provides both through its default stream).
  """
  name = model_config.name
  encoder = model_config.get("encoder", "")
  if model_config.get("deep_supervision", 0) and (
    encoder not in NATIVE_ENCODERS or name not in DECODER_MODELS
  ):
    raise errors.ConfigError(
      f"config.model.deep_supervision={model_config.deep_supervision} supervises the decoder "
      f"of the U-Net family's own encoder ({', '.join(DECODER_MODELS)}, encoder=''), not "
      f"name={name!r}, encoder={encoder!r}; set it to 0."
    )
  if encoder not in NATIVE_ENCODERS:
    if encoder not in ENCODERS:
      raise ValueError(
        f"Unknown config.model.encoder={encoder!r}; valid: {sorted(ENCODERS)} or ''."
      )
    if model_config.get("structures", False) or model_config.get("findings", ""):
      raise ValueError(
        f"config.model.structures / config.model.findings are heads of the U-Net's own "
        f"encoder, not of config.model.encoder={encoder!r}; set encoder='' or drop them."
      )
    return create_encoder_model(ENCODERS[encoder], model_config, rngs=rngs)
  if name not in MODELS:
    raise errors.ConfigError(
      f"Unknown model config.model.name={name!r}; valid names: {sorted(MODELS)}."
    )
  return MODELS[name].from_config(model_config, rngs=rngs)


__all__ = [
  "MODELS",
  "ENCODERS",
  "create_model",
  "UNet",
  "AttentionUNet",
  "Classifier",
  "MultiTaskUNet",
]

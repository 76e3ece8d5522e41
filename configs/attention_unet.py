"""Attention U-Net lung segmentation (Oktay et al. 2018): gated skip connections."""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config(arg)
  config.model.name = "attention_unet"
  return config

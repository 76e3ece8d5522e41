"""A trained model as one portable file: its inference function exported with `jax.export`
(serialized StableHLO, weights inside, batch dimension symbolic) and the preprocessing it
expects. Running it needs jax, not this package's model code or the run directory.

    FILE (zip): model.jax_exported   `jax.export.Exported.serialize()` (TTA and the mask
                                     uncertainty inside, as the run's config says)
                settings.json        image_size, postprocess, tta, qc_threshold, outputs,
                                     provenance
"""

import io
import json
import os
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax import export as jax_export

from cxr_jax.core.inference import inference
from cxr_jax.core.run import platform

FORMAT = "cxr_jax.portable/1"
PLATFORMS = ("cpu", "cuda", "tpu")  # lowered for each: exported on a GPU, run on a laptop
_MODEL, _SETTINGS = "model.jax_exported", "settings.json"


def export_model(
  config: ml_collections.ConfigDict,
  model: nnx.Module,
  path: str | os.PathLike,
  provenance: dict[str, Any],
) -> dict[str, Any]:
  """Writes `model` (eval mode) as a portable file at `path`; returns its settings."""
  if config.data.get("crop_to_lungs", False):
    raise ValueError(
      "a lung-crop classifier needs its segmentation run to crop its inputs; "
      "export that run and this one's classifier is not portable alone."
    )
  graphdef, state = nnx.split(model)

  def infer(images):  # [b, S, S, 1] float32, letterboxed and normalised
    model = nnx.merge(graphdef, state)
    outputs = model(images, train=False)
    return inference.segmenter_outputs(lambda x: model(x, train=False), outputs, images, tta)

  tta = bool(config.get("tta", False))

  size = int(config.data.image_size)
  (batch,) = jax_export.symbolic_shape("b")
  exported = jax_export.export(platform.jit(infer), platforms=PLATFORMS)(
    jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32)
  )
  settings = {
    "format": FORMAT,
    "image_size": size,
    "postprocess": bool(config.get("postprocess", False)),
    "tta": tta,
    "qc_threshold": inference.qc_threshold(config),
    "outputs": sorted(exported.out_tree.unflatten(range(exported.out_tree.num_leaves))),
    "model": config.model.name,
    "eval_batch_size": int(config.get("eval_batch_size", 8)),
    **provenance,
  }
  data = io.BytesIO()
  with zipfile.ZipFile(data, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr(_MODEL, bytes(exported.serialize()))
    z.writestr(_SETTINGS, json.dumps(settings, indent=2))
  epath.Path(path).write_bytes(data.getvalue())  # a local path or a gs:// URL
  return settings


class PortableModel:
  """A portable file's model, called like `inference.Inference` on letterboxed batches."""

  def __init__(self, path: str | os.PathLike, *, batch_size: int = 0):
    with zipfile.ZipFile(io.BytesIO(epath.Path(path).read_bytes())) as z:
      self.settings = json.loads(z.read(_SETTINGS))
      if self.settings.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format {self.settings.get('format')!r})")
      exported = jax_export.deserialize(bytearray(z.read(_MODEL)))
    self._call = platform.jit(exported.call)
    self.image_size = int(self.settings["image_size"])
    self.batch_size = batch_size or int(self.settings["eval_batch_size"])
    self.segments = "prob" in self.settings["outputs"]
    self.classifies = "p_abnormal" in self.settings["outputs"]
    self.qc_threshold = inference.qc_threshold(self.settings)

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    outputs = self._call(jnp.asarray(images, jnp.float32))
    return {k: np.asarray(v) for k, v in jax.device_get(outputs).items()}

"""A trained model as one portable file: its inference function exported with `jax.export`
(serialized StableHLO, weights inside, batch dimension symbolic) and the preprocessing it
expects. Running it needs jax, not this package's model code or the run directory.

    FILE (zip): model.jax_exported   `jax.export.Exported.serialize()` (TTA and the mask
                                     uncertainty inside, as the run's config says)
                settings.json        image_size, postprocess, tta, qc_threshold, outputs,
                                     members (a fold ensemble's runs: their mean), provenance
"""

import hashlib
import io
import json
import os
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax import export as jax_export

from cxr_jax.config import schema
from cxr_jax.core.inference import ensemble
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
  *,
  more: Sequence[tuple[ml_collections.ConfigDict, nnx.Module]] = (),
) -> dict[str, Any]:
  """Writes `model` (eval mode) as a portable file at `path`; returns its settings.

  `more`: the other (config, model) of a fold ensemble (runs of one recipe): the file then
  computes their mean probabilities (`ensemble.MEAN_KEYS`) and the uncertainty of the mean
  p(lung), as `ensemble.Ensemble` does.
  """
  members = [(config, model), *more]
  for member_config, _ in members:
    if member_config.data.crop_to_lungs:
      raise ValueError(
        "a lung-crop classifier needs its segmentation run to crop its inputs; "
        "export that run and this one's classifier is not portable alone."
      )
  tta = bool(config.tta)
  for member_config, _ in more:
    for key in ("data.image_size", "tta", "model.name"):
      if _get(member_config, key) != _get(config, key):
        raise ValueError(
          f"an ensemble's runs differ in config.{key} ({_get(config, key)!r} and "
          f"{_get(member_config, key)!r}); export runs of one recipe (a sweep's folds)."
        )
  splits = [nnx.split(member) for _, member in members]

  def infer(images):  # [b, S, S, 1] float32, letterboxed and normalised
    results = []
    for graphdef, state in splits:
      model = nnx.merge(graphdef, state)

      def forward(x, model=model):
        return model(x, train=False)

      results.append(inference.segmenter_outputs(forward, forward(images), images, tta))
    return results[0] if len(results) == 1 else ensemble.combine(results)

  size = int(config.data.image_size)
  (batch,) = jax_export.symbolic_shape("b")
  exported = jax_export.export(platform.jit(infer), platforms=PLATFORMS)(
    jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32)
  )
  settings = {
    "format": FORMAT,
    "image_size": size,
    "postprocess": bool(config.postprocess),
    "tta": tta,
    "qc_threshold": float(np.mean([float(c.qc_threshold) for c, _ in members])),
    "members": len(members),
    "outputs": sorted(exported.out_tree.unflatten(range(exported.out_tree.num_leaves))),
    "model": config.model.name,
    "eval_batch_size": int(config.eval_batch_size),
    **provenance,
  }
  data = io.BytesIO()
  with zipfile.ZipFile(data, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr(_MODEL, bytes(exported.serialize()))
    z.writestr(_SETTINGS, json.dumps(settings, indent=2))
  epath.Path(path).write_bytes(data.getvalue())  # a local path or a gs:// URL
  return settings


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  for part in path.split("."):
    config = config[part]
  return config


class PortableModel:
  """A portable file's model, called like `inference.Inference` on letterboxed batches."""

  def __init__(self, path: str | os.PathLike, *, batch_size: int = 0):
    """Raises ValueError, one line naming `path`, for a file that is not a whole model file
    (truncated, another kind of file, settings.json missing, the model inside damaged)."""
    try:
      with epath.Path(path).open("rb") as f, zipfile.ZipFile(f) as z:  # reads the index only
        self.settings = json.loads(_member(z, _SETTINGS))
        if not isinstance(self.settings, dict) or self.settings.get("format") != FORMAT:
          found = self.settings.get("format") if isinstance(self.settings, dict) else None
          raise _NotAModel(f"not a {FORMAT} file (format {found!r})")
        model = _member(z, _MODEL)
      self.fingerprint = hashlib.sha256(model).hexdigest()  # names the model in predict's OUT
      try:
        exported = jax_export.deserialize(bytearray(model))
      except Exception as e:  # flatbuffers, struct, ... on damaged bytes
        raise _NotAModel(f"its {_MODEL} is damaged ({type(e).__name__}: {_line(e)})") from e
      self._call = platform.jit(exported.call)
      self.image_size = int(self.settings["image_size"])
      self.batch_size = batch_size or int(self.settings["eval_batch_size"])
      self.segments = "prob" in self.settings["outputs"]
      self.classifies = "p_abnormal" in self.settings["outputs"]
      # Files exported before the threshold was a setting flag at the schema's default.
      self.qc_threshold = float(self.settings.get("qc_threshold", schema.default("qc_threshold")))
    except FileNotFoundError as e:
      raise ValueError(f"{path}: no such file") from e
    except _NotAModel as e:
      raise ValueError(f"{path}: {e}; export the run again (python -m cxr_jax.export)") from e
    except zipfile.BadZipFile as e:
      raise ValueError(
        f"{path}: not a model file of python -m cxr_jax.export, or one cut short "
        f"(BadZipFile: {_line(e)}); export the run again"
      ) from e
    except (KeyError, TypeError, ValueError) as e:  # settings.json without a key it needs
      raise ValueError(
        f"{path}: its {_SETTINGS} is damaged ({type(e).__name__}: {_line(e)}); export the "
        "run again (python -m cxr_jax.export)"
      ) from e

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    outputs = self._call(jnp.asarray(images, jnp.float32))
    return {k: np.asarray(v) for k, v in jax.device_get(outputs).items()}


class _NotAModel(Exception):
  pass


def _member(z: zipfile.ZipFile, name: str) -> bytes:
  """One member of the model file; _NotAModel when it is missing or damaged."""
  try:
    return z.read(name)
  except KeyError as e:
    raise _NotAModel(f"it has no {name}") from e
  except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:  # CRC, cut short
    raise _NotAModel(f"its {name} is damaged ({type(e).__name__}: {_line(e)})") from e


def _line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [""])[0][:200]

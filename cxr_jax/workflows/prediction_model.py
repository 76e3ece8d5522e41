"""The model predict runs: a run's checkpoint, several runs' as a fold ensemble, an exported
file, or a model held in memory; with what names it (OUT/predict.json) and the calibration
temperature evaluate fitted for it."""

import hashlib
import json
import math
import sys
from typing import NamedTuple

import ml_collections

from cxr_jax.core.inference import ensemble
from cxr_jax.core.inference import portable
from cxr_jax.core.inference.inference import Inference
from cxr_jax.core.run import rundir
from cxr_jax.core.run.layout import RunDir
from cxr_jax.workflows import lung_crop
from cxr_jax.workflows import prediction


class Model(NamedTuple):
  inference: Inference | ensemble.Ensemble | portable.PortableModel
  clean: bool
  temperature: float | None
  segmenter: lung_crop.Segmenter | None
  margin: float
  describe: str
  identity: dict
  config: ml_collections.ConfigDict | None  # None: an exported model (lungs, abnormal only)


def load(workdir, checkpoint, batch_size, restored, model_file, space, count) -> Model:
  """The model to predict with and what names it (for OUT/predict.json)."""
  if model_file:
    inference = portable.PortableModel(model_file, batch_size=batch_size)
    inference.batch_size = min(inference.batch_size, count)
    clean = bool(inference.settings["postprocess"])
    identity = {"weights": inference.fingerprint, "settings": inference.settings}
    return Model(inference, clean, None, None, 0.0, f"--model={model_file}", identity, None)
  temperature, describe = None, "a model given in-process"
  runs = rundir.ensemble_runs(workdir) if restored is None else []
  if len(runs) > 1:
    return _load_ensemble(runs, checkpoint, batch_size, space, count)
  if restored is None:
    config, model, step = rundir.restore_model(runs[0], checkpoint)
    temperature = read_temperature(runs[0], step)
    describe = f"--workdir={runs[0]} (step {step})"
  else:
    config, model = restored
  config = rundir.with_space(config, space)
  batch_size = min(batch_size or int(config.eval_batch_size), count)
  inference = Inference(config, model, batch_size=batch_size)
  clean = bool(config.postprocess)
  segmenter, margin = None, 0.0
  if config.data.crop_to_lungs:  # trained on lung crops
    segmenter = lung_crop.load_segmenter(config.data.crop_workdir, batch_size=batch_size)
    margin = float(config.data.crop_margin)
  temperature = temperature if inference.classifies else None
  settings = {
    "clean": clean,
    "tta": inference.tta,
    "image_size": inference.image_size,
    "temperature": temperature,
    "crop_workdir": config.data.crop_workdir if segmenter is not None else None,
  }
  identity = {"weights": prediction.weights_hash(model), "settings": settings}
  return Model(inference, clean, temperature, segmenter, margin, describe, identity, config)


def _load_ensemble(runs, checkpoint, batch_size, space, count) -> Model:
  """The runs' models averaged (`ensemble.Ensemble`). Each fold's calibration temperature
  was fitted to that fold alone, so p_abnormal_calibrated is left blank."""
  members, hashes, steps = [], [], []
  for config, model, step in rundir.restore_runs(runs, checkpoint, space=space):
    size = min(batch_size or int(config.eval_batch_size), count)
    members.append(Inference(config, model, batch_size=size))
    hashes.append(prediction.weights_hash(model))
    steps.append(step)
  inference = ensemble.Ensemble(members, runs)
  clean = bool(inference.config.postprocess)
  settings = {"clean": clean, "tta": inference.tta, "image_size": inference.image_size}
  identity = {"weights": hashlib.sha256(" ".join(hashes).encode()).hexdigest()}
  identity.update(settings=settings, runs=list(runs))
  describe = f"an ensemble of {len(runs)} runs: " + ", ".join(
    f"{r} (step {s})" for r, s in zip(runs, steps, strict=True)
  )
  return Model(inference, clean, None, None, 0.0, describe, identity, inference.config)


def read_temperature(workdir: str, step: int) -> float | None:
  """The temperature evaluate fitted for checkpoint `step` (DIR/calibration.json), or None
  (not evaluated yet, or fitted for another checkpoint: then said on stderr).

  Raises ValueError naming the file when it holds no positive, finite temperature (-1 would
  flip every probability, 0 make them all 0).
  """
  path = RunDir(workdir).calibration
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_text())
    temperature = float(record["temperature"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f"{path} is damaged ({type(e).__name__}: {e}); run evaluate again to refit it, or delete it"
    ) from e
  if not math.isfinite(temperature) or temperature <= 0:
    raise ValueError(
      f"{path}: temperature {record['temperature']!r} is not a positive finite number; run "
      "evaluate again to refit it, or delete the file"
    )
  if record.get("step") != step:
    print(
      f"predict: {path} was fitted for step {record.get('step')}, not {step}: no "
      "p_abnormal_calibrated (run evaluate on this checkpoint to fit it).",
      file=sys.stderr,
    )
    return None
  return temperature

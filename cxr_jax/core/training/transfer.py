"""Transfer learning: `config.model.init_from` and the encoder's fine-tuning schedule.

init_from is a PyTorch-layout state dict or a BiT .npz (models/pretrained.py converts them)
or another cxr_jax run directory, whose encoder's variables (parameters and batch statistics)
load into this model's encoder, e.g. a segmentation run's U-Net encoder into a classifier on the same
encoder. Everything else stays at its initialisation; the log says what was loaded, left
and unused.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from cxr_jax import errors
from cxr_jax.core.models import pretrained
from cxr_jax.core.run import rundir
from cxr_jax.core.run.layout import RunDir

ENCODER = "encoder"


def is_run_directory(path: str) -> bool:
  """Whether `path` is a cxr_jax run directory (it has a config.json)."""
  return RunDir(path).config.exists()


def resolve_config(config: ml_collections.ConfigDict) -> None:
  """Puts config.data.fold into init_from's '{fold}', and sets config.model.input_scale for init_from's source when left at 1 (TorchXRayVision's
  weights take pixels in [-1024, 1024]); config.json then records it."""
  path = config.model.get("init_from", "")
  if "{fold}" in path:  # a k-fold sweep's per-fold source (configs/sweeps/in_domain_*.py)
    path = config.model.init_from = path.format(fold=config.data.fold)
  if not path or is_run_directory(path) or float(config.model.get("input_scale", 1.0)) != 1.0:
    return
  scale = pretrained.input_scale_for(pretrained.read_state_dict(path))
  if scale != 1.0:
    logging.info("init_from %s: TorchXRayVision weights, config.model.input_scale=%g.", path, scale)
    config.model.input_scale = scale


def _encoder_suffix(path: tuple[Any, ...]) -> tuple[Any, ...] | None:
  """The part of a variable's path below its model's encoder (None: not in an encoder)."""
  return tuple(path[path.index(ENCODER) + 1 :]) if ENCODER in path else None


def run_encoder_arrays(
  workdir: str, targets: dict[tuple[Any, ...], tuple[int, ...]]
) -> tuple[dict[tuple[Any, ...], Any], pretrained.LoadReport]:
  """The encoder variables of run `workdir`'s best checkpoint, at this model's paths."""
  _, model, step = rundir.restore_model(workdir, "best")
  by_suffix = {_encoder_suffix(p): p for p in targets if _encoder_suffix(p) is not None}
  arrays, loaded, unused = {}, {}, []
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    suffix = _encoder_suffix(tuple(path))
    name = ".".join(map(str, path))
    value = variable.get_value() if hasattr(variable, "get_value") else None
    if suffix is None or not hasattr(value, "shape") or not value.ndim:
      if suffix is None and hasattr(value, "shape") and value.ndim:
        unused.append(name)
      continue
    if suffix not in by_suffix:
      unused.append(name)
      continue
    target = by_suffix[suffix]
    if tuple(value.shape) != targets[target]:
      raise errors.ConfigError(
        f"config.model.init_from={workdir!r}: {name} has shape {tuple(value.shape)} but the "
        f"model's {'.'.join(map(str, target))} has shape {targets[target]}; use the run's "
        f"config.model.encoder, base_features and depth."
      )
    arrays[target] = jax.device_get(value)
    loaded[name] = ".".join(map(str, target))
  left = sorted(".".join(map(str, p)) for p in targets if p not in arrays)
  notes = [f"encoder of the run's best checkpoint (step {step})"]
  return arrays, pretrained.LoadReport(loaded, left, unused, notes)


def load_init_from(
  path: str, params: nnx.State, model_state: nnx.State
) -> tuple[nnx.State, nnx.State, pretrained.LoadReport]:
  """(params, model_state) with init_from's weights in, and the report of what was done."""
  targets = pretrained.target_shapes(params, model_state)
  if is_run_directory(path):
    arrays, report = run_encoder_arrays(path, targets)
  else:
    arrays, report = pretrained.convert(pretrained.read_state_dict(path), targets)
  if not arrays:
    raise errors.ConfigError(
      f"config.model.init_from={path!r}: none of its arrays fits this model (first unused: "
      f"{report.unused[:3]}); set the config.model.encoder it was trained with "
      f"(resnet18/34/50, densenet121 for torchvision's layout, bit_r50x1 etc. for BiT .npz)."
    )
  return pretrained.replace(params, arrays), pretrained.replace(model_state, arrays), report


def initialise(state: Any, config: ml_collections.ConfigDict, tx: optax.GradientTransformation):
  """A fresh TrainState with config.model.init_from loaded, its optimiser state (and EMA)
  rebuilt from the loaded parameters. Logs the load report."""
  path = config.model.init_from
  params, model_state, report = load_init_from(path, state.params, state.model_state)
  logging.info("init_from %s: %s", path, report.summary())
  # The EMA starts equal to the weights but in buffers of its own: the train step donates
  # the state, and one buffer in two of its leaves cannot be donated twice.
  ema = None
  if state.ema is not None:
    ema = jax.tree.map(jnp.copy, {"params": params, "rest": model_state})
  return state.replace(params=params, model_state=model_state, opt_state=tx.init(params), ema=ema)


def encoder_labels(params: Any) -> Any:
  """'encoder' for the leaves under a module named encoder, 'rest' for the others."""

  def label(path, _):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    return ENCODER if ENCODER in keys else "rest"

  return jax.tree_util.tree_map_with_path(label, params)


def fine_tuning(
  make_tx: Callable[[], optax.GradientTransformation], config: ml_collections.ConfigDict
) -> optax.GradientTransformation:
  """`make_tx()`, with the encoder's updates zero for config.optim.encoder_frozen_steps
  steps and then scaled by config.optim.encoder_lr_multiplier (optax.multi_transform)."""
  frozen = int(config.optim.get("encoder_frozen_steps", 0))
  multiplier = float(config.optim.get("encoder_lr_multiplier", 1.0))
  if not frozen and multiplier == 1.0:
    return make_tx()
  if multiplier < 0:
    raise errors.ConfigError(f"config.optim.encoder_lr_multiplier={multiplier} must be >= 0.")

  def encoder_scale(step: jax.Array) -> jax.Array:
    return jnp.where(step < frozen, 0.0, multiplier)

  encoder_tx = optax.chain(make_tx(), optax.scale_by_schedule(encoder_scale))
  return optax.multi_transform({ENCODER: encoder_tx, "rest": make_tx()}, encoder_labels)

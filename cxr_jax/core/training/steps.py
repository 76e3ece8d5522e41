"""What the jitted training step is made of: the state it carries, the optimiser, and the
pure train and eval step functions.

Model state travels as `nnx.split` pytrees (params, model_state): `jax.jit` over them is
faster on the hot path than `nnx.jit`.
"""

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from cxr_jax import errors
from cxr_jax.core import models
from cxr_jax.core.training import anatomy
from cxr_jax.core.training import augment
from cxr_jax.core.training import heads
from cxr_jax.core.training import losses
from cxr_jax.core.training import transfer


@flax.struct.dataclass
class TrainState:
  """Everything the step changes. Pytree; replicated over the mesh."""

  step: jax.Array  # int32 []
  params: nnx.State  # nnx.Param variables
  model_state: nnx.State  # the other variables: batch statistics, dropout RNG counters
  opt_state: optax.OptState
  rng: jax.Array  # uint32 [2], raw key data; step keys are fold_in(rng, step)
  # config.optim.ema_decay > 0: {'params', 'rest'}, an exponential moving average of the
  # model's float variables (weights and batch statistics); what inference uses, and the
  # mean teacher of config.semi. None otherwise.
  ema: Any = None

  def checkpoint_items(self) -> dict[str, Any]:
    # 'rest': the model state's name on disk since the first release, so older runs resume.
    items = {
      "model": {"params": self.params, "rest": self.model_state},
      "optimizer": self.opt_state,
      "train": {"step": self.step, "rng": self.rng},
    }
    if self.ema is not None:
      items["ema"] = self.ema
    return items

  @classmethod
  def from_checkpoint_items(cls, items: Mapping[str, Any]) -> "TrainState":
    return cls(
      step=items["train"]["step"],
      params=items["model"]["params"],
      model_state=items["model"]["rest"],
      opt_state=items["optimizer"],
      rng=items["train"]["rng"],
      ema=items.get("ema"),
    )

  def inference_variables(self) -> tuple[nnx.State, nnx.State]:
    """(params, model_state) that evaluation and prediction use: the EMA when kept."""
    if self.ema is not None:
      return self.ema["params"], self.ema["rest"]
    return self.params, self.model_state


# ----- optimiser -----


def create_learning_rate_fn(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup, then cosine decay to zero (or constant) over `num_train_steps`."""
  optim = config.optim
  warmup = min(optim.warmup_steps, config.num_train_steps)
  if optim.schedule == "constant":
    after = optax.constant_schedule(optim.learning_rate)
  elif optim.schedule == "cosine":
    after = optax.cosine_decay_schedule(
      optim.learning_rate, max(1, config.num_train_steps - warmup)
    )
  else:
    raise errors.ConfigError(
      f"config.optim.schedule={optim.schedule!r}; valid: 'cosine', 'constant'."
    )
  warm = optax.linear_schedule(optim.learning_rate / max(1, warmup), optim.learning_rate, warmup)
  return optax.join_schedules([warm, after], [warmup])


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (decay on kernels only) or Adam, with optional global-norm clipping, and the
  encoder's fine-tuning schedule (transfer.fine_tuning)."""
  optim = config.optim
  learning_rate = create_learning_rate_fn(config)

  def decay_mask(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)

  if optim.name not in ("adamw", "adam"):
    raise errors.ConfigError(f"config.optim.name={optim.name!r}; valid: 'adamw', 'adam'.")

  def make_tx() -> optax.GradientTransformation:
    if optim.name == "adamw":
      return optax.adamw(learning_rate, weight_decay=optim.weight_decay, mask=decay_mask)
    return optax.adam(learning_rate)

  # The encoder's own schedule (frozen steps, learning-rate multiplier) when fine-tuning.
  tx = transfer.fine_tuning(make_tx, config)
  if optim.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  return tx


def create_train_state(
  config: ml_collections.ConfigDict, tx: optax.GradientTransformation
) -> TrainState:
  """A fresh TrainState from `config.seed` (run it under jax.jit with out_shardings)."""
  # Parameters from an 'rbg' key: XLA compiles the threefry initialisers of a U-Net ~9x
  # slower on CPU (33 s vs 4 s for the smoke model), and init runs once, unsharded.
  rngs = nnx.Rngs(params=jax.random.key(config.seed, impl="rbg"), dropout=config.seed + 1)
  model = models.create_model(config.model, rngs=rngs)
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=model_state,
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(config.seed)),
    ema={"params": params, "rest": model_state} if ema_decay(config) else None,
  )


def ema_decay(config: ml_collections.ConfigDict) -> float:
  return float(config.optim.ema_decay)


def update_ema(ema: Any, variables: Any, step: jax.Array, decay: float) -> Any:
  """ema <- d * ema + (1 - d) * variables over float leaves (others copied), with
  d = min(decay, (1 + step) / (10 + step)) so the first steps are not averaged with the
  random initialisation for long."""
  step = jnp.asarray(step, jnp.float32)
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))

  def one(e, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return (d * e + (1.0 - d) * x).astype(x.dtype)

  return jax.tree.map(one, ema, variables)


def semi_weight(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """The mean teacher's loss weight at `step`: config.semi.weight after a linear ramp over
  config.semi.rampup_steps (0 when off)."""
  weight = float(config.semi.weight)
  rampup = max(1, int(config.semi.rampup_steps))
  return weight * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / rampup)


# ----- steps -----


def loss_and_gradients(
  graphdef: nnx.GraphDef,
  config: ml_collections.ConfigDict,
  params: Any,
  model_state: Any,
  batch: dict[str, jax.Array],
  *,
  teacher: jax.Array | None = None,
  step: jax.Array | int = 0,
) -> tuple[tuple[jax.Array, tuple[Any, dict[str, jax.Array]]], Any]:
  """The training loss on an (augmented) batch and its gradients with respect to `params`.

  Returns `((loss, (new model_state, loss parts)), grads)`; `teacher` [B, S, S, 1] is the
  mean teacher's p(lung), the target of images without a mask (None: no mean teacher).
  """

  def loss_fn(params, model_state):
    # copy=True: fresh Variables of this trace level, which NNX lets the model mutate.
    model = nnx.merge(graphdef, params, model_state, copy=True)
    outputs = model(batch["image"], train=True)
    loss, parts = heads.compute_losses(outputs, batch, config)
    if teacher is not None:
      parts["semi_loss"] = losses.segmentation_loss(
        outputs["mask_logits"],
        teacher,
        (1.0 - batch["has_mask"]) * batch["weight"],
        dice_weight=config.loss.dice_weight,
      )
      loss = loss + semi_weight(config, step) * parts["semi_loss"]
    return loss, (nnx.state(model, nnx.Not(nnx.Param)), parts)

  return jax.value_and_grad(loss_fn, has_aux=True)(params, model_state)


def make_train_step(
  graphdef: nnx.GraphDef,
  config: ml_collections.ConfigDict,
  tx: optax.GradientTransformation,
  image_sharding: jax.sharding.Sharding | None = None,
):
  """Returns `train_step(state, batch) -> (state, scalars)`; pure, ready for jax.jit.

  `image_sharding`: where the augmented images must be (height split over the mesh's
  `space` axis); the augmentation's gathers would otherwise leave XLA free to gather whole
  images onto every device.
  """
  lr_fn = create_learning_rate_fn(config)
  semi = bool(config.semi.weight)
  if semi and not ema_decay(config):
    raise errors.ConfigError(
      "config.semi.weight > 0 needs a teacher: set config.optim.ema_decay (e.g. 0.99)."
    )
  if semi and config.data.examples != "all":
    raise errors.ConfigError(
      f"config.semi.weight > 0 learns from images without a mask, which "
      f"config.data.examples={config.data.examples!r} leaves out: set data.examples='all'."
    )

  def train_step(
    state: TrainState, batch: dict[str, jax.Array]
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update.

    Args:
      state: replicated TrainState.
      batch: global arrays, leading axis split over `data`: image [B,S,S,1] float32,
        mask [B,S,S,1], has_mask/weight [B] float32, label [B] int32.
    Returns:
      The new state and replicated scalars: loss and its parts, learning rate, grad norm.
    """
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    teacher = None
    if semi:
      # Mean teacher: the EMA model's p(lung) on the unaugmented image, carried through the
      # same augmentation as the student's input, is the target where no mask exists.
      model = nnx.merge(graphdef, *state.inference_variables(), copy=True)
      logits = model(batch["image"], train=False)["mask_logits"]
      teacher = jax.lax.stop_gradient(jax.nn.sigmoid(logits))
    # The heart and clavicle masks travel in the lung mask's channel as bits, so one draw
    # moves them all alike.
    structures = batch.get("structures")
    packed = anatomy.pack(batch["lung_mask"], structures)
    if teacher is None:
      image, packed = augment.augment_batch(step_key, batch["image"], packed, config.aug)
    else:
      image, packed, teacher = augment.augment_batch(
        step_key, batch["image"], packed, config.aug, soft=teacher
      )
    if image_sharding is not None:
      image = jax.lax.with_sharding_constraint(image, image_sharding)
      packed = jax.lax.with_sharding_constraint(packed, image_sharding)
    mask, structures = anatomy.unpack(packed, 0 if structures is None else structures.shape[-1])
    batch = dict(batch, image=image, lung_mask=mask)
    if structures is not None:
      batch["structures"] = structures

    (loss, (model_state, parts)), grads = loss_and_gradients(
      graphdef, config, state.params, state.model_state, batch, teacher=teacher, step=state.step
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
      step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state
    )
    if state.ema is not None:
      new_state = new_state.replace(
        ema=update_ema(
          state.ema, {"params": params, "rest": model_state}, state.step, ema_decay(config)
        )
      )
    scalars = {
      "loss": loss,
      "learning_rate": lr_fn(state.step),
      "grad_norm": optax.tree.norm(grads),
      **parts,
    }
    return new_state, scalars

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, *, online=False):
  """Returns `eval_step(state, batch) -> (metrics collections, outputs)`; pure.

  Scores the EMA weights when the state keeps them (what inference uses), the trained
  weights themselves with `online=True` or without an EMA.
  """

  def eval_step(state: TrainState, batch: dict[str, jax.Array]):
    variables = (state.params, state.model_state) if online else state.inference_variables()
    model = nnx.merge(graphdef, *variables, copy=True)
    outputs = model(batch["image"], train=False)
    _, parts = heads.compute_losses(outputs, batch, config)
    return heads.metric_collections(outputs, batch, parts), outputs

  return eval_step

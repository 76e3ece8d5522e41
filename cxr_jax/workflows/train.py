"""Training and evaluation: `train_and_evaluate(config, workdir)`, readable top to bottom.

The step (`core.training.steps`) is one pure function under `platform.jit`: paired augmentation, forward,
loss and the optax update, with parameters and optimiser state replicated over the mesh and
batches split over its `data` axis.
"""

import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from cxr_jax import errors
from cxr_jax.config import schema
from cxr_jax.core import models
from cxr_jax.core.inference import overlays
from cxr_jax.core.run import checkpoint
from cxr_jax.core.run import multihost
from cxr_jax.core.run import preemption
from cxr_jax.core.run import restore_errors
from cxr_jax.core.run import run_data
from cxr_jax.core.run import run_lock
from cxr_jax.core.run import rundir
from cxr_jax.core.run import sharding
from cxr_jax.core.run import trackers
from cxr_jax.core.run import utilisation
from cxr_jax.core.run import workdir_checks
from cxr_jax.core.run import writers
from cxr_jax.core.stats import metrics as metrics_lib
from cxr_jax.core.training import heads
from cxr_jax.core.training import steps
from cxr_jax.core.training import transfer
from cxr_jax.data import input_pipeline
from cxr_jax.data import paths
from cxr_jax.workflows import lung_crop
from cxr_jax.workflows import programs as programs_lib


# ----------------------------------------------------------------------------------------
# Run bookkeeping.
# ----------------------------------------------------------------------------------------
class ProgressLog:
  """steps/s, images/s and ETA since the last report (clu's ReportProgress needs TF)."""

  def __init__(self, num_train_steps: int, batch_size: int, first_step: int):
    self.num_train_steps = num_train_steps
    self.batch_size = batch_size
    self.last_step, self.last_time = first_step, time.perf_counter()

  def __call__(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.num_train_steps - step) / max(steps_per_sec, 1e-9)
    return {
      "steps_per_sec": steps_per_sec,
      "step_time_s": 1 / max(steps_per_sec, 1e-9),
      "images_per_sec": steps_per_sec * self.batch_size,
      "images_per_sec_per_device": steps_per_sec * self.batch_size / jax.device_count(),
      "eta_min": eta / 60,
    }


def _stop_on_nonfinite(history: list[dict[str, np.ndarray]], manager, workdir: str) -> None:
  for scalars in history:
    if not np.isfinite(scalars["loss"]):
      manager.wait_until_finished()  # name a checkpoint that is complete
      good = manager.latest_step()
      raise FloatingPointError(
        f"Non-finite training loss at step {int(scalars['step'])}. The last good checkpoint "
        f"is step {good} in {workdir}/checkpoints. Try a lower --config.optim.learning_rate "
        f"(now {scalars['learning_rate']:.3g}), gradient clipping "
        "(--config.optim.grad_clip=1.0), --config.model.dtype=float32, or check the input "
        "images; the same command resumes from that checkpoint."
      )


# ----------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------
def run_validation(
  eval_step,
  state: steps.TrainState,
  batches: Iterable[Mapping[str, np.ndarray]],
  mesh: jax.sharding.Mesh,
  num_images: int = 0,
) -> tuple[dict[str, float], np.ndarray | None]:
  """Metrics over every example of `batches` and, optionally, a few prediction overlays."""
  merged: dict[str, Any] = {}
  pictures = None
  for host_batch in batches:
    batch = sharding.to_global(host_batch, mesh)
    collections, outputs = eval_step(state, batch)
    collections = metrics_lib.gather(collections)
    for name, collection in collections.items():
      merged[name] = merged[name].merge(collection) if name in merged else collection
    if pictures is None and num_images and "mask_logits" in outputs:
      pictures = _overlays(host_batch, outputs["mask_logits"], num_images)
  results = {}
  for head_name, collection in merged.items():
    for key, value in collection.compute().items():
      results[heads.metric_name(head_name, key)] = float(value)
  return results, pictures


def _overlays(host_batch, mask_logits: jax.Array, num_images: int) -> np.ndarray:
  """[N,S,S,3] uint8 overlays of this process's first examples."""
  local = np.asarray(
    multihost_utils.global_array_to_host_local_array(
      mask_logits, mask_logits.sharding.mesh, mask_logits.sharding.spec
    )
  )
  n = min(num_images, int(np.sum(host_batch["weight"] > 0)))  # real examples come first
  size = local.shape[1:3]
  return (
    np.stack(
      [
        overlays.overlay(
          host_batch["image"][i, ..., 0],
          local[i, ..., 0] > 0,
          host_batch["lung_mask"][i, ..., 0] if host_batch["has_mask"][i] else None,
        )
        for i in range(n)
      ]
    )
    if n
    else np.zeros((0, *size, 3), np.uint8)
  )


# ----------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config.model` on `config.data`, evaluating and checkpointing into `workdir`.

  Running it again on the same workdir resumes from the newest complete checkpoint.
  Returns the last validation metrics.
  """
  workdir_checks.check_workdir(workdir)
  workdir = rundir.check_path(workdir, "--workdir")
  config = ml_collections.ConfigDict(config.to_dict())  # a copy we may resolve in place
  if config.data.crop_workdir:
    config.data.crop_workdir = paths.resolve(config.data.crop_workdir)
  transfer.resolve_config(config)  # the source's input scale, before the model is built
  schema.validate(config)
  trackers.check_config(config)
  check_model(config)  # seconds, before anything is read or written
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  lock = run_lock.lock_run(workdir)  # before reading checkpoints another run may be writing
  try:
    return _train_and_evaluate(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:

  # ----- data -----
  requested = config.data.name
  dataset = run_data.open_dataset(config.data)
  config.data.name, config.data.manual_dir = dataset.name, dataset.manual_dir
  logging.info(
    "Dataset: %s (config.data.name=%r)%s",
    dataset.name,
    requested,
    f", files at {dataset.manual_dir}" if dataset.manual_dir else "",
  )

  # ----- mesh -----
  mesh = sharding.create_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  sharding.check_image_size(config.data.image_size, mesh)
  logging.info(
    "Mesh: %s over %d devices (%s), %d processes, this is process %d.",
    dict(mesh.shape),
    jax.device_count(),
    jax.default_backend(),
    jax.process_count(),
    jax.process_index(),
  )

  config.data.num_workers = input_pipeline.worker_count(int(config.data.num_workers))
  sources = {
    split: lung_crop.maybe_crop(config, split, run_data.load_split(config, split, dataset), workdir)
    for split in ("train", "validation")
  }
  process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
  train_iter = input_pipeline.create_train_iterator(config, sources["train"], **process)
  eval_batches = input_pipeline.create_eval_batches(config, sources["validation"], **process)

  # ----- model, optimiser and the compiled steps -----
  programs = programs_lib.build(config, mesh)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(programs.abstract_state.params))
  logging.info("Model %s: %s parameters.", config.model.name, f"{num_params:,}")

  # ----- checkpoint: resume or start -----
  manager = checkpoint.create_manager(workdir, config)
  if manager.latest_step() is not None:
    rundir.check_resumable(workdir, config)  # another structure first: the deeper mismatch
    workdir_checks.check_steps_left(workdir, manager.latest_step(), config.num_train_steps)
    multihost.barrier("restore")  # Orbax's own restore waits on every process, unnamed
    abstract_items = programs.abstract_state.checkpoint_items()
    step, items = checkpoint.restore_newest_readable(
      manager,
      sorted(manager.all_steps(), reverse=True),
      lambda step: checkpoint.restore(manager, step, abstract_items, train_iter),
      abstract_items=abstract_items,
      data_state=train_iter.get_state(),
      changed=restore_errors.config_changes(
        rundir.load_config(workdir).to_dict(), config.to_dict()
      ),
    )
    state = steps.TrainState.from_checkpoint_items(items)
    for newer in [s for s in manager.all_steps() if s > step]:  # unreadable: Orbax would
      logging.warning("Deleting unreadable checkpoint %d.", newer)  # skip every save up to it
      manager.delete(newer)
    logging.info("Resumed from step %d in %s.", step, manager.directory)
  else:
    if jax.process_index() == 0:
      workdir_checks.set_aside_orphaned_metrics(workdir)
    state = programs.init()
    if config.model.init_from:
      state = jax.device_put(
        transfer.initialise(state, config, programs.tx), programs.state_sharding
      )
  first_step = int(state.step)
  if jax.process_index() == 0:  # after a restore: it describes what the checkpoints hold
    rundir.write_config(workdir, config, dataset.info(requested))

  # With an EMA the checkpoint chosen is the EMA's best; the trained weights' own metrics are
  # logged beside it as online_<name> (the EMA's paired effect, every evaluation).
  train_step, eval_step, online_step = (
    programs.train_step,
    programs.eval_step,
    programs.online_step,
  )

  # ----- loop -----
  # On resume, drop what the killed run logged after its last checkpoint. The loop logs its
  # own one-line summaries, so the writer does not log each scalar again.
  tracker = trackers.open_tracker(workdir, config) if jax.process_index() == 0 else None
  writer = writers.create_writer(
    workdir, resume_step=first_step or None, log=False, also=[tracker] if tracker else []
  )
  if first_step == 0:
    writer.write_hparams(config.to_dict())
  progress = ProgressLog(config.num_train_steps, config.batch_size, first_step)
  history: list[dict[str, Any]] = []  # per-step device scalars since the last report
  val_metrics: dict[str, float] = {}
  profile = utilisation.profile_window(config.profile_steps, workdir)
  watcher = preemption.PreemptionWatcher()
  compiled_step, flops = None, None
  device_kind = jax.devices()[0].device_kind
  logging.info("Training steps %d..%d.", first_step + 1, config.num_train_steps)
  try:
    for step in range(first_step + 1, config.num_train_steps + 1):
      batch = sharding.to_global(next(train_iter), mesh)
      if compiled_step is None:  # compiled ahead of time: its cost analysis gives the FLOPs
        t0 = time.perf_counter()
        with utilisation.CompilationCacheEvents() as cache:
          compiled_step = train_step.lower(state, batch).compile()
        flops = utilisation.step_flops(compiled_step)
        logging.info(
          "Train step compiled in %.1f s (%s); %s FLOPs per step per device.",
          time.perf_counter() - t0,
          cache.describe(),
          f"{flops:.3g}" if flops else "unknown",
        )
        multihost.barrier("train step compiled")
        progress.last_time += time.perf_counter() - t0  # keep compiling out of steps/s
      profile.before(step)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, scalars = compiled_step(state, batch)
      profile.after(step, state)
      history.append(dict(scalars, step=step))

      is_last = step == config.num_train_steps
      if step % config.log_every_steps == 0 or is_last:
        fetched = jax.device_get(history)
        history = []
        _stop_on_nonfinite(fetched, manager, workdir)
        summary = {k: float(np.mean([h[k] for h in fetched])) for k in fetched[-1] if k != "step"}
        summary["learning_rate"] = float(fetched[-1]["learning_rate"])
        summary.update(progress(step))
        summary.update(utilisation.utilisation(flops, summary["steps_per_sec"], device_kind))
        if flops:
          summary["flops_per_step_per_device"] = flops
        writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
        logging.info(
          "step %d/%d  loss %.4f  lr %.2e  %.0f ms/step  %.1f images/s (%.1f per device)%s"
          "  ETA %.1f min",
          step,
          config.num_train_steps,
          summary["loss"],
          summary["learning_rate"],
          1000 * summary["step_time_s"],
          summary["images_per_sec"],
          summary["images_per_sec_per_device"],
          f"  MFU {summary['mfu']:.1%}" if "mfu" in summary else "",
          summary["eta_min"],
        )

      evaluated = step % config.eval_every_steps == 0 or is_last
      if evaluated:
        t0 = time.perf_counter()
        val_metrics, pictures = run_validation(
          eval_step, state, eval_batches, mesh, config.num_eval_images
        )
        if online_step is not None:
          online, _ = run_validation(online_step, state, eval_batches, mesh)
          val_metrics.update({f"online_{k}": v for k, v in online.items()})
        writer.write_scalars(step, {f"validation/{k}": v for k, v in val_metrics.items()})
        if pictures is not None and len(pictures):
          writer.write_images(step, {"validation/overlays": pictures})
        logging.info(
          "step %d validation: %s (%.1fs)",
          step,
          "  ".join(f"{k} {v:.4f}" for k, v in sorted(val_metrics.items())),
          time.perf_counter() - t0,
        )
        progress.last_time += time.perf_counter() - t0  # keep eval out of steps/s

      # Every evaluated state is saved too, so the best checkpoint is the best evaluation.
      preempted = watcher.should_stop(step)  # every process, every step
      if step % config.checkpoint_every_steps == 0 or evaluated or preempted:
        if history:  # never save a state whose loss went non-finite since the last report
          _stop_on_nonfinite(jax.device_get(history), manager, workdir)
        writer.flush()  # what a resume from this checkpoint keeps is stored before it
        multihost.barrier(f"save step {step}")  # Orbax's own save waits on every process, unnamed
        checkpoint.save(
          manager,
          step,
          state.checkpoint_items(),
          train_iter,
          metrics=val_metrics if evaluated else None,
        )
      if preempted:
        logging.warning("Preempted: saved step %d; the same command resumes from it.", step)
        break
    manager.wait_until_finished()
    multihost.barrier("training done")
  finally:
    watcher.close()
    profile.close()
    writer.close()
  return val_metrics


def check_model(config: ml_collections.ConfigDict) -> None:
  """Fails at start-up when the model cannot take `config.data.image_size` (its own error
  names what fits) or does not report `config.best_metric`."""
  graphdef, state = nnx.split(
    nnx.eval_shape(lambda: models.create_model(config.model, rngs=nnx.Rngs(params=0, dropout=0)))
  )
  size = config.data.image_size
  outputs = jax.eval_shape(
    lambda state: nnx.merge(graphdef, state)(jnp.zeros((1, size, size, 1)), train=False), state
  )
  names = heads.validation_metric_names(outputs)
  if config.best_metric not in names:
    raise errors.ConfigError(
      f"config.best_metric={config.best_metric!r} is not a validation metric "
      f"of {config.model.name!r}; valid: {sorted(names)}."
    )

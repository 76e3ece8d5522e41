"""Every config key, once: its default, its valid values, one line of meaning, and whether
a resume may change it.

`configs/*.py` start from these defaults (`schema.defaults()`), an older run's config.json
gets missing keys from them (`schema.fill`), training validates against them at start-up
(`schema.validate`), and a resume compares the structural keys (`schema.structural_changes`).

`rule`: 'int', 'int >= 0', 'int >= 1', '> 0', '>= 0', '[0, 1)', '[0, 1]', a tuple of valid values, or
None (the default's type: bool or str; names checked by their registry). `structural`: what of
the value the checkpoint's or the data iterator's shape depends on (`SAME`: the value itself,
`bool`: whether it is on), or None when a resume may change it.
"""

import dataclasses
from collections.abc import Callable
from typing import Any


def SAME(value: Any) -> Any:  # named like a constant: a mark read in the table
  """Structural mark: any change of the value changes the checkpoint or iterator."""
  return value


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key: `path` ('data.image_size'), `default`, `rule`, `meaning`, `structural`."""

  path: str
  default: Any
  rule: str | tuple | None
  meaning: str
  structural: Callable[[Any], Any] | None = None


# fmt: off
# (one key a line: the table reads as a table)
KEYS = (
  Key("seed", 0, "int", "seed of the initial weights, the data order and the augmentation"),
  # ----- data -----
  Key("data.name", "auto", None, "dataset kind (data/registry.py); 'auto': the archive when manual_dir holds it, else synthetic"),
  Key("data.manual_dir", "", None, "Kaggle archive root (or its .zip); '' -> $CXR_MANUAL_DIR"),
  Key("data.mixture", "", None, "several prepared datasets trained together: 'NAME[@MANUAL_DIR][:WEIGHT],...' (data/mixture.py); '': data.name alone", SAME),
  Key("data.data_dir", "~/tensorflow_datasets", None, "prepared TFDS datasets"),
  Key("data.image_size", 128, "int >= 1", "side of the letterboxed square the model sees", SAME),
  Key("data.split", "hash", ("hash", "kfold", "cross_site"), "protocol: the dataset's splits | fold tests, fold+1 validates | train on train_sources, test on the others"),
  Key("data.num_folds", 5, "int >= 2", "kfold: number of folds"),
  Key("data.fold", 0, "int >= 0", "kfold: the fold tested"),
  Key("data.outer_fold", -1, "int", "kfold: a fold no run trains on, every run's test (nested: data.fold then validates, the rest train; -1: off)"),
  Key("data.train_sources", "montgomery", None, "cross_site: comma-separated source names trained on"),
  Key("data.examples", "with_masks", ("with_masks", "all", "all_without_masks"), "training examples: masked ones | all (unmasked train a class head only) | all, masks not read", SAME),
  Key("data.balance_classes", False, None, "balanced sampler for classification", SAME),
  Key("data.num_workers", 0, "int >= 0", "grain worker processes (0: read in the main process)", SAME),
  Key("data.prefetch", 2, "int >= 1", "host batches buffered ahead of the device"),
  Key("data.synthetic_examples", 400, "int >= 1", "size of the synthetic dataset (all splits)"),
  Key("data.crop_to_lungs", False, None, "crop each image to its predicted lungs (crop_workdir's model)"),
  Key("data.crop_workdir", "", None, "segmentation workdir whose masks crop images to the lungs"),
  Key("data.crop_margin", 0.1, ">= 0", "margin around the lung box, as a fraction of its size"),
  # ----- paired augmentation (jax, inside the train step) -----
  Key("aug.enabled", True, None, "paired augmentation on"),
  Key("aug.rotate_deg", 10.0, ">= 0", "max |rotation|, degrees"),
  Key("aug.scale", 0.1, "[0, 1)", "zoom in [1 - scale, 1 + scale]"),
  Key("aug.shift", 0.05, ">= 0", "max |shift| as a fraction of the side"),
  Key("aug.shear_deg", 5.0, ">= 0", "max |shear|, degrees"),
  Key("aug.elastic_alpha", 0.0, ">= 0", "elastic displacement in pixels (0: off)"),
  Key("aug.elastic_sigma", 8.0, "> 0", "smoothness of the elastic displacement field, pixels"),
  Key("aug.hflip", False, None, "random horizontal flips (anatomy is not mirror-symmetric)"),
  Key("aug.brightness", 0.1, ">= 0", "additive brightness, in normalised units"),
  Key("aug.contrast", 0.1, "[0, 1)", "multiplicative contrast in [1 - c, 1 + c]"),
  Key("aug.gamma", 0.1, "[0, 1)", "gamma in [1 - g, 1 + g]"),
  Key("aug.noise_std", 0.02, ">= 0", "Gaussian noise, in normalised units"),
  Key("aug.blur_sigma", 0.0, ">= 0", "max Gaussian blur sigma in pixels (0: off)"),
  Key("aug.window", 0.0, "[0, 1)", "contrast window: clip to [lo, hi] of the image's range, lo up to this fraction above its minimum, hi as far below its maximum, and stretch back (another site's display curve)"),
  Key("aug.local_contrast", 0.0, ">= 0", "CLAHE-like local contrast: x + a (x - blur(x, side/8)), a up to this"),
  Key("aug.opacity", 0.0, "[0, 1]", "probability of painting a simulated opacity (a smooth bright blob, consolidation-like) into the lungs, the lung mask kept"),
  Key("aug.magnification", 0.0, "[0, 1)", "AP-style projection magnification: a horizontal zoom in [1, 1 + m] with the mask"),
  # ----- model -----
  Key("model.name", "unet", None, "network (core/models registry)", SAME),
  Key("model.base_features", 8, "int >= 1", "channels of the first level (16+ for real data on an accelerator)", SAME),
  Key("model.depth", 4, "int >= 1", "number of downsamplings", SAME),
  Key("model.norm", "batch", ("batch", "group", "none"), "normalisation layer", SAME),
  Key("model.dropout", 0.0, "[0, 1)", "dropout rate", SAME),
  Key("model.upsample", "transpose", ("transpose", "resize"), "decoder upsampling", SAME),
  Key("model.num_classes", 2, "int >= 1", "classifier heads: normal / abnormal", SAME),
  Key("model.dtype", "float32", ("float32", "bfloat16", "float64"), "compute dtype (parameters stay float32; float64: the tests' reference, needs jax_enable_x64)"),
  Key("model.structures", False, None, "U-Net: also segment the heart and clavicles (a channel each, learnt where outlined)", SAME),
  Key("model.findings", "", None, "U-Net: a sigmoid per finding, comma-separated names of the dataset's findings (learnt where labelled)", SAME),
  # ----- transfer learning (README "Transfer learning") -----
  Key("model.deep_supervision", 0, "int >= 0", "U-Net family: an auxiliary lung head on each of this many decoder levels below full resolution, their losses weighted 1/2 per level (nnU-Net)", SAME),
  Key("model.encoder", "", ("", "unet", "resnet18", "resnet34", "resnet50", "densenet121", "bit_r50x1", "bit_r50x3", "bit_r101x1", "bit_r101x3", "bit_r152x2", "bit_r152x4"), "encoder of unet/multitask/classifier: '' (the model's own), a torchvision-layout one or a big_vision BiT ResNet-V2 (image_size a multiple of 32)", SAME),
  Key("model.init_from", "", None, "weights to start from: a torchvision/timm/TorchXRayVision state dict (.safetensors, .npz, .pth, .pt), a big_vision/BiT .npz or a cxr_jax run directory (its encoder); '{fold}' takes data.fold", SAME),
  Key("model.input_scale", 1.0, "> 0", "multiplies the z-scored input before the encoder (init_from sets 512 for TorchXRayVision weights)", SAME),
  Key("model.freeze_bn", False, None, "the encoder's BatchNorm keeps its running statistics in training", SAME),
  # ----- loss -----
  Key("loss.dice_weight", 1.0, ">= 0", "segmentation: BCE + dice_weight * soft Dice"),
  Key("loss.class_weight", 1.0, ">= 0", "multi-task: weight of the classification loss"),
  Key("loss.structure_weight", 1.0, ">= 0", "weight of the heart/clavicle loss (model.structures)"),
  Key("loss.findings_weight", 1.0, ">= 0", "weight of the findings loss (model.findings)"),
  Key("loss.uncertain", "ignore", ("ignore", "ones", "zeros"), "uncertain finding labels (CheXpert's -1): U-Ignore | U-Ones | U-Zeros"),
  # ----- optimiser -----
  Key("optim.name", "adamw", ("adamw", "adam"), "optimiser", SAME),
  Key("optim.learning_rate", 3e-3, "> 0", "peak learning rate"),
  Key("optim.warmup_steps", 50, "int >= 0", "linear warmup steps"),
  Key("optim.schedule", "cosine", ("cosine", "constant"), "learning rate after the warmup"),
  Key("optim.weight_decay", 1e-4, ">= 0", "AdamW decay of kernels"),
  Key("optim.grad_clip", 1.0, ">= 0", "global-norm gradient clipping (0: off)", bool),
  Key("optim.ema_decay", 0.0, "[0, 1)", "EMA of the weights (0: off) that validation, evaluate and predict use", bool),
  Key("optim.encoder_frozen_steps", 0, "int >= 0", "steps the encoder's parameters stay fixed (fine-tuning)", bool),
  Key("optim.encoder_lr_multiplier", 1.0, ">= 0", "the encoder's learning rate relative to the rest, after encoder_frozen_steps", lambda v: v != 1.0),
  # ----- semi-supervised: mean teacher (needs optim.ema_decay and data.examples='all') -----
  Key("semi.weight", 0.0, ">= 0", "weight of the EMA teacher's p(lung) on unmasked images (0: off)"),
  Key("semi.rampup_steps", 200, "int >= 0", "steps over which semi.weight ramps up linearly"),
  # ----- loop -----
  Key("mesh.data", -1, "int", "devices batches are split over (-1: the devices left)"),
  Key("mesh.space", 1, "int >= 1", "devices each image's height is split over"),
  Key("shard_params", False, None, "parameters and optimiser state split over 'data' (FSDP)"),
  Key("batch_size", 8, "int >= 1", "global batch size, over all devices and hosts"),
  Key("eval_batch_size", 16, "int >= 1", "batch size of validation, evaluate and predict"),
  Key("num_train_steps", 1000, "int >= 1", "training steps"),
  Key("log_every_steps", 50, "int >= 1", "steps between training metric rows"),
  Key("eval_every_steps", 250, "int >= 1", "steps between validations"),
  Key("checkpoint_every_steps", 250, "int >= 1", "steps between checkpoints"),
  Key("max_to_keep", 2, "int >= 1", "newest checkpoints kept (besides the best)"),
  Key("best_metric", "dice", None, "validation metric whose best checkpoint is kept"),
  Key("num_eval_images", 4, "int >= 0", "prediction overlays written per evaluation"),
  Key("postprocess", False, None, "keep the two largest components and fill holes"),
  Key("tta", False, None, "evaluate/predict average p(lung) over shifted and zoomed views"),
  # qc_threshold: Youden's J for Dice < 0.95 on folds 0-1 of configs/unet_kaggle.py (128 px, TTA;
  # 0.268), checked on folds 2-4 (README, Results). Other sizes and models shift the scale.
  Key("qc_threshold", 0.27, ">= 0", "masks whose uncertainty exceeds this are flagged for a look by eye"),
  Key("profile_steps", "", None, "e.g. '10-15': a jax.profiler trace of those steps in DIR/profile"),
  # ----- experiment tracker beside TensorBoard (core/run/trackers.py; pip install -e ".[trackers]") -----
  Key("tracker", "", ("", "mlflow", "wandb"), "also log params, scalars and evaluate's report to MLflow or W&B ('': off); its run is named in DIR/tracker.json"),
  Key("tracker_project", "cxr_jax", None, "MLflow experiment / W&B project"),
  Key("tracker_uri", "", None, "MLflow tracking URI ('': $MLFLOW_TRACKING_URI, else MLflow's default); W&B reads $WANDB_MODE"),
)
# fmt: on

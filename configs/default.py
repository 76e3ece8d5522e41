"""Default hyperparameters: every experiment config starts from this one.

Variants import it and change a few fields. `get_config(arg)` takes the string after the
colon in `--config=configs/unet.py:smoke`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config (a U-Net on the embedded synthetic data)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # ----- data -----
  config.data = ml_collections.ConfigDict()
  # 'auto': the real archive when `manual_dir` holds it, the synthetic phantoms otherwise.
  config.data.name = "auto"
  config.data.manual_dir = ""  # Kaggle archive root (or its .zip); '' -> $CXR_MANUAL_DIR.
  config.data.data_dir = "~/tensorflow_datasets"  # prepared TFDS datasets
  config.data.image_size = 128  # side of the letterboxed square the model sees
  # Protocol (data/protocols.py): 'hash' (the dataset's splits) | 'kfold' (fold tests, fold+1
  # validates) | 'cross_site' (train on train_sources, test on the others).
  config.data.split = "hash"
  config.data.num_folds = 5
  config.data.fold = 0
  config.data.train_sources = "montgomery"  # cross_site: comma-separated source names
  # Training examples: 'with_masks' | 'all' (unmasked ones train a class head only) |
  # 'all_without_masks' (classification: masks are not even read).
  config.data.examples = "with_masks"
  config.data.balance_classes = False  # balanced sampler for classification
  config.data.num_workers = 0  # grain worker processes (0: read in the main process)
  config.data.prefetch = 2  # host batches buffered ahead of the device
  config.data.synthetic_examples = 400  # size of the synthetic dataset (all splits)
  config.data.crop_to_lungs = False  # crop each image to its predicted lungs (below)
  config.data.crop_workdir = ""  # segmentation workdir whose masks crop images to the lungs
  config.data.crop_margin = 0.1  # margin around the lung box, as a fraction of its size

  # ----- paired augmentation (jax, inside the train step) -----
  config.aug = ml_collections.ConfigDict()
  config.aug.enabled = True
  config.aug.rotate_deg = 10.0  # max |rotation|
  config.aug.scale = 0.1  # zoom in [1 - scale, 1 + scale]
  config.aug.shift = 0.05  # max |shift| as a fraction of the side
  config.aug.shear_deg = 5.0
  config.aug.elastic_alpha = 0.0  # displacement in pixels (0: off)
  config.aug.elastic_sigma = 8.0  # smoothness of the displacement field, pixels
  config.aug.hflip = False  # anatomy is not mirror-symmetric
  config.aug.brightness = 0.1  # additive, in normalised units
  config.aug.contrast = 0.1  # multiplicative, in [1 - c, 1 + c]
  config.aug.gamma = 0.1  # gamma in [1 - g, 1 + g]
  config.aug.noise_std = 0.02
  config.aug.blur_sigma = 0.0  # max Gaussian blur sigma in pixels (0: off)

  # ----- model -----
  config.model = ml_collections.ConfigDict()
  config.model.name = "unet"
  config.model.base_features = 8  # 16+ for real data on an accelerator
  config.model.depth = 4  # number of downsamplings
  config.model.norm = "batch"  # 'batch' | 'group' | 'none'
  config.model.dropout = 0.0
  config.model.upsample = "transpose"  # 'transpose' | 'resize'
  config.model.num_classes = 2  # classifier heads: normal / abnormal
  config.model.dtype = "float32"  # 'bfloat16' computes in bf16, parameters stay float32
  # ----- transfer learning (README "Transfer learning") -----
  # Encoder of unet / multitask / classifier: '' (the model's own) | 'resnet18' | 'resnet34' |
  # 'resnet50' | 'densenet121' (torchvision's layout; image_size a multiple of 32).
  config.model.encoder = ""
  # Weights to start from: a torchvision/timm/TorchXRayVision state dict (.pth, .pt,
  # .safetensors, .npz) or a cxr_jax run directory (its encoder); local or gs://. '' = none.
  config.model.init_from = ""
  # Multiplies the z-scored input before the encoder; init_from sets it for its source
  # (TorchXRayVision: 512) and config.json records it.
  config.model.input_scale = 1.0
  config.model.freeze_bn = False  # the encoder's BatchNorm keeps its running statistics

  # ----- loss -----
  config.loss = ml_collections.ConfigDict()
  config.loss.dice_weight = 1.0  # segmentation: BCE + dice_weight * soft Dice
  config.loss.class_weight = 1.0  # multi-task: weight of the classification loss

  # ----- optimiser -----
  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adamw"
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 50
  config.optim.schedule = "cosine"  # 'cosine' | 'constant'
  config.optim.weight_decay = 1e-4
  config.optim.grad_clip = 1.0  # global norm (0: off)
  # Exponential moving average of the weights (0: off): validation, the best checkpoint,
  # evaluate and predict use the average; the trained weights' metrics are logged as online_*.
  config.optim.ema_decay = 0.0
  # Fine-tuning a config.model.encoder: its parameters stay fixed for the first
  # encoder_frozen_steps steps, then learn at encoder_lr_multiplier x the learning rate.
  config.optim.encoder_frozen_steps = 0
  config.optim.encoder_lr_multiplier = 1.0

  # ----- semi-supervised: mean teacher (needs optim.ema_decay and data.examples='all') -----
  # Images without a mask learn the EMA teacher's p(lung) on the unaugmented image, moved by
  # the student's augmentation; weight ramped up linearly over rampup_steps.
  config.semi = ml_collections.ConfigDict()
  config.semi.weight = 0.0  # 0: off
  config.semi.rampup_steps = 200

  # ----- loop -----
  # Devices: batches split over 'data' (-1: the devices left); with space > 1 every image's
  # height over 'space' too (training and predicting at sizes one device cannot hold).
  config.mesh = ml_collections.ConfigDict({"data": -1, "space": 1})
  config.shard_params = False  # True: parameters and optimiser state split over 'data' (FSDP)
  config.batch_size = 8  # global, over all devices and hosts
  config.eval_batch_size = 16
  config.num_train_steps = 1000
  config.log_every_steps = 50
  config.eval_every_steps = 250
  config.checkpoint_every_steps = 250
  config.max_to_keep = 2
  config.best_metric = "dice"  # validation metric whose best checkpoint is kept
  config.num_eval_images = 4  # prediction overlays written per evaluation
  config.postprocess = False  # keep the two largest components and fill holes
  config.tta = False  # evaluate/predict average p(lung) over shifted and zoomed views
  config.profile_steps = ""  # e.g. '10-15': a jax.profiler trace of those steps in DIR/profile

  if arg == "smoke":
    apply_smoke(config)
  elif arg:
    raise ValueError(f"Unknown config variant {arg!r}; valid: 'smoke'.")
  return config


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks a config to a run of seconds (tests, first try on a new machine)."""
  config.data.name = "synthetic"
  config.data.image_size = 32
  config.data.synthetic_examples = 48
  config.model.base_features = 4
  config.model.depth = 2
  config.batch_size = 4
  config.eval_batch_size = 8
  config.num_train_steps = 6
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  config.optim.warmup_steps = 1
  config.num_eval_images = 2

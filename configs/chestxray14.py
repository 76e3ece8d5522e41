"""Fourteen findings on NIH ChestX-ray14: a sigmoid per finding on the U-Net's pooled
bottleneck, official test list, patient-disjoint train/validation.

    python -m cxr_jax.data.prepare --dataset=chestxray14 --manual_dir=PATH --data_dir=DIR
    python -m cxr_jax.main --config=configs/chestxray14.py --workdir=RUN \
        --config.data.manual_dir=PATH   # Data_Entry_2017.csv, the lists, images_*/
    python -m cxr_jax.main --config=configs/chestxray14.py:smoke ...   # seconds

Validation reports `findings_auc` (macro over the 14); evaluate adds each finding's AUC,
predict a probability column per finding. The images have no lung masks: only the findings
head learns (the lung head sees no masked image and is not scored).
"""

from configs import default
from cxr_jax.data import chestxray14


def get_config(arg: str | None = None):
  if arg not in (None, "", "smoke"):
    raise ValueError(f"Unknown config variant {arg!r}; valid: 'smoke'.")
  config = default.get_config("smoke" if arg == "smoke" else None)
  config.data.name = "chestxray14"
  config.data.examples = "all"
  config.model.name = "unet"
  config.model.findings = ",".join(chestxray14.FINDINGS)
  config.best_metric = "findings_auc"
  if arg == "smoke":
    config.num_train_steps = 4
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 4
    return config
  config.data.image_size = 256
  config.model.base_features = 16
  config.batch_size = 32
  config.num_train_steps = 20000
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  return config

"""Model benchmark: parameters, forward GFLOPs and train-step speed (not run by CI).

  python benchmarks/models.py                       # every model at 128 and 256 px
  python benchmarks/models.py --models=unet --sizes=256 --steps=10

Per model and image size it prints the parameter count, forward GFLOPs per image from XLA's
cost analysis of the compiled forward pass, and the time per image of the trainer's own train
step: `platform.jit(steps.make_train_step(...), donate_argnums=0)` on a `steps.TrainState` built as
`train_and_evaluate` builds it, from configs/default.py with this script's model settings
(paired augmentation unless --no_aug, forward, the loss of every head the model has, AdamW
with clipping and the warmup/cosine schedule). Where PyTorch is installed, it also times the
classic U-Net written in PyTorch (same widths, BatchNorm, transposed convs, NCHW as PyTorch
prefers) and prints the JAX / PyTorch ratio. `--torch_step=same` (default) gives the PyTorch
step the JAX step's work: the same paired augmentation (affine grid, bilinear image,
nearest mask; gamma, contrast, brightness, noise), BCE + soft Dice, AdamW with weight decay
on kernels, global-norm clipping and the warmup/cosine schedule; `--torch_step=plain` is
forward, backward, BCE and Adam only.
"""

import argparse
import math
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # a checkout, uninstalled
import train_step as real_step  # noqa: E402  (benchmarks/train_step.py)

from configs import default  # noqa: E402
from cxr_jax.core.models import MODELS  # noqa: E402
from cxr_jax.core.run import platform  # noqa: E402

JAX_STEP = (
  "steps.make_train_step: {aug}forward, backward, BCE + soft Dice and/or "
  "cross-entropy per head, AdamW + grad clip"
)
TORCH_STEPS = {
  "same": "paired augmentation, forward, backward, BCE + soft Dice, AdamW + grad clip, "
  "warmup/cosine schedule (the JAX step's work)",
  "plain": "forward, backward, BCE, Adam (no augmentation, Dice or clipping)",
}


def _time(fn: Callable[[], object], steps: int) -> float:
  """Seconds per call of fn (which blocks), after one warm-up call."""
  fn()
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - start) / steps


def _config(name: str, size: int, args: argparse.Namespace):
  config = default.get_config()
  config.model.name = name
  config.model.base_features = args.base_features
  config.model.depth = args.depth
  config.model.dtype = args.dtype
  config.data.image_size = size
  config.batch_size = args.batch
  config.aug.enabled = not args.no_aug
  return config


def jax_runner(name: str, size: int, args: argparse.Namespace) -> tuple[dict, Callable]:
  """(params, forward GFLOPs/image, compile seconds; a function running one train step)."""
  config = _config(name, size, args)
  graphdef, state, step = real_step.real_train_step(config)
  params = sum(p.size for p in jax.tree.leaves(state.params))
  batch = real_step.random_batch(args.batch, size)

  def forward(state, image):
    model = nnx.merge(graphdef, state.params, state.model_state, copy=True)
    return model(image, train=False)

  cost = platform.jit(forward).lower(state, batch["image"]).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gflops = cost.get("flops", float("nan")) / args.batch / 1e9
  holder = [state]

  def run():
    holder[0], scalars = step(holder[0], batch)  # the state is donated: thread it through
    scalars["loss"].block_until_ready()

  start = time.perf_counter()
  run()  # compile + first step
  compile_s = time.perf_counter() - start
  return dict(model=name, size=size, params=params, gflops=gflops, compile_s=compile_s), run


def torch_unet_runner(size: int, args: argparse.Namespace) -> tuple[dict, Callable] | None:
  """The classic U-Net in PyTorch (BatchNorm, transposed convs), Adam; None without torch."""
  try:
    import torch
    from torch import nn
  except ImportError:
    return None

  def double_conv(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(
      nn.Conv2d(cin, cout, 3, padding=1, bias=False),
      nn.BatchNorm2d(cout),
      nn.ReLU(True),
      nn.Conv2d(cout, cout, 3, padding=1, bias=False),
      nn.BatchNorm2d(cout),
      nn.ReLU(True),
    )

  class TorchUNet(nn.Module):
    def __init__(self, base: int, depth: int):
      super().__init__()
      widths = [base * 2**i for i in range(depth + 1)]
      self.down = nn.ModuleList(
        double_conv(ci, co) for ci, co in zip([1] + widths[:-2], widths[:-1])
      )
      self.bottleneck = double_conv(widths[-2], widths[-1])
      rev = widths[::-1]
      self.ups = nn.ModuleList(
        nn.ConvTranspose2d(ci, co, 2, stride=2) for ci, co in zip(rev[:-1], rev[1:])
      )
      self.blocks = nn.ModuleList(double_conv(2 * co, co) for co in rev[1:])
      self.head = nn.Conv2d(base, 1, 1)

    def forward(self, x):
      skips = []
      for block in self.down:
        x = block(x)
        skips.append(x)
        x = nn.functional.max_pool2d(x, 2)
      x = self.bottleneck(x)
      for up, block, skip in zip(self.ups, self.blocks, reversed(skips)):
        x = block(torch.cat([skip, up(x)], dim=1))
      return self.head(x)

  torch.manual_seed(0)
  model = TorchUNet(args.base_features, args.depth)
  params = sum(p.numel() for p in model.parameters())
  image = torch.randn(args.batch, 1, size, size)
  mask = (image > 0).float()
  bce = nn.BCEWithLogitsLoss()
  model.train()
  if args.torch_step == "plain":
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def run():
      optimizer.zero_grad(set_to_none=True)
      loss = bce(model(image), mask)
      loss.backward()
      optimizer.step()

  else:
    config = _config("unet", size, args)
    optim, aug = config.optim, config.aug
    kernels = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
      [{"params": kernels, "weight_decay": optim.weight_decay},
       {"params": others, "weight_decay": 0.0}],
      lr=optim.learning_rate,
    )  # fmt: skip
    warmup, total = optim.warmup_steps, config.num_train_steps

    def schedule(step: int) -> float:
      if step < warmup:
        return (step + 1) / warmup
      return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def uniform(low, high):
      return torch.empty(args.batch).uniform_(low, high)

    def augment(x, m):
      # One affine map per example (rotation, zoom, shear, shift), image and mask through
      # the same grid; then the intensity transforms on the image.
      angle = torch.deg2rad(uniform(-aug.rotate_deg, aug.rotate_deg))
      zoom = uniform(1 - aug.scale, 1 + aug.scale)
      shear = torch.tan(torch.deg2rad(uniform(-aug.shear_deg, aug.shear_deg)))
      cos, sin = torch.cos(angle), torch.sin(angle)
      theta = torch.stack(
        [torch.stack([cos, cos * shear - sin, 2 * uniform(-aug.shift, aug.shift)], -1),
         torch.stack([sin, sin * shear + cos, 2 * uniform(-aug.shift, aug.shift)], -1)], 1
      ) / torch.stack([zoom, zoom, torch.ones_like(zoom)], -1)[:, None]  # fmt: skip
      grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=True)
      low = x.amin(dim=(1, 2, 3), keepdim=True)
      x = nn.functional.grid_sample(x - low, grid, "bilinear", "zeros", True) + low
      m = nn.functional.grid_sample(m, grid, "nearest", "zeros", True)
      gamma = uniform(1 - aug.gamma, 1 + aug.gamma)[:, None, None, None]
      low, high = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
      span = (high - low).clamp_min(1e-6)
      x = ((x - low) / span) ** gamma * span + low
      x = x * uniform(1 - aug.contrast, 1 + aug.contrast)[:, None, None, None]
      x = x + uniform(-aug.brightness, aug.brightness)[:, None, None, None]
      return x + aug.noise_std * torch.randn_like(x), m

    def run():
      with torch.no_grad():
        x, m = augment(image, mask)
      optimizer.zero_grad(set_to_none=True)
      logits = model(x)
      p = torch.sigmoid(logits)
      dice = (2 * (p * m).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + m.sum((1, 2, 3)) + 1)
      loss = bce(logits, m) + config.loss.dice_weight * (1 - dice).mean()
      loss.backward()
      nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
      optimizer.step()
      scheduler.step()

  return dict(
    model="unet (pytorch)", size=size, params=params, threads=torch.get_num_threads()
  ), run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--sizes", default="128,256")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--base_features", type=int, default=16)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument(
    "--no_aug", action="store_true", help="time the JAX step without its paired augmentation"
  )
  parser.add_argument("--steps", type=int, default=5, help="timed train steps per row")
  parser.add_argument("--torch_size", type=int, default=256, help="0: skip PyTorch")
  parser.add_argument(
    "--torch_step", default="same", choices=sorted(TORCH_STEPS), help="the PyTorch step's work"
  )
  parser.add_argument(
    "--rounds",
    type=int,
    default=3,
    help="alternating JAX / PyTorch rounds of --steps for the ratio",
  )
  args = parser.parse_args()

  jax_step = JAX_STEP.format(aug="" if args.no_aug else "paired augmentation, ")
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {args.batch}, "
    f"base {args.base_features}, depth {args.depth}, {args.dtype}; step = {jax_step}"
  )
  header = (
    f"{'model':<16} {'size':>5} {'params':>11} {'GFLOPs/img':>11} "
    f"{'ms/img':>8} {'img/s':>7} {'compile s':>9}"
  )
  print(header)
  print("-" * len(header))
  for name in args.models.split(","):
    for size in map(int, args.sizes.split(",")):
      info, run = jax_runner(name, size, args)
      seconds = _time(run, args.steps)
      print(
        f"{name:<16} {size:>5} {info['params']:>11,} {info['gflops']:>11.2f} "
        f"{1e3 * seconds / args.batch:>8.1f} {args.batch / seconds:>7.2f} "
        f"{info['compile_s']:>9.1f}",
        flush=True,
      )
  if not args.torch_size:
    return
  torch_bench = torch_unet_runner(args.torch_size, args)
  if torch_bench is None:
    print("PyTorch not installed: no comparison (pip install torch==2.13.0).")
    return
  # Alternate the two so that load from other processes on the machine hits both alike.
  torch_info, torch_run = torch_bench
  _, jax_run = jax_runner("unet", args.torch_size, args)
  jax_s, torch_s = [], []
  for _ in range(args.rounds):
    jax_s.append(_time(jax_run, args.steps))
    torch_s.append(_time(torch_run, args.steps))
  jax_ips, torch_ips = args.batch / np.median(jax_s), args.batch / np.median(torch_s)
  print(
    f"\nU-Net {args.torch_size} px, median of {args.rounds} alternating rounds of "
    f"{args.steps} steps (PyTorch {torch_info['params']:,} params, "
    f"{torch_info['threads']} threads):"
  )
  print(f"  JAX step: {jax_step}.\n  PyTorch step: {TORCH_STEPS[args.torch_step]}.")
  print(
    f"  JAX/Flax NNX {jax_ips:.2f} img/s, PyTorch {torch_ips:.2f} img/s, "
    f"JAX / PyTorch = {jax_ips / torch_ips:.2f}x"
  )


if __name__ == "__main__":
  main()

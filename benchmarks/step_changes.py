"""What each of the train step's XLA:CPU changes buys (not run by CI).

  python benchmarks/step_changes.py                 # U-Net, 256 px, base 16, batch 8
  python benchmarks/step_changes.py --rounds=5 --steps=5

Times the trainer's own step (benchmarks/train_step.py) as it is, and with each change undone
in turn, in alternating rounds so that load on the machine hits every variant alike:

- `compiler options`: `platform.compiler_options()` replaced by XLA's defaults (YNNPACK
  convolutions);
- `up-convolution gradient`: `ops.upconv2x2` replaced by the same einsum under autodiff;
- `max pool gradient`: `ops.max_pool_2x2` replaced by the same reshape + max under autodiff.

Prints a markdown table: images/s per variant (median of the rounds) and the step's speed-up
from each change (the step as it is over the step without that change).
"""

import argparse
import contextlib
import pathlib
import sys
import time
from collections.abc import Callable
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # a checkout, uninstalled
import train_step as real_step  # noqa: E402  (benchmarks/train_step.py)

from configs import default  # noqa: E402
from cxr_jax.core.models import ops  # noqa: E402
from cxr_jax.core.run import platform  # noqa: E402


def einsum_upconv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  b, h, w, _ = x.shape
  return jnp.einsum("bhwi,pqio->bhpwqo", x, kernel).reshape(b, 2 * h, 2 * w, -1)


# (module, attribute, replacement) per variant; `.fun`: the forward without its custom_vjp.
UNDO = {
  "as it is": [],
  "without the compiler options": [(platform, "compiler_options", lambda: {})],
  "without the up-convolution gradient": [(ops, "upconv2x2", einsum_upconv)],
  "without the max pool gradient": [(ops, "max_pool_2x2", ops.max_pool_2x2.fun)],
}


def runner(args: argparse.Namespace, undo: list[tuple]) -> Callable[[], None]:
  """One train step per call (compiled here, with `undo`'s replacements in place)."""
  config = default.get_config()
  config.model.name = "unet"
  config.model.base_features = args.base_features
  config.data.image_size = args.size
  config.batch_size = args.batch
  with contextlib.ExitStack() as patches:
    for module, name, replacement in undo:
      patches.enter_context(mock.patch.object(module, name, replacement))
    _, state, step = real_step.real_train_step(config)
    batch = real_step.random_batch(args.batch, args.size)
    holder = [state]

    def run():
      holder[0], scalars = step(holder[0], batch)
      scalars["loss"].block_until_ready()

    run()  # compile (tracing happens here, with the replacements)
  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--base_features", type=int, default=16)
  parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  runs = {name: runner(args, undo) for name, undo in UNDO.items()}
  seconds: dict[str, list[float]] = {name: [] for name in runs}
  for _ in range(args.rounds):
    for name, run in runs.items():
      run()  # warm
      start = time.perf_counter()
      for _ in range(args.steps):
        run()
      seconds[name].append((time.perf_counter() - start) / args.steps)
  ips = {name: args.batch / float(np.median(s)) for name, s in seconds.items()}
  print(
    f"U-Net {args.size} px, base {args.base_features}, batch {args.batch}, "
    f"median of {args.rounds} alternating rounds of {args.steps} steps:\n"
  )
  print("| step | images/s | the change's speed-up |\n|---|---|---|")
  for name, value in ips.items():
    gain = "" if name == "as it is" else f"{ips['as it is'] / value:.2f}x"
    print(f"| {name} | {value:.2f} | {gain} |")


if __name__ == "__main__":
  main()

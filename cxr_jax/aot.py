"""`python -m cxr_jax.aot --config=configs/unet.py --topology=v5e:2x2 [--config.KEY=VALUE ...]
[--search=image_size|batch_size|space]`

Compiles a run's train, eval and predict steps for a TPU slice on this machine (no TPU
needed; `pip install -e ".[tpu]"` for libtpu) and prints, per chip, the memory each needs
against the chip's HBM, then the train step's FLOPs and a roofline estimate of its time and
MFU. `--search` compiles the train step again and again to find the largest image side or
batch that fits, or the smallest `space` that fits the image side. Compiler estimates, not
measurements.
"""

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from cxr_jax import cli
from cxr_jax.config import schema
from cxr_jax.workflows import aot


def describe_run(config, topology: aot.Topology) -> str:
  mesh = aot.run_mesh(config, topology)
  return (
    f"{config.model.name} base {config.model.base_features}, {config.data.image_size} px, "
    f"{config.model.dtype}, batch {config.batch_size} (eval {config.eval_batch_size}); mesh "
    f"data {mesh.shape['data']} x space {mesh.shape['space']}, parameters "
    f"{'split over data (FSDP)' if config.shard_params else 'replicated'}"
  )


def memory_table(results: list, topology: aot.Topology) -> list[str]:
  """Per chip, GiB: one row per program, argument, temporary and total against HBM."""
  hbm = topology.chip.hbm_gib
  lines = [
    f"Per chip of {topology.describe()}, GiB:",
    f"  {'program':<8} {'argument':>9} {'temporary':>10} {'total':>7}  of HBM {hbm:g} GiB",
  ]
  for result in results:
    if isinstance(result, aot.DoesNotFit):
      used = f"{result.used_bytes / aot.GIB:.2f}" if result.used_bytes else "?"
      lines.append(
        f"  {result.name:<8} {'':>9} {'':>10} {used:>7}  does NOT fit (the compiler's verdict)"
      )
      continue
    total = result.total_bytes / aot.GIB
    room = hbm - total
    verdict = f"fits, {room:.2f} GiB free" if room >= 0 else f"does NOT fit: {-room:.2f} GiB over"
    lines.append(
      f"  {result.name:<8} {result.argument_bytes / aot.GIB:>9.3f} "
      f"{result.temp_bytes / aot.GIB:>10.3f} {total:>7.3f}  {verdict}"
    )
  return lines


def speed_lines(train: aot.Compiled, config, topology: aot.Topology) -> list[str]:
  """The train step's FLOPs and its roofline: time, images/s and MFU at best."""
  chip = topology.chip
  if not train.flops:
    return ["train step: the compiler reported no FLOPs."]
  lines = [
    f"train step: {train.flops:.3g} FLOPs per chip ({train.flops * topology.chips:.3g} per "
    f"step), {train.bytes_accessed or 0:.3g} bytes of HBM traffic per chip (XLA's count)."
  ]
  line = aot.roofline(train, chip)
  if line:
    lines.append(
      f"roofline ({topology.kind}: {chip.peak_flops / 1e12:g} TFLOP/s bf16, {chip.hbm_gbps:g} "
      f"GB/s): compute {1e3 * line.compute_s:.2f} ms, HBM {1e3 * line.memory_s:.2f} ms -> a "
      f"step takes at least {1e3 * line.step_s:.2f} ms: at most "
      f"{config.batch_size / line.step_s:,.0f} images/s, MFU at most {line.mfu:.0%}."
    )
  return lines


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  args = flags.FLAGS
  config = args.config
  schema.validate(config)
  topology = aot.get_topology(args.topology)
  if args.search:
    print(f"Searching {args.search} on {topology.describe()}: {describe_run(config, topology)}.")
    answer = aot.search(config, topology, args.search, say=lambda line: print(line, flush=True))
    print(answer)
    return
  results = aot.compile_all(config, topology)
  for line in memory_table(results, topology):
    print(line)
  print(f"Run: {describe_run(config, topology)}.")
  train = results[0]
  if isinstance(train, aot.Compiled):
    for line in speed_lines(train, config, topology):
      print(line)
  seconds = ", ".join(f"{r.name} {r.seconds:.0f} s" for r in results if isinstance(r, aot.Compiled))
  print(
    f"Compiled here in {seconds}. These are the compiler's estimates for one chip, not "
    "measurements: the roofline ignores collectives and overheads."
  )


def define_flags() -> None:
  """The command's flags; defined only when run as a command, so importing is side-free."""
  flags.DEFINE_string(
    "topology",
    None,
    "TPU slice: jax's name (v5e:2x2, v5p:2x2x1, v6e:2x4, v4:2x2x4) or Cloud TPU's (v5e-8, v4-32).",
  )
  flags.DEFINE_enum(
    "search",
    "",
    ["", "image_size", "batch_size", "space"],
    "Find the largest image side or batch whose train step fits, or the smallest space.",
  )
  config_flags.DEFINE_config_file(
    "config", None, "Training config, e.g. configs/unet_kaggle.py:full.", lock_config=True
  )
  flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
  # Compiling for the slice needs no local accelerator: the CPU backend, libtpu not started.
  jax.config.update("jax_platforms", "cpu")
  define_flags()
  cli.run(main)

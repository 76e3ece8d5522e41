"""The README's TPU table (not run by CI): the train step compiled ahead of time for TPU slices
(`cxr_jax.aot`, libtpu's compile-only devices) for U-Net and Attention U-Net at 512, 1024 and
2048 px; per cell the smallest `space` whose step fits a chip's HBM, its memory per chip and
the roofline's images/s and MFU. Compiler estimates, not measurements.

  pip install -e ".[tpu]"
  python benchmarks/aot_table.py --out=/tmp/aot_table.jsonl     # appends; reruns skip done cells
  python benchmarks/aot_table.py --out=/tmp/aot_table.jsonl --table_only

Every cell is the configs/unet_kaggle.py:full recipe (base 32, depth 4, AdamW, EMA) with
`--base_features`, `--dtype` (bfloat16 by default: how a TPU runs it) and one image per chip
(global batch = chips). Per model and slice the sides go up, and `space` starts at the
previous side's answer: a `space` too small for a smaller side is too small for a larger one,
so the first that fits is the smallest. One compile per try, minutes each on a small CPU.
"""

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOPOLOGIES = ("v5e-8", "v5p-8", "v6e-8", "v5e-32")
MODELS = ("unet", "attention_unet")
SIDES = (512, 1024, 2048)


def cell_config(model: str, side: int, chips: int, space: int, args):
  from configs import unet_kaggle

  config = unet_kaggle.get_config("full")
  config.model.name = model
  config.model.base_features = args.base_features
  config.model.dtype = args.dtype
  config.data.image_size = side
  config.batch_size = config.eval_batch_size = chips
  config.mesh = {"data": -1, "space": space}
  return config


def run_cells(args) -> None:
  import jax

  from cxr_jax.workflows import aot

  jax.config.update("jax_platforms", "cpu")
  out = pathlib.Path(args.out)
  done = {(r["topology"], r["model"], r["side"]) for r in read(out)}
  for name in args.topologies.split(","):
    topology = aot.get_topology(name)
    per_host = topology.chips // topology.hosts
    for model in args.models.split(","):
      space = 1
      for side in [int(s) for s in args.sides.split(",")]:
        if (name, model, side) in done:
          space = next(
            r["space"] or space
            for r in read(out)
            if (r["topology"], r["model"], r["side"]) == (name, model, side)
          )
          continue
        row = {"topology": name, "model": model, "side": side, "chips": topology.chips}
        row.update(base=args.base_features, dtype=args.dtype, batch=topology.chips, tries=[])
        while space <= per_host:
          config = cell_config(model, side, topology.chips, space, args)
          start = time.perf_counter()
          try:
            train = aot.compile_train(config, topology)
          except aot.DoesNotFit as verdict:
            row["tries"].append(
              {"space": space, "fits": False, "used_gib": gib(verdict.used_bytes)}
            )
            print(f"{name} {model} {side} px space {space}: does not fit", flush=True)
            space *= 2
            continue
          line = aot.roofline(train, topology.chip)
          fits = train.total_bytes <= topology.chip.hbm_gib * aot.GIB
          row["tries"].append({"space": space, "fits": fits, "total_gib": gib(train.total_bytes)})
          print(
            f"{name} {model} {side} px space {space}: {gib(train.total_bytes)} GiB, "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
          )
          if not fits:
            space *= 2
            continue
          row.update(
            space=space,
            total_gib=gib(train.total_bytes),
            argument_gib=gib(train.argument_bytes),
            temp_gib=gib(train.temp_bytes),
            flops_per_chip=train.flops,
            step_ms=1e3 * line.step_s,
            images_per_s=topology.chips / line.step_s,
            mfu=line.mfu,
            compile_s=round(train.seconds),
          )
          break
        else:
          row["space"] = None  # nothing up to one host's chips fits
          space = per_host
        with out.open("a") as f:
          f.write(json.dumps(row) + "\n")


def gib(nbytes) -> float | None:
  return round(nbytes / 2**30, 2) if nbytes else None


def read(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def table(rows: list[dict]) -> str:
  """Markdown: one row per (slice, model, side)."""
  lines = [
    "| slice | model | side | best space | memory per chip (GiB) | fits | images/s (roofline) "
    "| MFU (roofline) |",
    "|---|---|---:|---:|---:|---|---:|---:|",
  ]

  def order(r):  # the README's order: slice, model, side (cells finish in any order)
    known = r["topology"] in TOPOLOGIES and r["model"] in MODELS
    return (TOPOLOGIES.index(r["topology"]), MODELS.index(r["model"])) if known else (99, 0)

  for r in sorted(rows, key=lambda r: (*order(r), r["topology"], r["side"])):
    model = {"unet": "U-Net", "attention_unet": "Attention U-Net"}[r["model"]]
    if r.get("space"):
      lines.append(
        f"| {r['topology']} | {model} | {r['side']} | {r['space']} | {r['total_gib']:.2f} | yes "
        f"| {r['images_per_s']:,.0f} | {r['mfu']:.0%} |"
      )
    else:
      tried = ", ".join(  # refused: XLA stopped the compile without a number
        f"space {t['space']}: {t.get('used_gib') or t.get('total_gib') or 'refused'}"
        for t in r["tries"]
      )
      lines.append(f"| {r['topology']} | {model} | {r['side']} | none | {tried} | no | | |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="/tmp/aot_table.jsonl")
  parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--sides", default=",".join(map(str, SIDES)))
  parser.add_argument("--base_features", type=int, default=32)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--table_only", action="store_true")
  args = parser.parse_args()
  if not args.table_only:
    run_cells(args)
  print(table(read(pathlib.Path(args.out))))


if __name__ == "__main__":
  main()

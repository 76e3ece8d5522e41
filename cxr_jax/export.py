"""`python -m cxr_jax.export --workdir=DIR --output=FILE [--checkpoint=best]`

Writes a run's model as one portable file (`core.inference.portable`): `predict --model=FILE` runs it
with jax alone, without the model code or the run directory. Several runs (`--workdir=A,B` or
a sweep's variant folder): one file computing their fold ensemble's mean.
"""

import sys

from absl import app
from absl import flags

from cxr_jax import cli
from cxr_jax.core.inference import portable
from cxr_jax.core.run import rundir


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  args = flags.FLAGS
  runs = rundir.ensemble_runs(args.workdir)
  restored = [rundir.restore_model(run, args.checkpoint) for run in runs]
  (config, model, step), more = restored[0], [(c, m) for c, m, _ in restored[1:]]
  provenance = {"workdir": args.workdir, "checkpoint": args.checkpoint, "step": step}
  if more:
    provenance.update(runs=runs, steps=[s for _, _, s in restored], step=None)
  settings = portable.export_model(config, model, args.output, provenance, more=more)
  what = f"step {step}" if not more else f"an ensemble of {len(runs)} runs"
  print(
    f"export: {settings['model']} ({what}, {args.checkpoint} checkpoint) -> "
    f"{args.output}; outputs {', '.join(settings['outputs'])}, input "
    f"{settings['image_size']} px",
    file=sys.stderr,
  )


def define_flags() -> None:
  """The command's flags; defined only when run as a command, so importing is side-free."""
  flags.DEFINE_string(
    "workdir",
    None,
    "Training workdir (config.json, checkpoints); several ('DIR1,DIR2,...' or a folder of "
    "runs): their fold ensemble in one file.",
  )
  flags.DEFINE_string("output", None, "The portable model file to write.")
  flags.DEFINE_enum("checkpoint", "best", rundir.CHECKPOINT_CHOICES, "Which checkpoint.")
  flags.mark_flags_as_required(["workdir", "output"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)

"""Dataset kinds, one table: what the `cxr_masks_and_labels` builder can hold.

A kind names its sources (with the colour figures draw them in) and a reader; the builder,
`config.data.name='auto'`, the cross-host check, prepare's counts and the report all iterate
this table. Adding a dataset is a reader and one `register(DatasetKind(...))`.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from cxr_jax.data import chestxray14
from cxr_jax.data import chexmask
from cxr_jax.data import chexpert
from cxr_jax.data import covid_qu_ex
from cxr_jax.data import folders
from cxr_jax.data import jsrt
from cxr_jax.data import kaggle
from cxr_jax.data import phantoms
from cxr_jax.data.records import Example
from cxr_jax.data.records import Skip


class Reader(Protocol):
  """Lists a dataset's examples cheaply, then reads them one by one."""

  skipped: list[Skip]  # files found unusable while listing

  def describe(self) -> str:
    """Where the examples come from, for logs and messages."""

  def where(self, file: str) -> str:
    """A path a person can find for a file named in a `Skip`."""

  def items(self) -> list[tuple[str, Any]]:
    """(id, handle) of every candidate example, sorted by id."""

  def read(self, handle: Any, skip: Callable[[Skip], None]) -> Example | None:
    """The example, or None after reporting why through `skip`."""


@dataclasses.dataclass(frozen=True)
class DatasetKind:
  """One entry of the table.

  Attributes:
    name: config.data.name and the builder config's name.
    description: one line, for the builder config.
    sources: source name -> colour (matplotlib) of its figures; the order is the
      `source` ClassLabel's, after the kinds registered before.
    open_reader: (manual_dir, num_examples) -> Reader.
    find: for data on disk: manual_dir -> where it was found, raising `DataError` saying
      where it looked. None for a generated kind (it needs no files).
    default_size: a generated kind's default number of examples
      (config.data.synthetic_examples picks another).
    id_of: a generated kind's id of example i (to say how many fill every split).
  """

  name: str
  description: str
  sources: Mapping[str, str]
  open_reader: Callable[[str, int], Reader]
  find: Callable[[str], str] | None = None
  default_size: int = 0
  id_of: Callable[[int], str] | None = None

  @property
  def generated(self) -> bool:
    return self.find is None


KINDS: dict[str, DatasetKind] = {}
# config.data.name='auto' uses the first kind whose files are found, else this one.
AUTO_FALLBACK = "synthetic"


def register(kind: DatasetKind) -> DatasetKind:
  """Adds `kind` to the table (its source names must be new)."""
  if kind.name in KINDS or kind.name == "auto":
    raise ValueError(f"dataset kind {kind.name!r} is already registered (or reserved).")
  taken = set(source_names())
  if clash := taken & set(kind.sources):
    raise ValueError(f"dataset kind {kind.name!r}: sources {sorted(clash)} already exist.")
  KINDS[kind.name] = kind
  return kind


def unregister(name: str) -> None:
  """Removes a kind (tests that register their own)."""
  KINDS.pop(name)


def get(name: str) -> DatasetKind:
  if name not in KINDS:
    raise ValueError(f"Unknown dataset {name!r}; valid: {', '.join(KINDS)} (or 'auto').")
  return KINDS[name]


def names() -> list[str]:
  return list(KINDS)


def source_names(upto: str | None = None) -> tuple[str, ...]:
  """Every kind's sources in registration order (up to and including kind `upto`): the
  `source` ClassLabel's names. A kind's dataset holds the names up to its own, so kinds
  registered later never change the features of a dataset already prepared."""
  names = []
  for kind in KINDS.values():
    names.extend(kind.sources)
    if kind.name == upto:
      break
  return tuple(names)


def source_colours() -> dict[str, str]:
  return {source: colour for kind in KINDS.values() for source, colour in kind.sources.items()}


register(
  DatasetKind(
    name="kaggle",
    description="Montgomery + Shenzhen sets of the Kaggle archive (manual_dir).",
    sources={"montgomery": "#1f77b4", "shenzhen": "#ff7f0e"},
    open_reader=kaggle.KaggleReader,
    find=kaggle.find,
  )
)
register(
  DatasetKind(
    name="synthetic",
    description=f"Procedural chest X-ray phantoms (seed {phantoms.SYNTHETIC_SEED}).",
    sources={"synthetic": "#7f7f7f"},
    open_reader=phantoms.PhantomReader,
    default_size=400,
    id_of=phantoms.phantom_id,
  )
)
register(
  DatasetKind(
    name="folders",
    description="Your own images/ and masks/ (+ labels.csv, label_map.json) in manual_dir.",
    sources={"folders": "#2ca02c"},
    open_reader=folders.FoldersReader,
    find=folders.find,
  )
)
register(
  DatasetKind(
    name="jsrt",
    description="JSRT chest X-rays (.IMG) with the SCR lung, heart and clavicle outlines.",
    sources={"jsrt": "#d62728"},
    open_reader=jsrt.JsrtReader,
    find=jsrt.find,
  )
)
register(
  DatasetKind(
    name="covid_qu_ex",
    description="COVID-QU-Ex: COVID-19 / non-COVID / normal X-rays with lung masks.",
    sources={"covid_qu_ex": "#9467bd"},
    open_reader=covid_qu_ex.CovidQuExReader,
    find=covid_qu_ex.find,
  )
)
register(
  DatasetKind(
    name="chexmask",
    description="CheXmask lung and heart masks (RLE CSVs) over another dataset's images.",
    sources={"chexmask": "#8c564b"},
    open_reader=chexmask.ChexmaskReader,
    find=chexmask.find,
  )
)
register(
  DatasetKind(
    name="chestxray14",
    description="NIH ChestX-ray14: 14 findings, patient ids, the official test list.",
    sources={"chestxray14": "#e377c2"},
    open_reader=chestxray14.ChestXray14Reader,
    find=chestxray14.find,
  )
)
register(
  DatasetKind(
    name="chexpert",
    description="CheXpert: 14 observations with uncertain labels, frontal views.",
    sources={"chexpert": "#bcbd22"},
    open_reader=chexpert.ChexpertReader,
    find=chexpert.find,
  )
)

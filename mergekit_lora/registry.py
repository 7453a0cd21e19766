"""Merge algorithms: the plugin API (``Algorithm[P]``, ``AlgorithmParams``, ``MergedModule``) and the registry.

An algorithm is a small stateless class with a ``name``, a one-line ``description``, a frozen pydantic
``Params`` model (the single source of CLI flags, YAML keys, ``loramerge methods`` and search spaces)
and ``merge_batch(units, weights, params, ctxs) -> list[MergedModule]`` (or the one-module
convenience ``merge_module``).  Whatever an algorithm wants to say about the whole merge (errors,
cluster reports) travels per module in ``MergedModule.notes``; the driver collects the notes and
hands them back to :meth:`Algorithm.report`, :meth:`Algorithm.card_sections` and
:meth:`Algorithm.artifacts` — no state is kept between calls.

Built-ins and third-party packages are found through the entry-point group
``mergekit_lora.algorithms``: an entry point names an algorithm class, an :class:`AlgorithmEntry`, or a
list of them (our own ``mergekit_lora.algorithms:BUILTINS`` lists entries).  An entry carries what
``loramerge methods``, flag checks and recipes need (name, description, ``Params``) and imports the
implementation only in :meth:`AlgorithmEntry.load`, so listing methods never imports torch.
:func:`register` adds a class in-process (tests, notebooks).

Example::

    class Scale(Algorithm[ScaleParams]):
        name = "scale"
        Params = ScaleParams
        def merge_module(self, units, weights, params, ctx):
            return MergedModule(RankUnits.concat([u.scaled(w * params.factor) for u, w in zip(units, weights)]))
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import import_module
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import LoraMergeError, not_finite
from .threads import NO_BUDGET, ThreadBudget

if TYPE_CHECKING:
    import torch

    from .adapter import Adapter, ModuleInfo
    from .fidelity import ModuleFidelity
    from .units import RankUnits

ENTRY_POINT_GROUP = "mergekit_lora.algorithms"


class AlgorithmParams(BaseModel):
    """Base of every algorithm's parameters: frozen, unknown keys rejected, NaN/Inf refused (by its own type,
    ``finite_number``, before any bound is compared: one problem, worded by :func:`errors.not_finite`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


P = TypeVar("P", bound=AlgorithmParams)
Notes = Mapping[str, Any]


@dataclass(frozen=True)
class ModuleContext:
    """Per-module facts an algorithm may need: where to compute, a seed for randomness, and the run's thread
    budget (``threads``: pools and big products go through ``threads.workers_for`` / ``threads.matmul``;
    the default is no budget — torch's own threading, plain products)."""

    name: str
    seed: int
    device: torch.device
    threads: ThreadBudget = NO_BUDGET

    def generator(self, salt: str = "") -> torch.Generator:
        """A generator seeded from (seed, module name, salt): reproducible and module-independent."""
        import torch  # lazily: this module is imported by `loramerge methods`, which needs no torch

        g = torch.Generator(device="cpu")
        g.manual_seed((self.seed * 1_000_003 + zlib.crc32(f"{self.name}|{salt}".encode())) % (2**63))
        return g


@dataclass(frozen=True)
class MergedModule:
    """One merged module as an algorithm returns it.

    ``units``: the merged rank units (a ``RoutedUnits`` for routing algorithms, whose output format is
    ``routed``).  ``fidelity``: the algorithm's own exact row when it already has one from its factor-space
    products (the driver then skips its own measurement).  ``notes``: per-module numbers the algorithm
    wants back, all modules together, in :meth:`Algorithm.report` / ``card_sections`` / ``artifacts``.
    """

    units: Any
    fidelity: ModuleFidelity | None = None
    notes: Notes = field(default_factory=dict)


@dataclass(frozen=True)
class AlgorithmEntry:
    """An algorithm as the registry lists it: its metadata, and the implementation imported on demand.

    ``target`` is ``"package.module:Class"`` (imported by :meth:`load`) or the class itself (plugins
    and :func:`register`, already imported).  A built-in class takes ``name``, ``description`` and
    ``Params`` from its entry (``class Svd(Algorithm[SvdParams], entry=SVD)``), so they are written once.
    """

    name: str
    description: str
    Params: type[AlgorithmParams]
    target: str | type[Algorithm]
    default_scale: str = "none"  # the strength `scale: auto` means for this method (mergekit_lora.strength)
    output_format: str | None = None  # the one output format the method writes (route: "routed"), None: any

    @classmethod
    def of(cls, algo: type[Algorithm]) -> AlgorithmEntry:
        return cls(algo.name, algo.description, algo.Params, algo, algo.default_scale, algo.output_format)

    def load(self) -> type[Algorithm]:
        """The implementation class (importing its module: torch and the math)."""
        if isinstance(self.target, type):
            return self.target
        module, _, qualname = self.target.partition(":")
        obj: Any = import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if not (isinstance(obj, type) and issubclass(obj, Algorithm)) or obj.name != self.name:
            raise TypeError(f"entry {self.name!r} points at {self.target}, which is not its Algorithm class")
        return obj

    def describe(self) -> dict[str, Any]:
        return {**describe(self.name, self.description, self.Params), "default_scale": self.default_scale}


class Algorithm(Generic[P]):
    """Base class of merge algorithms; subclasses set ``name``, ``description``, ``Params`` (or ``entry=``)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Params: ClassVar[type[AlgorithmParams]] = AlgorithmParams
    # The output format this algorithm's results need (e.g. "routed"); None: any static LoRA format.
    output_format: ClassVar[str | None] = None
    # What `scale: auto` means for this method (see mergekit_lora.strength); chosen by measurement.
    default_scale: ClassVar[str] = "none"

    def __init_subclass__(cls, entry: AlgorithmEntry | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if entry is not None:  # a built-in: its metadata lives in its (torch-free) catalogue entry
            cls.name, cls.description, cls.Params = entry.name, entry.description, entry.Params
            cls.default_scale, cls.output_format = entry.default_scale, entry.output_format

    def batch_limit(self, params: P) -> int:
        """How many same-shape modules the driver may hand to :meth:`merge_batch` at once.

        1 (the default) means module by module.  The bound keeps peak memory independent of the number
        of layers.
        """
        return 1

    def runs_on_arrays(self, params: P) -> bool:
        """Whether :meth:`merge_module` / :meth:`merge_batch` take numpy
        :class:`~mergekit_lora.factor_arrays.ArrayUnits` for ``params`` (and return them, with an exact
        fidelity row): a method that only concatenates and scales factors through the API the two unit
        classes share, so a merge written to disk reads, merges and writes without importing torch.
        Default: False (torch :class:`RankUnits`)."""
        return False

    def check_module(self, name: str, infos: Sequence[ModuleInfo], params: P) -> str | None:
        """Why module ``name`` cannot be merged with ``params``, from its inputs' headers (``plan`` asks this
        before any tensor is read); None: it can.  Default: every module can."""
        return None

    def load_batch(self, inputs: list[list[tuple[Adapter, int]]], params: P,
                   ctxs: list[ModuleContext], weights: list[list[float]] | None = None) -> list[list[RankUnits]]:
        """Read a batch's inputs for :meth:`merge_batch`: ``inputs[m]`` are module ``ctxs[m].name``'s inputs as
        (adapter, input index), ``weights[m]`` their weights as ``merge_batch`` will get them (None: not known).  Default: each input's units (:meth:`Adapter.units`, tagged with the index) on
        ``ctxs[m].device``.  An algorithm with buffers of its own may read into them instead
        (:meth:`Adapter.factors_into`: LoRA-LEGO's pool); such units are valid only for this batch's
        :meth:`merge_batch`, which may change them (so it returns its own fidelity rows: the driver then never
        measures the merge against the units)."""
        return [[a.units(c.name, source=i).to(c.device) for a, i in ins] for ins, c in zip(inputs, ctxs)]

    def merge_module(self, units: list[RankUnits], weights: list[float], params: P,
                     ctx: ModuleContext) -> MergedModule:
        """Merge one module: ``units[i]`` are input i's units (scale folded in), ``weights[i]`` its weight."""
        raise NotImplementedError

    def merge_batch(self, units: list[list[RankUnits]], weights: list[list[float]], params: P,
                    ctxs: list[ModuleContext]) -> list[MergedModule]:
        """Merge several modules whose inputs have identical shapes, weights and parameters (batched
        algorithms override this, e.g. k-means on a [modules, units, dim] tensor); default: one by one."""
        return [self.merge_module(u, w, params, c) for u, w, c in zip(units, weights, ctxs)]

    def report(self, notes: Sequence[tuple[str, Notes]], params: P) -> dict[str, Any]:
        """Numbers about the whole merge from the modules' notes (model card and CLI); default: none."""
        return {}

    def card_sections(self, notes: Sequence[tuple[str, Notes]], params: P) -> list[tuple[str, str]]:
        """Extra model-card sections (title, markdown); default: none."""
        return []

    def artifacts(self, notes: Sequence[tuple[str, Notes]], params: P,
                  labels: Sequence[str]) -> dict[str, str | bytes]:
        """Extra files (name -> text, or bytes for pictures) for the output folder; ``labels`` names the inputs."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {**describe(self.name, self.description, self.Params), "default_scale": self.default_scale}


def describe(name: str, description: str, params: type[AlgorithmParams]) -> dict[str, Any]:
    """Name, description and the parameters from the Params model (for `loramerge methods`)."""
    fields = {}
    for fname, f in params.model_fields.items():
        fields[f.alias or fname] = {
            "required": f.is_required(),
            "default": None if f.is_required() else f.get_default(call_default_factory=True),
            "type": _type_label(f.annotation),
            "help": f.description or "",
        }
    return {"name": name, "description": description, "parameters": fields}


def _type_label(annotation: Any) -> str:
    """A readable type for help texts: ``int``, ``int | None``, ``paper|lsq|none``."""
    args = getattr(annotation, "__args__", None)
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and str(origin) == "typing.Literal":
        return "|".join(str(a) for a in args)
    if args and type(annotation).__name__ in ("UnionType", "_UnionGenericAlias"):
        return " | ".join(_type_label(a) for a in args).replace("NoneType", "None")
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


_REGISTERED: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Add an algorithm under ``cls.name`` in this process (plugins use the entry-point group instead)."""
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls!r} needs a string `name`")
    existing = _REGISTERED.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"algorithm name {name!r} is already registered by {existing.__module__}")
    _REGISTERED[name] = cls
    return cls


@cache
def _entry_point_entries() -> tuple[AlgorithmEntry, ...]:
    """The installed entry points' algorithms, scanned once per process (the scan is not free)."""
    found: list[AlgorithmEntry] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        obj = getattr(obj, "BUILTINS", obj)  # a module that lists its algorithms
        for item in obj if isinstance(obj, (list, tuple)) else [obj]:
            if isinstance(item, AlgorithmEntry):
                found.append(item)
            elif isinstance(item, type) and issubclass(item, Algorithm):
                found.append(AlgorithmEntry.of(item))
    return tuple(found)


def available() -> dict[str, AlgorithmEntry]:
    """All algorithms by name: the entry points' (built-ins first) and those added with :func:`register`.

    Nothing is imported beyond the entries' ``Params``; :meth:`AlgorithmEntry.load` imports a class."""
    out: dict[str, AlgorithmEntry] = {}
    for entry in _entry_point_entries():
        out.setdefault(entry.name, entry)
    out.update((name, AlgorithmEntry.of(cls)) for name, cls in _REGISTERED.items())
    return dict(sorted(out.items()))


def field_names(algo: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Parameters under their field names: a field's alias (``lambda`` for ``lambda_``) is the same parameter."""
    alias = {f.alias: name for name, f in algo.Params.model_fields.items() if f.alias}
    return {alias.get(k, k): v for k, v in params.items()}


def user_names(algo: Any) -> list[str]:
    """The parameter names a user writes (aliases where a field has one: ``lambda``, not ``lambda_``)."""
    return [f.alias or name for name, f in algo.Params.model_fields.items()]


def unknown_method(name: str, algos: Mapping[str, Any]) -> str:
    """``unknown method 'tiess' (did you mean 'ties'?); available: …``"""
    import difflib

    close = difflib.get_close_matches(name, list(algos), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown method {name!r}{hint}; available: {', '.join(algos) or 'none'}"


def get_entry(name: str) -> AlgorithmEntry:
    """The registry's entry of method ``name`` (torch-free: name, Params, default strength, output format)."""
    algos = available()
    if name not in algos:
        raise LoraMergeError(unknown_method(name, algos), field="method")
    return algos[name]


def get_algorithm(name: str) -> Algorithm:
    """An instance of method ``name`` (imports its module: torch and the math)."""
    return get_entry(name).load()()


def parse_params(algo: Algorithm, values: dict[str, Any], where: str = "parameters") -> AlgorithmParams:
    """Validate ``values`` with the algorithm's Params model; every problem in one message."""
    try:
        return algo.Params(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        errors = e.errors()
        bad = [err for err in errors if err["type"] == "finite_number"]
        if bad:  # the fact "a number is NaN/Inf" has one wording (also checks.finite_numbers', in plan stage 1)
            raise LoraMergeError(not_finite(f"{where}.{bad[0]['loc'][0]}"), field=where) from None
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or where}: "
            + ("required" if err["type"] == "missing" else err["msg"].removeprefix("Value error, "))
            for err in errors)
        raise LoraMergeError(f"invalid {where} for method {algo.name!r}: {problems}", field="params") from None

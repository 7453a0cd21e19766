"""The algorithm registry and plugin API.

An algorithm is a small class with a ``name``, a one-line ``description``, a frozen pydantic
``Params`` model (the single source of CLI flags and YAML keys: defaults, bounds, help text) and
``merge_module(units, weights, params, ctx) -> RankUnits``.  Built-ins and third-party packages
register through the entry-point group ``mergekit_lora.algorithms``; an entry point may name an
algorithm class or a module whose import registers classes with :func:`register`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import LoraMergeError

if TYPE_CHECKING:
    from .adapter import Adapter
    from .fidelity import ModuleFidelity
    from .units import RankUnits

ENTRY_POINT_GROUP = "mergekit_lora.algorithms"


class AlgorithmParams(BaseModel):
    """Base of every algorithm's parameters: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class ModuleContext:
    """Per-module facts an algorithm may need: where to compute and a seed for randomness."""

    name: str
    seed: int
    device: torch.device

    def generator(self, salt: str = "") -> torch.Generator:
        """A generator seeded from (seed, module name, salt): reproducible and module-independent."""
        g = torch.Generator(device="cpu")
        g.manual_seed((self.seed * 1_000_003 + zlib.crc32(f"{self.name}|{salt}".encode())) % (2**63))
        return g


class Algorithm:
    """Base class of merge algorithms; subclasses set ``name``, ``description``, ``Params``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Params: ClassVar[type[AlgorithmParams]] = AlgorithmParams
    # The output format this algorithm's results need (e.g. "routed"); None: any static LoRA format.
    output_format: ClassVar[str | None] = None

    def prepare(self, adapters: Sequence[Adapter], weights: Sequence[float], params: AlgorithmParams) -> None:
        """Optional cross-module pass (global statistics, calibration); default: nothing."""

    def merge_module(self, units: list[RankUnits], weights: list[float], params: AlgorithmParams,
                     ctx: ModuleContext) -> RankUnits:
        raise NotImplementedError

    def known_fidelity(self, name: str) -> ModuleFidelity | None:
        """Module ``name``'s fidelity row when the algorithm already has it from its own factor-space
        products (the driver then skips its own Gram pass); None, the default: the driver measures it."""
        return None

    def batch_limit(self, params: AlgorithmParams) -> int:
        """How many consecutive same-shape modules the driver may hand to :meth:`merge_batch` at once.

        1 (the default) means module by module.  The bound keeps peak memory independent of the number
        of layers.
        """
        return 1

    def merge_batch(self, units: list[list[RankUnits]], weights: list[list[float]], params: AlgorithmParams,
                    ctxs: list[ModuleContext]) -> list[RankUnits]:
        """Merge several modules whose inputs have identical shapes, weights and parameters (batched
        algorithms override this, e.g. k-means on a [modules, units, dim] tensor); default: one by one."""
        return [self.merge_module(u, w, params, c) for u, w, c in zip(units, weights, ctxs)]

    def card_sections(self) -> list[tuple[str, str]]:
        """Extra model-card sections (title, markdown) after a merge; default: none."""
        return []

    def artifacts(self) -> dict[str, str]:
        """Extra text files (name -> content) written into the output folder after a merge; default: none."""
        return {}

    def report(self) -> dict[str, Any]:
        """Optional numbers about the last merge for the model card and the CLI (e.g. a refactorisation error)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Name, description and the parameters from the Params model (for `loramerge methods`)."""
        fields = {}
        for fname, f in self.Params.model_fields.items():
            fields[f.alias or fname] = {
                "required": f.is_required(),
                "default": None if f.is_required() else f.default,
                "type": getattr(f.annotation, "__name__", str(f.annotation)),
                "help": f.description or "",
            }
        return {"name": self.name, "description": self.description, "parameters": fields}


_REGISTRY: dict[str, type[Algorithm]] = {}
_loaded = False


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: add an algorithm under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls!r} needs a string `name`")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"algorithm name {name!r} is already registered by {existing.__module__}")
    _REGISTRY[name] = cls
    return cls


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, Algorithm):
            register(obj)


def available() -> dict[str, type[Algorithm]]:
    """All registered algorithms, by name (built-ins and plugins)."""
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_algorithm(name: str) -> Algorithm:
    algos = available()
    if name not in algos:
        raise LoraMergeError(f"unknown method {name!r}; available: {', '.join(algos) or 'none'}")
    return algos[name]()


def parse_params(algo: Algorithm, values: dict[str, Any], where: str = "parameters") -> AlgorithmParams:
    """Validate ``values`` with the algorithm's Params model; every problem in one message."""
    try:
        return algo.Params(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or where}: "
            + (f"required (give it as --{err['loc'][-1]} or -p {err['loc'][-1]}=VALUE)" if err["type"] == "missing"
               else err["msg"])
            for err in e.errors())
        raise LoraMergeError(f"invalid {where} for method {algo.name!r}: {problems}") from None

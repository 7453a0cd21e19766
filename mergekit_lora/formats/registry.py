"""The format registry: one :class:`FormatSpec` per adapter family, in one explicit list.

A spec bundles everything the pipeline needs to know about a family: how to recognise a safetensors
file of it (``sniff``, on the header only), how to ``read`` it, how to ``write`` a merged result, which
output format inputs of the family default to, how to ``align`` module names when it is mixed with
another family, what it adds to ``loramerge inspect``, which inputs it refuses to write or to mix, which run
options only it takes (``options``), what it needs of them (``check_options``), its writer's own typed
options built from them (``write_options``), the one file it writes when it is one file (``file``: ``export``)
and the model card's ``library`` — so the pipeline names no format.  A writer takes one typed
:class:`~mergekit_lora.formats.request.WriteRequest`.

Built-ins are listed in :func:`builtin_formats`; third-party formats come through the entry-point
group ``mergekit_lora.formats`` (an entry point names a FormatSpec or a list of them) or, in-process,
:func:`register_format`.  Nothing here is filled in by importing another module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from ..adapter import Adapter
from ..errors import LoraMergeError
from . import diffusers, gguf_spec, kohya, peft_read, routed_tag, sd, sd_detect, writers
from .request import Writer
from .request import WriteRequest as WriteRequest  # re-exported: what a writer takes

ENTRY_POINT_GROUP = "mergekit_lora.formats"


@dataclass(frozen=True)
class FormatSpec:
    """One adapter family.  Every hook is optional except ``name``."""

    name: str
    sniff: Callable[[list[str], dict[str, str]], bool] | None = None  # (header keys, metadata) -> ours?
    read: Callable[..., Adapter] | None = None  # (path, allow_pickle=, ignore_modules_to_save=, strict=)
    write: Writer | None = None
    output: str | None = None  # the output format inputs of this family default to
    align: Callable[[list[Adapter]], list[Adapter]] | None = None  # bring mixed inputs to one naming
    inspect: Callable[[Adapter, dict[str, Any]], None] | None = None  # add a section to the inspect report
    refuse_inputs: Callable[[Sequence[Adapter]], str | None] | None = None  # why this writer cannot take them
    refuse_mix: Callable[[Sequence[Adapter]], str | None] | None = None  # why these inputs cannot merge together
    options: tuple[str, ...] = ()  # MergeOptions fields only this output format takes (refused for the others)
    check_options: Callable[[Any], None] | None = None  # (MergeOptions) -> None: what this writer needs, headers only
    write_options: Callable[[Any], Any] | None = None  # (MergeOptions) -> the writer's own typed options
    file: str | None = None  # the one file the writer writes (a one-file format: ``export`` writes it to a path)
    library: str = "diffusers"  # the model card's library_name
    arrays: bool = False  # the writer also takes numpy ArrayUnits (factor_arrays): torch-free merges write here


def deferred(module: str, name: str) -> Callable[..., Any]:
    """``formats.<module>.<name>``, imported on its first call: the routed and GGUF formats need torch (and
    gguf), which listing, sniffing and planning the other formats never import."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(import_module(f"{__package__}.{module}"), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def _inspect_routed(adapter: Adapter, report: dict[str, Any]) -> None:
    """The routed format's inspect section, for routed adapters only (the others never import it)."""
    if adapter.meta.format == routed_tag.FORMAT_TAG:
        deferred("routed", "inspect_routing")(adapter, report)


def builtin_formats() -> list[FormatSpec]:
    """Our formats in sniffing order (the most specific header tests first)."""
    return [
        FormatSpec("routed", routed_tag.sniff_routed, deferred("routed", "read_routed_adapter"),
                   deferred("routed", "routed_writer"), "peft", inspect=_inspect_routed, library="mergekit-lora"),
        FormatSpec("kohya", lambda keys, meta: sd_detect.is_kohya(keys), kohya.read_kohya, kohya.write_kohya, "kohya",
                   align=sd.align_sd, inspect=sd.inspect_sd, refuse_mix=sd.refuse_mixed_families, arrays=True),
        FormatSpec("diffusers", lambda keys, meta: diffusers.is_diffusers(keys), diffusers.read_diffusers,
                   diffusers.write_diffusers, "diffusers", inspect=sd.inspect_sd, arrays=True),
        FormatSpec("peft", lambda keys, meta: peft_read.has_peft_keys(keys), peft_read.read_peft,
                   writers.peft_writer, "peft", refuse_inputs=sd.refuse_peft_output, options=("profile",),
                   write_options=writers.peft_options, library="peft", arrays=True),
        # llama.cpp LoRA (issue 18): needs its base model's .gguf (GGUFOptions); gguf.py (torch) loads on first use
        FormatSpec("gguf", write=deferred("gguf", "gguf_writer"), options=("base_gguf",),
                   check_options=gguf_spec.check_options, write_options=deferred("gguf", "gguf_options"),
                   file=gguf_spec.GGUF_NAME),
    ]


_REGISTERED: list[FormatSpec] = []


def register_format(spec: FormatSpec) -> None:
    """Add a format in this process (plugins use the entry-point group)."""
    if any(s.name == spec.name for s in _REGISTERED):
        raise ValueError(f"format {spec.name!r} is already registered")
    _REGISTERED.append(spec)


@cache
def _installed() -> tuple[FormatSpec, ...]:
    """Built-ins and the installed entry points' formats, gathered once per process."""
    specs = builtin_formats()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        specs.extend(obj if isinstance(obj, (list, tuple)) else [obj])
    return tuple(specs)


def formats() -> list[FormatSpec]:
    """Every format: built-ins, then entry points, then in-process registrations (later names shadow)."""
    specs = [*_installed(), *_REGISTERED]
    by_name: dict[str, FormatSpec] = {}
    for s in specs:
        by_name.pop(s.name, None)
        by_name[s.name] = s
    return list(by_name.values())


def writable() -> dict[str, FormatSpec]:
    return {s.name: s for s in formats() if s.write is not None}


def get_writer(name: str) -> FormatSpec:
    specs = writable()
    if name not in specs:
        raise LoraMergeError(f"unknown output format {name!r}; available: {', '.join(sorted(specs))}",
                             field="output_format")
    return specs[name]


def sniff(keys: list[str], metadata: dict[str, str]) -> FormatSpec | None:
    """The first readable format whose header test accepts (keys, metadata)."""
    return next((s for s in formats() if s.sniff is not None and s.read is not None and s.sniff(keys, metadata)),
                None)


def default_output_format(adapters: Sequence[Adapter]) -> str:
    """The inputs' family's output format, or ``peft`` when the families differ."""
    by_name = {s.name: s for s in formats()}
    fams = {(by_name[a.meta.format].output if a.meta.format in by_name else None) or "peft" for a in adapters}
    return fams.pop() if len(fams) == 1 else "peft"


def mix_refusal(adapters: Sequence[Adapter]) -> str | None:
    """The first family's reason why ``adapters`` cannot be merged together, or None."""
    for s in formats():
        if s.refuse_mix is not None and (why := s.refuse_mix(adapters)):
            return why
    return None


def align_names(adapters: Sequence[Adapter]) -> list[Adapter]:
    """Every family's aligner in turn (SD: diffusers names -> kohya names when both are present)."""
    out = list(adapters)
    for s in formats():
        if s.align is not None:
            out = s.align(out)
    return out


def inspect_sections(adapter: Adapter, report: dict[str, Any]) -> None:
    for s in formats():
        if s.inspect is not None:
            s.inspect(adapter, report)

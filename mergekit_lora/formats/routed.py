"""The routed adapter format: pooled rank units per module plus routing parameters.

On disk a routed adapter is a folder with ``routing_config.json`` (router type, default top-k,
temperature, per-module R and top-k, the sources) and ``routed_model.safetensors`` holding, per
module ``<name>``: ``<name>.unit_A`` [R, d_in], ``<name>.unit_B`` [d_out, R] (scale and merge weight
folded in), ``<name>.source`` [R] (input index of each unit), ``<name>.bias`` [R] (the per-unit
selection bias d), ``<name>.gate`` [R, d_in] (gate router only), after calibration
``<name>.activation`` [R] (mean activation weight of each unit on the calibration data) and, for
the hierarchical router after profiling, ``<name>.profile_mean`` / ``<name>.profile_var`` [S, d_in]
(a diagonal Gaussian of the module's input per source adapter; see ``routing/hierarchical.py``).

``load_adapter`` also reads the folder (format ``routed``) as an ordinary :class:`Adapter` whose
units are the pooled units, i.e. ΔW at full activation (top-k = R).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..adapter import Adapter, AdapterMeta, ModuleInfo, output_meta
from ..arrays import dtype_name, torch_dtype
from ..errors import LoraMergeError
from ..units import RankUnits
from .request import WriteRequest
from .routed_tag import FORMAT_TAG, sniff_routed  # noqa: F401  (sniff_routed: re-exported)

RouterKind = Literal["implicit", "gate", "hierarchical"]
ROUTERS: tuple[str, ...] = ("implicit", "gate", "hierarchical")
EVIDENCE: tuple[str, ...] = ("depth", "module")
HIER_KEYS: tuple[str, ...] = ("top_m", "mass", "evidence")
CONFIG_NAME = "routing_config.json"
WEIGHTS_NAME = "routed_model.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RoutedUnits:
    """One module's pooled units and how a token chooses among them.

    ``units`` holds all R units of all inputs (B scaled by the merge weights).  ``top_k`` units are
    active per token.  ``bias`` is the per-unit selection bias d (added to the score, never to the
    output).  ``gate`` [R, d_in] is the gate router's matrix G (None for the implicit router).
    ``activation`` is the mean activation weight per unit measured on calibration data (or None).
    Hierarchical router only: ``profile_mean`` / ``profile_var`` [S, d_in] (one diagonal Gaussian of
    the module input per source adapter, None before profiling), ``top_m`` (adapters kept per
    sequence), ``mass`` (or: the fewest adapters whose probability reaches this mass) and
    ``evidence`` ("depth": log-likelihoods summed over this and all earlier routed modules of the
    forward pass; "module": this module's alone).
    """

    units: RankUnits
    router: RouterKind
    top_k: int
    temperature: float = 1.0
    bias: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    activation: torch.Tensor | None = None
    profile_mean: torch.Tensor | None = None
    profile_var: torch.Tensor | None = None
    top_m: int = 1
    mass: float | None = None
    evidence: str = "depth"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        R = self.units.rank
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}")
        if not 1 <= self.top_k <= max(R, 1):
            raise ValueError(f"top_k={self.top_k} is outside 1..{R}")
        if self.router == "gate" and (self.gate is None or tuple(self.gate.shape) != (R, self.units.d_in)):
            raise ValueError("the gate router needs a gate matrix of shape [R, d_in]")
        if self.bias is not None and tuple(self.bias.shape) != (R,):
            raise ValueError("bias must hold one value per unit")
        if (self.profile_mean is None) != (self.profile_var is None):
            raise ValueError("profile_mean and profile_var come together")
        if self.profile_mean is not None:
            S = self.n_sources
            for t in (self.profile_mean, self.profile_var):
                if t.ndim != 2 or t.shape[1] != self.units.d_in or t.shape[0] < S:
                    raise ValueError(f"a profile must have shape [S >= {S}, d_in={self.units.d_in}]")
            if not bool((self.profile_var > 0).all()):
                raise ValueError("profile variances must be positive")
        if self.top_m < 1:
            raise ValueError(f"top_m={self.top_m} must be >= 1")
        if self.mass is not None and not 0 < self.mass <= 1:
            raise ValueError(f"mass={self.mass} must be in (0, 1]")
        if self.evidence not in EVIDENCE:
            raise ValueError(f"evidence={self.evidence!r} must be one of {', '.join(EVIDENCE)}")

    @property
    def n_sources(self) -> int:
        """How many source adapters the units come from (1 + the largest source index)."""
        return int(self.units.source.max()) + 1 if self.units.rank else 0

    @property
    def rank(self) -> int:
        return self.units.rank

    @property
    def d_in(self) -> int:
        return self.units.d_in

    @property
    def d_out(self) -> int:
        return self.units.d_out

    def bias_or_zeros(self) -> torch.Tensor:
        return self.bias if self.bias is not None else torch.zeros(self.rank, dtype=self.units.A.dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> RoutedUnits:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(self, units=self.units.to(device, dtype), bias=mv(self.bias), gate=mv(self.gate),
                       activation=mv(self.activation), profile_mean=mv(self.profile_mean),
                       profile_var=mv(self.profile_var))

    def static_units(self) -> RankUnits:
        """The expected-activation static merge: unit i weighted by its mean activation E[wᵢ·mᵢ]."""
        if self.activation is None:
            raise LoraMergeError("a static export needs activation statistics; route with calibration data")
        act = self.activation.to(self.units.B.dtype)
        return self.units.with_factors(self.units.A, self.units.B * act[None, :], self.units.source)


@dataclass
class RoutedAdapter:
    """Module name -> :class:`RoutedUnits`, with the adapter-wide facts of ``routing_config.json``."""

    modules: dict[str, RoutedUnits]
    base_model: str | None = None
    sources: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        return routing_config(self.modules.items(), self.base_model, self.sources, self.info)


def routing_config(modules: Iterable[tuple[str, RoutedUnits]], base_model: str | None, sources: Sequence[str],
                   info: dict[str, Any] | None = None) -> dict[str, Any]:
    mods = list(modules)
    if not mods:
        raise LoraMergeError("a routed adapter needs at least one module")
    routers = {m.router for _, m in mods}
    temps = {m.temperature for _, m in mods}
    if len(routers) > 1 or len(temps) > 1:
        raise LoraMergeError("all modules of one routed adapter must share one router and temperature")
    ks = [m.top_k for _, m in mods]
    router = next(iter(routers))
    hier: dict[str, Any] = {}
    if router == "hierarchical":
        for key in HIER_KEYS:
            vals = {getattr(m, key) for _, m in mods}
            if len(vals) > 1:
                raise LoraMergeError(f"all modules of one routed adapter must share one {key}")
            hier[key] = vals.pop()
        hier["profiled"] = all(m.profile_mean is not None for _, m in mods)
    return {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "router": routers.pop(),
        "top_k": max(set(ks), key=ks.count),
        "temperature": temps.pop(),
        "base_model_name_or_path": base_model,
        "sources": list(sources),
        "calibrated": any(m.activation is not None for _, m in mods),
        **hier,
        **(info or {}),
        "modules": {
            n: {"R": m.rank, "top_k": m.top_k, "d_in": m.d_in, "d_out": m.d_out,
                "weight_shape": list(m.units.weight_shape), "kind": m.units.kind,
                "fan_in_fan_out": m.units.fan_in_fan_out}
            for n, m in mods
        },
    }


def write_routed(out_dir: Path, modules: Iterable[tuple[str, RoutedUnits]], *, base_model: str | None,
                 sources: Sequence[str], dtype: torch.dtype | str = torch.float32,
                 info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``routed_model.safetensors`` + ``routing_config.json`` into ``out_dir`` (an existing temp
    folder of :func:`mergekit_lora.atomic.atomic_output`).  Returns the config."""
    dtype = torch_dtype(dtype)  # a plan names it ("bfloat16")
    tensors: dict[str, torch.Tensor] = {}
    kept: list[tuple[str, RoutedUnits]] = []
    for name, m in modules:
        if not isinstance(m, RoutedUnits):
            raise LoraMergeError(f"module {name}: the routed format holds routed modules only; use the route method")
        u = m.units
        tensors[f"{name}.unit_A"] = u.A.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.unit_B"] = u.B.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.source"] = u.source.detach().to("cpu", torch.int64).contiguous()
        tensors[f"{name}.bias"] = m.bias_or_zeros().detach().to("cpu", torch.float32).contiguous()
        if m.gate is not None:
            tensors[f"{name}.gate"] = m.gate.detach().to("cpu", torch.float32).contiguous()
        if m.activation is not None:
            tensors[f"{name}.activation"] = m.activation.detach().to("cpu", torch.float32).contiguous()
        if m.profile_mean is not None and m.profile_var is not None:
            tensors[f"{name}.profile_mean"] = m.profile_mean.detach().to("cpu", torch.float32).contiguous()
            tensors[f"{name}.profile_var"] = m.profile_var.detach().to("cpu", torch.float32).contiguous()
        kept.append((name, m))
    cfg = routing_config(kept, base_model, sources, info)
    save_file(tensors, str(Path(out_dir) / WEIGHTS_NAME),
              metadata={"mergekit_lora.format": FORMAT_TAG})  # one key: safetensors orders keys at random
    (Path(out_dir) / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def _locate(path: Path) -> tuple[Path, Path]:
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = folder / WEIGHTS_NAME if path.is_dir() else path
    cfg = folder / CONFIG_NAME
    if not weights.is_file():
        raise LoraMergeError(f"{folder}: no {WEIGHTS_NAME}; not a routed adapter (make one with `loramerge route`)")
    if not cfg.is_file():
        raise LoraMergeError(f"{folder}: {WEIGHTS_NAME} without {CONFIG_NAME}; the routed adapter is incomplete")
    return weights, cfg


def read_config(cfg_path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise LoraMergeError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT_TAG or not isinstance(cfg.get("modules"), dict):
        raise LoraMergeError(f"{cfg_path}: not a routing config (needs format={FORMAT_TAG!r} and a modules table)")
    if cfg.get("router") not in ROUTERS:
        raise LoraMergeError(f"{cfg_path}: unknown router {cfg.get('router')!r}; expected one of {', '.join(ROUTERS)}")
    return cfg


def _module_tensors(f: Any, name: str, keys: set[str], path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("unit_A", "unit_B", "source", "bias", "gate", "activation", "profile_mean", "profile_var"):
        key = f"{name}.{part}"
        if key in keys:
            out[part] = f.get_tensor(key)
        elif part in ("unit_A", "unit_B", "source"):
            raise LoraMergeError(f"{path}: tensor {key!r} is missing; the routed adapter is incomplete")
    return out


def _units(name: str, spec: dict[str, Any], t: dict[str, torch.Tensor], path: Path) -> RankUnits:
    A, B, src = t["unit_A"], t["unit_B"], t["source"]
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] != spec.get("R"):
        raise LoraMergeError(f"{path}: module {name}: unit_A {tuple(A.shape)} / unit_B {tuple(B.shape)} do not "
                             f"match R={spec.get('R')} in {CONFIG_NAME}")
    for k, v in t.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise LoraMergeError(f"{path}: tensor {name}.{k} holds NaN or Inf")
    return RankUnits(A, B, src.long(), tuple(spec["weight_shape"]), spec.get("kind", "linear"),
                     bool(spec.get("fan_in_fan_out", False)))


def load_routed(path: str | Path) -> RoutedAdapter:
    """Read a routed adapter folder (or its ``routed_model.safetensors``) completely."""
    weights, cfg_path = _locate(Path(path))
    cfg = read_config(cfg_path)
    mods: dict[str, RoutedUnits] = {}
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        for name, spec in cfg["modules"].items():
            t = _module_tensors(f, name, keys, weights)
            u = _units(name, spec, t, weights)
            try:
                mass = cfg.get("mass")
                mods[name] = RoutedUnits(u, cfg["router"], int(spec.get("top_k", cfg["top_k"])),
                                         float(cfg.get("temperature", 1.0)), t.get("bias"), t.get("gate"),
                                         t.get("activation"), t.get("profile_mean"), t.get("profile_var"),
                                         int(cfg.get("top_m", 1)), None if mass is None else float(mass),
                                         str(cfg.get("evidence", "depth")))
            except ValueError as e:
                raise LoraMergeError(f"{weights}: module {name}: {e}") from None
    info = {k: v for k, v in cfg.items() if k not in ("format", "version", "router", "top_k", "temperature",
                                                     "base_model_name_or_path", "sources", "calibrated",
                                                     "modules", "profiled", *HIER_KEYS)}
    return RoutedAdapter(mods, cfg.get("base_model_name_or_path"), list(cfg.get("sources", [])), info)


def read_routed_adapter(path: Path, **_: Any) -> Adapter:
    """The routed folder as an :class:`Adapter` of pooled units (ΔW at full activation), lazily."""
    weights, cfg_path = _locate(Path(path))
    cfg = read_config(cfg_path)
    infos = {}
    for name, s in cfg["modules"].items():
        infos[name] = ModuleInfo(name, int(s["R"]), int(s["d_out"]), int(s["d_in"]), tuple(s["weight_shape"]),
                                 s.get("kind", "linear"), bool(s.get("fan_in_fan_out", False)), float(s["R"]), 1.0,
                                 "float32")

    def loader(info: ModuleInfo) -> RankUnits:
        with safe_open(str(weights), framework="pt") as f:
            t = _module_tensors(f, info.name, set(f.keys()), weights)
        return _units(info.name, cfg["modules"][info.name], t, weights)

    with safe_open(str(weights), framework="pt") as f:
        dtype = dtype_name(f.get_tensor(f"{next(iter(infos))}.unit_A").dtype) if infos else "float32"
    fifo = {i.fan_in_fan_out for i in infos.values()}
    meta = AdapterMeta(format=FORMAT_TAG, base_model=cfg.get("base_model_name_or_path"), dtype=dtype,
                       target_modules=sorted(infos), fan_in_fan_out=fifo == {True}, config=cfg,
                       extra={"routing": cfg})
    return Adapter(infos, meta, loader, path=weights.parent, label=weights.parent.name)


def inspect_routing(a: Adapter, report: dict[str, Any]) -> None:
    """``loramerge inspect``: the routing config of a routed adapter (the routed FormatSpec's inspector)."""
    cfg = a.meta.extra.get("routing")
    if a.meta.format != FORMAT_TAG or not cfg:
        return
    ks = sorted({m["top_k"] for m in cfg["modules"].values()})
    report["routing"] = {
        "router": cfg["router"],
        "top_k": str(ks[0]) if len(ks) == 1 else f"{ks[0]}–{ks[-1]}",
        "temperature": cfg.get("temperature"),
        "units": sum(m["R"] for m in cfg["modules"].values()),
        "sources": len(cfg.get("sources", [])),
        "calibrated": bool(cfg.get("calibrated")),
        **({k: cfg.get(k) for k in (*HIER_KEYS, "profiled")} if cfg["router"] == "hierarchical" else {}),
        "per_module": {n: {"R": m["R"], "top_k": m["top_k"]} for n, m in cfg["modules"].items()},
    }


def iter_static(modules: Iterable[tuple[str, RoutedUnits]]) -> Iterator[tuple[str, RankUnits]]:
    for name, m in modules:
        yield name, m.static_units()


@dataclass(frozen=True)
class RoutedOptions:
    """The routed writer's own options: calibrated routing's ``info`` (calibration, profiles) for the config
    and the ``sources`` as the user named them (default: the inputs' paths)."""

    info: dict[str, Any] | None = None
    sources: Sequence[str] | None = None


def routed_writer(req: WriteRequest) -> dict[str, Any]:
    """The pipeline's writer for format ``routed`` (``merge(..., method="route")``); the recipe is in the card."""
    o = req.options if isinstance(req.options, RoutedOptions) else RoutedOptions()
    labels = list(o.sources) if o.sources is not None else [str(a.path or a.label) for a in req.adapters]
    return write_routed(req.out_dir, req.modules, base_model=output_meta(req.adapters).base_model, sources=labels,
                        dtype=req.dtype, info=o.info)

"""Ask/tell optimisers over a :class:`SearchSpace`: Nevergrad (default: CMA-ES, as mergekit-evolve) and Optuna TPE.

Nevergrad's ``NGOpt`` (LoraHub's choice) is not the default: with numpy 2 its MetaModel step raises
``TypeError: only 0-dimensional arrays can be converted to Python scalars`` after ~20 trials
(nevergrad 1.0.12); ``nevergrad:NAME`` still selects any registered optimiser, NGOpt included.

Both are seeded and see the start point (the untuned settings) as their first candidate, so the
trial sequence depends only on (space, seed, budget, workers) and the scores told back: a resumed
search replays its recorded trials through ``ask``/``tell`` and continues where it stopped.
"""

from __future__ import annotations

from typing import Any

from mergekit_lora.errors import LoraMergeError

from .space import WEIGHT_BOUND, SearchSpace

OPTIMIZERS = ("nevergrad", "optuna")


class Optimizer:
    """``ask() -> (token, flat values)``; ``tell(token, loss)``; lower loss is better."""

    def ask(self) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def tell(self, token: Any, loss: float) -> None:
        raise NotImplementedError


class NevergradOptimizer(Optimizer):
    def __init__(self, space: SearchSpace, *, seed: int, budget: int, workers: int, name: str = "CMA") -> None:
        import nevergrad as ng
        import numpy as np

        p: dict[str, Any] = {}
        for i in range(space.n_weights):
            p[f"w{i}"] = ng.p.Scalar(init=space.init_weights[i], lower=-WEIGHT_BOUND, upper=WEIGHT_BOUND)
        for d in space.dims:
            if d.kind == "choice":
                p[d.name] = ng.p.Choice(list(d.choices))
            else:
                s = ng.p.Scalar(init=d.init, lower=d.low, upper=d.high)
                p[d.name] = s.set_integer_casting() if d.kind == "int" else s
        param = ng.p.Dict(**p)
        param.random_state = np.random.RandomState(seed)
        if name not in ng.optimizers.registry:
            raise LoraMergeError(f"unknown Nevergrad optimizer {name!r}; e.g. NGOpt, CMA, TwoPointsDE, OnePlusOne")
        self.opt = ng.optimizers.registry[name](parametrization=param, budget=budget, num_workers=workers)
        start = {f"w{i}": space.init_weights[i] for i in range(space.n_weights)}
        start.update({d.name: d.init for d in space.dims})
        self.opt.suggest(start)

    def ask(self) -> tuple[Any, dict[str, Any]]:
        cand = self.opt.ask()
        return cand, dict(cand.value)

    def tell(self, token: Any, loss: float) -> None:
        self.opt.tell(token, float(loss))


class OptunaOptimizer(Optimizer):
    def __init__(self, space: SearchSpace, *, seed: int, budget: int, workers: int) -> None:
        import optuna
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.dist: dict[str, Any] = {}
        for i in range(space.n_weights):
            self.dist[f"w{i}"] = FloatDistribution(-WEIGHT_BOUND, WEIGHT_BOUND)
        for d in space.dims:
            self.dist[d.name] = (CategoricalDistribution(list(d.choices)) if d.kind == "choice" else
                                 IntDistribution(int(d.low), int(d.high)) if d.kind == "int" else
                                 FloatDistribution(d.low, d.high))
        self.study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
        start = {f"w{i}": space.init_weights[i] for i in range(space.n_weights)}
        start.update({d.name: d.init for d in space.dims})
        self.study.enqueue_trial(start)

    def ask(self) -> tuple[Any, dict[str, Any]]:
        trial = self.study.ask(self.dist)
        return trial, dict(trial.params)

    def tell(self, token: Any, loss: float) -> None:
        self.study.tell(token, float(loss))


def make_optimizer(name: str, space: SearchSpace, *, seed: int, budget: int, workers: int) -> Optimizer:
    if name == "nevergrad" or name.startswith("nevergrad:"):
        algo = name.split(":", 1)[1] if ":" in name else "CMA"
        return NevergradOptimizer(space, seed=seed, budget=budget, workers=workers, name=algo)
    if name == "optuna":
        return OptunaOptimizer(space, seed=seed, budget=budget, workers=workers)
    raise LoraMergeError(f"unknown optimizer {name!r}; use nevergrad (CMA-ES, default), nevergrad:NAME or optuna")

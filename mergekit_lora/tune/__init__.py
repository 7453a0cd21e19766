"""``loramerge tune``: gradient-free search of a merge's parameters and per-adapter weights.

:mod:`.objective` reads the objective YAML, :mod:`.space` builds the search space from a method's
``Params`` model, :mod:`.optimizers` wraps Nevergrad and Optuna behind ask/tell, :mod:`.evaluator`
merges in memory and scores a trial (the model loaded once per worker), :mod:`.search` runs the
loop (sequential or on Ray actors), records ``trials.jsonl`` and writes the best adapter.
"""

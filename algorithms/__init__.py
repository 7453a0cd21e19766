"""Built-in merge algorithms, one file each.  Importing this package registers them.

The core finds this package through the entry-point group ``mergekit_lora.algorithms`` (our own
``pyproject.toml`` names it ``builtins``), the same way a third-party plugin is found.
"""

from . import cat, dare, lego, linear, magnitude_prune, route, svd, ties  # noqa: F401  (registration side effects)

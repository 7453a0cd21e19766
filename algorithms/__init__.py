"""Built-in merge algorithms, one file (or folder) each, listed in ``BUILTINS``.

The core finds them through the entry-point group ``mergekit_lora.algorithms`` (our own
``pyproject.toml`` names ``mergekit_lora.algorithms:BUILTINS``), the same way it finds a plugin.
Importing this package registers nothing.
"""

from .cat import Cat
from .dare import DareLinear, DareTies
from .lego import Lego
from .linear import Linear
from .magnitude_prune import MagnitudePrune
from .route import Route
from .svd import Svd
from .ties import Ties

BUILTINS = (Linear, Cat, Svd, Ties, DareLinear, DareTies, MagnitudePrune, Lego, Route)

__all__ = ["BUILTINS", *(c.__name__ for c in BUILTINS)]

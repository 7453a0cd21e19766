"""Built-in merge algorithms, one file (or folder) each, listed in ``BUILTINS``.

``BUILTINS`` holds registry entries (:mod:`.catalog`: name, description, ``Params``, where the class
lives), so importing this package imports no torch; an implementation module is imported when a merge
needs it.  The core finds them through the entry-point group ``mergekit_lora.algorithms`` (our own
``pyproject.toml`` names ``mergekit_lora.algorithms:BUILTINS``), the same way it finds a plugin.
Importing this package registers nothing.
"""

from .catalog import BUILTINS

__all__ = ["BUILTINS"]

"""The public name of the routed-adapter runtime (``mergekit_lora.routing.runtime``).

Model cards of routed adapters print ``from mergekit_lora.runtime import attach``; this alias keeps that
line working. The core imports :mod:`mergekit_lora.routing.runtime` (an import contract).
"""

from .routing.runtime import Attached, RoutedLoraLayer, attach, detach

__all__ = ["Attached", "RoutedLoraLayer", "attach", "detach"]

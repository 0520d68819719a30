"""Transformer growth that keeps the model's own class: heads, stream, MLP and layers, every layer alike.

:func:`grow_transformer` (uniform, returns the class with a grown config) and
:func:`grow_heads` (the heads of chosen layers; ``net2wider`` at an attention site)
rest on one mechanism: per-dimension axis maps (:mod:`growth.transformer.maps`)
applied to every parameter by its family's layout (:mod:`surgery.channels.layouts`).
"""

from growth.transformer.grow import grow_transformer

__all__ = ["grow_transformer"]

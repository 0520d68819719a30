"""Packages above surgery plug in without surgery importing them: the ``surgery.plugins`` entry points.

``growth`` registers its recipe replays (net2wider, ...) and ``xross`` the loader of
``RUN@0-1`` references when imported; a recipe or reference that needs them imports
them through this entry point group. Only entry points of trusted packages
(:mod:`surgery.core.trust`) are loaded, so another installed distribution cannot slip
code in through it.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from surgery.core.trust import in_trusted_package

GROUP = "surgery.plugins"


@functools.lru_cache(maxsize=1)
def load_plugins() -> tuple[str, ...]:
    """Import every trusted ``surgery.plugins`` entry point once; the modules imported."""
    loaded = []
    for ep in entry_points(group=GROUP):
        if in_trusted_package(ep.module):
            ep.load()
            loaded.append(ep.module)
    return tuple(loaded)

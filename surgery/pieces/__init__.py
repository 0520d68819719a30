"""surgery.pieces: Cutting a captured graph into exact pieces and working with them: cut points, what crosses a cut,
re-cutting for other calls, device/server splits, adapters and stitching, channel matching, submodule
replacement and drawing. May import ``surgery.core`` and ``surgery.graph``.
"""

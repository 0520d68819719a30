"""surgery.cli: The ``surgery`` command (``main``) and the plumbing the three command-line tools share (``kit``): a thin
layer over the library. May import every other room of surgery; nothing in surgery imports it.
"""

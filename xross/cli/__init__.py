"""xross.cli: The ``xross`` command (``main``) and its sub-commands' modules: a thin layer over the library. May
import every other room of xross; nothing in xross imports it.
"""

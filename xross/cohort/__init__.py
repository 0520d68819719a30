"""xross.cohort: The cohort: K networks cut into the same number of parts, with adapters between them, the routes
through that grid, one net of it grown in place with its adapters, exit heads after every part, and a
network's output read as logits. May import
``xross.data`` and ``xross.errors``.
"""

"""xross.run: A run: its config (the one source of its options), directory, checkpoints, data-parallel setup,
optimiser (and its state across a growth), metrics, teachers, evaluation, the growth schedule and log, the
engine every method's loop runs inside, and the table of methods and run kinds. May import ``xross.data``,
``xross.cohort`` and ``xross.analysis``.
"""

"""xross: train cohorts of networks whose pieces become interchangeable, and distil them.

>>> import xross
>>> callable(xross.train) and callable(xross.distill) and callable(xross.AnytimeRunner.from_run)
True

``xross.train(**options)`` runs :class:`xross.methods.trainer.Trainer` and ``xross.distill(**options)``
:class:`xross.methods.distiller.Distiller` from the fields of :class:`xross.run.config.TrainConfig` and
:class:`xross.run.config.DistillConfig`; :class:`xross.AnytimeRunner` answers within a deadline from a run
trained with exit heads. The command line is ``xross train|distill|eval|best|export|anytime|...``.
"""

from xross.anytime.runner import AnytimeRunner
from xross.methods.distiller import distill
from xross.methods.trainer import train

__all__ = ["AnytimeRunner", "distill", "train"]

"""xross: train cohorts of networks whose pieces become interchangeable, and distil them.

>>> import xross
>>> callable(xross.train) and callable(xross.distill) and callable(xross.AnytimeRunner.from_run)
True

``xross.train(**options)`` runs :class:`xross.trainer.Trainer` and ``xross.distill(**options)``
:class:`xross.distiller.Distiller` from the fields of :class:`xross.config.TrainConfig` and
:class:`xross.config.DistillConfig`; :class:`xross.AnytimeRunner` answers within a deadline from a run
trained with exit heads. The command line is ``xross train|distill|eval|best|export|anytime|...``.
"""

from xross.anytime import AnytimeRunner
from xross.distiller import distill
from xross.trainer import train

__all__ = ["AnytimeRunner", "distill", "train"]

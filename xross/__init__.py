"""xross: train cohorts of networks whose pieces become interchangeable, and distil them.

>>> import xross
>>> callable(xross.train) and callable(xross.distill)
True

``xross.train(**options)`` runs :class:`xross.trainer.Trainer` and ``xross.distill(**options)``
:class:`xross.distiller.Distiller` from the fields of :class:`xross.config.TrainConfig` and
:class:`xross.config.DistillConfig`; the command line is ``xross train|distill|eval|best|export``.
"""

from xross.distiller import distill
from xross.trainer import train

__all__ = ["distill", "train"]

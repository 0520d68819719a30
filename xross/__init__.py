"""xross: train cohorts of networks whose pieces become interchangeable, and distil them.

``xross.train(config, **overrides)`` trains what a :class:`TrainConfig` describes (a cohort, or one net at
every width) and ``xross.distill(config, **overrides)`` a :class:`DistillConfig` (one student from teachers);
each method (``--mode``) and each kind of run is one entry of the table in :mod:`xross.run.table`, filled
when xross is imported. :class:`xross.AnytimeRunner` answers within a deadline from a run trained with exit
heads. The command line is ``xross train|distill|eval|best|export|anytime|...``.

>>> import xross
>>> xross.METHODS.names()
['independent', 'kd', 'dml', 'xml', 'mutualnet', 'distill']
>>> xross.TrainConfig(mode="kd", nets=["resnet18"], teacher=["runs/t"], temperature=2).temperature
2.0
>>> xross.TrainConfig.from_dict({"mode": "independent", "temperature": 2})
Traceback (most recent call last):
...
xross.errors.XrossError: the configuration: temperature applies to kd, not independent: drop --temperature ...
"""

# the methods register themselves in the table (xross.run.table) in this order, then the kinds of run
from xross.methods.trainer import train  # isort: skip
from xross.methods.mutualnet import MUTUALNET  # noqa: F401  # isort: skip
from xross.methods.distiller import distill  # isort: skip
from xross.anytime.kinds import COHORT  # noqa: F401  # isort: skip
from xross.anytime.runner import AnytimeRunner
from xross.run.config import DistillConfig, TrainConfig
from xross.run.table import KINDS, METHODS

__all__ = ["KINDS", "METHODS", "AnytimeRunner", "DistillConfig", "TrainConfig", "distill", "train"]

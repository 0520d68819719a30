"""Where modules went when the packages were split into rooms: names recorded in files written before still load.

Recipes and configs record classes and builders as ``package.module:attribute``
(:func:`surgery.core.trust.class_name`). A name from before the move is read through
this table, so every file the library wrote keeps loading.

>>> current_module("surgery.adapters")
'surgery.pieces.adapters'
>>> current_module("surgery.pieces.adapters")
'surgery.pieces.adapters'
"""

MOVED: dict[str, str] = {
    "surgery._util": "surgery.core.util",
    "surgery.errors": "surgery.core.errors",
    "surgery.schema": "surgery.core.schema",
    "surgery.specs": "surgery.core.specs",
    "surgery.trust": "surgery.core.trust",
    "surgery.plugins": "surgery.core.plugins",
    "surgery.recipe": "surgery.core.recipe",
    "surgery.modspec": "surgery.core.modspec",
    "surgery.inputs": "surgery.graph.inputs",
    "surgery.names": "surgery.graph.names",
    "surgery.tracing": "surgery.graph.fx",
    "surgery.exported": "surgery.graph.torch_export",
    "surgery.capture": "surgery.graph.capture",
    "surgery.flops": "surgery.graph.flops",
    "surgery.cut": "surgery.pieces.cut",
    "surgery.cutpoints": "surgery.pieces.cutpoints",
    "surgery.boundary": "surgery.pieces.boundary",
    "surgery.recut": "surgery.pieces.recut",
    "surgery.split": "surgery.pieces.split",
    "surgery.adapters": "surgery.pieces.adapters",
    "surgery.matching": "surgery.pieces.matching",
    "surgery.replace": "surgery.pieces.replace",
    "surgery.render": "surgery.pieces.render",
    "surgery.remap": "surgery.channels.remap",
    "surgery.slim": "surgery.channels.slim",
    "surgery.batchnorm": "surgery.channels.batchnorm",
    "surgery.models": "surgery.models.build",
    "surgery.ecosystems": "surgery.models.ecosystems",
    "surgery.io": "surgery.files.io",
    "surgery.recipe_file": "surgery.files.recipe_file",
    "surgery.refs": "surgery.files.refs",
    "surgery.export": "surgery.exporters",
    "surgery.cli": "surgery.cli.main",
    "surgery.clikit": "surgery.cli.kit",
    "xross.labels": "xross.data.labels",
    "xross.cohort": "xross.cohort.grid",
    "xross.exits": "xross.cohort.exits",
    "xross.logits": "xross.cohort.logits",
    "xross.config": "xross.run.config",
    "xross.checkpoint": "xross.run.checkpoint",
    "xross.distributed": "xross.run.distributed",
    "xross.metrics": "xross.run.metrics",
    "xross.optim": "xross.run.optim",
    "xross.teachers": "xross.run.teachers",
    "xross.evaluate": "xross.run.evaluate",
    "xross.engine": "xross.run.engine",
    "xross.run": "xross.run.directory",
    "xross.losses": "xross.methods.objectives",
    "xross.discriminator": "xross.methods.discriminator",
    "xross.trainer": "xross.methods.trainer",
    "xross.mutualnet": "xross.methods.mutualnet",
    "xross.distiller": "xross.methods.distiller",
    "xross.anytime": "xross.anytime.runner",
    "xross.anytime_report": "xross.anytime.report",
    "xross.budget": "xross.anytime.budget",
    "xross.latency": "xross.anytime.latency",
    "xross.query": "xross.anytime.query",
    "xross.diagnose": "xross.analysis.diagnose",
    "xross.similarity": "xross.analysis.similarity",
    "xross.plots": "xross.analysis.plots",
    "xross.cli": "xross.cli.main",
    "xross.cli_anytime": "xross.cli.anytime",
    "xross.cli_common": "xross.cli.common",
    "xross.cli_diagnose": "xross.cli.diagnose",
}


def current_module(name: str) -> str:
    """The module ``name`` is now: itself, or where it moved."""
    return MOVED.get(name, name)

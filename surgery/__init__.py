"""surgery: trace any network, cut it into exact pieces, stitch pieces of different networks.

>>> import torch, torchvision, surgery
>>> net = torchvision.models.resnet18().eval()
>>> pieces = surgery.cut(net, at="layer2")
>>> x = torch.randn(1, 3, 64, 64)
>>> torch.equal(pieces(x), net(x))
True
"""

from surgery.channels.batchnorm import recalibrate_bn
from surgery.channels.remap import permute_channels
from surgery.channels.slim import SlimNet, slim
from surgery.core.errors import SurgeryError, UserError
from surgery.core.recipe import Recipe, recipe_of
from surgery.core.specs import ValueSpec
from surgery.exporters import export
from surgery.files import refs
from surgery.files.io import load, save
from surgery.graph.capture import Capture, capture, trace
from surgery.graph.flops import count_flops, count_params
from surgery.graph.inputs import Example
from surgery.models.build import build_model, list_models, load_weights
from surgery.pieces.adapters import Adapter, adapter, stitch
from surgery.pieces.cut import Pieces, cut
from surgery.pieces.cutpoints import CutPoint, cut_points
from surgery.pieces.matching import match_channels
from surgery.pieces.pipeline import StagePlan, pipeline
from surgery.pieces.render import render
from surgery.pieces.replace import replace

__all__ = [
    "Adapter",
    "Capture",
    "Example",
    "capture",
    "refs",
    "CutPoint",
    "Pieces",
    "Recipe",
    "adapter",
    "SurgeryError",
    "UserError",
    "ValueSpec",
    "build_model",
    "count_flops",
    "count_params",
    "cut",
    "cut_points",
    "pipeline",
    "StagePlan",
    "export",
    "list_models",
    "load",
    "load_weights",
    "match_channels",
    "permute_channels",
    "recipe_of",
    "recalibrate_bn",
    "render",
    "replace",
    "save",
    "slim",
    "SlimNet",
    "stitch",
    "trace",
]

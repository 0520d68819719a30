"""surgery: trace any network, cut it into exact pieces, stitch pieces of different networks.

>>> import torch, torchvision, surgery
>>> net = torchvision.models.resnet18().eval()
>>> pieces = surgery.cut(net, at="layer2")
>>> x = torch.randn(1, 3, 64, 64)
>>> torch.equal(pieces(x), net(x))
True
"""

from surgery import refs
from surgery.adapters import Adapter, adapter, stitch
from surgery.batchnorm import recalibrate_bn
from surgery.capture import Capture, capture, trace
from surgery.cut import Pieces, cut
from surgery.cutpoints import CutPoint, cut_points
from surgery.errors import SurgeryError, UserError
from surgery.export import export
from surgery.flops import count_flops, count_params
from surgery.inputs import Example
from surgery.io import load, save
from surgery.matching import match_channels
from surgery.models import build_model, list_models, load_weights
from surgery.recipe import Recipe, recipe_of
from surgery.remap import permute_channels
from surgery.render import render
from surgery.replace import replace
from surgery.slim import SlimNet, slim
from surgery.specs import ValueSpec

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

"""surgery: trace any network, cut it into exact pieces, stitch pieces of different networks.

>>> import torch, torchvision, surgery
>>> net = torchvision.models.resnet18().eval()
>>> pieces = surgery.cut(net, at="layer2")
>>> x = torch.randn(1, 3, 64, 64)
>>> torch.equal(pieces(x), net(x))
True
"""
from surgery.cut import Pieces, cut
from surgery.errors import SurgeryError
from surgery.flops import count_flops, count_params
from surgery.io import load, save
from surgery.models import build_model, list_models, load_weights
from surgery.recipe import Recipe, recipe_of
from surgery.replace import replace
from surgery.specs import ValueSpec
from surgery.tracing import trace

__all__ = [
    "Pieces",
    "Recipe",
    "SurgeryError",
    "ValueSpec",
    "build_model",
    "count_flops",
    "count_params",
    "cut",
    "list_models",
    "load",
    "load_weights",
    "recipe_of",
    "replace",
    "save",
    "trace",
]

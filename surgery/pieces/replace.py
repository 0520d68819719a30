"""Replace a submodule by path, e.g. a CIFAR stem for an ImageNet ResNet.

>>> import torch, torchvision, surgery
>>> net = surgery.build_model("resnet18", num_classes=10)
>>> net = surgery.replace(net, "conv1", torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False))
>>> net = surgery.replace(net, "maxpool", torch.nn.Identity())
>>> net(torch.randn(1, 3, 32, 32)).shape
torch.Size([1, 10])
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from surgery.core.errors import SurgeryError, did_you_mean
from surgery.core.modspec import module_from_spec, module_spec
from surgery.core.recipe import attach_recipe, recipe_of, register_replay


def replace(model: nn.Module, name: str, new_module: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return ``model`` with the submodule at path ``name`` replaced by ``new_module``.

    The input model is left untouched unless ``inplace=True``. When the model carries a
    recipe and ``new_module`` can be described as JSON (torch.nn layers, Sequentials of
    them), the replacement is recorded so the result saves and loads like the original.

    >>> import torch, surgery
    >>> net = surgery.build_model("resnet18", num_classes=10)
    >>> new = surgery.replace(net, "fc", torch.nn.Linear(512, 3))
    >>> new.fc.out_features, net.fc.out_features  # the input model is untouched
    (3, 10)
    >>> surgery.recipe_of(new).transforms[-1].op
    'replace'
    """
    names = dict(model.named_modules())
    if not name or name not in names:
        raise SurgeryError(
            f"'{name}' is not a submodule path of {type(model).__name__} "
            f"({did_you_mean(name, [n for n in names if n])})"
        )
    parent_path, _, attr = name.rpartition(".")
    recipe = recipe_of(model)
    spec = None
    if recipe is not None:
        try:
            spec = module_spec(new_module)
        except SurgeryError:
            spec = None  # replacement cannot be recorded: the result has no recipe
    result = model if inplace else copy.deepcopy(model)
    parent = result.get_submodule(parent_path) if parent_path else result
    setattr(parent, attr, new_module)
    new_recipe = recipe.then("replace", name=name, module=spec) if (recipe is not None and spec is not None) else None
    return attach_recipe(result, new_recipe)


@register_replay("replace")
def _replay_replace(model: nn.Module, name: str, module: Any) -> nn.Module:
    return replace(model, name, module_from_spec(module), inplace=True)

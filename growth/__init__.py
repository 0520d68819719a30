"""growth: function-preserving Net2Net mutations on any traced network.

Every op takes a model, returns a new ``torch.fx.GraphModule`` computing the same
function (to float tolerance; ``check=True`` verifies it on an example input), and
records itself in the model's recipe so the result saves and loads with
:func:`surgery.save` / :func:`surgery.load`.

>>> import torch, torchvision, growth
>>> net = torchvision.models.resnet18().eval()
>>> grown = growth.net2deeper(net, "layer2_0_relu", check=True)
>>> grown = growth.net2wider(grown, "layer2.0.conv1", factor=1.5, seed=0, check=True)
>>> grown.layer2[0].conv1.out_channels
192
>>> "layer3.0.conv1" in growth.sites(grown, "net2wider")
True
"""

from growth.branch import net2branch
from growth.deeper import net2deeper
from growth.kernel import widen_kernel
from growth.mutation import MutationRecord, mutate, random_mutation, read_log, replay, weights_digest
from growth.policies import POLICIES, expand
from growth.provenance import grow_steps, lineage
from growth.registry import OPS, GrowthOp, Site, sites
from growth.skip import add_skip
from growth.transformer import grow_transformer
from growth.wider import net2wider

__all__ = [
    "OPS",
    "POLICIES",
    "expand",
    "grow_steps",
    "grow_transformer",
    "lineage",
    "GrowthOp",
    "MutationRecord",
    "add_skip",
    "mutate",
    "net2branch",
    "net2deeper",
    "net2wider",
    "random_mutation",
    "read_log",
    "replay",
    "Site",
    "sites",
    "weights_digest",
    "widen_kernel",
]

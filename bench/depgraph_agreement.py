"""Compare the channel analysis with Torch-Pruning's DepGraph, layer by layer, on torchvision and timm models.

For every Conv2d/Linear ``L`` of a model, both tools answer: which Conv2d/Linear layers must
change together when the output channels of ``L`` change?

* the library (:func:`surgery.channels.analyze_channels`): the group of channel 0 of
  ``L``'s output (a layer whose output is later split, by a slice or ``torch.split``, writes
  several groups; channel 0 is in the first), and every Conv2d/Linear among its producers,
  followers (depthwise convs) and consumers;
* DepGraph (``torch_pruning.DependencyGraph().build_dependency(model, example_inputs=x)``):
  ``get_pruning_group(L, prune_conv_out_channels / prune_linear_out_channels, idxs=[0])``
  (torch-pruning switches depthwise convs to its depthwise handler itself), and every
  Conv2d/Linear module that a dependency of the group targets, whatever its handler
  (output channels of a producer, input channels of a consumer, both for a depthwise conv).

A layer *agrees* when the two sets of layer names (``L`` itself included) are equal. Only
the coupling is compared, not whether a change is exact (the library also says why not:
a LayerNorm forbids replication, a model output forbids any change). The layers are the
Conv2d/Linear modules either tool sees in the forward pass (a ``nn.MultiheadAttention``
computes with its ``out_proj`` weights without calling it: neither tool lists it). A layer
is an *analysis error* when the library does not follow its output channels through every
op (a blocker naming an op it "does not follow", or an untracked output).

Disagreements that remain are the cases where DepGraph is wrong: each one has a test in
``tests/test_channels_depgraph.py`` growing the model along the library's grouping (net2wider
at that layer, ``check=True``). torch-pruning is a bench-only dependency.

A model that one of the tools cannot handle at all is listed as not compared and left out
of the totals (DepGraph fails on torchvision's ShuffleNetV2 with a ZeroDivisionError in its
reshape index mapping).

    python bench/depgraph_agreement.py                    # all models below
    python bench/depgraph_agreement.py --models timm:ghostnet_100,tv:resnet18 --show 20

Last line: {"models": N, "layers": L, "agree": A}
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass, field

import torch
import torchvision
from torch import nn

from surgery.channels import ChannelAnalysis, analyze_channels

warnings.filterwarnings("ignore")

MODELS = (
    "tv:resnet18",
    "tv:resnet50",
    "tv:resnext50_32x4d",
    "tv:densenet121",
    "tv:mobilenet_v2",
    "tv:mobilenet_v3_small",
    "tv:efficientnet_b0",
    "tv:regnet_y_400mf",
    "tv:googlenet",
    "tv:squeezenet1_0",
    "tv:convnext_tiny",
    "tv:vit_b_16",
    "tv:shufflenet_v2_x0_5",
    "timm:resnet26d",
    "timm:dla34",
    "timm:ghostnet_100",
    "timm:mixnet_s",
    "timm:cspdarknet53",
    "timm:rexnet_100",
    "timm:cspresnet50",
    "timm:resnetv2_50",
    "timm:res2net50_14w_8s",
)
SIZES = {"tv:vit_b_16": 224}  # torchvision's ViT checks its image size
LAYERS = (nn.Conv2d, nn.Linear)


@dataclass
class ModelResult:
    layers: int = 0
    agree: int = 0
    errors: int = 0
    seconds: float = 0.0
    disagreements: list[tuple[str, list[str], list[str]]] = field(default_factory=list)


def build(spec: str) -> tuple[nn.Module, torch.Tensor]:
    """``tv:NAME`` (torchvision) or ``timm:NAME``, random weights, eval mode, with a small input it accepts."""
    source, _, name = spec.partition(":")
    if source == "tv":
        kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    else:
        import timm

        model = timm.create_model(name, pretrained=False)
    size = SIZES.get(spec, 64)
    return model.eval(), torch.randn(1, 3, size, size)


def library_sets(analysis: ChannelAnalysis) -> tuple[dict[str, set[str]], set[str]]:
    """Per layer: the Conv2d/Linear coupled to channel 0 of its output; and the layers with analysis errors."""
    kinds = {"Conv2d", "Linear"}
    output_node: dict[str, str] = {}
    for group in analysis.groups.values():
        for ep in [*group.producers, *group.followers]:
            if ep.kind in kinds:
                output_node.setdefault(ep.target, ep.node)
    sets: dict[str, set[str]] = {}
    errors: set[str] = set()
    for layer, node in output_node.items():
        layout = analysis.layout(node)
        if layout is None:
            errors.add(layer)
            continue
        group = analysis.groups[layout.segments[0].group]
        sets[layer] = {ep.target for ep in (*group.producers, *group.followers, *group.consumers) if ep.kind in kinds}
        if any("does not follow" in r or "untracked" in r for r in group.blockers):
            errors.add(layer)
    return sets, errors


def depgraph_sets(model: nn.Module, x: torch.Tensor) -> dict[str, set[str]]:
    """Per layer: the Conv2d/Linear modules DepGraph's pruning group of its output channel 0 touches."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    names = {m: n for n, m in model.named_modules()}
    sets: dict[str, set[str]] = {}
    for module in graph.module2node:
        if not isinstance(module, LAYERS):
            continue
        fn = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
        group = graph.get_pruning_group(module, fn, idxs=[0])
        sets[names[module]] = {names[dep.target.module] for dep, _ in group if isinstance(dep.target.module, LAYERS)}
    return sets


def compare(spec: str) -> ModelResult:
    start = time.perf_counter()
    model, x = build(spec)
    ours, errors = library_sets(analyze_channels(model, x))
    theirs = depgraph_sets(model, x)
    result = ModelResult()
    for layer in sorted(set(ours) | set(theirs) | errors):
        result.layers += 1
        mine, other = ours.get(layer, set()), theirs.get(layer, set())
        result.errors += layer in errors
        if mine == other and layer in ours and layer in theirs:
            result.agree += 1
        else:
            result.disagreements.append((layer, sorted(mine - other), sorted(other - mine)))
    result.seconds = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated subset, each tv:NAME or timm:NAME")
    parser.add_argument("--show", type=int, default=5, help="disagreements printed per model")
    args = parser.parse_args()
    specs = args.models.split(",") if args.models else list(MODELS)
    results: dict[str, ModelResult] = {}
    print(f"{'model':28} {'layers':>6} {'agree':>6} {'disagree':>8} {'errors':>6} {'s':>5}")
    for spec in specs:
        try:
            r = results[spec] = compare(spec)
        except Exception as e:  # noqa: BLE001 - a tool that cannot handle a model is reported, not fatal
            print(f"{spec:28} not compared: {type(e).__name__}: {str(e)[:100]}", flush=True)
            continue
        row = f"{r.layers:6d} {r.agree:6d} {r.layers - r.agree:8d} {r.errors:6d} {r.seconds:5.0f}"
        print(f"{spec:28} {row}", flush=True)
    for spec, r in results.items():
        for layer, only_ours, only_theirs in r.disagreements[: args.show]:
            print(f"  {spec} {layer}: only the library {only_ours}; only DepGraph {only_theirs}")
    total = {"models": len(results), "layers": sum(r.layers for r in results.values())}
    total["agree"] = sum(r.agree for r in results.values())
    print(json.dumps(total))


if __name__ == "__main__":
    main()

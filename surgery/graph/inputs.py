"""Example inputs: how a model is called (positional and keyword tensors), their specs, and sensible defaults.

An :class:`Example` is what capture, cut points, FLOP counts and checks run a model on.
It is written as a tensor, a tuple of positional inputs, a dict of keyword inputs, or
from specs: the CLI's ``--input`` grammar is ``[name=][dtype:]d0,d1,...`` per input,
e.g. ``1,3,224,224`` or ``input_ids=int64:1,16 attention_mask=int64:1,16``.

>>> ex = Example.parse(["input_ids=int64:2,16", "attention_mask=int64:2,16"])
>>> ex.describe()
'input_ids=int64:2x16, attention_mask=int64:2x16'
>>> Example.parse(["1,3,32,32"]).args[0].shape
torch.Size([1, 3, 32, 32])
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field, PositiveInt
from torch import fx, nn

from surgery.core.errors import SurgeryError
from surgery.core.schema import FileModel

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_SPEC = re.compile(r"^(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)=)?(?:(?P<dtype>[a-z0-9]+):)?(?P<shape>\d+(?:,\d+)*)$")


MAX_EXAMPLE_ELEMENTS = 1 << 24  # an example input recorded in a file holds at most this many numbers (64 MB of float32)


def check_example_size(shape: list[int]) -> list[int]:
    """A recorded example shape, refused when it would need more than :data:`MAX_EXAMPLE_ELEMENTS` numbers."""
    if math.prod(shape) > MAX_EXAMPLE_ELEMENTS:
        raise ValueError(f"an example input of shape {shape} holds more than {MAX_EXAMPLE_ELEMENTS} numbers")
    return shape


class InputSpec(FileModel):
    """One input: its keyword (None for a positional input), shape and dtype."""

    name: str | None = None
    shape: Annotated[list[PositiveInt], AfterValidator(check_example_size)] = Field(min_length=1)
    dtype: str = "float32"

    def __str__(self) -> str:
        body = f"{self.dtype}:{'x'.join(map(str, self.shape))}"
        return f"{self.name}={body}" if self.name else body


def _fill(spec: InputSpec, vocab: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """A tensor for ``spec``: normal floats; ints are ones for masks and ids below ``vocab`` otherwise."""
    dtype = DTYPES[spec.dtype]
    if dtype.is_floating_point:
        return torch.randn(spec.shape, generator=generator).to(dtype)
    if dtype == torch.bool or (spec.name and "mask" in spec.name):
        return torch.ones(spec.shape, dtype=dtype)
    if spec.name and "type_ids" in spec.name:
        return torch.zeros(spec.shape, dtype=dtype)
    high = max(int(vocab or 2), 2)
    return torch.randint(1, high, spec.shape, generator=generator, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Example:
    """Positional and keyword inputs of one call of a model.

    >>> import torch, surgery
    >>> e = surgery.Example((torch.ones(2, 3),), {"scale": 2.0})
    >>> e(lambda x, scale: x * scale).sum().item()
    12.0
    >>> surgery.Example.parse(["x=int64:1,16"]).kwargs["x"].shape
    torch.Size([1, 16])
    """

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, value: Any) -> Example | None:
        """An Example from a tensor, a tuple/list of positional inputs, a dict of keyword inputs (None stays None)."""
        if value is None or isinstance(value, Example):
            return value
        if isinstance(value, dict):
            return cls((), dict(value))
        if isinstance(value, (tuple, list)):
            return cls(tuple(value), {})
        return cls((value,), {})

    @classmethod
    def required(cls, value: Any, needed_by: str) -> Example:
        """:meth:`of` for an input that must be given: a one-line error naming ``needed_by`` when it is None."""
        example = cls.of(value)
        if example is None:
            raise SurgeryError(f"{needed_by} needs example_input=: an input the model accepts")
        return example

    @classmethod
    def from_specs(cls, specs: Sequence[InputSpec], vocab: int | None = None, seed: int = 0) -> Example:
        """Tensors of the given specs (see :func:`_fill`), positional ones first."""
        generator = torch.Generator().manual_seed(seed)
        args = tuple(_fill(s, vocab, generator) for s in specs if s.name is None)
        kwargs = {s.name: _fill(s, vocab, generator) for s in specs if s.name is not None}
        return cls(args, kwargs)

    @classmethod
    def parse(cls, items: Sequence[str], vocab: int | None = None) -> Example:
        """An Example from ``--input`` items (each may hold several, separated by spaces)."""
        return cls.from_specs(parse_specs(items), vocab)

    def __call__(self, module: nn.Module) -> Any:
        return module(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        return [v for v in (*self.args, *self.kwargs.values()) if isinstance(v, torch.Tensor)]

    def specs(self) -> list[InputSpec]:
        """The specs of every tensor input (non-tensor inputs are not recorded)."""

        def spec(name: str | None, t: torch.Tensor) -> InputSpec:
            return InputSpec(name=name, shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."))

        out = [spec(None, a) for a in self.args if isinstance(a, torch.Tensor)]
        return out + [spec(k, v) for k, v in self.kwargs.items() if isinstance(v, torch.Tensor)]

    def describe(self) -> str:
        return ", ".join(map(str, self.specs()))

    def flat(self, graph: Any) -> list[Any]:
        """The values of ``graph``'s placeholders for this call: keyword inputs by name, positional ones in order.

        Placeholders the call does not give take their default (``None`` when they have none).
        """
        positional, named, out = list(self.args), dict(self.kwargs), []
        for node in (n for n in graph.nodes if n.op == "placeholder"):
            name = str(node.target).lstrip("*")
            if name in named:
                out.append(named.pop(name))
            elif positional:
                out.append(positional.pop(0))
            else:
                out.append(node.args[0] if node.args else None)
        return out

    def to(self, device: torch.device | str) -> Example:
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Example(tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()})


def parse_specs(items: Sequence[str]) -> list[InputSpec]:
    """``["input_ids=int64:1,16 attention_mask=int64:1,16"]`` -> specs; one-line errors."""
    specs = []
    for item in (part for text in items for part in text.split()):
        m = _SPEC.match(item.strip())
        if m is None:
            raise SurgeryError(
                f"--input '{item}' is not [name=][dtype:]shape; write e.g. 1,3,224,224 or input_ids=int64:1,16"
            )
        dtype = m["dtype"] or ("int64" if m["name"] and ("ids" in m["name"] or "mask" in m["name"]) else "float32")
        if dtype not in DTYPES:
            raise SurgeryError(f"--input '{item}': unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
        shape = [int(d) for d in m["shape"].split(",")]
        if not all(shape):
            raise SurgeryError(f"--input '{item}' has a zero-sized dimension; give positive sizes")
        specs.append(InputSpec(name=m["name"], shape=shape, dtype=dtype))
    names = [s.name for s in specs if s.name]
    if len(names) != len(set(names)):
        raise SurgeryError(f"--input names an input twice ({', '.join(names)}); give each once")
    return specs


def vocab_size(model: nn.Module) -> int | None:
    """The vocabulary size of a language model (its config's, or its input embedding's), else None."""
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if isinstance(size, int):
        return size
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return emb.num_embeddings if isinstance(emb, nn.Embedding) else None


def default_example(model: nn.Module, batch: int = 1) -> Example:
    """An input ``model`` accepts, guessed from what it is: Hugging Face (by its main input), timm, or an image net.

    Text models get ``input_ids`` of 16 tokens (and ``decoder_input_ids`` for
    encoder-decoders), as they are called at their simplest; vision models
    ``pixel_values`` of their configured image size; speech models a second of audio
    (``input_values``) or log-mel features (``input_features``); everything else a
    224x224 image (299 for Inception v3), or the size timm's config names.
    """
    declared = declared_example(model, batch)
    if declared is not None:
        return declared
    size = _image_size(model)
    return Example((torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)),), {})


def declared_example(model: nn.Module, batch: int = 1) -> Example | None:
    """The input a model declares by its main input (Hugging Face's ``main_input_name``), else None.

    >>> import torchvision
    >>> declared_example(torchvision.models.resnet18()) is None
    True
    """
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is not None and isinstance(main, str):
        return Example.from_specs(_hf_specs(model, config, main, batch), vocab_size(model))
    return recorded_example(model, batch)


def recorded_example(model: nn.Module, batch: int = 1) -> Example | None:
    """The input a graph captured by torch.export records (its placeholders' values), by name; else None.

    A grown or edited Hugging Face model is such a graph: it no longer has a config to
    declare its input, but each placeholder keeps the dtype and shape export saw (a
    symbolic size takes the size export ran on; the batch is ``batch``). Token ids are
    drawn below the smallest embedding table of the graph.
    """
    if not isinstance(model, fx.GraphModule):
        return None
    specs = []
    for node in (n for n in model.graph.nodes if n.op == "placeholder"):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not value.dim():
            return None
        shape = [batch] + [d if isinstance(d, int) else int(d.node.hint or 2) for d in value.shape[1:]]
        specs.append(InputSpec(name=str(node.target), shape=shape, dtype=str(value.dtype).removeprefix("torch.")))
    tables = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return Example.from_specs(specs, min(tables, default=2)) if specs else None


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first floating-point parameter (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


CANDIDATE_SIZES = (64, 32, 96, 224, 299)  # image sides tried for a net that declares no input, smallest cost first


def candidate_examples(model: nn.Module, first_layer: nn.Module | None = None, batch: int = 2) -> list[Example]:
    """Inputs to try, in order, when none is given: the declared one, else images (a Linear first layer: vectors).

    ``first_layer`` is the layer the input goes to first (its channels or features set
    the input's); the images are seeded random ``batch x C x S x S`` for S in
    :data:`CANDIDATE_SIZES`, in the model's dtype.

    >>> import torchvision
    >>> [ex.describe() for ex in candidate_examples(torchvision.models.resnet18())][:2]
    ['float32:2x3x64x64', 'float32:2x3x32x32']
    """
    declared = declared_example(model, batch)
    if declared is not None:
        return [declared]
    dtype = model_dtype(model)
    generator = torch.Generator().manual_seed(0)
    shapes: list[tuple[int, ...]]
    if isinstance(first_layer, nn.Linear):
        shapes = [(batch, first_layer.in_features)]
    else:
        channels = first_layer.in_channels if isinstance(first_layer, nn.Conv2d) else 3
        shapes = [(batch, channels, s, s) for s in CANDIDATE_SIZES]
    return [Example((torch.randn(s, generator=generator, dtype=dtype),), {}) for s in shapes]


def _hf_specs(model: nn.Module, config: Any, main: str, batch: int) -> list[InputSpec]:
    if main == "input_ids":  # the model's minimal call: optional inputs (a mask) keep their defaults
        specs = [InputSpec(name="input_ids", shape=[batch, 16], dtype="int64")]
        if getattr(config, "is_encoder_decoder", False):
            specs.append(InputSpec(name="decoder_input_ids", shape=[batch, 16], dtype="int64"))
        return specs
    if main == "pixel_values":
        side = getattr(config, "image_size", 224)
        side = side if isinstance(side, int) else int(side[0])
        channels = int(getattr(config, "num_channels", 3))
        return [InputSpec(name="pixel_values", shape=[batch, channels, side, side])]
    if main == "input_features":
        bins = int(getattr(config, "num_mel_bins", 80))
        frames = 2 * int(getattr(config, "max_source_positions", 1500))
        return [InputSpec(name="input_features", shape=[batch, bins, frames])]
    if main == "input_values":
        return [InputSpec(name="input_values", shape=[batch, 16000])]
    raise SurgeryError(
        f"{type(model).__name__} takes '{main}'; pass an example input (CLI: --input {main}=dtype:shape)"
    )


def _image_size(model: nn.Module) -> int:
    """The image side ``model`` was built for: its patch embedding's (timm with ``img_size=``), else its config's."""
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(built, int) or (isinstance(built, (tuple, list)) and built and isinstance(built[-1], int)):
        return int(built if isinstance(built, int) else built[-1])
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)):
        return int(cfg["input_size"][-1])
    return 299 if type(model).__name__ == "Inception3" else 224

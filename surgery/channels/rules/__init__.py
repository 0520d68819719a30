"""The channel rules, one module per family of ops; importing this package registers them all.

Each family module adds its rules to the tables of :mod:`surgery.channels.registry`:
:mod:`~surgery.channels.rules.attention` (``nn.MultiheadAttention``),
:mod:`~surgery.channels.rules.layers` (Conv2d, Linear, batch/instance norms, PReLU, ``F.conv2d``, ``F.linear``),
:mod:`~surgery.channels.rules.norms` (layer norms),
:mod:`~surgery.channels.rules.functional_norms` (``F.batch_norm``, ``F.instance_norm``, group norms),
:mod:`~surgery.channels.rules.elementwise` (activations, dropout, arithmetic),
:mod:`~surgery.channels.rules.shape_ops` (flatten, reshape and channel shuffles, permute, transpose, unsqueeze,
padding, indexing, size),
:mod:`~surgery.channels.rules.slicing` (channel slices, ``split`` and ``chunk``),
:mod:`~surgery.channels.rules.joins` (concatenation),
:mod:`~surgery.channels.rules.reductions` (pooling, softmax, mean/sum/amax/amin) and
:mod:`~surgery.channels.rules.aten` (the aten ops of graphs torch.export captured; embeddings, ``Conv1D``,
attention).
"""

from surgery.channels.rules import (
    aten,
    attention,
    elementwise,
    functional_norms,
    joins,
    layers,
    norms,
    reductions,
    shape_ops,
    slicing,
)

__all__ = [
    "aten",
    "attention",
    "elementwise",
    "functional_norms",
    "joins",
    "layers",
    "norms",
    "reductions",
    "shape_ops",
    "slicing",
]

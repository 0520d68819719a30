"""surgery.models: Building models by name: torchvision, ``package.module:callable`` and the other ecosystems
(``timm:``, ``hf:``). May import ``surgery.core`` and ``surgery.graph``.
"""

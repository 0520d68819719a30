"""surgery.files: Files: saving and loading models and pieces (safetensors and a JSON recipe, never pickles), the
recipe file's schema, and the one grammar of model references. May import every room below it
(core, graph, pieces, channels, models).
"""

"""lcv: long-context vision-language models in JAX/Flax.

Import submodules explicitly (`lcv.masks`, `lcv.attention`, `lcv.models.vlm`, ...); this package
init stays empty so that importing one part never pulls in the others.
"""

__version__ = "0.1.0"

"""Models: vision encoder, projector, decoder LLM, the VLM that joins them, loss and generation.

Import the submodules explicitly (`lcv.models.decoder`, `lcv.models.vlm`, ...). Sizes are rows of
the variant tables in `lcv.config` (`DECODER_VARIANTS`, `VISION_VARIANTS`); a new module appears
here only when the computation differs. docs/models.md describes the parameter trees.
"""

"""Experiment configs: each file's `get_config(arg)` returns a typed `lcv.config.RunConfig`.

Scripts load them by path (`--config configs/NAME.py[:knob=value,...]`), so every file stands
alone; its docstring holds the command that runs it, and the few knobs worth sweeping are parsed
from `arg`. Model sizes come from the variant tables in `lcv.config`.
"""

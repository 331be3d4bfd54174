"""Typed configuration: frozen dataclasses, one per component.

Configs are code (`configs/*.py` return these); layers receive their own sub-config, never the
whole run config. Sizes are table rows (see `lcv.models`), not subclasses.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

# --- rope / positions ---

# --- models: vision / projector ---

# --- models: decoder / vlm ---

# --- mesh / parallelism ---

# --- data / training ---

# --- evaluation ---

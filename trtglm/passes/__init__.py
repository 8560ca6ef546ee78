"""Graph passes. Each pass mutates a gs.Graph in place and returns how many rewrites it made.

The order is explicit (DEFAULT_PIPELINE); there is no registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs


@dataclass
class PassContext:
    """What passes may need besides the graph; grows only when a pass needs it."""

    opset: int = 17
    log: list[str] = field(default_factory=list)

"""Graph passes. Each pass mutates a gs.Graph in place and returns how many rewrites it made.

The order is explicit (DEFAULT_PIPELINE); there is no registry.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs


@dataclass
class PassContext:
    """What passes may need besides the graph; grows only when a pass needs it."""

    opset: int = 17
    log: list[str] = field(default_factory=list)
    attention: str = "decomposed"  # --attention: "native" rewrites to the opset-23 Attention op
    # blocks a pass recognised but left decomposed (GELU below opset 20, attention in decomposed mode, RMSNorm
    # below opset 23), by kind: TensorRT still sees them, and the fusion summary counts them
    recognised: Counter = field(default_factory=Counter)
    # per-channel (mean, std) of each BatchNorm output, from its beta and |gamma| (fold_batchnorm; equalize rescales
    # them with the channels): what analytic bias correction knows of a layer's input without data
    normals: dict = field(default_factory=dict)


# The FP32 passes, in order: pass-throughs go first (a weight behind an Identity is not a constant), folding
# then turns weight arithmetic, Constant nodes and static shape subgraphs into initializers; fuse_layernorm and
# fold_batchnorm need those constants (epsilon, gamma/beta; BN parameters and Conv/Gemm weights); fold_batchnorm's
# Mul+Add have a variable input, so a second fold after it would find nothing. fuse_attention matches from the
# Softmax back to the per-head Q/K/V tensors, so it does not care whether fuse_qkv has merged the projections
# before them; fuse_qkv goes last so that each attention block is recognised on the exporter's own graph.
from trtglm.passes.fold_batchnorm import fold_batchnorm  # noqa: E402
from trtglm.passes.fold_constants import fold_constants  # noqa: E402
from trtglm.passes.fuse_attention import fuse_attention  # noqa: E402
from trtglm.passes.fuse_gelu import fuse_gelu  # noqa: E402
from trtglm.passes.fuse_layernorm import fuse_layernorm  # noqa: E402
from trtglm.passes.fuse_qkv import fuse_qkv  # noqa: E402
from trtglm.passes.remove_identity import remove_identity  # noqa: E402
from trtglm.passes.run import fusion_summary, run_passes  # noqa: E402

DEFAULT_PIPELINE = (remove_identity, fold_constants, fuse_layernorm, fuse_gelu, fuse_attention, fuse_qkv,
                    fold_batchnorm)

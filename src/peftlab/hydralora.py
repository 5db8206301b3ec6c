"""``from peftlab.hydralora import estimate_num_heads``: the documented import path, kept.

The clustering lives in :mod:`peftlab.data.clusters`; the method itself in :mod:`peftlab.methods.hydralora`.
"""

from peftlab.data.clusters import elbow_from_gains, estimate_num_heads

__all__ = ["elbow_from_gains", "estimate_num_heads"]

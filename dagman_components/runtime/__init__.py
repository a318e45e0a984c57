"""How a process runs: its DDP rank and the rank-0 handler policy, ``torch.compile``, progress bars.

- :mod:`~dagman_components.runtime.distributed`: rank, world size and :class:`HandlerGroup`;
- :mod:`~dagman_components.runtime.compilation`: ``torch.compile`` in place with the state-dict keys kept;
- :mod:`~dagman_components.runtime.progress`: the one progress bar of long loops.
"""

from dagman_components.runtime import compilation, distributed, progress

__all__ = ["compilation", "distributed", "progress"]

"""lowband for PyTorch: tensors in and out, torch.distributed collectives,
DDP communication hooks.

``import lowband`` never imports torch; this subpackage does, and needs it
installed (``pip install torch``)::

    import lowband.torch
    comm = lowband.torch.ProcessGroupCommunicator()          # after init_process_group
    state = lowband.torch.hooks.CompressionState(compressor="topk:0.01", feedback="ef")
    ddp.register_comm_hook(state, lowband.torch.hooks.compression_hook)
"""
try:
    import torch as _torch  # noqa: F401
    import torch.distributed as _dist  # noqa: F401
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError("lowband.torch needs PyTorch: pip install torch "
                      f"(or pip install 'lowband[torch]'); importing it failed: {_exc}") from _exc

from .comm import ProcessGroupCommunicator
from . import hooks

__all__ = ["ProcessGroupCommunicator", "hooks"]

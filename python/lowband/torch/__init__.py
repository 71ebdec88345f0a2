"""lowband for PyTorch.  ``import lowband`` never imports torch; this
subpackage does and needs it installed (``pip install torch``)."""
try:
    import torch as _torch  # noqa: F401
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError("lowband.torch needs PyTorch: pip install torch "
                      f"(or pip install 'lowband[torch]'); importing it failed: {_exc}") from _exc

from . import moe  # noqa: E402

__all__ = ["moe"]

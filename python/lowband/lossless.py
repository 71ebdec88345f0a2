"""An optional lossless stage for any payload: ``+zstd`` (Zstandard, through
the ``zstandard`` package: ``pip install lowband[zstd]``).

``zstd(payload, level=3)`` wraps the encoded bytes of any payload (sparse,
quantized or dense) into a ``Quantized`` of scheme ``zstd`` with the same
shape and dtype: the wire carries the compressed bytes, ``payload.nbytes``
is exact, ``dequantize()`` gives the inner payload's dense tensor and
``unwrap(q)`` the inner payload itself.  ``decode`` checks the inner bytes
as strictly as any payload (the decompressed size is bounded by the header,
the inner payload must have the same shape and dtype and must not be
another zstd payload).  In a spec, a last stage ``+zstd`` (or
``+zstd:level=N``) wraps whatever the stages before it produce:
``"topk:0.01+zstd"``, ``"sign+zstd"``, ``"topk:0.01+blockwise:4+zstd"``.
"""
from __future__ import annotations

import numpy as np

from ._payload import Dense, Quantized, Scheme, Sparse, register_scheme
from ._validate import check_int

__all__ = ["zstd", "unwrap", "ZstdScheme"]

MAX_RAW = 1 << 40


def _zstandard():
    try:
        import zstandard
    except ImportError:
        raise ModuleNotFoundError("the zstd stage needs the zstandard package: "
                                  "pip install 'lowband[zstd]'") from None
    return zstandard


class ZstdScheme(Scheme):
    """The encoded bytes of an inner payload, Zstandard-compressed."""
    name, wire_id = "zstd", 13
    params = (("level", "u"), ("raw", "u"), ("nbytes", "u"))
    arrays = ("data",)

    def layout(self, params, size, dtype):
        for name, hi in (("level", 22), ("raw", MAX_RAW), ("nbytes", MAX_RAW)):
            if params[name] > hi:
                raise ValueError(f"{name}: expected at most {hi}, got {params[name]}")
        return {"data": (np.uint8, params["nbytes"])}

    def inner(self, q):
        from .wire import decode
        zs = _zstandard()
        raw_len = q.params["raw"]
        try:
            raw = zs.ZstdDecompressor().decompress(q.arrays["data"].tobytes(), max_output_size=raw_len)
        except zs.ZstdError as exc:
            raise ValueError(f"data: not a Zstandard frame of at most {raw_len} bytes ({exc})") from None
        if len(raw) != raw_len:
            raise ValueError(f"data: decompresses to {len(raw)} bytes, the header says {raw_len}")
        p = decode(raw, expect_shape=q.shape, expect_dtype=q.dtype)
        if isinstance(p, Quantized) and p.scheme == self.name:
            raise ValueError("data: a zstd payload inside a zstd payload")
        return p

    def check(self, q):
        self.inner(q)

    def dequantize(self, q, out, threads):
        p = self.inner(q)
        view = out.reshape(q.shape)
        if isinstance(p, Quantized):
            p.dequantize(out=view, threads=threads)
        elif isinstance(p, Sparse):
            p.to_dense(out=view, threads=threads)
        else:
            view[...] = p.array


SCHEME = register_scheme(ZstdScheme())


def zstd(payload, level=3):
    """``payload`` (Sparse, Quantized or Dense) with its encoded bytes
    Zstandard-compressed at ``level`` (1..22), as a ``zstd`` Quantized."""
    from .wire import encode
    if not isinstance(payload, (Sparse, Quantized, Dense)):
        raise TypeError(f"payload: expected a Sparse, Quantized or Dense, got {type(payload).__name__}")
    if isinstance(payload, Quantized) and payload.scheme == "zstd":
        raise ValueError("payload: already a zstd payload")
    level = check_int(level, "level", 1, 22)
    raw = encode(payload)
    data = np.frombuffer(_zstandard().ZstdCompressor(level=level).compress(raw), np.uint8).copy()
    return Quantized._make("zstd", payload.shape, payload.dtype,
                           {"level": level, "raw": len(raw), "nbytes": data.size}, {"data": data})


def unwrap(q):
    """The inner payload of a ``zstd`` payload."""
    if not isinstance(q, Quantized) or q.scheme != "zstd":
        raise TypeError(f"q: expected a zstd payload, got {getattr(q, 'scheme', type(q).__name__)}")
    return SCHEME.inner(q)

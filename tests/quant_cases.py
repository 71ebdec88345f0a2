"""The quantizers under test, each paired with its NumPy twin: shared by
the tests/test_quant*.py files."""
import numpy as np

import lowband
from lowband import _reference as ref


def _emax(dt):
    return {np.dtype(np.float16): 15, np.dtype(np.float64): 1023}.get(np.dtype(dt), 127)


# name -> (lowband call, twin call returning the payload arrays in order)
CASES = {
    "sign_l1": (lambda x, **k: lowband.sign(x, **k),
                lambda x: ref.sign(x, "l1", 0)),
    "sign_rms_b64": (lambda x, **k: lowband.sign(x, scale="rms", block=64, **k),
                     lambda x: ref.sign(x, "rms", 64)),
    "sign_l1_b100": (lambda x, **k: lowband.sign(x, block=100, **k),
                     lambda x: ref.sign(x, "l1", 100)),
    "sign_none": (lambda x, **k: lowband.sign(x, scale="none", **k),
                  lambda x: ref.sign(x, "none", 0)),
    "q4": (lambda x, **k: lowband.quantize(x, 4, **k), lambda x: ref.quantize(x, 4, 64)),
    "q8_b100": (lambda x, **k: lowband.quantize(x, 8, block=100, **k),
                lambda x: ref.quantize(x, 8, 100)),
    "q3_tensor": (lambda x, **k: lowband.quantize(x, 3, block=None, **k),
                  lambda x: ref.quantize(x, 3, 0)),
    "q2": (lambda x, **k: lowband.quantize(x, 2, block=32, **k), lambda x: ref.quantize(x, 2, 32)),
    "q1": (lambda x, **k: lowband.quantize(x, 1, block=64, **k), lambda x: ref.quantize(x, 1, 64)),
    "q4_sr": (lambda x, **k: lowband.quantize(x, 4, rounding="stochastic", seed=5, step=2, **k),
              lambda x: ref.quantize(x, 4, 64, True, 5, 2)),
    "q4_sr_b8": (lambda x, **k: lowband.quantize(x, 4, block=8, rounding="stochastic", seed=7,
                                                 step=1, **k),
                 lambda x: ref.quantize(x, 4, 8, True, 7, 1)),
    "q1_sr": (lambda x, **k: lowband.quantize(x, 1, block=7, rounding="stochastic", seed=5, **k),
              lambda x: ref.quantize(x, 1, 7, True, 5, 0)),
    "q8_sr_big": (lambda x, **k: lowband.quantize(x, 8, block=100000, rounding="stochastic",
                                                  seed=2**63 + 1, **k),
                  lambda x: ref.quantize(x, 8, 100000, True, 2**63 + 1, 0)),
    "qsgd": (lambda x, **k: lowband.qsgd(x, 4, seed=9, **k), lambda x: ref.qsgd(x, 4, 0, 9, 0)),
    "qsgd_b128": (lambda x, **k: lowband.qsgd(x, 127, seed=9, step=3, block=128, **k),
                  lambda x: ref.qsgd(x, 127, 128, 9, 3)),
    "terngrad": (lambda x, **k: lowband.terngrad(x, seed=4, **k),
                 lambda x: ref.terngrad(x, 2.5, 4, 0)),
    "terngrad_noclip": (lambda x, **k: lowband.terngrad(x, seed=4, clip=None, **k),
                        lambda x: ref.terngrad(x, None, 4, 0)),
    "natural": (lambda x, **k: lowband.natural(x, seed=6, step=1, **k),
                lambda x: ref.natural(x, _emax(x.dtype), 6, 1)),
    "e3m0": (lambda x, **k: lowband.minifloat(x, 3, 0, **k),
             lambda x: ref.minifloat(x, 3, 0, 128)),
    "e2m1_b32": (lambda x, **k: lowband.minifloat(x, 2, 1, block=32, **k),
                 lambda x: ref.minifloat(x, 2, 1, 32)),
    "e3m0_b8": (lambda x, **k: lowband.minifloat(x, 3, 0, block=8, **k),
                lambda x: ref.minifloat(x, 3, 0, 8)),
    "e4m3_tensor": (lambda x, **k: lowband.minifloat(x, 4, 3, block=None, **k),
                    lambda x: ref.minifloat(x, 4, 3, 0)),
    "lut2bit": (lambda x, **k: lowband.lut2bit(x, **k), ref.lut2bit),
}

UNBIASED = ("q4_sr", "q4_sr_b8", "q1_sr", "qsgd", "qsgd_b128", "terngrad_noclip", "natural")


def payload_arrays(p):
    return [p.arrays[name] for name in lowband._payload.get_scheme(p.scheme).arrays]


def twin_dequantize(p):
    """Decode a payload with the NumPy twins (the oracle for dequantize)."""
    from lowband import _schemes as S
    a, prm, n = p.arrays, p.params, p.size
    if p.scheme in ("float16", "bfloat16"):
        c = a["codes"]
        v = c.view(np.float16).astype(np.float32) if p.scheme == "float16" else ref.from_bfloat16_bits(c)
        return v.astype(p.dtype).reshape(p.shape)
    sch = S.SCHEMES[p.scheme]
    if p.scheme == "sign":
        args = (1, [-1.0, 1.0], a["scales"] if prm["scale"] else None, prm["block"])
    elif p.scheme.startswith("blockwise"):
        b = prm["bits"]
        table = [-1.0, 1.0] if b == 1 else np.arange(1 << b) - sch.levels(b)
        args = (b, table, a["scales"], prm["block"])
    elif p.scheme == "qsgd":
        s = prm["levels"]
        wd = np.float64 if p.dtype == np.float64 else np.float32
        args = (ref.qsgd_bits(s), np.arange(1 << ref.qsgd_bits(s)) - s,
                a["scales"].astype(wd) / wd(s), prm["block"])
    elif p.scheme == "terngrad":
        args = (2, [-1.0, 0.0, 1.0, 2.0], a["scales"], 0)
    elif p.scheme == "natural":
        args = (8, sch.table(int(a["top"][0])), None, 0)
    elif p.scheme == "minifloat":
        E, M = prm["exp_bits"], prm["man_bits"]
        args = (1 + E + M, sch.table(E, M), np.ldexp(1.0, a["exponents"].astype(int)), prm["block"])
    else:
        args = (2, a["table"], None, 0)
    bits, table, mult, block = args
    return ref.table_decode(a["codes"], n, bits, table, mult, block, p.dtype).reshape(p.shape)

/*
 * pack.c - bit streams of 1..16-bit codes (docs/quantization.md): packing
 * from any integer width, unpacking to uint8/uint16 and the validation of
 * untrusted streams.  Work is split into LB_CHUNK-element chunks (a multiple
 * of 8 elements, so every chunk starts at a whole byte); eight codes of b
 * bits fill exactly b bytes, so groups of 8 are packed independently.
 */
#include <string.h>

#include "lowband.h"
#include "quant.h"
#include "threads.h"

/* Code i of a source array of `width`-byte integers, and whether it fits. */
static inline int code_at(const void *codes, int width, int is_signed,
                          uint64_t i, int bits, uint32_t *out)
{
    uint64_t u;
    int neg = 0;
    switch (width) {
    case 1: u = ((const uint8_t *)codes)[i]; neg = is_signed && (u & 0x80); break;
    case 2: u = ((const uint16_t *)codes)[i]; neg = is_signed && (u & 0x8000); break;
    case 4: u = ((const uint32_t *)codes)[i]; neg = is_signed && (u >> 31); break;
    default: u = ((const uint64_t *)codes)[i]; neg = is_signed && (u >> 63); break;
    }
    *out = (uint32_t)u;
    return !neg && (u >> bits) == 0;
}

/* Up to 8 codes (cnt) of up to 16 bits into ceil(cnt * bits / 8) bytes. */
static inline void put_group(const uint32_t *c, int cnt, int bits, uint8_t *out)
{
    unsigned __int128 acc = 0;
    for (int j = 0; j < cnt; j++)
        acc |= (unsigned __int128)c[j] << (j * bits);
    int nbytes = (cnt * bits + 7) / 8;
    for (int k = 0; k < nbytes; k++)
        out[k] = (uint8_t)(acc >> (8 * k));
}

static inline void get_group(const uint8_t *buf, int cnt, int bits, uint32_t *c)
{
    unsigned __int128 acc = 0;
    int nbytes = (cnt * bits + 7) / 8;
    for (int k = 0; k < nbytes; k++)
        acc |= (unsigned __int128)buf[k] << (8 * k);
    uint32_t mask = (1u << bits) - 1;
    for (int j = 0; j < cnt; j++)
        c[j] = (uint32_t)(acc >> (j * bits)) & mask;
}

lb_status lb_pack_bits(const void *codes, int width, int is_signed, uint64_t n,
                       int bits, uint8_t *out, int nthreads, lb_error *err)
{
    if (bits < 1 || bits > 16 || !(width == 1 || width == 2 || width == 4 || width == 8) ||
        (n && (!codes || !out)))
        return LB_EINVAL;
    const lb_quant_fns *fns = lb_quant();
    uint64_t nchunks = lb_num_chunks(n, LB_CHUNK);
    int team = lb_team(nthreads, nchunks);
    uint64_t bad = UINT64_MAX;
    LB_OMP(omp parallel for num_threads(team) schedule(static) reduction(min:bad) if(team > 1))
    for (uint64_t k = 0; k < nchunks; k++) {
        uint64_t s = k * LB_CHUNK, e = n - s < LB_CHUNK ? n : s + LB_CHUNK;
        uint64_t chunk_bad = UINT64_MAX;
        if (width == 1 && !is_signed && bits <= 8) {   /* fast path */
            const uint8_t *c = (const uint8_t *)codes;
            uint8_t hi = 0;
            for (uint64_t i = s; i < e; i++)
                hi |= (uint8_t)(c[i] >> bits);
            if (hi) {
                for (uint64_t i = s; i < e && chunk_bad == UINT64_MAX; i++)
                    if (c[i] >> bits)
                        chunk_bad = i;
            } else {
                fns->pack(c + s, e - s, bits, out + s / 8 * (uint64_t)bits);
            }
        } else {
            for (uint64_t g = s; g < e && chunk_bad == UINT64_MAX; g += 8) {
                uint32_t c[8];
                int cnt = e - g < 8 ? (int)(e - g) : 8;
                for (int j = 0; j < cnt; j++)
                    if (!code_at(codes, width, is_signed, g + (uint64_t)j, bits, &c[j])) {
                        chunk_bad = g + (uint64_t)j;
                        break;
                    }
                if (chunk_bad == UINT64_MAX)
                    put_group(c, cnt, bits, out + g / 8 * (uint64_t)bits);
            }
        }
        if (chunk_bad < bad)
            bad = chunk_bad;
    }
    if (bad != UINT64_MAX) {
        if (err)
            err->index = bad;
        return LB_ERANGE;
    }
    return LB_OK;
}

lb_status lb_unpack_bits(const uint8_t *buf, uint64_t len, uint64_t n, int bits,
                         void *codes, int width, int nthreads)
{
    if (bits < 1 || bits > 16 || !(width == 1 || width == 2) ||
        (width == 1 && bits > 8) || (n && (!buf || !codes)) ||
        n > ((uint64_t)1 << 60) || len < lb_packed_bytes(n, bits))
        return LB_EINVAL;
    const lb_quant_fns *fns = lb_quant();
    uint64_t nchunks = lb_num_chunks(n, LB_CHUNK);
    int team = lb_team(nthreads, nchunks);
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
    for (uint64_t k = 0; k < nchunks; k++) {
        uint64_t s = k * LB_CHUNK, e = n - s < LB_CHUNK ? n : s + LB_CHUNK;
        const uint8_t *src = buf + s / 8 * (uint64_t)bits;
        if (width == 1) {
            fns->unpack(src, e - s, bits, (uint8_t *)codes + s);
            continue;
        }
        uint16_t *dst = (uint16_t *)codes + s;
        for (uint64_t g = 0; g < e - s; g += 8) {
            uint32_t c[8];
            int cnt = e - s - g < 8 ? (int)(e - s - g) : 8;
            get_group(src + g / 8 * (uint64_t)bits, cnt, bits, c);
            for (int j = 0; j < cnt; j++)
                dst[g + (uint64_t)j] = (uint16_t)c[j];
        }
    }
    return LB_OK;
}

lb_status lb_check_codes(const uint8_t *buf, uint64_t n, int bits,
                         uint32_t maxcode, uint32_t forbidden, lb_error *err)
{
    if (bits < 1 || bits > 16 || (n && !buf) || n > ((uint64_t)1 << 60))
        return LB_EINVAL;
    uint32_t top = (uint32_t)((1u << bits) - 1);
    int need = maxcode < top || forbidden <= top;
    if (need && bits <= 8) {   /* fast path: unpack tiles of uint8 codes */
        const lb_quant_fns *fns = lb_quant();
        uint8_t tile[4096];
        for (uint64_t t = 0; t < n; t += 4096) {
            uint64_t m = n - t < 4096 ? n - t : 4096;
            fns->unpack(buf + t / 8 * (uint64_t)bits, m, bits, tile);
            uint8_t bad = 0;
            for (uint64_t j = 0; j < m; j++)
                bad |= (uint8_t)((tile[j] > maxcode) | (tile[j] == forbidden));
            if (bad)
                for (uint64_t j = 0; j < m; j++)
                    if (tile[j] > maxcode || tile[j] == forbidden) {
                        if (err)
                            err->index = t + j;
                        return LB_EFORMAT;
                    }
        }
        need = 0;
    }
    for (uint64_t g = 0; g < n && need; g += 8) {
        uint32_t c[8];
        int cnt = n - g < 8 ? (int)(n - g) : 8;
        get_group(buf + g / 8 * (uint64_t)bits, cnt, bits, c);
        for (int j = 0; j < cnt; j++)
            if (c[j] > maxcode || c[j] == forbidden) {
                if (err)
                    err->index = g + (uint64_t)j;
                return LB_EFORMAT;
            }
    }
    uint64_t used = (n % 8) * (uint64_t)bits % 8;
    if (used && (buf[lb_packed_bytes(n, bits) - 1] >> used)) {
        if (err)
            err->index = n;
        return LB_EFORMAT;
    }
    return LB_OK;
}

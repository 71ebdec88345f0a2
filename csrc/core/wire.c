/*
 * wire.c - the byte-level pieces of the wire format (docs/formats.md) that
 * need speed or careful bounds: CRC-32C and the three index encodings.  The
 * framing itself (header, sections) is written and parsed by
 * python/lowband/wire.py, and for the common payloads in one call by the
 * fast path of csrc/python/wire_glue.c (wire_encode / wire_decode).
 * Decoders treat their input as hostile: every read is bounds-checked and
 * every decoded index is checked for order and range before it is stored.
 */
#include <string.h>

#include "lowband.h"

/* ---- CRC-32C ------------------------------------------------------------- */

static uint32_t crc_table[8][256];
static volatile int crc_table_ready = 0;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int j = 0; j < 8; j++)
            c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^
                              crc_table[0][crc_table[t - 1][i] & 0xff];
    crc_table_ready = 1;
}

/* Slicing-by-8 over the table (portable path). */
static uint32_t crc_sw(uint32_t crc, const uint8_t *p, size_t len)
{
    if (!crc_table_ready)
        crc_init();   /* idempotent: racing initialisers write equal tables */
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc;   /* little-endian */
        crc = crc_table[7][w & 0xff] ^ crc_table[6][(w >> 8) & 0xff] ^
              crc_table[5][(w >> 16) & 0xff] ^ crc_table[4][(w >> 24) & 0xff] ^
              crc_table[3][(w >> 32) & 0xff] ^ crc_table[2][(w >> 40) & 0xff] ^
              crc_table[1][(w >> 48) & 0xff] ^ crc_table[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len--)
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
    return crc;
}

/* a(x) * b(x) mod P(x) for reflected CRC-32C register values (zlib's
 * multmodp, with the Castagnoli polynomial); a must be nonzero (every
 * caller passes a power of x mod P, which never is zero). */
static uint32_t crc_mulmod(uint32_t a, uint32_t b)
{
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0)
                break;
        }
        m >>= 1;
        b = b & 1 ? (b >> 1) ^ 0x82F63B78u : b >> 1;
    }
    return p;
}

/* x^(8 * nbytes) mod P(x): the operator that advances a CRC register over
 * nbytes zero bytes (square-and-multiply over x^(2^k)). */
static uint32_t crc_shift_op(uint64_t nbytes)
{
    uint32_t result = 1u << 31, pow2 = 1u << 30;   /* x^0, x^1 */
    uint64_t e = nbytes * 8;
    while (e) {
        if (e & 1)
            result = crc_mulmod(pow2, result);
        pow2 = crc_mulmod(pow2, pow2);
        e >>= 1;
    }
    return result;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint64_t crc_hw_run(uint64_t c,
                                                              const uint8_t *p,
                                                              size_t words)
{
    for (size_t i = 0; i < words; i++) {
        uint64_t w;
        memcpy(&w, p + 8 * i, 8);
        c = __builtin_ia32_crc32di(c, w);
    }
    return c;
}

/* The crc32 instruction has a latency of 3 cycles and a throughput of one
 * per cycle, so large inputs run as three independent streams over three
 * consecutive thirds, joined by shifting the first two registers over the
 * bytes that follow them (crc(A|B) = shift(crc(A), |B|) ^ crc0(B)). */
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc,
                                                          const uint8_t *p,
                                                          size_t len)
{
    uint64_t c = crc;
    size_t op_lane = 0;
    uint32_t op = 0;
    while (len >= 3 * 4096) {
        size_t words = len / 24 > 8192 ? 8192 : len / 24;   /* per stream */
        size_t lane = 8 * words;
        uint64_t c0 = c, c1 = 0, c2 = 0;
        const uint8_t *p1 = p + lane, *p2 = p + 2 * lane;
        for (size_t i = 0; i < words; i++) {
            uint64_t w0, w1, w2;
            memcpy(&w0, p + 8 * i, 8);
            memcpy(&w1, p1 + 8 * i, 8);
            memcpy(&w2, p2 + 8 * i, 8);
            c0 = __builtin_ia32_crc32di(c0, w0);
            c1 = __builtin_ia32_crc32di(c1, w1);
            c2 = __builtin_ia32_crc32di(c2, w2);
        }
        if (lane != op_lane) {   /* every block but the last has 64 KiB lanes */
            op = crc_shift_op(lane);
            op_lane = lane;
        }
        c = crc_mulmod(op, crc_mulmod(op, (uint32_t)c0) ^ (uint32_t)c1) ^ (uint32_t)c2;
        p += 3 * lane;
        len -= 3 * lane;
    }
    c = crc_hw_run(c, p, len / 8);
    p += len & ~(size_t)7;
    len &= 7;
    uint32_t c32 = (uint32_t)c;
    while (len--)
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#endif

uint32_t lb_crc32c(uint32_t crc, const void *data, size_t len)
{
    crc = ~crc;
#if defined(__x86_64__)
    if (lb_active_isa() >= LB_ISA_AVX2)   /* every AVX2 CPU has SSE4.2 */
        return ~crc_hw(crc, (const uint8_t *)data, len);
#endif
    return ~crc_sw(crc, (const uint8_t *)data, len);
}

/* ---- index encodings ----------------------------------------------------- */

static inline uint64_t idx_at(const void *indices, int width, uint64_t i)
{
    return width == 4 ? ((const uint32_t *)indices)[i]
                      : ((const uint64_t *)indices)[i];
}

static inline void idx_put(void *out, int width, uint64_t i, uint64_t v)
{
    if (width == 4)
        ((uint32_t *)out)[i] = (uint32_t)v;
    else
        ((uint64_t *)out)[i] = v;
}

static inline unsigned varint_len(uint64_t v)
{
    unsigned l = 1;
    while (v >= 0x80) {
        v >>= 7;
        l++;
    }
    return l;
}

lb_status lb_index_check(const void *indices, int width, uint64_t count,
                         uint64_t n, lb_error *err)
{
    if ((width != 4 && width != 8) || (count && !indices))
        return LB_EINVAL;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t v = idx_at(indices, width, i);
        if (v >= n || (i && v <= idx_at(indices, width, i - 1))) {
            if (err)
                err->index = i;
            return v >= n ? LB_ERANGE : LB_EINVAL;
        }
    }
    return LB_OK;
}

lb_status lb_index_sizes(const void *indices, int width, uint64_t count,
                         uint64_t n, uint64_t sizes[3])
{
    if ((width != 4 && width != 8) || (count && !indices))
        return LB_EINVAL;
    sizes[0] = count * (n > 0xFFFFFFFFull ? 8 : 4);
    uint64_t v = 0, prev = 0;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t x = idx_at(indices, width, i);
        v += varint_len(i ? x - prev - 1 : x);
        prev = x;
    }
    sizes[1] = v;
    sizes[2] = (n + 7) / 8;
    return LB_OK;
}

lb_status lb_index_encode(const void *indices, int width, uint64_t count,
                          uint64_t n, int encoding, uint8_t *out,
                          uint64_t out_len)
{
    uint64_t sizes[3];
    if (encoding < LB_IDX_RAW || encoding > LB_IDX_BITMAP ||
        lb_index_sizes(indices, width, count, n, sizes) != LB_OK ||
        sizes[encoding] != out_len || (out_len && !out))
        return LB_EINVAL;
    if (encoding == LB_IDX_RAW) {
        for (uint64_t i = 0; i < count; i++) {
            uint64_t x = idx_at(indices, width, i);
            if (n > 0xFFFFFFFFull) {
                for (int b = 0; b < 8; b++)
                    out[8 * i + b] = (uint8_t)(x >> (8 * b));
            } else {
                for (int b = 0; b < 4; b++)
                    out[4 * i + b] = (uint8_t)(x >> (8 * b));
            }
        }
    } else if (encoding == LB_IDX_VARINT) {
        uint64_t o = 0, prev = 0;
        for (uint64_t i = 0; i < count; i++) {
            uint64_t x = idx_at(indices, width, i);
            uint64_t d = i ? x - prev - 1 : x;
            prev = x;
            while (d >= 0x80) {
                out[o++] = (uint8_t)(d | 0x80);
                d >>= 7;
            }
            out[o++] = (uint8_t)d;
        }
    } else {
        memset(out, 0, (size_t)out_len);
        for (uint64_t i = 0; i < count; i++) {
            uint64_t x = idx_at(indices, width, i);
            out[x >> 3] |= (uint8_t)(1u << (x & 7));
        }
    }
    return LB_OK;
}

static lb_status fail_at(lb_error *err, uint64_t offset)
{
    if (err)
        err->index = offset;
    return LB_EFORMAT;
}

lb_status lb_index_decode(const uint8_t *buf, uint64_t len, int encoding,
                          uint64_t count, uint64_t n, int width, void *out,
                          lb_error *err)
{
    if ((width != 4 && width != 8) || (len && !buf) || (count && !out))
        return LB_EINVAL;
    if (count > n)
        return fail_at(err, 0);
    if (width == 4 && n > ((uint64_t)1 << 32))
        return LB_EINVAL;
    if (encoding == LB_IDX_RAW) {
        int w = n > 0xFFFFFFFFull ? 8 : 4;
        if (count > len / (uint64_t)w || len != count * (uint64_t)w)
            return fail_at(err, len < count * (uint64_t)w ? len : count * (uint64_t)w);
        uint64_t prev = 0;
        for (uint64_t i = 0; i < count; i++) {
            uint64_t x = 0;
            for (int b = 0; b < w; b++)
                x |= (uint64_t)buf[(uint64_t)w * i + (uint64_t)b] << (8 * b);
            if (x >= n || (i && x <= prev))
                return fail_at(err, (uint64_t)w * i);
            idx_put(out, width, i, x);
            prev = x;
        }
        return LB_OK;
    }
    if (encoding == LB_IDX_VARINT) {
        uint64_t o = 0, prev = 0;
        for (uint64_t i = 0; i < count; i++) {
            uint64_t d = 0, start = o;
            int shift = 0;
            for (;;) {
                if (o >= len)
                    return fail_at(err, o);
                uint8_t byte = buf[o++];
                uint64_t part = (uint64_t)(byte & 0x7f);
                /* the 10th byte may only carry the top bit of a u64 */
                if (shift == 63 && part > 1)
                    return fail_at(err, o - 1);
                d |= part << shift;
                if (!(byte & 0x80))
                    break;
                shift += 7;
                if (shift > 63)
                    return fail_at(err, o - 1);
            }
            /* canonical: no trailing zero groups (single 0 byte is fine) */
            if (o - start > 1 && buf[o - 1] == 0)
                return fail_at(err, o - 1);
            uint64_t x;
            if (i == 0) {
                x = d;
            } else {
                if (d >= n || prev >= n - 1 - d)   /* x = prev + d + 1 >= n */
                    return fail_at(err, start);
                x = prev + d + 1;
            }
            if (x >= n)
                return fail_at(err, start);
            idx_put(out, width, i, x);
            prev = x;
        }
        if (o != len)
            return fail_at(err, o);
        return LB_OK;
    }
    if (encoding == LB_IDX_BITMAP) {
        if (len != (n + 7) / 8)
            return fail_at(err, len < (n + 7) / 8 ? len : (n + 7) / 8);
        if ((n & 7) && (buf[len - 1] >> (n & 7)))
            return fail_at(err, len - 1);   /* padding bits must be zero */
        uint64_t o = 0;
        for (uint64_t b = 0; b < len; b++) {
            unsigned byte = buf[b];
            while (byte) {
                if (o >= count)
                    return fail_at(err, b);
                idx_put(out, width, o++, 8 * b + (uint64_t)__builtin_ctz(byte));
                byte &= byte - 1;
            }
        }
        if (o != count)
            return fail_at(err, len);
        return LB_OK;
    }
    return fail_at(err, 0);
}

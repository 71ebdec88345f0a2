/*
 * vote.c - majority vote on packed sign bits (signSGD with majority vote,
 * Bernstein et al., ICML 2018 / ICLR 2019).
 *
 * The W bit streams are added position by position with a bit-sliced
 * (vertical) counter: 64 positions at a time, the count of position j kept
 * in bit j of `planes` 64-bit words (plane k holds bit k of every count),
 * each input word added with a ripple of AND/XOR half adders.  The
 * threshold comparison is also bitwise, so no bit is ever unpacked to a
 * byte.  Every output word depends only on the same input words: the
 * result is identical for every thread count.
 */
#include <string.h>

#include "lowband.h"
#include "threads.h"

#define VOTE_MAX_PLANES 32

static uint64_t load_word(const uint8_t *p, uint64_t nbytes)
{
    uint64_t w = 0;
    if (nbytes >= 8)
        memcpy(&w, p, 8);                 /* little-endian hosts */
    else
        memcpy(&w, p, nbytes);
    return w;
}

/* out bit j = 1 when at least `thresh` of the W words have bit j set.     */
static uint64_t vote_word(const uint8_t *const *codes, uint64_t W,
                          uint64_t off, uint64_t nbytes, int nplanes,
                          uint64_t thresh)
{
    uint64_t plane[VOTE_MAX_PLANES] = {0};
    for (uint64_t w = 0; w < W; w++) {
        uint64_t carry = load_word(codes[w] + off, nbytes);
        for (int k = 0; k < nplanes && carry; k++) {
            uint64_t t = plane[k] & carry;
            plane[k] ^= carry;
            carry = t;
        }
    }
    /* count >= thresh, from the top plane down */
    uint64_t gt = 0, eq = ~(uint64_t)0;
    for (int k = nplanes - 1; k >= 0; k--) {
        if ((thresh >> k) & 1)
            eq &= plane[k];
        else {
            gt |= eq & plane[k];
            eq &= ~plane[k];
        }
    }
    return gt | eq;
}

/* out[0..ceil(n/8)) = bitwise majority of the W packed 1-bit streams
 * codes[0..W) (each ceil(n/8) bytes, LSB first): bit i is 1 when at least
 * `thresh` inputs have bit i set.  thresh 0 means ceil(W/2), so a tie
 * (even W) gives 1 (sign(0) = +1).  Spare bits past n are written as 0.
 * W in [1, 2^32).                                                         */
lb_status lb_majority_vote(const uint8_t *const *codes, uint64_t W, uint64_t n,
                           uint64_t thresh, int nthreads, uint8_t *out)
{
    if (W < 1 || W >= ((uint64_t)1 << 32) || thresh > W || !codes ||
        (n && !out))
        return LB_EINVAL;
    for (uint64_t w = 0; n && w < W; w++)
        if (!codes[w])
            return LB_EINVAL;
    if (thresh == 0)
        thresh = (W + 1) / 2;
    int nplanes = 1;
    while (nplanes < VOTE_MAX_PLANES && (W >> nplanes))
        nplanes++;
    uint64_t nbytes = n / 8 + (n % 8 != 0), nwords = lb_num_chunks(nbytes, 8);
    uint64_t wpc = LB_CHUNK / 64;           /* words per chunk */
    uint64_t nchunks = lb_num_chunks(nwords, wpc);
    int team = lb_team(nthreads, nchunks);
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
    for (uint64_t c = 0; c < nchunks; c++) {
        uint64_t end = (c + 1) * wpc < nwords ? (c + 1) * wpc : nwords;
        for (uint64_t i = c * wpc; i < end; i++) {
            uint64_t off = i * 8, len = nbytes - off < 8 ? nbytes - off : 8;
            uint64_t r = vote_word(codes, W, off, len, nplanes, thresh);
            if (len == 8 && n - off * 8 >= 64) {
                memcpy(out + off, &r, 8);
            } else {
                uint64_t bits = n - off * 8;
                if (bits < 64)
                    r &= ((uint64_t)1 << bits) - 1;
                memcpy(out + off, &r, len);
            }
        }
    }
    return LB_OK;
}

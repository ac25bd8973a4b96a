/*
 * kvmclock read in ring 3: guest ns = system_time + scale(rdtsc - tsc_timestamp).
 *
 * The host rewrites the struct at will (and after a live update, when the VMM restores the clock);
 * an odd or changed version means it was mid-update, so read again.
 */
#include "guest.h"

static inline uint64_t rdtsc_ordered(void)
{
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi)::"memory");
    return ((uint64_t)hi << 32) | lo;
}

uint64_t kvmclock_ns(const struct pvclock *p)
{
    for (;;) {
        uint32_t v = p->version;
        __asm__ volatile("" ::: "memory");
        if (v & 1) {
            cpu_relax();
            continue;
        }
        uint64_t ts = p->tsc_timestamp;
        uint64_t st = p->system_time;
        uint32_t mul = p->tsc_to_system_mul;
        int8_t shift = p->tsc_shift;
        uint64_t tsc = rdtsc_ordered();
        __asm__ volatile("" ::: "memory");
        if (p->version != v)
            continue;
        uint64_t delta = tsc - ts;
        if (tsc < ts) /* TSC read before the host's stamp: count it as zero elapsed */
            delta = 0;
        if (shift < 0)
            delta >>= -shift;
        else
            delta <<= shift;
        return st + (uint64_t)(((unsigned __int128)delta * mul) >> 32);
    }
}

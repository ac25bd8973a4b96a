/*
 * Ring 3: configuration, the boot/ready lines and the per-vCPU workloads.
 *
 *   vCPU 0   heartbeat every hb_ms (and the integrity work in between when there is one vCPU)
 *   vCPU 1   memory integrity: rewrite and verify a buffer chunk by chunk, forever
 *   others   idle: sleep tick to tick
 *
 * Every loop reads its vCPU's kvmclock often; a gap larger than stall_ms between two reads on one
 * vCPU is a stall (the vCPU did not run, e.g. across a live update) and is printed.
 */
#include "guest.h"

#define MiB (1024ULL * 1024)
#define CHUNK_BYTES (256 * 1024ULL)       /* integrity work unit: well under a ms */
#define FINE_CHUNK_BYTES (16 * 1024ULL)   /* the same with stall_us: a clock read every ~50 µs */
#define MAX_FAIL_LINES_PER_PASS 16

struct vcpu {
    uint32_t cpu;
    uint64_t last_ns;  /* previous clock read on this vCPU, 0 before the first */
    uint64_t slack_ns; /* a sleep of our own since that read: not a stall unless far longer */
};

/* The stall threshold: stall_us when given (a blackout of a few hundred µs is visible only to a
 * vCPU that never sleeps, integrity_pct=100), else stall_ms; 0 turns the detector off. */
static uint64_t stall_threshold_ns(void)
{
    return g.stall_us ? g.stall_us * 1000ULL : g.stall_ms * 1000000ULL;
}

/* Sleep until the next tick; the gap this leaves between two clock reads is not a stall. */
static void nap(struct vcpu *v)
{
    v->slack_ns = 2 * TICK_NS;
    sys_sleep_tick();
}

static uint64_t now_ns(struct vcpu *v)
{
    uint64_t t = kvmclock_ns(&pvclock_area[v->cpu].clock);
    if (v->last_ns) {
        if (t < v->last_ns) {
            out_str("clock backwards delta_ns=");
            out_u64(v->last_ns - t);
            out_str(" cpu=");
            out_u64(v->cpu);
            out_char('\n');
            t = v->last_ns; /* keep this vCPU's clock monotonic */
        } else if (stall_threshold_ns() && t - v->last_ns > stall_threshold_ns() + v->slack_ns) {
            out_str("stall gap_ns=");
            out_u64(t - v->last_ns);
            out_str(" cpu=");
            out_u64(v->cpu);
            out_str(" at_ns="); /* the clock when the vCPU ran again: places the gap on a timeline */
            out_u64(t);
            out_char('\n');
        }
    }
    v->last_ns = t;
    v->slack_ns = 0;
    return t;
}

/* ---- command line ---- */

static bool parse_u64(const char *s, size_t n, uint64_t *out)
{
    uint64_t v = 0;
    if (n == 0 || n > 18)
        return false;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return true;
}

static bool key_is(const char *w, size_t klen, const char *key)
{
    size_t i = 0;
    for (; i < klen; i++)
        if (key[i] != w[i])
            return false;
    return key[i] == 0;
}

static void parse_cmdline(const char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        while (i < len && (s[i] == ' ' || s[i] == '\t'))
            i++;
        size_t start = i;
        while (i < len && s[i] != ' ' && s[i] != '\t')
            i++;
        const char *w = s + start;
        size_t n = i - start, k = 0;
        while (k < n && w[k] != '=')
            k++;
        uint64_t v;
        if (k == n || !parse_u64(w + k + 1, n - k - 1, &v))
            continue; /* not key=<number>: ignored */
        if (key_is(w, k, "hb_ms") && v > 0)
            g.hb_ms = v;
        else if (key_is(w, k, "stall_ms"))
            g.stall_ms = v;
        else if (key_is(w, k, "stall_us"))
            g.stall_us = v;
        else if (key_is(w, k, "integrity_mb"))
            g.integrity_mb = v;
        else if (key_is(w, k, "integrity_pct") && v > 0 && v <= 100)
            g.integrity_pct = v;
    }
}

/* ---- boot id ---- */

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static uint64_t make_boot_id(void)
{
    uint32_t lo, hi, a, b, c, d;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    uint64_t id = mix64(((uint64_t)hi << 32) | lo);
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    if (c & (1u << 30)) { /* RDRAND: native in ring 3 */
        for (int tries = 0; tries < 10; tries++) {
            uint64_t r;
            uint8_t ok;
            __asm__ volatile("rdrand %0; setc %1" : "=r"(r), "=qm"(ok)::"cc");
            if (ok) {
                id = mix64(id ^ r);
                break;
            }
        }
    }
    id ^= mix64(kvmclock_ns(&pvclock_area[0].clock));
    return id ? id : 1;
}

/* ---- integrity ---- */

struct integrity {
    volatile uint64_t *base;
    uint64_t words;
    uint64_t pos;        /* next word to do in this pass */
    uint64_t gen;        /* generation being written; gen-1 is what memory should hold */
    uint64_t mismatches; /* in this pass */
    uint64_t busy_since; /* duty cycle: start of the current busy stretch */
};

/* Contents of the word at addr in generation gen: a cheap hash, different for every (addr, gen). */
static inline uint64_t pattern(uint64_t addr, uint64_t gen)
{
    uint64_t x = addr ^ (gen * 0x9e3779b97f4a7c15ULL);
    x *= 0xbf58476d1ce4e5b9ULL;
    return x ^ (x >> 31);
}

static void integrity_init(struct integrity *in)
{
    const struct boot_info *bi = g.bi;
    uint64_t start = ((uint64_t)__image_end + 2 * MiB - 1) & ~(2 * MiB - 1);
    uint64_t low_end = bi->low_ram_end ? bi->low_ram_end : bi->mem_bytes;
    if (low_end > 0xC0000000ULL)
        low_end = 0xC0000000ULL;
    uint64_t bytes = g.integrity_mb * MiB;
    uint64_t room = low_end > start ? low_end - start : 0;
    if (bytes > room)
        bytes = room & ~(CHUNK_BYTES - 1);
    in->base = (volatile uint64_t *)start;
    in->words = bytes / 8;
    in->pos = 0;
    in->gen = 0;
    in->mismatches = 0;
    in->busy_since = 0;
    out_str("integrity start addr=");
    out_hex(start);
    out_str(" bytes=");
    out_u64(bytes);
    out_char('\n');
}

static void integrity_report(uint64_t addr, uint64_t expected, uint64_t got)
{
    g.integrity_failed = 1;
    out_str("integrity FAIL addr=");
    out_hex(addr);
    out_str(" expected=");
    out_hex(expected);
    out_str(" got=");
    out_hex(got);
    out_char('\n');
}

/* One chunk: check the previous generation, write the next.  Prints a line after each full pass. */
static void integrity_chunk(struct integrity *in)
{
    /* With stall_us the clock is read between chunks of 16 KiB (~50 µs), not 256 KiB (~0.9 ms),
     * so that the detector sees gaps of a few hundred µs and not its own work. */
    uint64_t n = (g.stall_us ? FINE_CHUNK_BYTES : CHUNK_BYTES) / 8;
    if (n > in->words - in->pos)
        n = in->words - in->pos;
    volatile uint64_t *p = in->base + in->pos;
    uint64_t gen = in->gen;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t addr = (uint64_t)&p[i];
        if (gen) {
            uint64_t want = pattern(addr, gen - 1), got = p[i];
            if (got != want && in->mismatches++ < MAX_FAIL_LINES_PER_PASS)
                integrity_report(addr, want, got);
        }
        p[i] = pattern(addr, gen);
    }
    in->pos += n;
    if (in->pos < in->words)
        return;
    if (gen) {
        if (in->mismatches) {
            out_str("integrity FAIL pass=");
            out_u64(gen);
            out_str(" mismatches=");
            out_u64(in->mismatches);
            out_char('\n');
        }
        out_str("integrity pass=");
        out_u64(gen);
        out_str(" bytes=");
        out_u64(in->words * 8);
        out_char('\n');
    }
    in->gen++;
    in->pos = 0;
    in->mismatches = 0;
}

/* Do a chunk, then sleep a tick whenever the busy stretch used up its integrity_pct share. */
static void integrity_work(struct integrity *in, struct vcpu *v)
{
    if (!in->words) {
        nap(v);
        now_ns(v);
        return;
    }
    integrity_chunk(in);
    uint64_t t = now_ns(v);
    if (g.integrity_pct >= 100)
        return;
    if (!in->busy_since)
        in->busy_since = t;
    uint64_t budget = TICK_NS * g.integrity_pct / (100 - g.integrity_pct);
    if (t - in->busy_since >= budget) {
        nap(v);
        in->busy_since = now_ns(v);
    }
}

/* ---- the vCPUs ---- */

static void print_boot_line(void)
{
    const struct boot_info *bi = g.bi;
    const char *cl = (const char *)bi->cmdline_gpa;
    uint32_t len = cl ? bi->cmdline_len : 0;
    if (len > 4095)
        len = 4095;
    out_str("luo-guest boot cpus=");
    out_u64(g.ncpus);
    out_str(" mem=");
    out_u64(bi->mem_bytes);
    out_str(" boot_id=");
    out_hex16(g.boot_id);
    out_str(" cmdline=\"");
    for (uint32_t i = 0; i < len; i++)
        out_char(cl[i] == '"' || cl[i] < ' ' || cl[i] > '~' ? '?' : cl[i]);
    out_str("\"\n");
}

static void heartbeat(uint64_t seq, uint64_t t)
{
    out_str("heartbeat seq=");
    out_u64(seq);
    out_str(" mono_ns=");
    out_u64(t);
    out_str(" boot_id=");
    out_hex16(g.boot_id);
    out_str(g.integrity_failed ? " integrity=FAIL\n" : " integrity=ok\n");
}

static void wait_flag(volatile uint32_t *flag)
{
    while (!__atomic_load_n(flag, __ATOMIC_ACQUIRE))
        sys_sleep_tick();
}

static void cpu0_main(struct vcpu *v) __attribute__((noreturn));
static void cpu0_main(struct vcpu *v)
{
    const struct boot_info *bi = g.bi;
    g.hb_ms = 100;
    g.stall_ms = 50;
    g.integrity_mb = bi->mem_bytes / 4 / MiB;
    g.integrity_pct = 10;
    if (bi->cmdline_gpa)
        parse_cmdline((const char *)bi->cmdline_gpa, bi->cmdline_len > 4095 ? 4095 : bi->cmdline_len);
    g.boot_id = make_boot_id();
    print_boot_line();
    __atomic_store_n(&g.config_done, 1, __ATOMIC_RELEASE);
    __atomic_fetch_add(&g.in_user, 1, __ATOMIC_ACQ_REL);

    uint64_t t0 = kvmclock_ns(&pvclock_area[0].clock);
    bool said_waiting = false;
    while (__atomic_load_n(&g.in_user, __ATOMIC_ACQUIRE) < g.ncpus) {
        sys_sleep_tick();
        if (!said_waiting && kvmclock_ns(&pvclock_area[0].clock) - t0 > 2000000000ULL) {
            said_waiting = true;
            out_str("luo-guest waiting cpus_in_user=");
            out_u64(g.in_user);
            out_char('/');
            out_u64(g.ncpus);
            out_char('\n');
        }
    }
    out_str("luo-guest ready\n");
    __atomic_store_n(&g.ready, 1, __ATOMIC_RELEASE);

    struct integrity in;
    bool with_integrity = g.ncpus == 1;
    if (with_integrity)
        integrity_init(&in);
    uint64_t hb_ns = g.hb_ms * 1000000ULL;
    uint64_t seq = 0;
    uint64_t next = now_ns(v);
    for (;;) {
        uint64_t t = now_ns(v);
        if (t >= next) {
            heartbeat(seq++, t);
            next += hb_ns;
            if (next <= t) /* we were away for more than a period: re-phase, never burst */
                next = t + hb_ns;
        } else if (with_integrity) {
            integrity_work(&in, v);
        } else {
            nap(v);
        }
    }
}

void user_main(uint64_t cpu)
{
    struct vcpu v = {.cpu = (uint32_t)cpu, .last_ns = 0};
    if (cpu == 0)
        cpu0_main(&v);
    wait_flag(&g.config_done);
    __atomic_fetch_add(&g.in_user, 1, __ATOMIC_ACQ_REL);
    wait_flag(&g.ready);
    if (cpu == 1) {
        struct integrity in;
        integrity_init(&in);
        for (;;)
            integrity_work(&in, &v);
    }
    for (;;) { /* the other vCPUs idle, or with integrity_pct=100 spin on the clock (a busy vCPU) */
        if (g.integrity_pct < 100)
            nap(&v);
        now_ns(&v);
    }
}

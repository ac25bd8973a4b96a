/*
 * luo-linux-guest: PID 1 of a stock Linux guest that prints the same console lines as the test
 * guest (docs/guest.md), so luo.testing.console reads both.  docs/guest-linux.md says why and how.
 *
 * It is /init of an initramfs, run directly by the kernel: no busybox, no shell.  Being PID 1 it
 * must never exit (the kernel panics when init dies), so every error prints a FATAL line and the
 * program sleeps forever instead.
 *
 * Threads, each pinned to one CPU when there are enough (as the test guest's vCPUs):
 *   CPU 0    heartbeat every hb_ms (SCHED_FIFO, so integrity work never delays a beat)
 *   CPU 1    memory integrity: rewrite and verify a buffer chunk by chunk (CPU 0 with one CPU)
 *   others   tick: sleep 10 ms, read the clock (spin on it with integrity_pct=100)
 * Every loop reads CLOCK_MONOTONIC at least every tick or chunk; a jump between two consecutive
 * reads larger than the stall threshold, beyond the loop's own sleep, is printed as a stall.
 *
 * Build: gcc -static -O2 -pthread -o luo-linux-guest luo-linux-guest.c   (guest-linux/build.sh)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MiB (1024ULL * 1024)
#define TICK_NS 10000000ULL             /* longest sleep between two clock reads: 10 ms */
#define CHUNK_BYTES (256 * 1024ULL)     /* integrity work unit between two clock reads */
#define FINE_CHUNK_BYTES (16 * 1024ULL) /* the same with stall_us: gaps of a few hundred µs show */
#define MAX_FAIL_LINES_PER_PASS 16
#define CMDLINE_MAX 4095

static struct {
    uint64_t hb_ms, stall_ms, stall_us, integrity_mb, integrity_pct;
    uint64_t boot_id;
    int ncpus;
    int console;                       /* /dev/ttyS0, else whatever the kernel gave us as fd 2 */
    volatile int integrity_failed;     /* sticky: heartbeats say FAIL from then on */
} g = {.hb_ms = 100, .stall_ms = 50, .integrity_mb = 64, .integrity_pct = 10, .console = 2};

/* ---- output: one write() per line, so lines from different threads never interleave ---- */

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char buf[CMDLINE_MAX + 256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof buf - 2)
        n = sizeof buf - 2;
    buf[n++] = '\n';
    /* A tty write of a few hundred bytes completes whole; the loop is for a signal's sake only. */
    for (int off = 0; off < n;) {
        ssize_t w = write(g.console, buf + off, (size_t)(n - off));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        off += (int)w;
    }
}

/* PID 1 may not exit: report and park this thread for good (the others keep going). */
static void fatal(const char *what, int err) __attribute__((noreturn));
static void fatal(const char *what, int err)
{
    int cpu = sched_getcpu();
    say("luo-guest FATAL cpu=%d %s: %s", cpu < 0 ? 0 : cpu, what, strerror(err));
    for (;;)
        pause();
}

/* ---- the clock and the stall detector ---- */

struct loop {
    uint64_t last_ns;  /* previous clock read of this loop, 0 before the first */
    uint64_t slack_ns; /* our own sleep since that read: not a stall unless far longer */
};

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* stall_us when given, else stall_ms; 0 turns the detector off (docs/guest.md). */
static uint64_t stall_threshold_ns(void)
{
    return g.stall_us ? g.stall_us * 1000ULL : g.stall_ms * 1000000ULL;
}

static uint64_t now_ns(struct loop *l)
{
    uint64_t t = mono_ns();
    if (l->last_ns) {
        uint64_t thr = stall_threshold_ns();
        if (t < l->last_ns) { /* CLOCK_MONOTONIC never does this; the line is there in case */
            say("clock backwards delta_ns=%" PRIu64 " cpu=%d", l->last_ns - t, sched_getcpu());
            t = l->last_ns;
        } else if (thr && t - l->last_ns > thr + l->slack_ns) {
            /* at_ns: the clock when this loop ran again, to place the gap on a timeline */
            say("stall gap_ns=%" PRIu64 " cpu=%d at_ns=%" PRIu64, t - l->last_ns, sched_getcpu(), t);
        }
    }
    l->last_ns = t;
    l->slack_ns = 0;
    return t;
}

/* Sleep until `until`, at most one tick past the last read.  The time asked for plus one tick of
 * wake-up latency (a TCG guest's timer interrupt can be late) is not a stall. */
static void nap(struct loop *l, uint64_t until)
{
    uint64_t wake = l->last_ns + TICK_NS;
    if (until && until < wake)
        wake = until;
    l->slack_ns = (wake > l->last_ns ? wake - l->last_ns : 0) + TICK_NS;
    struct timespec ts = {.tv_sec = (time_t)(wake / 1000000000ULL), .tv_nsec = (long)(wake % 1000000000ULL)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

/* ---- command line: the test guest's keys, `key=<decimal>` words, everything else ignored ---- */

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
    return strlen(key) == klen && memcmp(w, key, klen) == 0;
}

static void parse_cmdline(const char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        while (i < len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n'))
            i++;
        size_t start = i;
        while (i < len && s[i] != ' ' && s[i] != '\t' && s[i] != '\n')
            i++;
        const char *w = s + start;
        size_t n = i - start, k = 0;
        while (k < n && w[k] != '=')
            k++;
        uint64_t v;
        if (k == n || !parse_u64(w + k + 1, n - k - 1, &v))
            continue;
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

/* /proc/cmdline without its newline, capped as the test guest caps it. */
static size_t read_cmdline(char *buf, size_t cap)
{
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, cap);
    close(fd);
    if (n <= 0)
        return 0;
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
        n--;
    return (size_t)n;
}

/* ---- boot id ---- */

/* getrandom() may block early in boot until the kernel's generator is seeded, and a guest under
 * TCG has no RDRAND or virtio-rng: take seeded bytes if they are there at once, else the
 * "insecure" ones, which still differ from boot to boot (a boot id is no secret).  Mixed with the
 * wall clock in case both fail. */
static uint64_t make_boot_id(void)
{
    uint64_t id = 0;
    if (getrandom(&id, sizeof id, GRND_NONBLOCK) != (ssize_t)sizeof id &&
        getrandom(&id, sizeof id, GRND_INSECURE) != (ssize_t)sizeof id) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t x = ((uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec) ^ mono_ns();
        x ^= x >> 30;
        x *= 0xbf58476d1ce4e5b9ULL;
        x ^= x >> 27;
        x *= 0x94d049bb133111ebULL;
        id = x ^ (x >> 31);
    }
    return id;
}

/* ---- integrity (the test guest's algorithm and pattern) ---- */

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

/* The buffer is anonymous memory, faulted in at once (MAP_POPULATE) so the first pass measures
 * memory and not page faults; its address is a virtual one.  It is clamped to 3/4 of the free RAM. */
static void integrity_init(struct integrity *in)
{
    memset(in, 0, sizeof *in);
    uint64_t bytes = g.integrity_mb * MiB;
    struct sysinfo si;
    if (bytes && sysinfo(&si) == 0) {
        uint64_t room = (uint64_t)si.freeram * si.mem_unit / 4 * 3;
        if (bytes > room)
            bytes = room & ~(CHUNK_BYTES - 1);
    }
    void *p = NULL;
    if (bytes) {
        p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (p == MAP_FAILED)
            fatal("integrity buffer mmap", errno);
    }
    in->base = p;
    in->words = bytes / 8;
    say("integrity start addr=0x%" PRIx64 " bytes=%" PRIu64, (uint64_t)(uintptr_t)p, bytes);
}

/* One chunk: check the previous generation, write the next.  Prints a line after each full pass. */
static void integrity_chunk(struct integrity *in)
{
    uint64_t n = (g.stall_us ? FINE_CHUNK_BYTES : CHUNK_BYTES) / 8;
    if (n > in->words - in->pos)
        n = in->words - in->pos;
    volatile uint64_t *p = in->base + in->pos;
    uint64_t gen = in->gen;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t addr = (uint64_t)(uintptr_t)&p[i];
        if (gen) {
            uint64_t want = pattern(addr, gen - 1), got = p[i];
            if (got != want) {
                g.integrity_failed = 1;
                if (in->mismatches++ < MAX_FAIL_LINES_PER_PASS)
                    say("integrity FAIL addr=0x%" PRIx64 " expected=0x%" PRIx64 " got=0x%" PRIx64, addr,
                        want, got);
            }
        }
        p[i] = pattern(addr, gen);
    }
    in->pos += n;
    if (in->pos < in->words)
        return;
    if (gen) {
        if (in->mismatches)
            say("integrity FAIL pass=%" PRIu64 " mismatches=%" PRIu64, gen, in->mismatches);
        say("integrity pass=%" PRIu64 " bytes=%" PRIu64, gen, in->words * 8);
    }
    in->gen++;
    in->pos = 0;
    in->mismatches = 0;
}

/* ---- the threads ---- */

static void pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set); /* best effort: an unpinned loop works as well */
}

static void *integrity_thread(void *arg)
{
    pin((int)(intptr_t)arg);
    struct loop l = {0};
    struct integrity in;
    integrity_init(&in);
    now_ns(&l);
    for (;;) {
        if (!in.words) {
            nap(&l, 0);
            now_ns(&l);
            continue;
        }
        integrity_chunk(&in);
        uint64_t t = now_ns(&l);
        if (g.integrity_pct >= 100)
            continue;
        if (!in.busy_since)
            in.busy_since = t;
        /* Busy for pct% of the time: after `budget` of work, sleep a tick. */
        uint64_t budget = TICK_NS * g.integrity_pct / (100 - g.integrity_pct);
        if (t - in.busy_since >= budget) {
            nap(&l, 0);
            in.busy_since = now_ns(&l);
        }
    }
    return NULL;
}

static void *tick_thread(void *arg)
{
    pin((int)(intptr_t)arg);
    struct loop l = {0};
    now_ns(&l);
    for (;;) { /* integrity_pct=100: a busy CPU that sees every gap, as in the test guest */
        if (g.integrity_pct < 100)
            nap(&l, 0);
        now_ns(&l);
    }
    return NULL;
}

static void heartbeat_loop(void) __attribute__((noreturn));
static void heartbeat_loop(void)
{
    struct sched_param sp = {.sched_priority = 10};
    sched_setscheduler(0, SCHED_FIFO, &sp); /* best effort, as pin() */
    pin(0);
    struct loop l = {0};
    uint64_t hb_ns = g.hb_ms * 1000000ULL, seq = 0;
    uint64_t next = now_ns(&l);
    for (;;) {
        uint64_t t = now_ns(&l);
        if (t >= next) {
            say("heartbeat seq=%" PRIu64 " mono_ns=%" PRIu64 " boot_id=%016" PRIx64 " integrity=%s", seq++, t,
                g.boot_id, g.integrity_failed ? "FAIL" : "ok");
            next += hb_ns;
            if (next <= t) /* away for more than a period: re-phase, never burst */
                next = t + hb_ns;
        } else {
            nap(&l, next);
        }
    }
}

static void start_thread(void *(*fn)(void *), int cpu, const char *what)
{
    pthread_t th;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    int err = pthread_create(&th, &attr, fn, (void *)(intptr_t)cpu);
    pthread_attr_destroy(&attr);
    if (err)
        fatal(what, err);
}

/* ---- set-up ---- */

static void mount_fs(const char *src, const char *dir, const char *type)
{
    mkdir(dir, 0755);
    if (mount(src, dir, type, MS_NOSUID | MS_NOEXEC, NULL) != 0 && errno != EBUSY) {
        char what[64];
        snprintf(what, sizeof what, "mount %s", dir);
        fatal(what, errno);
    }
}

/* The serial port raw on output: lines end in "\n" as the test guest's do, not "\r\n". */
static void open_console(void)
{
    int fd = open("/dev/ttyS0", O_WRONLY | O_NOCTTY | O_CLOEXEC);
    if (fd < 0)
        fatal("open /dev/ttyS0", errno); /* printed on fd 2, the kernel's /dev/console, if any */
    struct termios tio;
    if (tcgetattr(fd, &tio) == 0) {
        tio.c_oflag &= ~(tcflag_t)OPOST;
        tcsetattr(fd, TCSANOW, &tio);
    }
    g.console = fd;
}

int main(void)
{
    mount_fs("devtmpfs", "/dev", "devtmpfs");
    mount_fs("proc", "/proc", "proc");
    mount_fs("sysfs", "/sys", "sysfs");
    open_console();

    static char cmdline[CMDLINE_MAX + 1];
    size_t len = read_cmdline(cmdline, CMDLINE_MAX);
    parse_cmdline(cmdline, len);
    for (size_t i = 0; i < len; i++)
        if (cmdline[i] == '"' || cmdline[i] < ' ' || cmdline[i] > '~')
            cmdline[i] = '?';
    cmdline[len] = 0;

    g.boot_id = make_boot_id();
    g.ncpus = get_nprocs();
    if (g.ncpus < 1)
        g.ncpus = 1;
    struct sysinfo si;
    uint64_t mem = sysinfo(&si) == 0 ? (uint64_t)si.totalram * si.mem_unit : 0;
    say("luo-guest boot cpus=%d mem=%" PRIu64 " boot_id=%016" PRIx64 " cmdline=\"%s\"", g.ncpus, mem,
        g.boot_id, cmdline);

    say("luo-guest ready"); /* as in the test guest: the workloads start after it */
    start_thread(integrity_thread, g.ncpus > 1 ? 1 : 0, "start integrity thread");
    for (int cpu = 2; cpu < g.ncpus; cpu++)
        start_thread(tick_thread, cpu, "start tick thread");
    heartbeat_loop();
}

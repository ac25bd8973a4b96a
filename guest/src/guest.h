/*
 * luo test guest: shared definitions.
 *
 * The guest runs on PVM, where every ring-0 instruction is emulated (~1 us each) and ring 3 is
 * native.  So ring 0 only sets the machine up and services tiny interrupt handlers; everything
 * else (command line, clock reads, printing, workloads) runs in ring 3.  All pages are mapped
 * user-accessible by the VMM's identity map, so ring 3 reads the boot info, the pvclock pages and
 * the shared state below directly.
 */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MAX_CPUS 64
#define KSTACK_SHIFT 14
#define KSTACK_SIZE (1UL << KSTACK_SHIFT) /* ring-0 stack per vCPU (TSS.RSP0) */
#define USTACK_SIZE (32UL * 1024)         /* ring-3 stack per vCPU */

/* GDT layout: STAR-compatible order (kernel code, kernel data, user data, user code). */
#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UDATA (0x18 | 3)
#define SEL_UCODE (0x20 | 3)
#define SEL_TSS(cpu) (0x28 + 16 * (cpu))
#define GDT_ENTRIES (5 + 2 * MAX_CPUS)

/* Interrupt vectors. */
#define VEC_TIMER 0xEC    /* LAPIC timer (periodic) */
#define VEC_SPURIOUS 0xFF /* LAPIC spurious vector */

#define TICK_NS 10000000ULL /* LAPIC timer period: 10 ms */

#define LUO_BOOT_MAGIC 0x31544f4f424f554cULL /* "LUOBOOT1" */

struct boot_info {
    uint64_t magic;
    uint64_t mem_bytes;
    uint64_t cmdline_gpa;
    uint32_t cmdline_len;
    uint32_t ncpus;
    uint64_t low_ram_end;
    uint64_t high_ram_end;
    uint64_t mmio_console_gpa;
};

/* KVM pvclock (kvmclock) layout, written by the host; one per vCPU. */
struct pvclock {
    volatile uint32_t version;
    uint32_t pad0;
    volatile uint64_t tsc_timestamp;
    volatile uint64_t system_time;
    volatile uint32_t tsc_to_system_mul;
    volatile int8_t tsc_shift;
    volatile uint8_t flags;
    uint8_t pad[2];
} __attribute__((packed));

/* One 64-byte slot per vCPU so no pvclock straddles a page or shares a line. */
struct pvclock_slot {
    struct pvclock clock;
    uint8_t pad[64 - sizeof(struct pvclock)];
} __attribute__((aligned(64)));

/* State shared by all vCPUs, written by ring 0 at set-up and by ring 3 afterwards. */
struct shared {
    /* set by ring 0 on vCPU 0 before setup_done */
    const struct boot_info *bi;
    volatile uint8_t *console;
    uint32_t ncpus;
    volatile uint32_t setup_done;
    /* set by ring 3 on vCPU 0 */
    uint64_t boot_id;
    uint64_t hb_ms;
    uint64_t stall_ms;
    uint64_t stall_us;
    uint64_t integrity_mb;
    uint64_t integrity_pct;
    volatile uint32_t config_done;
    volatile uint32_t in_user;   /* vCPUs that reached ring 3 */
    volatile uint32_t ready;     /* "luo-guest ready" printed */
    volatile uint32_t integrity_failed;
};

extern struct shared g;
extern struct pvclock_slot pvclock_area[MAX_CPUS];
extern char __image_end[];

/* console.c: byte-wise writes to the MMIO console, usable from ring 0 and ring 3. */
void out_char(char c);
void out_str(const char *s);
void out_mem(const char *s, size_t n);
void out_u64(uint64_t v);
void out_hex(uint64_t v);    /* 0x-prefixed, minimal digits */
void out_hex16(uint64_t v);  /* exactly 16 digits, no prefix */

/* clock.c (ring 3) */
uint64_t kvmclock_ns(const struct pvclock *p);

/* user.c (ring 3) */
void user_main(uint64_t cpu) __attribute__((noreturn));

/* entry.S */
void load_gdt(const void *gdtr, uint16_t tss_sel);
void enter_user(void (*fn)(uint64_t), uint64_t rsp, uint64_t arg) __attribute__((noreturn));
void halt_forever(void) __attribute__((noreturn));
extern const uint64_t exc_stub_table[32];
void isr_timer(void);
void isr_spurious(void);

/* ring 3 -> ring 0: block until the next interrupt (the 10 ms tick at the latest).  The hlt faults
 * (#GP) in ring 3 and the #GP handler carries it out, see entry.S. */
static inline void sys_sleep_tick(void) { __asm__ volatile("hlt" ::: "memory"); }

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);

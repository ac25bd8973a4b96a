/*
 * Ring 0: machine set-up and the fatal-exception report.  Nothing else runs here.
 *
 * Under PVM each instruction in this file costs about a microsecond, so vCPU 0 builds the shared
 * tables (GDT with one TSS per vCPU, a 256-entry IDT holding only the gates we use), the other
 * vCPUs wait for it, and then each vCPU loads the tables, turns on its x2APIC timer and kvmclock
 * and leaves for ring 3 for good.
 */
#include "guest.h"

struct tss64 {
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3;
    uint16_t iomap_base;
} __attribute__((packed));

struct idt_gate {
    uint16_t off_lo;
    uint16_t sel;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t off_mid;
    uint32_t off_hi;
    uint32_t zero;
} __attribute__((packed));

struct dtr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

struct trap_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, err, rip, cs, rflags, rsp, ss;
};

struct shared g = {0};
struct pvclock_slot pvclock_area[MAX_CPUS] __attribute__((aligned(4096))) = {0};

static uint64_t gdt[GDT_ENTRIES] __attribute__((aligned(16))) = {0};
static struct idt_gate idt[256] __attribute__((aligned(16))) = {0};
static struct tss64 tss[MAX_CPUS] __attribute__((aligned(16))) = {0};

/* Stacks need no initial contents: keep them out of the ELF file (see link.ld). */
uint8_t kstacks[MAX_CPUS][KSTACK_SIZE] __attribute__((section(".noinit"), aligned(4096)));
static uint8_t ustacks[MAX_CPUS][USTACK_SIZE] __attribute__((section(".noinit"), aligned(4096)));

#define MSR_APIC_BASE 0x1b
#define MSR_X2APIC_SVR 0x80f
#define MSR_X2APIC_LVT_TIMER 0x832
#define MSR_X2APIC_LVT_LINT0 0x835
#define MSR_X2APIC_LVT_LINT1 0x836
#define MSR_X2APIC_LVT_ERROR 0x837
#define MSR_X2APIC_TMICT 0x838
#define MSR_X2APIC_TDCR 0x83e
#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01


static inline void wrmsr(uint32_t msr, uint64_t v)
{
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}

static inline uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }

static inline void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static inline uint64_t read_cr2(void)
{
    uint64_t v;
    __asm__ volatile("mov %%cr2, %0" : "=r"(v));
    return v;
}

static void die(const char *why, uint64_t cpu) __attribute__((noreturn));
static void die(const char *why, uint64_t cpu)
{
    out_str("\nluo-guest FATAL cpu=");
    out_u64(cpu);
    out_char(' ');
    out_str(why);
    out_char('\n');
    halt_forever();
}

static void set_gate(int vec, void (*fn)(void), uint8_t type_attr)
{
    uint64_t a = (uint64_t)fn;
    idt[vec] = (struct idt_gate){
        .off_lo = (uint16_t)a,
        .sel = SEL_KCODE,
        .ist = 0,
        .type_attr = type_attr,
        .off_mid = (uint16_t)(a >> 16),
        .off_hi = (uint32_t)(a >> 32),
        .zero = 0,
    };
}

static void build_tables(uint32_t ncpus)
{
    gdt[0] = 0;
    gdt[1] = 0x00af9a000000ffffULL; /* 0x08 kernel code, L=1 */
    gdt[2] = 0x00cf92000000ffffULL; /* 0x10 kernel data */
    gdt[3] = 0x00cff2000000ffffULL; /* 0x18 user data, DPL3 */
    gdt[4] = 0x00affa000000ffffULL; /* 0x20 user code, L=1, DPL3 */
    for (uint32_t i = 0; i < ncpus; i++) {
        uint64_t base = (uint64_t)&tss[i];
        uint64_t limit = sizeof(struct tss64) - 1;
        tss[i].rsp[0] = (uint64_t)&kstacks[i + 1][0];
        tss[i].iomap_base = sizeof(struct tss64); /* no I/O bitmap: ring 3 has no port access */
        gdt[5 + 2 * i] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) |
                         (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
        gdt[6 + 2 * i] = base >> 32;
    }
    /* All gates: RSP0 from ring 3, the current stack in ring 0; interrupt gates (IF cleared). */
    for (int v = 0; v < 32; v++)
        set_gate(v, (void (*)(void))exc_stub_table[v], 0x8e);
    set_gate(VEC_TIMER, isr_timer, 0x8e);
    set_gate(VEC_SPURIOUS, isr_spurious, 0x8e);
}

static void apic_timer_init(uint64_t cpu)
{
    uint32_t a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    if (!(c & (1u << 21)))
        die("no x2APIC in CPUID", cpu);
    wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | (1ULL << 11) | (1ULL << 10));
    wrmsr(MSR_X2APIC_SVR, 0x100 | VEC_SPURIOUS);
    wrmsr(MSR_X2APIC_LVT_LINT0, 1u << 16);
    wrmsr(MSR_X2APIC_LVT_LINT1, 1u << 16);
    wrmsr(MSR_X2APIC_LVT_ERROR, 1u << 16);
    wrmsr(MSR_X2APIC_TDCR, 0xb);                           /* divide by 1: KVM's bus is 1 GHz */
    wrmsr(MSR_X2APIC_LVT_TIMER, VEC_TIMER | (1u << 17));   /* periodic */
    wrmsr(MSR_X2APIC_TMICT, TICK_NS);
}

static void kvmclock_init(uint64_t cpu)
{
    uint32_t a, b, c, d;
    cpuid(0x40000000, &a, &b, &c, &d);
    if (b != 0x4b4d564b) /* "KVMK" */
        die("no KVM CPUID leaves", cpu);
    cpuid(0x40000001, &a, &b, &c, &d);
    if (!(a & (1u << 3)))
        die("no KVM_FEATURE_CLOCKSOURCE2", cpu);
    wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (uint64_t)&pvclock_area[cpu].clock | 1);
}

void kmain(const struct boot_info *bi, uint64_t cpu) __attribute__((noreturn));
void kmain(const struct boot_info *bi, uint64_t cpu)
{
    if (cpu == 0) {
        g.console = (volatile uint8_t *)(bi->mmio_console_gpa ? bi->mmio_console_gpa : 0xD0000000ULL);
        if (bi->magic != LUO_BOOT_MAGIC)
            die("bad boot info magic", cpu);
        g.bi = bi;
        g.ncpus = bi->ncpus < MAX_CPUS ? bi->ncpus : MAX_CPUS;
        if (g.ncpus == 0)
            g.ncpus = 1;
        /* The legacy PIC would deliver on vectors 8..15: mask it, we use the LAPIC only. */
        outb(0x21, 0xff);
        outb(0xa1, 0xff);
        build_tables(g.ncpus);
        __atomic_store_n(&g.setup_done, 1, __ATOMIC_RELEASE);
    } else {
        while (!__atomic_load_n(&g.setup_done, __ATOMIC_ACQUIRE))
            cpu_relax();
    }
    if (cpu >= g.ncpus)
        halt_forever();

    struct dtr gdtr = {.limit = sizeof(gdt) - 1, .base = (uint64_t)gdt};
    struct dtr idtr = {.limit = sizeof(idt) - 1, .base = (uint64_t)idt};
    load_gdt(&gdtr, SEL_TSS(cpu));
    __asm__ volatile("lidt %0" ::"m"(idtr));
    apic_timer_init(cpu);
    kvmclock_init(cpu);
    enter_user(user_main, (uint64_t)&ustacks[cpu + 1][0] - 8, cpu);
}

static const char *const exc_names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "?15",
    "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "?22", "?23", "?24", "?25", "?26", "?27", "#HV", "#VC", "#SX", "?31",
};

/* Called from exc_common for any CPU exception: say everything we know, loudly, then halt. */
void trap_fatal(const struct trap_frame *f);
void trap_fatal(const struct trap_frame *f)
{
    uint64_t here = (uint64_t)__builtin_frame_address(0);
    uint64_t cpu = (here - (uint64_t)kstacks) >> KSTACK_SHIFT;
    out_str("\nluo-guest FATAL exception ");
    out_str(exc_names[f->vector & 31]);
    out_str(" vec=");
    out_u64(f->vector);
    out_str(" cpu=");
    out_u64(cpu);
    out_str(" err=");
    out_hex(f->err);
    out_str(" rip=");
    out_hex(f->rip);
    out_str(" cs=");
    out_hex(f->cs);
    out_str(" rflags=");
    out_hex(f->rflags);
    out_str(" rsp=");
    out_hex(f->rsp);
    out_str(" cr2=");
    out_hex(read_cr2());
    out_char('\n');
    halt_forever();
}

/*
 * Entry, descriptor loading, the ring-0 -> ring-3 drop and the interrupt stubs.
 *
 * Every ring-0 instruction costs ~1 us under PVM (emulated), so the handlers that run in steady
 * state (timer, sleep, spurious) are a handful of instructions and save only what they touch.
 */
#define ASM 1
#define MAX_CPUS 64
#define KSTACK_SHIFT 14

    .section .text.entry, "ax"
    .globl _start
_start:
    /* RDI = boot info GPA, RSI = vCPU index, RSP = 0: pick this vCPU's ring-0 stack. */
    cli
    cld
    cmp $MAX_CPUS, %rsi
    jae halt_forever
    lea kstacks(%rip), %rsp
    mov %rsi, %rax
    inc %rax
    shl $KSTACK_SHIFT, %rax
    add %rax, %rsp
    xor %ebp, %ebp
    call kmain
    jmp halt_forever

    .text
    .globl halt_forever
halt_forever:
    cli
1:  hlt
    jmp 1b

/* void load_gdt(const void *gdtr, uint16_t tss_sel): lgdt, reload every segment, ltr. */
    .globl load_gdt
load_gdt:
    lgdt (%rdi)
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    pushq $0x08
    lea 1f(%rip), %rax
    push %rax
    lretq
1:  ltr %si
    ret

/* void enter_user(void (*fn)(uint64_t), uint64_t rsp, uint64_t arg): iretq to ring 3, IF=1. */
    .globl enter_user
enter_user:
    pushq $0x1b          /* SS = user data */
    push %rsi            /* RSP */
    pushq $0x202         /* RFLAGS: IF */
    pushq $0x23          /* CS = user code */
    push %rdi            /* RIP */
    mov %rdx, %rdi
    xor %eax, %eax
    xor %ebx, %ebx
    xor %ecx, %ecx
    xor %edx, %edx
    xor %esi, %esi
    xor %ebp, %ebp
    xor %r8d, %r8d
    xor %r9d, %r9d
    xor %r10d, %r10d
    xor %r11d, %r11d
    iretq

/* LAPIC timer: EOI (x2APIC MSR 0x80B) and return.  Waking a sleeping vCPU is its only job. */
    .globl isr_timer
isr_timer:
    push %rax
    push %rcx
    push %rdx
    mov $0x80b, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    pop %rdx
    pop %rcx
    pop %rax
    iretq

    .globl isr_spurious
isr_spurious:
    iretq

/* Exceptions: push a uniform frame and report (never returns). */
.macro EXC num, has_err
exc_\num:
    .if \has_err == 0
    pushq $0
    .endif
    pushq $\num
    jmp exc_common
.endm

EXC 0,0
EXC 1,0
EXC 2,0
EXC 3,0
EXC 4,0
EXC 5,0
EXC 6,0
EXC 7,0
EXC 8,1
EXC 9,0
EXC 10,1
EXC 11,1
EXC 12,1
/*
 * #GP: a `hlt` executed in ring 3 is this guest's only system call, "sleep until the next
 * interrupt".  PVM runs ring 3 natively, so the hlt faults; we skip it, wait with interrupts on
 * (the sti shadow makes `sti; hlt` atomic) and return.  PVM gives #UD for `int $n` from ring 3,
 * and SYSCALL from ring 3 enters PVM's own supervisor-mode ABI, not an x86 ring 0, so a fault is
 * the portable way in.  Any other #GP is fatal.
 */
exc_13:
    testb $3, 16(%rsp)      /* CS of the faulting context (after the error code and RIP) */
    jz 2f
    push %rax
    mov 16(%rsp), %rax      /* faulting RIP */
    cmpb $0xf4, (%rax)
    jne 1f
    incq 16(%rsp)
    pop %rax
    add $8, %rsp            /* drop the error code */
    sti
    hlt
    iretq
1:  pop %rax
2:  pushq $13
    jmp exc_common
EXC 14,1
EXC 15,0
EXC 16,0
EXC 17,1
EXC 18,0
EXC 19,0
EXC 20,0
EXC 21,1
EXC 22,0
EXC 23,0
EXC 24,0
EXC 25,0
EXC 26,0
EXC 27,0
EXC 28,0
EXC 29,1
EXC 30,1
EXC 31,0

exc_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    call trap_fatal
    jmp halt_forever

    .section .rodata
    .balign 8
    .globl exc_stub_table
exc_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_\n
    .endr

    .section .note.GNU-stack, "", @progbits

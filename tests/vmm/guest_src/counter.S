/* Test guest for luo.vmm: vCPU 0 counts in rbx and prints "count <hex>" on COM1, keeps a
 * canary in r12 (prints "BAD r12" if it changes), stores the count at GPA 0x5000; other vCPUs print
 * "ap<n> <hex>" on the MMIO console. With -DSTOP_AT=N vCPU 0 triple-faults after N counts. */
    .code64
    .text
    .globl _start
_start:
    mov %rsi, %r13
    mov %rsi, %rax
    shl $12, %rax
    add $0x90000, %rax
    mov %rax, %rsp
    movabs $0x1122334455667788, %r12
    xor %ebx, %ebx
    test %r13, %r13
    jnz ap
bsp:
    inc %rbx
    lea msg(%rip), %rsi
    call puts_uart
    mov %rbx, %rax
    call puthex_uart
    mov $10, %al
    call putc_uart
    mov %rbx, 0x5000
    movabs $0x1122334455667788, %rax
    cmp %rax, %r12
    jne bad
#ifdef STOP_AT
    cmp $STOP_AT, %rbx
    je die
#endif
    mov $DELAY, %rcx
1:  dec %rcx
    jnz 1b
    jmp bsp
ap:
    inc %rbx
    mov $0xD0000000, %edi
    movb $'a', (%rdi)
    movb $'p', (%rdi)
    mov %r13, %rax
    add $'0', %al
    movb %al, (%rdi)
    movb $' ', (%rdi)
    mov %rbx, %rax
    call puthex_mmio
    movb $10, (%rdi)
    mov $DELAY, %rcx
1:  dec %rcx
    jnz 1b
    jmp ap
bad:
    lea badmsg(%rip), %rsi
    call puts_uart
2:  jmp 2b
die:
    lidt nullidt(%rip)
    ud2
putc_uart:
    mov $0x3f8, %dx
    out %al, %dx
    ret
puts_uart:
    lodsb
    test %al, %al
    jz 1f
    call putc_uart
    jmp puts_uart
1:  ret
puthex_uart:
    mov %rax, %r8
    mov $16, %r9
1:  rol $4, %r8
    mov %r8, %rax
    and $15, %rax
    lea hexd(%rip), %r10
    mov (%r10,%rax), %al
    call putc_uart
    dec %r9
    jnz 1b
    ret
puthex_mmio:
    mov %rax, %r8
    mov $16, %r9
1:  rol $4, %r8
    mov %r8, %rax
    and $15, %rax
    lea hexd(%rip), %r10
    mov (%r10,%rax), %al
    movb %al, (%rdi)
    dec %r9
    jnz 1b
    ret
    .data
msg:    .asciz "count "
badmsg: .asciz "BAD r12\n"
hexd:   .ascii "0123456789abcdef"
    .balign 8
nullidt: .word 0
    .quad 0

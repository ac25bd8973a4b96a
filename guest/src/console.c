/*
 * Console output: one byte per write to the MMIO console (the VMM collects a line per vCPU until
 * '\n').  The same code runs in ring 0 (fatal reports) and ring 3 (everything else), so it uses
 * only plain instructions.  Lines are streamed, never buffered: nothing else prints on a vCPU
 * while it is in the middle of a line (interrupt handlers do not print).
 */
#include "guest.h"

void out_char(char c) { *g.console = (uint8_t)c; }

void out_mem(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        out_char(s[i]);
}

void out_str(const char *s)
{
    while (*s)
        out_char(*s++);
}

void out_u64(uint64_t v)
{
    char buf[20];
    int n = 0;
    do {
        buf[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        out_char(buf[--n]);
}

static void hex_digits(uint64_t v, int digits)
{
    for (int i = digits - 1; i >= 0; i--)
        out_char("0123456789abcdef"[(v >> (4 * i)) & 0xf]);
}

void out_hex(uint64_t v)
{
    int digits = 1;
    while (digits < 16 && (v >> (4 * digits)))
        digits++;
    out_str("0x");
    hex_digits(v, digits);
}

void out_hex16(uint64_t v) { hex_digits(v, 16); }

/* The compiler may emit calls to these even in freestanding code. */
void *memset(void *d, int c, size_t n)
{
    uint8_t *p = d;
    while (n--)
        *p++ = (uint8_t)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    uint8_t *p = d;
    const uint8_t *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

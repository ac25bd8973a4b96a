/*
 * luo VMM: run a prepared list of ioctls in one call (src/luo/vmm/kvm/batch.py loads this).
 *
 * Why C (bench/save_restore.py --profile, 1 GiB, 2 vCPUs, this machine, PVM, 100 cycles): with
 * save and restore already prepared as batches, running their ~50 ioctls from Python through
 * fcntl.ioctl costs 162 us (save) + 153 us (restore) of ioctl time per cycle, 5-16 us per vCPU
 * ioctl; from this loop 88 + 102 us, 2.4-4 us per vCPU ioctl but KVM_SET_MSRS/SET_SREGS (~12-15).
 * Whole steps, medians: save 226 -> 158 us, restore 271 -> 183 us (the version-1 path: 609 and
 * 763). A tight C loop of one vCPU ioctl takes ~2.2 us; the rest is user-space work between the
 * syscalls, paid cold: the blackout's code runs right after the guest had both cores. So the whole
 * save (or restore) is one foreign call, with the GIL released throughout, and the few decisions
 * a restore makes per op (skip a TSC deadline of 0, a TSC offset or CPUID equal to the fresh
 * vCPU's) are made here too, from bytes in the buffer.
 *
 * Nothing here knows KVM: an op is (fd, request, argument = base + off), optionally checked to
 * return an expected value (KVM_GET/SET_MSRS return how many MSRs they moved), optionally run
 * only if some bytes of the buffer are non-zero, or differ from other bytes. The Python fallback
 * in batch.py runs the same list with fcntl.ioctl and must stay equivalent.
 *
 * Build: scripts/setup.sh (gcc -O2 -shared -fPIC). ABI: bump LUO_BATCH_ABI with struct luo_op.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#define LUO_BATCH_ABI 2
#define LUO_OP_SKIP 1u         /* not run this time */
#define LUO_OP_CHECK 2u        /* the result must equal expect */
#define LUO_OP_IF_NONZERO 4u   /* run only if the cond_len bytes at cond_a are not all zero */
#define LUO_OP_IF_DIFFERENT 8u /* run only if the cond_len bytes at cond_a differ from those at cond_b */
#define LUO_NOT_RUN INT64_MIN  /* results[i] of an op that did not run */

struct luo_op {
	int32_t fd;
	uint32_t flags;
	uint64_t req;
	uint64_t off;
	int64_t expect;
	uint64_t cond_a;
	uint64_t cond_b;
	uint64_t cond_len;
};

_Static_assert(sizeof(struct luo_op) == 56, "struct luo_op is 56 bytes (batch.py OP)");

int luo_ioctl_batch_abi(void)
{
	return LUO_BATCH_ABI;
}

static inline uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int all_zero(const char *p, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++)
		if (p[i])
			return 0;
	return 1;
}

static int wanted(const struct luo_op *op, const char *base)
{
	if (op->flags & LUO_OP_SKIP)
		return 0;
	if ((op->flags & LUO_OP_IF_NONZERO) && all_zero(base + op->cond_a, op->cond_len))
		return 0;
	if ((op->flags & LUO_OP_IF_DIFFERENT) && !memcmp(base + op->cond_a, base + op->cond_b, op->cond_len))
		return 0;
	return 1;
}

/*
 * Runs ops[start..n) in order. Returns n when every op ran or was not wanted; otherwise the
 * index of the first op that failed (*err = errno, *result = its return value) or whose result
 * differed from its expect (*err = 0, *result = what it returned); the ops after it did not run.
 * results: n slots, each op's return value or LUO_NOT_RUN. ns: NULL, or n slots that receive
 * each op's duration (0 when not run), for profiling.
 */
int luo_ioctl_batch(const struct luo_op *ops, int n, int start, char *base, int *err, int64_t *result,
		    int64_t *results, uint64_t *ns)
{
	for (int i = start; i < n; i++) {
		const struct luo_op *op = &ops[i];
		results[i] = LUO_NOT_RUN;
		if (ns)
			ns[i] = 0;
		if (!wanted(op, base))
			continue;
		uint64_t t0 = ns ? now_ns() : 0;
		int r = ioctl(op->fd, (unsigned long)op->req, base + op->off);
		if (ns)
			ns[i] = now_ns() - t0;
		results[i] = r;
		if (r < 0) {
			*err = errno;
			*result = r;
			return i;
		}
		if ((op->flags & LUO_OP_CHECK) && r != op->expect) {
			*err = 0;
			*result = r;
			return i;
		}
	}
	return n;
}

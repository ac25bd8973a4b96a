/*
 * luo VMM: run a prepared list of ioctls in one call (src/luo/vmm/kvm/batch.py loads this).
 *
 * Why C: a vCPU's save or restore is ~10 ioctls, each of which costs ~2.2-2.8 us in the kernel
 * on this machine (PVM) when issued back to back from C, but 6-9 us when issued one by one from
 * Python through ctypes and 3.3-5.7 us through fcntl.ioctl (bench/save_restore.py --profile and
 * the loop measurements in docs/vmm.md): on PVM a vCPU ioctl leaves user space cache- and
 * TLB-cold, so every Python statement between two ioctls costs more than it does elsewhere. Issuing
 * the whole save (or restore) of every vCPU and the VM's chips as one list removes all of that:
 * one foreign call per save or restore, with the GIL released throughout.
 *
 * Nothing here knows KVM: an op is (fd, request, argument = base + offset), optionally skipped,
 * optionally checked to return an expected value (KVM_GET/SET_MSRS return how many MSRs they
 * moved). The Python fallback in batch.py runs the same list with fcntl.ioctl.
 *
 * Build: scripts/setup.sh (gcc -O2 -shared -fPIC). ABI: bump LUO_BATCH_ABI with struct luo_op.
 */
#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <time.h>

#define LUO_BATCH_ABI 1
#define LUO_OP_SKIP 1u  /* not run this time */
#define LUO_OP_CHECK 2u /* the result must equal expect */

struct luo_op {
	int32_t fd;
	uint32_t flags;
	uint64_t req;
	uint64_t off;
	int64_t expect;
};

_Static_assert(sizeof(struct luo_op) == 32, "struct luo_op is 32 bytes (batch.py OP)");

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

/*
 * Runs ops[start..n) in order. Returns n when every op ran; otherwise the index of the first op
 * that failed (*err = errno, *result = its return value) or whose result differed from its
 * expect (*err = 0, *result = what it returned); the ops after it did not run.
 * ns: NULL, or n slots that receive each op's duration (0 for a skipped op), for profiling.
 */
int luo_ioctl_batch(const struct luo_op *ops, int n, int start, char *base, int *err, int64_t *result,
		    uint64_t *ns)
{
	for (int i = start; i < n; i++) {
		const struct luo_op *op = &ops[i];
		if (op->flags & LUO_OP_SKIP) {
			if (ns)
				ns[i] = 0;
			continue;
		}
		uint64_t t0 = ns ? now_ns() : 0;
		int r = ioctl(op->fd, (unsigned long)op->req, base + op->off);
		if (ns)
			ns[i] = now_ns() - t0;
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

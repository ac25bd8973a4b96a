/* SPDX-License-Identifier: MIT */
/*
 * luo_rfcv2: the RFC v2 global calls on the same /dev/liveupdate fd (the full command value
 * tells them from the v7.3 ones): GET_STATE, FD_PRESERVE (the kernel assigns the token),
 * FD_UNPRESERVE, FD_RESTORE, and the PREPARE/FREEZE/CANCEL/FINISH events.
 * Expects a host in the normal state and leaves it normal with nothing preserved.
 */
#include "check.h"

static const char *state_name(__u32 s)
{
	static const char *names[] = { "normal", "prepared", "frozen", "updated" };

	return s < 4 ? names[s] : "?";
}

static void expect_state(int dev, __u32 want, const char *when)
{
	__u32 st = 0xdeadbeef;

	if (EXPECT_OK(ioctl(dev, LUO_V2_GET_STATE, &st), "GET_STATE %s", when) >= 0)
		luo_check(st == want, "state is %s %s (got %u %s)", state_name(want), when, st, state_name(st));
}

static int v2_preserve(int dev, int fd, __u64 *token)
{
	struct luo_v2_fd arg = { .fd = fd, .flags = 0, .token = 0xabababababababab };
	int r = ioctl(dev, LUO_V2_FD_PRESERVE, &arg);

	if (r == 0 && token)
		*token = arg.token;
	return r;
}

static int v2_unpreserve(int dev, __u64 token)
{
	return ioctl(dev, LUO_V2_FD_UNPRESERVE, &token);
}

static int v2_restore(int dev, __u64 token)
{
	struct luo_v2_fd arg = { .fd = -1, .flags = 0, .token = token };
	int r = ioctl(dev, LUO_V2_FD_RESTORE, &arg);

	return r < 0 ? r : arg.fd;
}

int main(void)
{
	__u64 t1 = 0, t2 = 0, t3 = 0;
	int dev, m1, m2, m3, null, s;
	char *bad, *gone;

	luo_setup_output();
	bad = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	gone = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (bad == MAP_FAILED || gone == MAP_FAILED || munmap(gone, 4096) < 0)
		luo_bail("mmap");
	dev = luo_open_dev();
	if (dev < 0)
		luo_bail("open " LUO_DEV_PATH);

	expect_state(dev, LUO_V2_STATE_NORMAL, "at start");
	EXPECT_ERR(ioctl(dev, LUO_V2_GET_STATE, gone), EFAULT, "GET_STATE into an unmapped address: EFAULT");
	EXPECT_ERR(ioctl(dev, LUO_V2_GET_STATE, bad), EFAULT, "GET_STATE into a PROT_NONE page: EFAULT");

	m1 = luo_memfd("v2-a", 21, 4096);
	m2 = luo_memfd("v2-b", 22, 0);
	m3 = luo_memfd("v2-c", 23, 3);
	if (m1 < 0 || m2 < 0 || m3 < 0)
		luo_bail("memfd");
	EXPECT_OK(v2_preserve(dev, m1, &t1), "FD_PRESERVE a memfd");
	luo_check(t1 != 0xabababababababab, "FD_PRESERVE writes the assigned token back (%llu)",
		  (unsigned long long)t1);
	EXPECT_OK(v2_preserve(dev, m2, &t2), "FD_PRESERVE a second (empty) memfd");
	luo_check(t2 != t1 && t2 != 0xabababababababab, "the second token differs (%llu, %llu)",
		  (unsigned long long)t1, (unsigned long long)t2);
	null = open("/dev/null", O_RDWR);
	EXPECT_ERR(v2_preserve(dev, null, NULL), ENOENT, "FD_PRESERVE of /dev/null (no handler): ENOENT");
	close(null);
	EXPECT_ERR(v2_preserve(dev, 9999, NULL), EBADF, "FD_PRESERVE of a closed fd number: EBADF");
	EXPECT_ERR(ioctl(dev, LUO_V2_FD_PRESERVE, gone), EFAULT, "FD_PRESERVE with a struct at an unmapped address: EFAULT");
	EXPECT_ERR(ioctl(dev, LUO_V2_FD_PRESERVE, bad), EFAULT, "FD_PRESERVE with a struct in a PROT_NONE page: EFAULT");

	EXPECT_ERR(v2_restore(dev, t1), EBUSY, "FD_RESTORE in the normal state: EBUSY");
	EXPECT_ERR(v2_unpreserve(dev, 0x7777777777ull), ENOENT, "FD_UNPRESERVE of an unknown token: ENOENT");

	EXPECT_ERR(ioctl(dev, LUO_V2_EVENT_FINISH), EINVAL, "FINISH from normal: EINVAL");
	EXPECT_ERR(ioctl(dev, LUO_V2_EVENT_CANCEL), EINVAL, "CANCEL from normal: EINVAL");
	EXPECT_ERR(ioctl(dev, LUO_V2_EVENT_FREEZE), EINVAL, "FREEZE from normal: EINVAL");
	expect_state(dev, LUO_V2_STATE_NORMAL, "after the refused events");

	/* the v7.3 session calls still work on the same fd */
	s = EXPECT_OK(luo_create_session(dev, "rfcv2-mixed"), "CREATE_SESSION (v7.3) on the same fd");
	if (s >= 0) {
		EXPECT_ERR(luo_preserve_fd(s, m1, 1), EBUSY,
			   "a memfd preserved through FD_PRESERVE cannot join a session: EBUSY");
		EXPECT_OK(luo_preserve_fd(s, m3, 1), "a fresh memfd joins the session");
		EXPECT_ERR(v2_preserve(dev, m3, NULL), EBUSY, "FD_PRESERVE of a memfd already in a session: EBUSY");
		close(s);
	}

	EXPECT_OK(ioctl(dev, LUO_V2_EVENT_PREPARE), "EVENT_PREPARE (0xBA04)");
	expect_state(dev, LUO_V2_STATE_PREPARED, "after PREPARE");
	EXPECT_ERR(ioctl(dev, LUO_V2_EVENT_PREPARE), EINVAL, "PREPARE from prepared: EINVAL");
	EXPECT_ERR(ioctl(dev, LUO_V2_EVENT_FINISH), EINVAL, "FINISH from prepared: EINVAL");
	EXPECT_ERR(v2_preserve(dev, m3, NULL), EBUSY, "FD_PRESERVE while prepared: EBUSY");
	EXPECT_ERR(v2_unpreserve(dev, t2), EBUSY, "FD_UNPRESERVE while prepared: EBUSY");
	EXPECT_ERR(v2_restore(dev, t1), EBUSY, "FD_RESTORE while prepared: EBUSY");
	EXPECT_OK(ioctl(dev, LUO_V2_EVENT_CANCEL), "EVENT_CANCEL");
	expect_state(dev, LUO_V2_STATE_NORMAL, "after CANCEL");

	EXPECT_OK(ioctl(dev, LUO_V2_EVENT_PREPARE), "PREPARE again");
	EXPECT_OK(ioctl(dev, LUO_V2_EVENT_FREEZE), "EVENT_FREEZE from prepared");
	expect_state(dev, LUO_V2_STATE_FROZEN, "after FREEZE");
	EXPECT_ERR(ioctl(dev, LUO_V2_EVENT_FREEZE), EINVAL, "FREEZE from frozen: EINVAL");
	EXPECT_ERR(ioctl(dev, LUO_V2_EVENT_PREPARE), EINVAL, "PREPARE from frozen: EINVAL");
	EXPECT_OK(ioctl(dev, LUO_V2_EVENT_CANCEL), "CANCEL from frozen");
	expect_state(dev, LUO_V2_STATE_NORMAL, "after the second CANCEL");

	EXPECT_OK(v2_preserve(dev, m3, &t3), "FD_PRESERVE after cancel (normal again)");
	EXPECT_OK(v2_unpreserve(dev, t1), "FD_UNPRESERVE the first token (it stayed registered across cancel)");
	EXPECT_ERR(v2_unpreserve(dev, t1), ENOENT, "FD_UNPRESERVE of the same token again: ENOENT");
	EXPECT_OK(v2_unpreserve(dev, t2), "FD_UNPRESERVE the second token");
	EXPECT_OK(v2_unpreserve(dev, t3), "FD_UNPRESERVE the third token");
	EXPECT_ERR(ioctl(dev, LUO_V2_FD_UNPRESERVE, gone), EFAULT, "FD_UNPRESERVE with the token at an unmapped address: EFAULT");
	EXPECT_ERR(ioctl(dev, LUO_V2_FD_UNPRESERVE, bad), EFAULT, "FD_UNPRESERVE with the token in a PROT_NONE page: EFAULT");
	EXPECT_OK(v2_preserve(dev, m1, &t1), "an unpreserved memfd can be preserved again");
	EXPECT_OK(v2_unpreserve(dev, t1), "and unpreserved again");
	expect_state(dev, LUO_V2_STATE_NORMAL, "at the end");
	close(m1);
	close(m2);
	close(m3);
	close(dev);
	return luo_done();
}

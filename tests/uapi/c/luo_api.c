/* SPDX-License-Identifier: MIT */
/*
 * luo_api: the v7.3 /dev/liveupdate UAPI in one stage (no update needed).
 *
 *   luo_api              every check (open, sessions, size rules, errnos, memfd freezing, scale)
 *   luo_api --paths      the device opened through other spellings of its path
 *   luo_api --hold       open the device, print "holding", keep it until a line on stdin
 *   luo_api --open-busy  an open must fail with EBUSY
 *   luo_api --open-ok    an open must succeed
 */
#include "check.h"

#include <linux/falloc.h>

#define MANY_SESSIONS 200
#define MANY_FILES 200

static char *bad_page;  /* a PROT_NONE page: reading it faults */
static char *gone_page; /* an address with nothing mapped */

static int open_dev_flags(int flags)
{
	return open(LUO_DEV_PATH, flags);
}

static void check_open(void)
{
	int fd1, fd2;

	fd1 = EXPECT_OK(open_dev_flags(O_RDWR | O_CLOEXEC), "open " LUO_DEV_PATH " O_RDWR|O_CLOEXEC");
	if (fd1 < 0)
		luo_bail("cannot open " LUO_DEV_PATH);
	luo_check(luo_is_cloexec(fd1), "device fd opened with O_CLOEXEC has FD_CLOEXEC");
	EXPECT_ERR(open_dev_flags(O_RDWR), EBUSY, "second open while the first is open gives EBUSY");
	EXPECT_ERR(open_dev_flags(O_RDWR | O_CLOEXEC), EBUSY, "third open (O_CLOEXEC) gives EBUSY too");
	EXPECT_OK(close(fd1), "close the device fd");
	fd2 = EXPECT_OK(open_dev_flags(O_RDWR), "open again after close works");
	if (fd2 >= 0) {
		luo_check(!luo_is_cloexec(fd2), "device fd opened without O_CLOEXEC has no FD_CLOEXEC");
		close(fd2);
	}
}

static void check_other_fds(void)
{
	int p[2], avail = -1, fd;
	struct luo_session_req req = { .size = sizeof(req), .name = "on-a-pipe" };

	if (pipe(p) < 0)
		luo_bail("pipe");
	if (write(p[1], "abc", 3) != 3)
		luo_bail("write pipe");
	EXPECT_OK(ioctl(p[0], FIONREAD, &avail), "FIONREAD on a pipe (not an 0xBA ioctl) works");
	luo_check(avail == 3, "FIONREAD reports 3 bytes (got %d)", avail);
	EXPECT_ERR(ioctl(p[0], LUO_IOC_CREATE_SESSION, &req), ENOTTY,
		   "0xBA00 on a pipe (not a luo fd) gives the kernel's ENOTTY");
	fd = memfd_create("plain", 0);
	EXPECT_ERR(ioctl(fd, LUO_SESSION_PRESERVE_FD, &req), ENOTTY, "0xBA40 on a memfd gives ENOTTY");
	close(fd);
	close(p[0]);
	close(p[1]);
	fd = open("/etc/hostname", O_RDONLY);
	if (fd < 0)
		fd = open("/proc/self/stat", O_RDONLY);
	luo_check(fd >= 0, "opening an ordinary file works (errno %s)", luo_errname(errno));
	if (fd >= 0)
		close(fd);
	EXPECT_ERR(open("/dev/liveupdate-not-here", O_RDWR), ENOENT,
		   "opening a nonexistent /dev path still gives ENOENT");
}

static void check_create(int dev)
{
	struct luo_session_req req;
	char name[LUO_NAME_LEN], longname[LUO_NAME_LEN];
	int s, s63;

	s = EXPECT_OK(luo_create_session(dev, "api-a"), "CREATE_SESSION api-a");
	luo_check(s >= 0 && luo_is_cloexec(s), "a new session fd is O_CLOEXEC");
	if (s >= 0) {
		EXPECT_OK(luo_get_name(s, name), "GET_NAME on a created session");
		luo_check(strcmp(name, "api-a") == 0, "GET_NAME gives api-a (got %.64s)", name);
	}
	EXPECT_ERR(luo_create_session(dev, "api-a"), EEXIST, "duplicate session name gives EEXIST");
	EXPECT_ERR(luo_create_session(dev, ""), EINVAL, "empty session name gives EINVAL");

	memset(&req, 0, sizeof(req));
	req.size = sizeof(req);
	memset(req.name, 'n', sizeof(req.name));
	EXPECT_ERR(ioctl(dev, LUO_IOC_CREATE_SESSION, &req), EINVAL, "name without NUL in 64 bytes gives EINVAL");

	memset(longname, 'L', 63);
	longname[63] = 0;
	s63 = EXPECT_OK(luo_create_session(dev, longname), "CREATE_SESSION with a 63-char name");
	if (s63 >= 0) {
		memset(name, 0, sizeof(name));
		EXPECT_OK(luo_get_name(s63, name), "GET_NAME of the 63-char session");
		luo_check(memcmp(name, longname, 64) == 0, "GET_NAME returns the 63 chars and the NUL");
		close(s63);
	}
	EXPECT_ERR(luo_retrieve_session(dev, "api-no-such"), ENOENT, "RETRIEVE_SESSION of an unknown name: ENOENT");
	EXPECT_ERR(luo_retrieve_session(dev, "api-a"), ENOENT,
		   "RETRIEVE_SESSION of this run's own (outgoing) session: ENOENT");
	if (s >= 0) {
		close(s);
		s = EXPECT_OK(luo_create_session(dev, "api-a"), "after closing api-a, its name can be created again");
		if (s >= 0)
			close(s);
	}
}

static void check_size_rules_device(int dev)
{
	unsigned char big[4096];
	struct luo_session_req *req = (struct luo_session_req *)big;
	int fd;

	EXPECT_ERR(ioctl(dev, LUO_IOC_CREATE_SESSION, NULL), EFAULT, "CREATE_SESSION with NULL gives EFAULT");
	EXPECT_ERR(ioctl(dev, LUO_IOC_CREATE_SESSION, gone_page), EFAULT,
		   "CREATE_SESSION with a struct at an unmapped address gives EFAULT");
	EXPECT_ERR(ioctl(dev, LUO_IOC_RETRIEVE_SESSION, gone_page), EFAULT,
		   "RETRIEVE_SESSION with a struct at an unmapped address gives EFAULT");
	EXPECT_ERR(ioctl(dev, LUO_IOC_CREATE_SESSION, bad_page), EFAULT,
		   "CREATE_SESSION with a struct in a PROT_NONE page gives EFAULT");

	memset(big, 0, sizeof(big));
	req->size = 71;
	strcpy((char *)req->name, "api-short");
	EXPECT_ERR(ioctl(dev, LUO_IOC_CREATE_SESSION, req), EINVAL, "size 71 (< 72) gives EINVAL");
	req->size = 0;
	EXPECT_ERR(ioctl(dev, LUO_IOC_CREATE_SESSION, req), EINVAL, "size 0 gives EINVAL");
	req->size = 4;
	EXPECT_ERR(ioctl(dev, LUO_IOC_RETRIEVE_SESSION, req), EINVAL, "RETRIEVE_SESSION size 4 gives EINVAL");

	memset(big, 0, sizeof(big));
	req->size = 80;
	strcpy((char *)req->name, "api-tail");
	big[77] = 1;
	EXPECT_ERR(ioctl(dev, LUO_IOC_CREATE_SESSION, req), E2BIG, "size 80 with a non-zero tail gives E2BIG");
	big[77] = 0;
	req->fd = -1;
	fd = EXPECT_OK(ioctl(dev, LUO_IOC_CREATE_SESSION, req), "size 80 with a zero tail is accepted");
	luo_check(req->fd >= 0 && fcntl(req->fd, F_GETFD) >= 0, "the session fd is written back (fd %d)", req->fd);
	if (fd >= 0 && req->fd >= 0)
		close(req->fd);

	memset(big, 0, sizeof(big));
	req->size = sizeof(big);
	strcpy((char *)req->name, "api-page");
	req->fd = -1;
	EXPECT_OK(ioctl(dev, LUO_IOC_CREATE_SESSION, req), "size 4096 with all-zero tail is accepted");
	if (req->fd >= 0)
		close(req->fd);

	memset(big, 0, sizeof(big));
	req->size = sizeof(*req);
	strcpy((char *)req->name, "api-enotty");
	EXPECT_ERR(ioctl(dev, _IOR(LUO_IOC_TYPE, 0x00, struct luo_session_req), req), ENOTTY,
		   "_IOR(0xBA,0x00,72) on the device fd gives ENOTTY");
	EXPECT_ERR(ioctl(dev, _IOW(LUO_IOC_TYPE, 0x01, struct luo_session_req), req), ENOTTY,
		   "_IOW(0xBA,0x01,72) on the device fd gives ENOTTY");
	EXPECT_ERR(ioctl(dev, _IO(LUO_IOC_TYPE, 0x20), req), EINVAL, "_IO(0xBA,0x20) on the device fd: EINVAL");
	EXPECT_ERR(ioctl(dev, _IO(LUO_IOC_TYPE, 0x40), req), EINVAL,
		   "_IO(0xBA,0x40) (a session nr) on the device fd: EINVAL");
}

static void check_size_rules_session(int dev)
{
	unsigned char buf[64];
	struct luo_fd_req *req = (struct luo_fd_req *)buf;
	struct luo_get_name_req gn;
	int s, m;

	s = luo_create_session(dev, "api-sizes");
	if (s < 0)
		luo_bail("create api-sizes");
	m = luo_memfd("sizes", 1, 100);
	if (m < 0)
		luo_bail("memfd");

	EXPECT_ERR(ioctl(s, LUO_SESSION_PRESERVE_FD, gone_page), EFAULT, "PRESERVE_FD with a struct at an unmapped address: EFAULT");
	EXPECT_ERR(ioctl(s, LUO_SESSION_PRESERVE_FD, bad_page), EFAULT, "PRESERVE_FD with a struct in a PROT_NONE page: EFAULT");
	EXPECT_ERR(ioctl(s, LUO_SESSION_GET_NAME, NULL), EFAULT, "GET_NAME with NULL: EFAULT");
	memset(buf, 0, sizeof(buf));
	req->fd = m;
	req->token = 7;
	req->size = 15;
	EXPECT_ERR(ioctl(s, LUO_SESSION_PRESERVE_FD, req), EINVAL, "PRESERVE_FD size 15 (< 16): EINVAL");
	req->size = 8;
	EXPECT_ERR(ioctl(s, LUO_SESSION_PRESERVE_FD, req), EINVAL, "PRESERVE_FD size 8: EINVAL");
	req->size = 24;
	buf[20] = 0x5a;
	EXPECT_ERR(ioctl(s, LUO_SESSION_PRESERVE_FD, req), E2BIG, "PRESERVE_FD size 24, non-zero tail: E2BIG");
	buf[20] = 0;
	EXPECT_OK(ioctl(s, LUO_SESSION_PRESERVE_FD, req), "PRESERVE_FD size 24, zero tail: accepted");

	memset(&gn, 0, sizeof(gn));
	gn.size = 71;
	EXPECT_ERR(ioctl(s, LUO_SESSION_GET_NAME, &gn), EINVAL, "GET_NAME size 71: EINVAL");

	req->size = sizeof(*req);
	EXPECT_ERR(ioctl(s, _IOW(LUO_IOC_TYPE, 0x40, struct luo_fd_req), req), ENOTTY,
		   "_IOW(0xBA,0x40,16) on a session fd: ENOTTY");
	EXPECT_ERR(ioctl(s, _IOWR(LUO_IOC_TYPE, 0x43, struct luo_get_name_req), &gn), ENOTTY,
		   "_IOWR(0xBA,0x43,72) on a session fd: ENOTTY");
	EXPECT_ERR(ioctl(s, _IO(LUO_IOC_TYPE, 0x44), req), EINVAL, "_IO(0xBA,0x44) on a session fd: EINVAL");
	EXPECT_ERR(ioctl(s, _IO(LUO_IOC_TYPE, 0x3f), req), EINVAL, "_IO(0xBA,0x3f) on a session fd: EINVAL");
	EXPECT_ERR(ioctl(s, LUO_IOC_CREATE_SESSION, req), EINVAL, "CREATE_SESSION (nr 0x00) on a session fd: EINVAL");
	close(m);
	close(s);
}

static void check_preserve(int dev)
{
	int a, b, m1, m2, m1dup, mnull;
	struct stat st;
	char buf[16];

	a = luo_create_session(dev, "api-p1");
	b = luo_create_session(dev, "api-p2");
	if (a < 0 || b < 0)
		luo_bail("create api-p1/api-p2");
	m1 = luo_memfd("m1", 11, 8192);
	m2 = luo_memfd("m2", 12, 10);
	if (m1 < 0 || m2 < 0)
		luo_bail("memfd");

	EXPECT_OK(luo_preserve_fd(a, m1, 1), "PRESERVE_FD a memfd_create(name, 0) memfd with data");
	EXPECT_ERR(luo_preserve_fd(a, m2, 1), EEXIST, "PRESERVE_FD with a token used in the session: EEXIST");
	EXPECT_OK(luo_preserve_fd(b, m2, 1), "the same token in another session is fine");
	EXPECT_ERR(luo_preserve_fd(a, m1, 2), EBUSY, "preserving a memfd twice in one session: EBUSY");
	EXPECT_ERR(luo_preserve_fd(b, m1, 3), EBUSY, "preserving a memfd already in another session: EBUSY");
	m1dup = dup(m1);
	EXPECT_ERR(luo_preserve_fd(b, m1dup, 4), EBUSY, "a dup of a preserved memfd (same file): EBUSY");
	EXPECT_ERR(luo_preserve_fd(a, 9999, 5), EBADF, "PRESERVE_FD of a closed fd number: EBADF");
	EXPECT_ERR(luo_preserve_fd(a, -1, 6), EBADF, "PRESERVE_FD of fd -1: EBADF");
	mnull = open("/dev/null", O_RDWR);
	EXPECT_ERR(luo_preserve_fd(a, mnull, 7), ENOENT, "PRESERVE_FD of /dev/null (no handler): ENOENT");
	close(mnull);

	EXPECT_ERR(luo_retrieve_fd(a, 1), EINVAL, "RETRIEVE_FD on a created session: EINVAL");
	EXPECT_ERR(luo_finish(a), EINVAL, "FINISH on a created session: EINVAL");

	/* 64-bit tokens: 1 and 1<<32|1 must not collide */
	{
		int t1 = luo_memfd("t64a", 1, 1), t2 = luo_memfd("t64b", 2, 1), t3 = luo_memfd("t64c", 3, 1);

		EXPECT_OK(luo_preserve_fd(b, t1, 0x100000001ull), "token 0x100000001 (high bits) works");
		EXPECT_OK(luo_preserve_fd(b, t2, ~0ull), "token 0xffffffffffffffff works");
		EXPECT_OK(luo_preserve_fd(b, t3, 0), "token 0 works");
		EXPECT_ERR(luo_preserve_fd(b, m1dup, 0x100000001ull), EEXIST, "token 0x100000001 again: EEXIST");
		close(t1);
		close(t2);
		close(t3);
	}

	/* a preserved memfd is frozen in size; contents within the size can change */
	EXPECT_ERR(ftruncate(m1, 16384), EPERM, "ftruncate (grow) of a preserved memfd: EPERM");
	EXPECT_ERR(ftruncate(m1, 100), EPERM, "ftruncate (shrink) of a preserved memfd: EPERM");
	EXPECT_ERR(fallocate(m1, 0, 0, 65536), EPERM, "fallocate of a preserved memfd: EPERM");
	EXPECT_ERR(fallocate(m1, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096), EPERM,
		   "fallocate punch-hole of a preserved memfd: EPERM");
	luo_check(fstat(m1, &st) == 0 && st.st_size == 8192, "the preserved memfd keeps its size (%lld)",
		  (long long)st.st_size);
	/* A write past the end still grows a preserved memfd under luo run: the filter would have to
	 * stop every write(2) of the program to see it (docs/uapi.md, "Limits of the emulation"). */
	EXPECT_OK(pwrite(m1, "hello", 5, 100), "a write within the size of a preserved memfd works");
	memset(buf, 0, sizeof(buf));
	EXPECT_OK(pread(m1, buf, 5, 100), "reading a preserved memfd works");
	luo_check(memcmp(buf, "hello", 5) == 0, "the write is read back");

	EXPECT_OK(close(a), "close the created session api-p1 (unpreserves its files)");
	EXPECT_OK(ftruncate(m1, 16384), "after the session is closed, the memfd can grow");
	EXPECT_OK(fallocate(m1, 0, 0, 32768), "and fallocate works again");
	EXPECT_OK(ftruncate(m1, 10), "and it can shrink");
	a = EXPECT_OK(luo_create_session(dev, "api-p1"), "api-p1 can be created again");
	EXPECT_OK(luo_preserve_fd(a, m1dup, 1), "the unpreserved memfd can be preserved again");
	EXPECT_ERR(ftruncate(m1, 20), EPERM, "and is frozen again");
	EXPECT_ERR(ftruncate(m2, 20), EPERM, "m2 (in api-p2) is still frozen");
	close(m1);
	close(m1dup);
	close(m2);
	close(a);
	close(b);
}

static void check_session_outlives_device(void)
{
	int dev, s, m, dev2;
	char name[LUO_NAME_LEN];

	dev = luo_open_dev();
	if (dev < 0)
		luo_bail("open");
	s = EXPECT_OK(luo_create_session(dev, "api-outlive"), "create api-outlive");
	EXPECT_OK(close(dev), "close the device fd while a session is open");
	m = luo_memfd("outlive", 5, 4096);
	EXPECT_OK(luo_preserve_fd(s, m, 42), "the session still works without the device fd (PRESERVE_FD)");
	EXPECT_OK(luo_get_name(s, name), "GET_NAME without the device fd");
	dev2 = EXPECT_OK(luo_open_dev(), "the device opens again (sessions do not hold it)");
	EXPECT_ERR(luo_create_session(dev2, "api-outlive"), EEXIST, "the open session's name is still taken");
	EXPECT_ERR(ftruncate(m, 1), EPERM, "and its memfd is still frozen");
	close(s);
	EXPECT_OK(ftruncate(m, 1), "closing the session unfreezes it");
	close(m);
	close(dev2);
}

static void check_many(int dev)
{
	static int fds[MANY_SESSIONS];
	char name[LUO_NAME_LEN];
	int ok = 1, s, bad = -1, s2;

	for (int i = 0; i < MANY_SESSIONS; i++) {
		snprintf(name, sizeof(name), "many-%03d", i);
		fds[i] = luo_create_session(dev, name);
		if (fds[i] < 0 && ok) {
			ok = 0;
			bad = i;
			luo_note("create %s: %s", name, luo_errname(errno));
		}
	}
	luo_check(ok, "%d sessions created (first failure at %d)", MANY_SESSIONS, bad);
	ok = 1;
	for (int i = 0; i < MANY_SESSIONS && fds[i] >= 0; i++) {
		char want[LUO_NAME_LEN];

		snprintf(want, sizeof(want), "many-%03d", i);
		if (luo_get_name(fds[i], name) < 0 || strcmp(name, want) != 0) {
			if (ok)
				luo_note("GET_NAME of %s: %s", want, luo_errname(errno));
			ok = 0;
		}
	}
	luo_check(ok, "each of the %d session fds has its own name", MANY_SESSIONS);
	for (int i = 0; i < MANY_SESSIONS; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	s2 = EXPECT_OK(luo_create_session(dev, "many-000"), "after closing them, many-000 can be created again");
	if (s2 >= 0)
		close(s2);

	s = luo_create_session(dev, "many-files");
	if (s < 0)
		luo_bail("create many-files");
	ok = 1;
	bad = -1;
	for (int i = 0; i < MANY_FILES; i++) {
		int m = luo_memfd("f", (unsigned)i, (size_t)(i % 3) * 100);

		if (m < 0)
			luo_bail("memfd %d", i);
		if (luo_preserve_fd(s, m, 1000 + (__u64)i) < 0 && ok) {
			ok = 0;
			bad = i;
			luo_note("preserve file %d: %s", i, luo_errname(errno));
		}
		close(m);
	}
	luo_check(ok, "%d memfds preserved in one session (first failure at %d)", MANY_FILES, bad);
	{
		int m = luo_memfd("g", 1, 1);

		EXPECT_ERR(luo_preserve_fd(s, m, 1000 + MANY_FILES - 1), EEXIST, "token of file %d reused: EEXIST",
			   MANY_FILES - 1);
		EXPECT_OK(luo_preserve_fd(s, m, 1000 + MANY_FILES), "file %d preserved", MANY_FILES + 1);
		close(m);
	}
	EXPECT_OK(close(s), "close the session with %d files", MANY_FILES + 1);
}

static int mode_paths(void)
{
	const char *paths[] = { "/dev/./liveupdate", "//dev/liveupdate", "/dev/../dev/liveupdate" };
	char name[LUO_NAME_LEN];
	int dirfd, fd, s;

	for (unsigned i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
		fd = EXPECT_OK(open(paths[i], O_RDWR), "open %s", paths[i]);
		if (fd < 0)
			continue;
		snprintf(name, sizeof(name), "paths-%u", i);
		s = EXPECT_OK(luo_create_session(fd, name), "CREATE_SESSION through %s", paths[i]);
		if (s >= 0)
			close(s);
		close(fd);
	}
	fd = EXPECT_OK(openat(AT_FDCWD, LUO_DEV_PATH, O_RDWR), "openat(AT_FDCWD, %s)", LUO_DEV_PATH);
	if (fd >= 0)
		close(fd);
	dirfd = open("/dev", O_RDONLY | O_DIRECTORY);
	fd = EXPECT_OK(openat(dirfd, "liveupdate", O_RDWR), "openat(fd of /dev, \"liveupdate\")");
	if (fd >= 0) {
		s = EXPECT_OK(luo_create_session(fd, "paths-dirfd"), "CREATE_SESSION through it");
		if (s >= 0)
			close(s);
		close(fd);
	}
	close(dirfd);
	if (chdir("/dev") == 0) {
		fd = EXPECT_OK(open("liveupdate", O_RDWR), "open(\"liveupdate\") in cwd /dev");
		if (fd >= 0)
			close(fd);
	}
	return luo_done();
}

static int mode_hold(void)
{
	char line[64];
	int fd = open(LUO_DEV_PATH, O_RDWR);

	if (fd < 0) {
		printf("not ok 1 - open: %s\n", luo_errname(errno));
		return 1;
	}
	printf("holding pid=%d\n", (int)getpid());
	if (!fgets(line, sizeof(line), stdin))
		luo_note("stdin closed");
	close(fd);
	printf("released\n");
	return 0;
}

int main(int argc, char **argv)
{
	int dev;

	luo_setup_output();
	if (argc > 1 && strcmp(argv[1], "--hold") == 0)
		return mode_hold();
	if (argc > 1 && strcmp(argv[1], "--open-busy") == 0) {
		EXPECT_ERR(open(LUO_DEV_PATH, O_RDWR), EBUSY, "open while another program holds the device: EBUSY");
		return luo_done();
	}
	if (argc > 1 && strcmp(argv[1], "--open-ok") == 0) {
		EXPECT_OK(open(LUO_DEV_PATH, O_RDWR), "open the device");
		return luo_done();
	}
	if (argc > 1 && strcmp(argv[1], "--paths") == 0)
		return mode_paths();
	if (argc > 1) {
		fprintf(stderr, "usage: %s [--paths|--hold|--open-busy|--open-ok]\n", argv[0]);
		return 2;
	}

	bad_page = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	gone_page = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (bad_page == MAP_FAILED || gone_page == MAP_FAILED || munmap(gone_page, 4096) < 0)
		luo_bail("mmap");

	check_open();
	check_other_fds();
	dev = luo_open_dev();
	if (dev < 0)
		luo_bail("open " LUO_DEV_PATH);
	check_create(dev);
	check_size_rules_device(dev);
	check_size_rules_session(dev);
	check_preserve(dev);
	close(dev);
	check_session_outlives_device();
	dev = luo_open_dev();
	if (dev < 0)
		luo_bail("reopen " LUO_DEV_PATH);
	check_many(dev);
	close(dev);
	return luo_done();
}

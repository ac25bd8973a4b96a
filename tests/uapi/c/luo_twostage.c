/* SPDX-License-Identifier: MIT */
/*
 * luo_twostage --stage 1|2 [--name NAME] [--pidfile PATH]
 *
 * Stage 1 (before an update): sessions NAME_a (an empty memfd, a memfd with data, a memfd
 * whose contents are written after it was preserved) and NAME_b (1 MiB, a 64-bit token),
 * plus NAME_state holding a memfd with "2". A child (setsid, stdio closed) keeps the
 * session fds open forever; its pid goes to PATH. The parent prints its checks and exits.
 *
 * Stage 2 (after the update): the state session says which stage this is (retrieving it
 * gives ENOENT in stage 1). Retrieves every file, compares its contents (mmap and read),
 * finishes NAME_a and NAME_state with FINISH, finishes NAME_b by closing it, and prints a
 * last line ending in "TEST PASSED ---".
 */
#include "check.h"

#include <signal.h>
#include <sys/wait.h>

#define TOK_STATE 0x5354415445ull /* "STATE" */
#define TOK_EMPTY 1
#define TOK_DATA 2
#define TOK_LATE 3
#define TOK_BIG 0x100000002ull

#define DATA_LEN (3 * 4096 + 123)
#define LATE_LEN 8192
#define BIG_LEN (1 << 20)
#define SEED_DATA 1
#define SEED_LATE 3
#define SEED_BIG 2

static const char *name = "twostage";
static const char *pidfile;

static void sname(char *buf, const char *suffix)
{
	snprintf(buf, LUO_NAME_LEN, "%s_%s", name, suffix);
}

static int preserve_new(int s, const char *what, unsigned seed, size_t len, __u64 token)
{
	int m = luo_memfd(what, seed, len);

	if (m < 0)
		luo_bail("memfd %s", what);
	EXPECT_OK(luo_preserve_fd(s, m, token), "stage 1: preserve %s (%zu bytes, token %#llx)", what, len,
		  (unsigned long long)token);
	return m;
}

static void write_pidfile(pid_t pid)
{
	char tmp[4096];
	FILE *f;

	if (!pidfile)
		return;
	snprintf(tmp, sizeof(tmp), "%s.tmp", pidfile);
	f = fopen(tmp, "w");
	if (!f || fprintf(f, "%d\n", (int)pid) < 0 || fclose(f) != 0 || rename(tmp, pidfile) != 0)
		luo_bail("pidfile %s", pidfile);
}

static int stage1(int dev)
{
	char n[LUO_NAME_LEN];
	int st, a, b, m, late, ready[2];
	pid_t child;
	char c;

	sname(n, "state");
	EXPECT_ERR(luo_retrieve_session(dev, n), ENOENT, "stage 1: no state session %s yet (ENOENT)", n);
	st = EXPECT_OK(luo_create_session(dev, n), "stage 1: create %s", n);
	m = memfd_create("state", 0);
	if (st < 0 || m < 0 || write(m, "2", 1) != 1)
		luo_bail("state session");
	EXPECT_OK(luo_preserve_fd(st, m, TOK_STATE), "stage 1: preserve the state memfd (\"2\")");
	close(m);

	sname(n, "a");
	a = EXPECT_OK(luo_create_session(dev, n), "stage 1: create %s", n);
	sname(n, "b");
	b = EXPECT_OK(luo_create_session(dev, n), "stage 1: create %s", n);
	if (a < 0 || b < 0)
		luo_bail("sessions");
	close(preserve_new(a, "empty", 0, 0, TOK_EMPTY));
	close(preserve_new(a, "data", SEED_DATA, DATA_LEN, TOK_DATA));
	late = preserve_new(a, "late", 99, LATE_LEN, TOK_LATE);
	close(preserve_new(b, "big", SEED_BIG, BIG_LEN, TOK_BIG));
	{
		/* contents written after preserve (within the size) are what the next stage sees */
		int fresh = luo_memfd("late-src", SEED_LATE, LATE_LEN);
		unsigned char *p = mmap(NULL, LATE_LEN, PROT_READ, MAP_SHARED, fresh, 0);

		if (p == MAP_FAILED)
			luo_bail("mmap");
		EXPECT_OK(pwrite(late, p, LATE_LEN, 0), "stage 1: rewrite the preserved 'late' memfd within its size");
		munmap(p, LATE_LEN);
		close(fresh);
		close(late);
	}

	if (pipe(ready) < 0)
		luo_bail("pipe");
	fflush(stdout);
	child = fork();
	if (child < 0)
		luo_bail("fork");
	if (child == 0) {
		int null = open("/dev/null", O_RDWR);

		setsid();
		close(dev); /* the holder keeps the sessions, not the device */
		close(ready[0]);
		write_pidfile(getpid());
		dup2(null, 0);
		dup2(null, 1);
		dup2(null, 2);
		close(null);
		close(ready[1]); /* tells the parent: pid file written, stdio closed */
		for (;;)
			pause();
	}
	close(ready[1]);
	luo_check(read(ready[0], &c, 1) == 0, "stage 1: holder %d started (setsid, stdio closed)", (int)child);
	close(ready[0]);
	luo_check(waitpid(child, NULL, WNOHANG) == 0, "stage 1: the holder is running");
	/* the parent's copies go away with it; the holder's keep the sessions */
	return luo_done();
}

static void compare(int s, const char *what, __u64 token, unsigned seed, size_t len, int *out)
{
	char why[200] = "";
	int fd = EXPECT_OK(luo_retrieve_fd(s, token), "stage 2: RETRIEVE_FD %s (token %#llx)", what,
			   (unsigned long long)token);

	if (out)
		*out = fd;
	if (fd < 0)
		return;
	luo_check(luo_is_cloexec(fd), "stage 2: the retrieved %s fd is O_CLOEXEC", what);
	if (!luo_check(luo_memfd_compare(fd, seed, len, why, sizeof(why)) == 0,
		       "stage 2: %s has its %zu bytes (mmap and read)", what, len))
		luo_note("  %s", why);
	if (!out)
		close(fd);
}

static int stage2(int dev)
{
	char n[LUO_NAME_LEN], got[LUO_NAME_LEN], buf[8] = "";
	int st, a, b, m, data, big, data2;
	struct stat s1, s2;
	struct luo_finish_req fin;

	sname(n, "state");
	st = EXPECT_OK(luo_retrieve_session(dev, n), "stage 2: RETRIEVE_SESSION %s", n);
	if (st < 0)
		luo_bail("no state session: this is not stage 2");
	m = EXPECT_OK(luo_retrieve_fd(st, TOK_STATE), "stage 2: RETRIEVE_FD of the state memfd");
	luo_check(m >= 0 && pread(m, buf, sizeof(buf), 0) == 1 && buf[0] == '2', "stage 2: the state memfd says \"2\"");

	sname(n, "a");
	a = EXPECT_OK(luo_retrieve_session(dev, n), "stage 2: RETRIEVE_SESSION %s", n);
	if (a < 0)
		luo_bail("session %s", n);
	luo_check(luo_is_cloexec(a), "stage 2: the retrieved session fd is O_CLOEXEC");
	EXPECT_ERR(luo_retrieve_session(dev, n), EINVAL, "stage 2: RETRIEVE_SESSION %s twice: EINVAL", n);
	EXPECT_OK(luo_get_name(a, got), "stage 2: GET_NAME on a retrieved session");
	luo_check(strcmp(got, n) == 0, "stage 2: GET_NAME gives %s (got %.64s)", n, got);
	{
		int x = luo_memfd("x", 1, 1);

		EXPECT_ERR(luo_preserve_fd(a, x, 9), EINVAL, "stage 2: PRESERVE_FD on a retrieved session: EINVAL");
		close(x);
	}
	/* any order */
	compare(a, "late", TOK_LATE, SEED_LATE, LATE_LEN, NULL);
	compare(a, "data", TOK_DATA, SEED_DATA, DATA_LEN, &data);
	compare(a, "empty", TOK_EMPTY, 0, 0, NULL);
	data2 = EXPECT_OK(luo_retrieve_fd(a, TOK_DATA), "stage 2: RETRIEVE_FD of 'data' again works");
	if (data >= 0 && data2 >= 0)
		luo_check(fstat(data, &s1) == 0 && fstat(data2, &s2) == 0 && s1.st_ino == s2.st_ino &&
				  s1.st_dev == s2.st_dev,
			  "stage 2: both retrievals are the same file");
	EXPECT_ERR(luo_retrieve_fd(a, 77), ENOENT, "stage 2: RETRIEVE_FD of an unknown token: ENOENT");
	if (data >= 0)
		EXPECT_ERR(ftruncate(data, 1), EPERM, "stage 2: a retrieved memfd stays frozen until FINISH (EPERM)");

	fin.size = sizeof(fin);
	fin.reserved = 1;
	EXPECT_ERR(ioctl(a, LUO_SESSION_FINISH, &fin), EINVAL, "stage 2: FINISH with reserved != 0: EINVAL");
	fin.size = 4;
	fin.reserved = 0;
	EXPECT_ERR(ioctl(a, LUO_SESSION_FINISH, &fin), EINVAL, "stage 2: FINISH with size 4: EINVAL");
	EXPECT_OK(luo_finish(a), "stage 2: FINISH %s", n);
	if (data >= 0) {
		EXPECT_OK(ftruncate(data, 3 * DATA_LEN), "stage 2: after FINISH the memfd can grow");
		close(data);
	}
	if (data2 >= 0)
		close(data2);
	close(a);

	sname(n, "b");
	b = EXPECT_OK(luo_retrieve_session(dev, n), "stage 2: RETRIEVE_SESSION %s", n);
	if (b >= 0) {
		compare(b, "big", TOK_BIG, SEED_BIG, BIG_LEN, &big);
		EXPECT_OK(close(b), "stage 2: close %s without FINISH (closing finishes it)", n);
		if (big >= 0) {
			EXPECT_OK(ftruncate(big, 10), "stage 2: the closed session's memfd is finished (can shrink)");
			close(big);
		}
	}

	EXPECT_OK(luo_finish(st), "stage 2: FINISH the state session");
	if (m >= 0)
		close(m);
	close(st);
	if (luo_n_failed == 0)
		printf("--- luo_twostage %s: stage 2 TEST PASSED ---\n", name);
	return luo_done();
}

int main(int argc, char **argv)
{
	int stage = 0, dev, r;

	luo_setup_output();
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--stage") == 0 && i + 1 < argc)
			stage = atoi(argv[++i]);
		else if (strcmp(argv[i], "--name") == 0 && i + 1 < argc)
			name = argv[++i];
		else if (strcmp(argv[i], "--pidfile") == 0 && i + 1 < argc)
			pidfile = argv[++i];
		else
			stage = -1;
	}
	if (stage != 1 && stage != 2) {
		fprintf(stderr, "usage: %s --stage 1|2 [--name NAME] [--pidfile PATH]\n", argv[0]);
		return 2;
	}
	dev = luo_open_dev();
	if (dev < 0)
		luo_bail("open " LUO_DEV_PATH);
	r = stage == 1 ? stage1(dev) : stage2(dev);
	close(dev);
	return r;
}

/* SPDX-License-Identifier: MIT */
/*
 * luo_fork_exec: descendants are served too.
 *
 * The parent opens the device (O_CLOEXEC), creates session "forkexec" (FD_CLOEXEC cleared)
 * and "forkexec-cloexec" (left O_CLOEXEC), then forks and execs itself as
 *   luo_fork_exec --child SESSION_FD CLOEXEC_FD
 * The child finds CLOEXEC_FD closed, gets EBUSY opening the device (the parent holds it),
 * preserves a memfd (token 0xF00D) through the inherited session fd, and forks a grandchild
 * (no exec) that preserves another (token 0xF00E). The parent then sees the child's token
 * taken (EEXIST), prints "ready", and keeps the sessions until a line arrives on stdin, so
 * the test can look at `luo status`.
 */
#include "check.h"

#include <sys/wait.h>

#define TOK_CHILD 0xF00Dull
#define TOK_GRANDCHILD 0xF00Eull

static int child(int sfd, int cfd)
{
	char name[LUO_NAME_LEN];
	int m, st;
	pid_t gc;

	/* before anything else can reuse the number */
	EXPECT_ERR(fcntl(cfd, F_GETFD), EBADF, "child: the O_CLOEXEC session fd %d is gone after exec", cfd);
	luo_check(fcntl(sfd, F_GETFD) == 0, "child: the inherited session fd %d is open, FD_CLOEXEC clear", sfd);
	EXPECT_ERR(open(LUO_DEV_PATH, O_RDWR), EBUSY, "child: opening the device while the parent holds it: EBUSY");
	EXPECT_OK(luo_get_name(sfd, name), "child: GET_NAME on the inherited session fd");
	luo_check(strcmp(name, "forkexec") == 0, "child: it is forkexec (got %.64s)", name);
	m = luo_memfd("child", 7, 5000);
	EXPECT_OK(luo_preserve_fd(sfd, m, TOK_CHILD), "child: PRESERVE_FD through the inherited session fd");
	EXPECT_ERR(ftruncate(m, 1), EPERM, "child: the memfd is frozen (EPERM)");
	EXPECT_ERR(luo_preserve_fd(sfd, m, TOK_CHILD + 100), EBUSY, "child: preserving it again: EBUSY");
	close(m);

	fflush(stdout);
	gc = fork();
	if (gc == 0) {
		int g = luo_memfd("grandchild", 8, 100);

		luo_n_checks = 100; /* the grandchild's checks are numbered from 101 */
		EXPECT_OK(luo_preserve_fd(sfd, g, TOK_GRANDCHILD), "grandchild: PRESERVE_FD after fork without exec");
		EXPECT_ERR(luo_create_session(sfd, "x"), EINVAL, "grandchild: CREATE_SESSION on a session fd: EINVAL");
		_exit(luo_n_failed ? 1 : 0);
	}
	luo_check(gc > 0 && waitpid(gc, &st, 0) == gc && WIFEXITED(st) && WEXITSTATUS(st) == 0,
		  "child: the grandchild passed");
	return luo_done();
}

int main(int argc, char **argv)
{
	int dev, s, c, st = 0, m;
	char a1[16], a2[16], line[64];
	pid_t pid;

	luo_setup_output();
	if (argc == 4 && strcmp(argv[1], "--child") == 0)
		return child(atoi(argv[2]), atoi(argv[3]));
	if (argc != 1) {
		fprintf(stderr, "usage: %s\n", argv[0]);
		return 2;
	}
	dev = luo_open_dev();
	if (dev < 0)
		luo_bail("open " LUO_DEV_PATH);
	s = EXPECT_OK(luo_create_session(dev, "forkexec"), "parent: create forkexec");
	c = EXPECT_OK(luo_create_session(dev, "forkexec-cloexec"), "parent: create forkexec-cloexec");
	if (s < 0 || c < 0)
		luo_bail("sessions");
	EXPECT_OK(fcntl(s, F_SETFD, 0), "parent: clear FD_CLOEXEC on forkexec");
	snprintf(a1, sizeof(a1), "%d", s);
	snprintf(a2, sizeof(a2), "%d", c);
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		execl("/proc/self/exe", argv[0], "--child", a1, a2, (char *)NULL);
		printf("not ok - exec: %s\n", luo_errname(errno));
		_exit(127);
	}
	luo_check(pid > 0 && waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0,
		  "parent: the exec'd child passed its checks (status %#x)", st);
	m = luo_memfd("parent", 9, 10);
	EXPECT_ERR(luo_preserve_fd(s, m, TOK_CHILD), EEXIST, "parent: the child's token is taken in forkexec (EEXIST)");
	EXPECT_ERR(luo_preserve_fd(s, m, TOK_GRANDCHILD), EEXIST, "parent: so is the grandchild's");
	close(m);
	printf("ready\n");
	if (!fgets(line, sizeof(line), stdin))
		luo_note("stdin closed");
	EXPECT_OK(close(s), "parent: close forkexec");
	EXPECT_OK(close(c), "parent: close forkexec-cloexec");
	close(dev);
	return luo_done();
}

/* Cost of /dev/liveupdate calls served by `luo run`, against the same requests sent straight to
 * luod's socket (JSON + SCM_RIGHTS, as libluo does). Built and run by bench/uapi.py.
 *
 *   uapi_bench calls SOCKET ITERATIONS    per-call cost of a few ioctls and socket requests
 *   uapi_bench preserve SOCKET FILES      FILES memfds into session "bench-ioctl" by ioctl and
 *                                         "bench-socket" by socket; then waits for stdin to close
 *   uapi_bench retrieve SOCKET FILES      after an update: retrieve both, check, finish
 *
 * Prints one line per measure: "<name> <n> <median_us> <p99_us> <total_ms>".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

struct session_arg { uint32_t size; int32_t fd; char name[64]; };
struct fd_arg { uint32_t size; int32_t fd; uint64_t token; };
struct name_arg { uint32_t size; uint32_t reserved; char name[64]; };
struct finish_arg { uint32_t size; uint32_t reserved; };

static double now_us(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static void report(const char *name, double *v, int n) {
	double total = 0;
	for (int i = 0; i < n; i++)
		total += v[i];
	qsort(v, n, sizeof *v, cmp);
	printf("%s %d %.2f %.2f %.2f\n", name, n, v[n / 2], v[(int)(n * 0.99)], total / 1e3);
	fflush(stdout);
}

static void die(const char *what) {
	fprintf(stderr, "uapi_bench: %s: %s\n", what, strerror(errno));
	exit(1);
}

static int connect_luod(const char *path) {
	int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	strncpy(addr.sun_path, path, sizeof addr.sun_path - 1);
	if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr))
		die("connect to luod");
	return s;
}

/* One request on luod's socket; sends fd_out if >= 0, returns a received fd (or -1). */
static int luod_call(int s, const char *json, int fd_out) {
	char buf[65536];
	struct iovec iov = { (void *)json, strlen(json) };
	union { struct cmsghdr h; char b[CMSG_SPACE(sizeof(int))]; } c;
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (fd_out >= 0) {
		m.msg_control = c.b;
		m.msg_controllen = sizeof c.b;
		struct cmsghdr *h = CMSG_FIRSTHDR(&m);
		h->cmsg_level = SOL_SOCKET;
		h->cmsg_type = SCM_RIGHTS;
		h->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(h), &fd_out, sizeof(int));
	}
	if (sendmsg(s, &m, 0) < 0)
		die("sendmsg");
	iov.iov_base = buf;
	iov.iov_len = sizeof buf - 1;
	m.msg_control = c.b;
	m.msg_controllen = sizeof c.b;
	ssize_t n = recvmsg(s, &m, MSG_CMSG_CLOEXEC);
	if (n <= 0)
		die("recvmsg");
	buf[n] = 0;
	if (!strstr(buf, "\"errno\":0")) {
		fprintf(stderr, "uapi_bench: luod refused %s: %s\n", json, buf);
		exit(1);
	}
	int fd = -1;
	struct cmsghdr *h = CMSG_FIRSTHDR(&m);
	if (h && h->cmsg_type == SCM_RIGHTS)
		memcpy(&fd, CMSG_DATA(h), sizeof(int));
	return fd;
}

static void calls(const char *sock_path, int iters) {
	double *v = calloc(iters, sizeof(double));
	int pipefd[2];
	if (pipe(pipefd))
		die("pipe");
	for (int i = 0; i < iters; i++) { /* the floor: an ioctl the supervisor is not asked about */
		int n;
		double t = now_us();
		ioctl(pipefd[0], FIONREAD, &n);
		v[i] = now_us() - t;
	}
	report("native_ioctl", v, iters);

	int dev = open("/dev/liveupdate", O_RDWR);
	if (dev < 0)
		die("open /dev/liveupdate");
	struct session_arg s = { sizeof s, -1, "bench-calls" };
	if (ioctl(dev, 0xBA00, &s))
		die("CREATE_SESSION");
	for (int i = 0; i < iters; i++) { /* answered by the supervisor alone */
		struct name_arg a = { sizeof a, 0, "" };
		double t = now_us();
		if (ioctl(s.fd, 0xBA43, &a))
			die("GET_NAME");
		v[i] = now_us() - t;
	}
	report("ioctl GET_NAME", v, iters);
	for (int i = 0; i < iters; i++) { /* RFC v2 GET_STATE: luod's published state */
		uint32_t st;
		double t = now_us();
		if (ioctl(dev, 0x8004BA03, &st))
			die("GET_STATE");
		v[i] = now_us() - t;
	}
	report("ioctl GET_STATE", v, iters);
	int luod = connect_luod(sock_path);
	for (int i = 0; i < iters; i++) {
		double t = now_us();
		luod_call(luod, "{\"op\":\"get_state\"}", -1);
		v[i] = now_us() - t;
	}
	report("socket get_state", v, iters);
	/* a request luod must answer: FINISH on a created session is refused by luo run itself,
	 * so time the one-round-trip RFC v2 UNPRESERVE of an unknown token (ENOENT from luod) */
	for (int i = 0; i < iters; i++) {
		uint64_t token = 0xdead0000 + i;
		double t = now_us();
		if (ioctl(dev, 0x4008BA01, &token) == 0 || errno != ENOENT)
			die("FD_UNPRESERVE of an unknown token");
		v[i] = now_us() - t;
	}
	report("ioctl FD_UNPRESERVE (ENOENT)", v, iters);
	for (int i = 0; i < iters; i++) {
		char req[96];
		snprintf(req, sizeof req, "{\"op\":\"unpreserve_fd\",\"token\":%u}", 0xdead0000u + i);
		struct iovec iov = { req, strlen(req) };
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
		char buf[4096];
		double t = now_us();
		if (sendmsg(luod, &m, 0) < 0 || recv(luod, buf, sizeof buf, 0) <= 0)
			die("socket unpreserve_fd");
		v[i] = now_us() - t;
	}
	report("socket unpreserve_fd (ENOENT)", v, iters);
}

static void preserve(const char *sock_path, int files) {
	double *v = calloc(files, sizeof(double));
	int dev = open("/dev/liveupdate", O_RDWR);
	if (dev < 0)
		die("open /dev/liveupdate");
	struct session_arg s = { sizeof s, -1, "bench-ioctl" };
	if (ioctl(dev, 0xBA00, &s))
		die("CREATE_SESSION");
	int luod = connect_luod(sock_path);
	int ss = luod_call(luod, "{\"op\":\"create_session\",\"name\":\"bench-socket\"}", -1);
	for (int round = 0; round < 2; round++) {
		for (int i = 0; i < files; i++) {
			int m = memfd_create("bench", 0);
			if (m < 0 || ftruncate(m, 4096) || pwrite(m, &i, sizeof i, 0) != sizeof i)
				die("memfd");
			double t = now_us();
			if (round == 0) {
				struct fd_arg a = { sizeof a, m, (uint64_t)i + 1 };
				if (ioctl(s.fd, 0xBA40, &a))
					die("PRESERVE_FD");
			} else {
				char req[64];
				snprintf(req, sizeof req, "{\"op\":\"preserve_fd\",\"token\":%d}", i + 1);
				luod_call(ss, req, m);
			}
			v[i] = now_us() - t;
			close(m);
		}
		report(round == 0 ? "ioctl PRESERVE_FD" : "socket preserve_fd", v, files);
	}
	printf("ready\n");
	fflush(stdout);
	char c;
	while (read(0, &c, 1) > 0) /* hold the sessions until the driver closes our stdin */
		;
}

static void retrieve(const char *sock_path, int files) {
	double *v = calloc(files, sizeof(double));
	int dev = open("/dev/liveupdate", O_RDWR);
	if (dev < 0)
		die("open /dev/liveupdate");
	struct session_arg s = { sizeof s, -1, "bench-ioctl" };
	if (ioctl(dev, 0xBA01, &s))
		die("RETRIEVE_SESSION");
	int luod = connect_luod(sock_path);
	int ss = luod_call(luod, "{\"op\":\"retrieve_session\",\"name\":\"bench-socket\"}", -1);
	for (int round = 0; round < 2; round++) {
		for (int i = 0; i < files; i++) {
			int fd;
			double t = now_us();
			if (round == 0) {
				struct fd_arg a = { sizeof a, -1, (uint64_t)i + 1 };
				if (ioctl(s.fd, 0xBA41, &a))
					die("RETRIEVE_FD");
				fd = a.fd;
			} else {
				char req[64];
				snprintf(req, sizeof req, "{\"op\":\"retrieve_fd\",\"token\":%d}", i + 1);
				fd = luod_call(ss, req, -1);
			}
			v[i] = now_us() - t;
			int got = -1;
			if (pread(fd, &got, sizeof got, 0) != sizeof got || got != i) {
				fprintf(stderr, "uapi_bench: file %d holds %d\n", i + 1, got);
				exit(1);
			}
			close(fd);
		}
		report(round == 0 ? "ioctl RETRIEVE_FD" : "socket retrieve_fd", v, files);
	}
	struct finish_arg f = { sizeof f, 0 };
	double t = now_us();
	if (ioctl(s.fd, 0xBA42, &f))
		die("FINISH");
	v[0] = now_us() - t;
	report("ioctl FINISH", v, 1);
	t = now_us();
	luod_call(ss, "{\"op\":\"finish\"}", -1);
	v[0] = now_us() - t;
	report("socket finish", v, 1);
}

int main(int argc, char **argv) {
	if (argc < 4) {
		fprintf(stderr, "usage: uapi_bench calls|preserve|retrieve SOCKET N\n");
		return 2;
	}
	struct rlimit rl;
	getrlimit(RLIMIT_NOFILE, &rl);
	rl.rlim_cur = rl.rlim_max;
	setrlimit(RLIMIT_NOFILE, &rl);
	int n = atoi(argv[3]);
	if (!strcmp(argv[1], "calls"))
		calls(argv[2], n);
	else if (!strcmp(argv[1], "preserve"))
		preserve(argv[2], n);
	else
		retrieve(argv[2], n);
	return 0;
}

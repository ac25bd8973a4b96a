/* SPDX-License-Identifier: MIT */
/*
 * One line per check: "ok N - what" or "not ok N - what" followed by "# ..." details.
 * A program ends with luo_done(), which prints "# N checks, M failed" and returns the
 * exit status (1 if any check failed). luo_bail() ends a program whose setup failed (2).
 * Helpers for the ioctls return the ioctl's result and keep errno.
 */
#ifndef LUO_TESTS_CHECK_H
#define LUO_TESTS_CHECK_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "luo_uapi.h"

static int luo_n_checks, luo_n_failed;

static inline const char *luo_errname(int e)
{
	const char *n = e ? strerrorname_np(e) : "0";
	return n ? n : "E?";
}

static inline void luo_setup_output(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
}

__attribute__((format(printf, 2, 3))) static inline int luo_check(int ok, const char *fmt, ...)
{
	va_list ap;

	luo_n_checks++;
	if (!ok)
		luo_n_failed++;
	printf("%s %d - ", ok ? "ok" : "not ok", luo_n_checks);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	return ok;
}

__attribute__((format(printf, 1, 2))) static inline void luo_note(const char *fmt, ...)
{
	va_list ap;

	printf("# ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
}

__attribute__((noreturn, format(printf, 1, 2))) static inline void luo_bail(const char *fmt, ...)
{
	va_list ap;

	printf("Bail out! ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf(" (errno %s)\n", luo_errname(errno));
	exit(2);
}

static inline int luo_done(void)
{
	printf("# %d checks, %d failed\n", luo_n_checks, luo_n_failed);
	return luo_n_failed ? 1 : 0;
}

/* A call that must succeed (result >= 0). */
#define EXPECT_OK(call, ...)                                                                   \
	({                                                                                     \
		errno = 0;                                                                     \
		long r_ = (long)(call);                                                        \
		int e_ = errno;                                                                \
		if (!luo_check(r_ >= 0, __VA_ARGS__))                                          \
			luo_note("  %s returned %ld, errno %s", #call, r_, luo_errname(e_));   \
		errno = e_;                                                                    \
		r_;                                                                            \
	})

/* A call that must fail with errno `want`. Returns 1 if it did. */
#define EXPECT_ERR(call, want, ...)                                                            \
	({                                                                                     \
		errno = 0;                                                                     \
		long r_ = (long)(call);                                                        \
		int e_ = errno;                                                                \
		int ok_ = luo_check(r_ == -1 && e_ == (want), __VA_ARGS__);                    \
		if (!ok_)                                                                      \
			luo_note("  %s: want -1/%s, got %ld/%s", #call, luo_errname(want), r_, \
				 r_ == -1 ? luo_errname(e_) : "-");                            \
		errno = e_;                                                                    \
		ok_;                                                                           \
	})

/* ---- v7.3 wrappers: return the ioctl's result, errno on failure ---- */

static inline int luo_open_dev(void)
{
	return open(LUO_DEV_PATH, O_RDWR | O_CLOEXEC);
}

static inline int luo_session_ioctl(int devfd, unsigned long cmd, const char *name)
{
	struct luo_session_req req;
	int r;

	memset(&req, 0, sizeof(req));
	req.size = sizeof(req);
	req.fd = -1;
	snprintf((char *)req.name, sizeof(req.name), "%s", name);
	r = ioctl(devfd, cmd, &req);
	return r < 0 ? r : req.fd;
}

static inline int luo_create_session(int devfd, const char *name)
{
	return luo_session_ioctl(devfd, LUO_IOC_CREATE_SESSION, name);
}

static inline int luo_retrieve_session(int devfd, const char *name)
{
	return luo_session_ioctl(devfd, LUO_IOC_RETRIEVE_SESSION, name);
}

static inline int luo_preserve_fd(int sfd, int fd, __u64 token)
{
	struct luo_fd_req req = { .size = sizeof(req), .fd = fd, .token = token };

	return ioctl(sfd, LUO_SESSION_PRESERVE_FD, &req);
}

static inline int luo_retrieve_fd(int sfd, __u64 token)
{
	struct luo_fd_req req = { .size = sizeof(req), .fd = -1, .token = token };
	int r = ioctl(sfd, LUO_SESSION_RETRIEVE_FD, &req);

	return r < 0 ? r : req.fd;
}

static inline int luo_finish(int sfd)
{
	struct luo_finish_req req = { .size = sizeof(req), .reserved = 0 };

	return ioctl(sfd, LUO_SESSION_FINISH, &req);
}

/* The session's name into buf (64 bytes); returns the ioctl's result. */
static inline int luo_get_name(int sfd, char *buf)
{
	struct luo_get_name_req req;
	int r;

	memset(&req, 0, sizeof(req));
	req.size = sizeof(req);
	memset(req.name, 'X', sizeof(req.name));
	r = ioctl(sfd, LUO_SESSION_GET_NAME, &req);
	if (r == 0)
		memcpy(buf, req.name, sizeof(req.name));
	return r;
}

/* ---- memfds ---- */

/* A byte of the test pattern: depends on the seed and the offset. */
static inline unsigned char luo_pattern(unsigned seed, size_t off)
{
	return (unsigned char)((off * 131u + seed * 7u + (off >> 12)) & 0xff);
}

/* A memfd (flags 0: no MFD_ALLOW_SEALING) with `len` bytes of pattern `seed`. */
static inline int luo_memfd(const char *name, unsigned seed, size_t len)
{
	int fd = memfd_create(name, 0);
	unsigned char buf[4096];
	size_t off = 0;

	if (fd < 0)
		return -1;
	while (off < len) {
		size_t n = len - off < sizeof(buf) ? len - off : sizeof(buf);

		for (size_t i = 0; i < n; i++)
			buf[i] = luo_pattern(seed, off + i);
		if (pwrite(fd, buf, n, (off_t)off) != (ssize_t)n) {
			close(fd);
			return -1;
		}
		off += n;
	}
	return fd;
}

/* 0 if fd holds exactly `len` bytes of pattern `seed`, read through both mmap and read(2). */
static inline int luo_memfd_compare(int fd, unsigned seed, size_t len, char *why, size_t whylen)
{
	struct stat st;
	unsigned char buf[4096];
	size_t off = 0;

	if (fstat(fd, &st) < 0) {
		snprintf(why, whylen, "fstat: %s", luo_errname(errno));
		return -1;
	}
	if ((size_t)st.st_size != len) {
		snprintf(why, whylen, "size %lld, want %zu", (long long)st.st_size, len);
		return -1;
	}
	if (len) {
		unsigned char *p = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);

		if (p == MAP_FAILED) {
			snprintf(why, whylen, "mmap: %s", luo_errname(errno));
			return -1;
		}
		for (size_t i = 0; i < len; i++) {
			if (p[i] != luo_pattern(seed, i)) {
				snprintf(why, whylen, "mmap: byte %zu is %u, want %u", i, p[i],
					 luo_pattern(seed, i));
				munmap(p, len);
				return -1;
			}
		}
		munmap(p, len);
	}
	while (off <= len) {
		ssize_t n = pread(fd, buf, sizeof(buf), (off_t)off);

		if (n < 0) {
			snprintf(why, whylen, "pread: %s", luo_errname(errno));
			return -1;
		}
		if (n == 0)
			break;
		for (ssize_t i = 0; i < n; i++) {
			if (buf[i] != luo_pattern(seed, off + (size_t)i)) {
				snprintf(why, whylen, "read: byte %zu differs", off + (size_t)i);
				return -1;
			}
		}
		off += (size_t)n;
	}
	if (off != len) {
		snprintf(why, whylen, "read %zu bytes, want %zu", off, len);
		return -1;
	}
	return 0;
}

static inline int luo_is_cloexec(int fd)
{
	int f = fcntl(fd, F_GETFD);

	return f >= 0 && (f & FD_CLOEXEC);
}

#endif

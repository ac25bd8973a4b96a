/* SPDX-License-Identifier: MIT */
/*
 * /dev/liveupdate as seen by a program: the Linux v7.3 session UAPI and the RFC v2 global
 * calls, written for luo's own tests from the documented values (luo-design.md §2, §3b).
 *
 * Every v7.3 command is _IO(0xBA, nr): no direction or size bits. Every v7.3 struct starts
 * with its size (u32), so it can grow. The RFC v2 commands share the device fd and the type;
 * their full command value (direction and size bits) tells them apart.
 */
#ifndef LUO_TESTS_UAPI_H
#define LUO_TESTS_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define LUO_DEV_PATH "/dev/liveupdate"
#define LUO_IOC_TYPE 0xBA
#define LUO_NAME_LEN 64 /* including the terminating NUL */

/* ---- v7.3: the device fd (nr 0x00..) ---- */
#define LUO_CMD_BASE 0x00
#define LUO_IOC_CREATE_SESSION _IO(LUO_IOC_TYPE, 0x00)
#define LUO_IOC_RETRIEVE_SESSION _IO(LUO_IOC_TYPE, 0x01)

/* ---- v7.3: a session fd (nr 0x40..0x43) ---- */
#define LUO_SESSION_CMD_BASE 0x40
#define LUO_SESSION_PRESERVE_FD _IO(LUO_IOC_TYPE, 0x40)
#define LUO_SESSION_RETRIEVE_FD _IO(LUO_IOC_TYPE, 0x41)
#define LUO_SESSION_FINISH _IO(LUO_IOC_TYPE, 0x42)
#define LUO_SESSION_GET_NAME _IO(LUO_IOC_TYPE, 0x43)

/* CREATE_SESSION and RETRIEVE_SESSION (72 bytes) */
struct luo_session_req {
	__u32 size;
	__s32 fd; /* out: the session fd (O_CLOEXEC) */
	__u8 name[LUO_NAME_LEN];
};

/* PRESERVE_FD (fd in) and RETRIEVE_FD (fd out) (16 bytes) */
struct luo_fd_req {
	__u32 size;
	__s32 fd;
	__aligned_u64 token;
};

/* FINISH (8 bytes) */
struct luo_finish_req {
	__u32 size;
	__u32 reserved; /* must be 0 (v7.3) */
};

/* GET_NAME (72 bytes) */
struct luo_get_name_req {
	__u32 size;
	__u32 reserved;
	__u8 name[LUO_NAME_LEN]; /* out */
};

/* ---- RFC v2 (May 2025): the global state machine, on the device fd ---- */
struct luo_v2_fd {
	int fd;
	__u32 flags;
	__aligned_u64 token; /* FD_PRESERVE: out (assigned); FD_RESTORE: in */
};

#define LUO_V2_FD_PRESERVE _IOWR(LUO_IOC_TYPE, 0x00, struct luo_v2_fd)
#define LUO_V2_FD_UNPRESERVE _IOW(LUO_IOC_TYPE, 0x01, __u64)
#define LUO_V2_FD_RESTORE _IOWR(LUO_IOC_TYPE, 0x02, struct luo_v2_fd)
#define LUO_V2_GET_STATE _IOR(LUO_IOC_TYPE, 0x03, __u32)
#define LUO_V2_EVENT_PREPARE _IO(LUO_IOC_TYPE, 0x04)
#define LUO_V2_EVENT_FREEZE _IO(LUO_IOC_TYPE, 0x05)
#define LUO_V2_EVENT_CANCEL _IO(LUO_IOC_TYPE, 0x06)
#define LUO_V2_EVENT_FINISH _IO(LUO_IOC_TYPE, 0x07)

enum luo_v2_state {
	LUO_V2_STATE_NORMAL = 0,
	LUO_V2_STATE_PREPARED = 1,
	LUO_V2_STATE_FROZEN = 2,
	LUO_V2_STATE_UPDATED = 3,
};

/* The layout and values this header promises (checked at compile time). */
_Static_assert(sizeof(struct luo_session_req) == 72, "session request is 72 bytes");
_Static_assert(sizeof(struct luo_fd_req) == 16, "fd request is 16 bytes");
_Static_assert(__builtin_offsetof(struct luo_fd_req, token) == 8, "token is 8-aligned");
_Static_assert(sizeof(struct luo_finish_req) == 8, "finish request is 8 bytes");
_Static_assert(sizeof(struct luo_get_name_req) == 72, "get-name request is 72 bytes");
_Static_assert(sizeof(struct luo_v2_fd) == 16, "RFC v2 liveupdate_fd is 16 bytes");
_Static_assert(LUO_IOC_CREATE_SESSION == 0xBA00, "CREATE_SESSION");
_Static_assert(LUO_IOC_RETRIEVE_SESSION == 0xBA01, "RETRIEVE_SESSION");
_Static_assert(LUO_SESSION_PRESERVE_FD == 0xBA40, "PRESERVE_FD");
_Static_assert(LUO_SESSION_RETRIEVE_FD == 0xBA41, "RETRIEVE_FD");
_Static_assert(LUO_SESSION_FINISH == 0xBA42, "FINISH");
_Static_assert(LUO_SESSION_GET_NAME == 0xBA43, "GET_NAME");
_Static_assert(LUO_V2_EVENT_PREPARE == 0xBA04, "RFC v2 PREPARE");
_Static_assert(LUO_V2_FD_PRESERVE == 0xC010BA00, "RFC v2 FD_PRESERVE");

#endif

/* SPDX-License-Identifier: MIT */
/*
 * luo_threads [N]: N threads (default 8) at once, on one device fd: each creates session
 * "thr-NN", checks its name and preserves FILES memfds with tokens (NN << 16 | j); all
 * of them also race to create "thr-shared" (exactly one wins, the others get EEXIST).
 * Then prints "ready" and keeps the sessions until a line arrives on stdin.
 */
#include "check.h"

#include <pthread.h>
#include <stdatomic.h>

#define MAX_THREADS 32
#define FILES 4

struct worker {
	pthread_t th;
	int idx;
	int session;
	int shared;
	int shared_errno;
	int failed;
	char why[160];
};

static int dev;
static pthread_barrier_t start;

static void *work(void *arg)
{
	struct worker *w = arg;
	char name[LUO_NAME_LEN], got[LUO_NAME_LEN];

	snprintf(name, sizeof(name), "thr-%02d", w->idx);
	pthread_barrier_wait(&start);
	w->shared = luo_create_session(dev, "thr-shared");
	w->shared_errno = w->shared < 0 ? errno : 0;
	w->session = luo_create_session(dev, name);
	if (w->session < 0) {
		snprintf(w->why, sizeof(w->why), "create %s: %s", name, luo_errname(errno));
		w->failed = 1;
		return NULL;
	}
	for (int j = 0; j < FILES; j++) {
		int m = luo_memfd(name, (unsigned)(w->idx * FILES + j), 4096 + (size_t)j);

		if (m < 0 || luo_preserve_fd(w->session, m, ((__u64)w->idx << 16) | (unsigned)j) < 0) {
			snprintf(w->why, sizeof(w->why), "%s: preserve %d: %s", name, j, luo_errname(errno));
			w->failed = 1;
			return NULL;
		}
		int tr = ftruncate(m, 1);

		if ((tr == 0 || errno != EPERM) && !w->failed) {
			snprintf(w->why, sizeof(w->why), "%s: file %d is not frozen (ftruncate: %s)", name, j,
				 tr == 0 ? "succeeded" : luo_errname(errno));
			w->failed = 1;
		}
		close(m);
	}
	if ((luo_get_name(w->session, got) < 0 || strcmp(got, name) != 0) && !w->failed) {
		snprintf(w->why, sizeof(w->why), "GET_NAME of %s gave %.64s", name, got);
		w->failed = 1;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	static struct worker ws[MAX_THREADS];
	int n = argc > 1 ? atoi(argv[1]) : 8, winners = 0, eexist = 0, distinct = 1;
	char line[64];

	luo_setup_output();
	if (n < 1 || n > MAX_THREADS) {
		fprintf(stderr, "usage: %s [1..%d]\n", argv[0], MAX_THREADS);
		return 2;
	}
	dev = luo_open_dev();
	if (dev < 0)
		luo_bail("open " LUO_DEV_PATH);
	pthread_barrier_init(&start, NULL, (unsigned)n);
	for (int i = 0; i < n; i++) {
		ws[i].idx = i;
		if (pthread_create(&ws[i].th, NULL, work, &ws[i]) != 0)
			luo_bail("pthread_create");
	}
	for (int i = 0; i < n; i++)
		pthread_join(ws[i].th, NULL);
	for (int i = 0; i < n; i++) {
		if (!luo_check(!ws[i].failed, "thread %d: session thr-%02d with %d frozen files, right name", i, i, FILES))
			luo_note("  %s", ws[i].why);
		if (ws[i].shared >= 0)
			winners++;
		else if (ws[i].shared_errno == EEXIST)
			eexist++;
		for (int j = 0; j < i; j++)
			if (ws[i].session >= 0 && ws[i].session == ws[j].session)
				distinct = 0;
	}
	luo_check(winners == 1 && eexist == n - 1, "thr-shared: one winner, %d EEXIST (got %d winners, %d EEXIST)",
		  n - 1, winners, eexist);
	luo_check(distinct, "every thread got its own session fd");
	printf("ready\n");
	if (!fgets(line, sizeof(line), stdin))
		luo_note("stdin closed");
	for (int i = 0; i < n; i++) {
		if (ws[i].session >= 0)
			close(ws[i].session);
		if (ws[i].shared >= 0)
			close(ws[i].shared);
	}
	close(dev);
	return luo_done();
}

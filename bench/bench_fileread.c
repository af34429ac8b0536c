/* SPDX-License-Identifier: MIT */
/*
 * fileread: 4 KiB random reads from a page-cached file (--file PATH, made by bench/run.py).
 *   concur: -b tasks on a 1-loop executor, each reading 4 KiB at a random 4 KiB-aligned offset
 *           with concur_await_read() in a loop (queue depth = -b), n reads in all.
 *   raw:    one thread, one ring (concur's setup flags where the kernel takes them), -b reads
 *           kept in flight: each CQE queues the next read, io_uring_submit_and_wait(1) per turn.
 *           The floor; fio's io_uring engine (run by bench/run.py) is the peer.
 *   raw_fixed: the same with the file registered (io_uring_register_files, IOSQE_FIXED_FILE):
 *           what registered files would save here.
 * Unit: ns per read (wall clock / reads).
 */
#include "common.h"

#include <fcntl.h>
#include <liburing.h>
#include <sys/stat.h>

#define VARIANTS "concur|raw|raw_fixed"
#define BS       4096

static long iters, depth;
static int fd;
static uint64_t blocks;

static inline uint64_t rnd(uint64_t *s)
{
	uint64_t x = *s; /* xorshift64 */
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

static int64_t read_task(void *arg)
{
	long n = (long)(intptr_t)arg;
	char buf[BS];
	uint64_t seed = 0x9e3779b97f4a7c15ull ^ (uint64_t)(uintptr_t)&n;
	for (long i = 0; i < n; i++) {
		int64_t off = (int64_t)(rnd(&seed) % blocks) * BS;
		int64_t r = concur_await_read(fd, buf, BS, off, CONCUR_NO_TIMEOUT);
		if (r != BS)
			return r < 0 ? r : -EIO;
	}
	return 0;
}

static void run_concur(void)
{
	concur_exec *ex = bench_exec(1, 0);
	struct concur_stats before;
	concur_exec_stats(ex, &before);
	long per = iters / depth;
	concur_future **fs = calloc((size_t)depth, sizeof(*fs));
	int64_t t0 = bench_now_ns();
	for (long i = 0; i < depth; i++)
		fs[i] = concur_spawn(ex, read_task, (void *)(intptr_t)per);
	for (long i = 0; i < depth; i++) {
		int64_t r = concur_result(fs[i], -1);
		if (r < 0)
			bench_die("read task: %s", concur_strerror(r));
		concur_release(fs[i]);
	}
	int64_t t1 = bench_now_ns();
	free(fs);
	char params[128];
	snprintf(params, sizeof(params), "\"n\": %ld, \"depth\": %ld, \"bs\": %d, \"loops\": 1",
	         per * depth, depth, BS);
	bench_begin((double)(t1 - t0) / (double)(per * depth), "ns/op", "lower", params);
	bench_stats_concur(ex, &before);
	bench_end();
	concur_exec_free(ex);
}

static void run_raw(bool fixed)
{
	struct io_uring ring;
	static const unsigned tries[] = {
	    IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
	    IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
	    0,
	};
	unsigned flags = 0;
	int err = -1;
	for (unsigned i = 0; i < sizeof(tries) / sizeof(tries[0]) && err; i++) {
		struct io_uring_params p = {.flags = tries[i]};
		err = io_uring_queue_init_params((unsigned)depth * 2, &ring, &p);
		flags = tries[i];
	}
	if (err)
		bench_die("io_uring_queue_init: %s", strerror(-err));
	int rfd = fd;
	if (fixed) {
		int rc = io_uring_register_files(&ring, &fd, 1);
		if (rc)
			bench_die("io_uring_register_files: %s", strerror(-rc));
		rfd = 0;
	}
	char *bufs = aligned_alloc(BS, (size_t)depth * BS);
	uint64_t seed = 0x9e3779b97f4a7c15ull;
	long issued = 0, done = 0, enters = 0;
	int64_t t0 = bench_now_ns();
	for (long i = 0; i < depth && issued < iters; i++, issued++) {
		struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
		io_uring_prep_read(sqe, rfd, bufs + i * BS, BS, (rnd(&seed) % blocks) * BS);
		io_uring_sqe_set_data64(sqe, (uint64_t)i);
		if (fixed)
			sqe->flags |= IOSQE_FIXED_FILE;
	}
	while (done < iters) {
		io_uring_submit_and_wait(&ring, 1);
		enters++;
		struct io_uring_cqe *cqe;
		unsigned head, seen = 0;
		io_uring_for_each_cqe(&ring, head, cqe)
		{
			seen++;
			if (cqe->res != BS)
				bench_die("read: %s", cqe->res < 0 ? strerror(-cqe->res) : "short");
			done++;
			if (issued < iters) {
				uint64_t slot = io_uring_cqe_get_data64(cqe);
				struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
				io_uring_prep_read(sqe, rfd, bufs + slot * BS, BS,
				                   (rnd(&seed) % blocks) * BS);
				io_uring_sqe_set_data64(sqe, slot);
				if (fixed)
					sqe->flags |= IOSQE_FIXED_FILE;
				issued++;
			}
		}
		io_uring_cq_advance(&ring, seen);
	}
	int64_t t1 = bench_now_ns();
	char params[128];
	snprintf(params, sizeof(params), "\"n\": %ld, \"depth\": %ld, \"bs\": %d, \"fixed\": %s",
	         iters, depth, BS, fixed ? "true" : "false");
	bench_begin((double)(t1 - t0) / (double)iters, "ns/op", "lower", params);
	printf("\"cqes\": %ld, \"enters\": %ld, \"cqes_per_enter\": %.3g, \"ring_flags\": %u", done,
	       enters, (double)done / (double)enters, flags);
	bench_end();
	io_uring_queue_exit(&ring);
	free(bufs);
}

int main(int argc, char **argv)
{
	const char *path = NULL;
	/* --file PATH is ours; the rest is the common command line */
	for (int i = 1; i + 1 < argc; i++) {
		if (!strcmp(argv[i], "--file")) {
			path = argv[i + 1];
			memmove(&argv[i], &argv[i + 2], sizeof(char *) * (size_t)(argc - i - 1));
			argc -= 2;
			break;
		}
	}
	struct bench_args a = bench_parse(argc, argv, VARIANTS);
	if (!path)
		bench_die("%s: --file PATH is required", argv[0]);
	iters = a.n ? a.n : 1000000;
	depth = a.batch ? a.batch : 32;
	if (depth > iters)
		depth = iters;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) || st.st_size < BS)
		bench_die("%s: cannot open or too small: %s", path, strerror(errno));
	blocks = (uint64_t)st.st_size / BS;
	if (!strcmp(a.variant, "concur"))
		run_concur();
	else if (!strcmp(a.variant, "raw") || !strcmp(a.variant, "raw_fixed"))
		run_raw(!strcmp(a.variant, "raw_fixed"));
	else
		bench_usage(argv[0], VARIANTS);
	close(fd);
	return 0;
}

/* SPDX-License-Identifier: MIT */
/*
 * Signals as futures (concur_signal): a signal sent to the process while the loops sleep
 * completes the future with its number, waited on from a foreign thread and awaited in a task;
 * a signal outside the set does not; several futures share deliveries one each; cancel; bad
 * input; no descriptor left open (the test counts the process's signalfds).
 *
 * main() blocks the signals used here before anything else, so every thread (the loops
 * included) inherits the mask, as include/concur.h asks of callers. Signals are sent with
 * kill(getpid(), ...): process-directed, as the header requires.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "helpers.h"
#include "hold_loop.h"

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/resource.h>
#include <unistd.h>

static concur_exec *ex;

/* How many signalfds the process has open; *last (if not NULL) gets one's fd, or -1. */
static int signalfds(int *last)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	char path[300], target[64];
	int n = 0;

	assert_non_null(d);
	if (last)
		*last = -1;
	while ((e = readdir(d))) {
		snprintf(path, sizeof(path), "/proc/self/fd/%s", e->d_name);
		ssize_t len = readlink(path, target, sizeof(target) - 1);
		if (len <= 0)
			continue;
		target[len] = 0;
		if (strstr(target, "[signalfd]")) {
			n++;
			if (last)
				*last = atoi(e->d_name);
		}
	}
	closedir(d);
	return n;
}

static int count_signalfds(void)
{
	return signalfds(NULL);
}

static sigset_t set_of(int sig)
{
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, sig);
	return s;
}

/* Take a pending (blocked) signal off the process; true if it was pending. */
static bool consume_pending(int sig)
{
	sigset_t s = set_of(sig);
	struct timespec zero = {0, 0};
	return sigtimedwait(&s, NULL, &zero) == sig;
}

/* The fd of the one signalfd the process has open, or -1. */
static int find_signalfd(void)
{
	int fd;
	signalfds(&fd);
	return fd;
}

/*
 * Linked with -Wl,--wrap=close (tests/CMakeLists.txt): while hold_fd is set, the close of that
 * fd (the signal's end, on the thread completing it) waits until the test lets it go.
 */
int __real_close(int fd);
static atomic_int hold_fd = -1;
static atomic_int close_state; /* 1: held, 2: let it go */

int __wrap_close(int fd)
{
	if (fd >= 0 && atomic_load(&hold_fd) == fd) {
		atomic_store(&hold_fd, -1);
		atomic_store(&close_state, 1);
		while (atomic_load(&close_state) != 2)
			usleep(100);
	}
	return __real_close(fd);
}

static int setup(void **state)
{
	ex = new_exec(2);
	return 0;
}

static int teardown(void **state)
{
	assert_int_equal(concur_exec_join(ex, MS(10000)), 0); /* no read left in flight */
	concur_exec_free(ex);
	assert_int_equal(count_signalfds(), 0);
	return 0;
}

/* A thread outside the executor waits; the signal comes while the read is parked. */
static void test_foreign_wait(void **state)
{
	sigset_t set = set_of(SIGUSR1);
	concur_future *f = concur_signal(ex, &set);

	/* nothing pending: it waits (the loops go to sleep meanwhile), RUNNING, one fd open */
	assert_int_equal(concur_result(f, MS(50)), -ETIMEDOUT);
	assert_true(concur_running(f));
	assert_int_equal(count_signalfds(), 1);
	assert_int_equal(kill(getpid(), SIGUSR1), 0);
	assert_int_equal(concur_result(f, -1), SIGUSR1);
	assert_false(concur_cancelled(f));
	assert_int_equal(count_signalfds(), 0); /* closed before the future was done */
	concur_release(f);
}

static concur_future *armed;

static int64_t await_signal(void *arg)
{
	sigset_t set = set_of((int)(intptr_t)arg);
	concur_future *f = concur_signal(ex, &set);
	concur_promise_set(armed, 1);
	int64_t r = concur_result(f, -1); /* suspends the task, not the loop */
	concur_release(f);
	return r;
}

/* A task awaits it; the loops stay free for other tasks meanwhile. */
static int64_t nothing(void *arg)
{
	return 7;
}

static void test_task_await(void **state)
{
	armed = concur_promise_new(ex);
	concur_future *t = concur_spawn(ex, await_signal, (void *)(intptr_t)SIGUSR2);
	assert_int_equal(concur_result(armed, -1), 1);
	assert_int_equal(concur_result(t, MS(50)), -ETIMEDOUT);
	for (int i = 0; i < 4; i++) { /* both loops still run work */
		concur_future *o = concur_spawn(ex, nothing, NULL);
		assert_int_equal(concur_result(o, -1), 7);
		concur_release(o);
	}
	assert_int_equal(kill(getpid(), SIGUSR2), 0);
	assert_int_equal(concur_result(t, -1), SIGUSR2);
	concur_release(t);
	concur_release(armed);
	assert_int_equal(count_signalfds(), 0);
}

/* A signal outside the set leaves the future waiting, and stays pending for whoever wants it. */
static void test_other_signal(void **state)
{
	sigset_t set = set_of(SIGUSR1);
	concur_future *f = concur_signal(ex, &set);

	assert_int_equal(kill(getpid(), SIGUSR2), 0);
	assert_int_equal(concur_result(f, MS(50)), -ETIMEDOUT);
	assert_true(consume_pending(SIGUSR2)); /* not taken by the future */
	assert_int_equal(kill(getpid(), SIGUSR1), 0);
	assert_int_equal(concur_result(f, -1), SIGUSR1);
	concur_release(f);
}

/* A signal pending before the call completes the future at once; a set of several signals. */
static void test_pending_before(void **state)
{
	sigset_t set = set_of(SIGUSR1);
	sigaddset(&set, SIGUSR2);
	assert_int_equal(kill(getpid(), SIGUSR2), 0);
	concur_future *f = concur_signal(ex, &set);
	assert_int_equal(concur_result(f, -1), SIGUSR2);
	concur_release(f);
	assert_int_equal(count_signalfds(), 0);
}

/* Two futures on one signal: each delivery completes exactly one of them. */
static void test_several_futures(void **state)
{
	sigset_t set = set_of(SIGUSR1);
	concur_future *f[2] = {concur_signal(ex, &set), concur_signal(ex, &set)};
	bool done[2];

	assert_int_equal(kill(getpid(), SIGUSR1), 0);
	assert_int_equal(concur_wait(f, 2, CONCUR_FIRST_COMPLETED, -1, done), 1);
	int first = done[0] ? 0 : 1, other = 1 - first;
	assert_int_equal(concur_result(f[first], 0), SIGUSR1);
	assert_int_equal(concur_result(f[other], MS(50)), -ETIMEDOUT);
	assert_int_equal(kill(getpid(), SIGUSR1), 0);
	assert_int_equal(concur_result(f[other], -1), SIGUSR1);
	concur_release(f[0]);
	concur_release(f[1]);
	assert_int_equal(count_signalfds(), 0);
}

/* Realtime signals queue: two sent, two read. */
static void test_realtime_queue(void **state)
{
	sigset_t set = set_of(SIGRTMIN);
	assert_int_equal(kill(getpid(), SIGRTMIN), 0);
	assert_int_equal(kill(getpid(), SIGRTMIN), 0);
	for (int i = 0; i < 2; i++) {
		concur_future *f = concur_signal(ex, &set);
		assert_int_equal(concur_result(f, -1), SIGRTMIN);
		concur_release(f);
	}
	assert_false(consume_pending(SIGRTMIN));
}

/* Cancel while the read is parked in the kernel: -EINPROGRESS, then CANCELLED, fd closed, and a
 * later signal is left pending (no read is left behind to eat it). Also join waits for it. */
static void test_cancel_in_flight(void **state)
{
	sigset_t set = set_of(SIGUSR1);
	concur_future *f = concur_signal(ex, &set);

	assert_int_equal(concur_result(f, MS(50)), -ETIMEDOUT);
	assert_int_equal(concur_exec_join(ex, 0), -ETIMEDOUT); /* the read is work */
	assert_int_equal(concur_cancel(f), -EINPROGRESS);
	assert_int_equal(concur_result(f, -1), -ECANCELED);
	assert_true(concur_cancelled(f));
	assert_int_equal(concur_cancel(f), 1);
	assert_int_equal(count_signalfds(), 0);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	assert_int_equal(kill(getpid(), SIGUSR1), 0);
	assert_true(consume_pending(SIGUSR1));
	concur_release(f);
}

/* Cancel before the read reached its loop (the only loop is held busy): 1, CANCELLED at once,
 * and the read is never submitted. */
static void test_cancel_unsent(void **state)
{
	concur_exec *one = new_exec(1);
	concur_future *s = hold_loop(one);
	sigset_t set = set_of(SIGUSR1);
	concur_future *f = concur_signal(one, &set);

	assert_false(concur_done(f));
	assert_int_equal(concur_cancel(f), 1);
	assert_true(concur_cancelled(f));
	assert_int_equal(concur_result(f, 0), -ECANCELED);
	assert_int_equal(count_signalfds(), 0);
	release_loop(s);
	assert_int_equal(concur_exec_join(one, -1), 0);
	concur_release(f);
	concur_exec_free(one);
}

static int64_t cancel_in_task(void *arg)
{
	sigset_t set = set_of(SIGUSR1);
	concur_future *f = concur_signal(ex, &set);
	int c = concur_cancel(f);
	int64_t r = concur_result(f, -1);
	concur_release(f);
	return c == -EINPROGRESS && r == -ECANCELED ? 1 : -1;
}

/* Cancelled in the task that made it (the read was submitted on the task's own loop). */
static void test_cancel_in_task(void **state)
{
	concur_future *t = concur_spawn(ex, cancel_in_task, NULL);
	assert_int_equal(concur_result(t, -1), 1);
	concur_release(t);
	assert_int_equal(count_signalfds(), 0);
}

/*
 * A second cancel that finds the first one's poll CANCELLED returns 1 only once the future is
 * CANCELLED: it returned 1 while the first cancel's end (closing the descriptor, completing)
 * still ran on the loop, the future RUNNING, not done. Forced: the loop is held in that close.
 */
static concur_future *_Atomic second_f;
static atomic_int second_r, second_done_at_return, second_returned;

static void *cancel_again(void *arg)
{
	concur_future *f = atomic_load(&second_f);
	int r = concur_cancel(f);
	atomic_store(&second_done_at_return, concur_cancelled(f));
	atomic_store(&second_r, r);
	atomic_store(&second_returned, 1);
	return NULL;
}

static void test_second_cancel_waits_for_end(void **state)
{
	sigset_t set = set_of(SIGUSR1);
	concur_future *f = concur_signal(ex, &set);
	assert_int_equal(concur_result(f, MS(50)), -ETIMEDOUT); /* its poll waits in the kernel */
	atomic_store(&second_f, f);
	atomic_store(&close_state, 0);
	atomic_store(&hold_fd, find_signalfd());
	assert_int_equal(concur_cancel(f), -EINPROGRESS);
	while (atomic_load(&close_state) != 1)
		usleep(100);
	pthread_t th;
	assert_int_equal(pthread_create(&th, NULL, cancel_again, NULL), 0);
	usleep(50000);
	bool early = atomic_load(&second_returned);
	atomic_store(&close_state, 2);
	assert_int_equal(pthread_join(th, NULL), 0);
	assert_false(early && !atomic_load(&second_done_at_return));
	assert_int_equal(atomic_load(&second_r), 1);
	assert_true(atomic_load(&second_done_at_return));
	assert_int_equal(concur_result(f, -1), -ECANCELED);
	concur_release(f);
}

/* How many io-wq workers the kernel made for the thread tid ("iou-wrk-<tid>"). */
static int io_workers_of(pid_t tid)
{
	DIR *d = opendir("/proc/self/task");
	struct dirent *e;
	char path[300], comm[64], want[64];
	int n = 0;

	assert_non_null(d);
	snprintf(want, sizeof(want), "iou-wrk-%d", (int)tid);
	while ((e = readdir(d))) {
		snprintf(path, sizeof(path), "/proc/self/task/%s/comm", e->d_name);
		FILE *c = fopen(path, "r");
		if (!c)
			continue;
		if (fgets(comm, sizeof(comm), c) && !strncmp(comm, want, strlen(want)))
			n++;
		fclose(c);
	}
	closedir(d);
	return n;
}

static int64_t loop_tid(void *arg)
{
	return gettid();
}

/*
 * A signal future waiting through 130 signals of other futures takes no kernel worker thread. It
 * used to: its descriptor was read through the ring blocking, every signal of the process woke
 * that read, and after 128 wake-ups that found nothing the kernel handed it to an io-wq worker,
 * which blocked in it for as long as the future waited.
 */
static void test_no_worker_while_waiting(void **state)
{
	concur_exec *one = new_exec(1);
	concur_future *t = concur_spawn(one, loop_tid, NULL);
	pid_t tid = (pid_t)concur_result(t, -1);
	concur_release(t);
	sigset_t usr1 = set_of(SIGUSR1), usr2 = set_of(SIGUSR2);
	concur_future *held = concur_signal(one, &usr1); /* a server's SIGTERM, say */
	for (int i = 0; i < 130; i++) {                  /* and its reloads */
		concur_future *h = concur_signal(one, &usr2);
		assert_int_equal(kill(getpid(), SIGUSR2), 0);
		assert_int_equal(concur_result(h, -1), SIGUSR2);
		concur_release(h);
	}
	assert_int_equal(io_workers_of(tid), 0);
	assert_false(concur_done(held));
	assert_int_equal(kill(getpid(), SIGUSR1), 0);
	assert_int_equal(concur_result(held, -1), SIGUSR1);
	concur_release(held);
	concur_exec_free(one);
}

static void expect_failed(concur_future *f, int64_t err)
{
	assert_non_null(f);
	assert_true(concur_done(f));
	assert_int_equal(concur_result(f, 0), err);
	concur_release(f);
}

static void test_bad_input(void **state)
{
	sigset_t set = set_of(SIGUSR1), empty, kill_stop;
	sigemptyset(&empty);
	sigemptyset(&kill_stop);
	sigaddset(&kill_stop, SIGKILL);
	sigaddset(&kill_stop, SIGSTOP);
	_Alignas(64) char junk[128] = {0};

	expect_failed(concur_signal(NULL, &set), -EINVAL);
	expect_failed(concur_signal((concur_exec *)junk, &set), -EINVAL);
	expect_failed(concur_signal(ex, NULL), -EINVAL);
	expect_failed(concur_signal(ex, &empty), -EINVAL);
	expect_failed(concur_signal(ex, &kill_stop), -EINVAL); /* no signalfd can take those */
	assert_int_equal(count_signalfds(), 0);
}

/* No descriptor left: signalfd's own error, and nothing leaks. */
static void test_out_of_fds(void **state)
{
	struct rlimit old, low;
	int lowest = dup(0); /* the next descriptor number the process would get */
	assert_true(lowest >= 0);
	close(lowest);
	assert_int_equal(getrlimit(RLIMIT_NOFILE, &old), 0);
	low = old;
	low.rlim_cur = (rlim_t)lowest;
	assert_int_equal(setrlimit(RLIMIT_NOFILE, &low), 0);
	sigset_t set = set_of(SIGUSR1);
	concur_future *f = concur_signal(ex, &set);
	assert_int_equal(setrlimit(RLIMIT_NOFILE, &old), 0);
	expect_failed(f, -EMFILE);
	assert_int_equal(count_signalfds(), 0);
}

int main(void)
{
	/* before any thread exists: every thread inherits the mask */
	sigset_t block;
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	sigaddset(&block, SIGUSR2);
	sigaddset(&block, SIGRTMIN);
	pthread_sigmask(SIG_BLOCK, &block, NULL);

	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_foreign_wait, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_task_await, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_other_signal, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_pending_before, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_several_futures, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_realtime_queue, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_cancel_in_flight, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_cancel_unsent, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_cancel_in_task, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_second_cancel_waits_for_end, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_no_worker_while_waiting, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_bad_input, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_out_of_fds, setup, teardown),
	};
	return TESTS_EXIT(cmocka_run_group_tests(tests, NULL, NULL));
}

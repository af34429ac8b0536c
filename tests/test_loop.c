/* SPDX-License-Identifier: MIT */
/* Loops: idle means idle (an idle poll too), messages between loops ride MSG_RING, blocked threads
 * are woken through the ring, the ring flags the kernel gave us. No wake-up is lost at the fd limit
 * or when memory runs out; a tiny or pushed-back ring loses nothing and does not spin; rings of
 * executors churned on several threads are clean under TSan. */
#define _GNU_SOURCE /* CPU_SET, pthread_getaffinity_np */
#include "helpers.h"
#include "internal.h" /* concur__submit_fault */

#include <dirent.h>
#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

static concur_exec *ex;

/* An executor with 2 idle loops uses under 10 ms of CPU in 1 s. */
static int64_t nothing(void *arg)
{
	return 0;
}

/*
 * The time on CPU of this process's loop threads (named concur-N), in ns, from each thread's
 * schedstat: neither the test's own thread nor a sanitizer's helper thread counts. -1 without
 * schedstat.
 */
static int64_t loops_cpu_ns(void)
{
	DIR *d = opendir("/proc/self/task");
	if (!d)
		return -1;
	int64_t sum = 0;
	int found = 0;
	struct dirent *e;
	while ((e = readdir(d))) {
		char path[300], comm[32] = "";
		long long ns;
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/proc/self/task/%s/comm", e->d_name);
		FILE *f = fopen(path, "r");
		if (!f)
			continue;
		if (!fgets(comm, sizeof(comm), f))
			comm[0] = 0;
		fclose(f);
		if (strncmp(comm, "concur-", 7))
			continue;
		snprintf(path, sizeof(path), "/proc/self/task/%s/schedstat", e->d_name);
		if (!(f = fopen(path, "r")))
			continue;
		if (fscanf(f, "%lld", &ns) == 1) {
			sum += ns;
			found++;
		}
		fclose(f);
	}
	closedir(d);
	return found ? sum : -1;
}

/*
 * ex's 2 loops, done with some work (fn 100 times, so they have been through their whole
 * circle), stay asleep in io_uring_enter for 1 s and use under 10 ms of CPU. Frees ex.
 */
static void assert_idle_after(concur_task_fn fn)
{
	for (int i = 0; i < 100; i++)
		concur_release(concur_spawn(ex, fn, NULL));
	assert_int_equal(concur_exec_join(ex, -1), 0);
	concur_sleep(MS(50)); /* let any post-activity watch end */
	/* the loops' own time if the kernel tells it; else the whole process's */
	bool per_thread = loops_cpu_ns() >= 0;
	int64_t cpu0 = per_thread ? loops_cpu_ns() : process_cpu_ns();
	struct concur_stats before, after;
	concur_exec_stats(ex, &before);
	concur_sleep(MS(1000));
	concur_exec_stats(ex, &after);
	int64_t used = (per_thread ? loops_cpu_ns() : process_cpu_ns()) - cpu0;
	concur_exec_free(ex); /* first: a failure must not leave threads to the tests that fork */
	if (used >= MS(10))
		fail_msg("2 idle loops used %lld ns of CPU in 1 s", (long long)used);
	assert_int_equal(after.enters, before.enters); /* asleep in io_uring_enter throughout */
}

static void test_idle_is_idle(void **state)
{
	ex = new_exec(2);
	assert_idle_after(nothing);
}

/* Idle polling (concur_exec_opts.idle_poll_ns) follows I/O and then ends: the idle loop sleeps. */
static int64_t one_nop(void *arg)
{
	return concur_await_nop();
}

static void test_idle_poll_ends(void **state)
{
	struct concur_exec_opts o = {.loops = 2, .idle_poll_ns = MS(2)};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	assert_idle_after(one_nop);
}

/* Waits (up to 10 s) until *flag (a loop's `sleeping` or `watching`) is 1. */
/*
 * A loop in its idle poll after a completion picks up a post from a thread outside without a
 * doorbell; with no idle poll, the same post finds it asleep and rings. The order is forced:
 * with the poll, the post comes 20 ms after the completion, inside a 1 s window, once the loop
 * is seen polling; without, once it is seen asleep (or about to be: a poster then rings).
 */
static uint64_t doorbells_for_late_post(unsigned idle_poll_ns)
{
	struct concur_exec_opts o = {.loops = 1, .idle_poll_ns = idle_poll_ns};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	concur_future *f = concur_spawn(ex, one_nop, NULL);
	assert_int_equal(concur_result(f, -1), 0); /* its completion starts the loop's watch */
	concur_release(f);
	struct concur_stats before, after;
	concur_exec_stats(ex, &before);
	if (idle_poll_ns) {
		concur_sleep(MS(20));
		assert_true(flag_set(&ex->loops[0]->watching));
	} else {
		assert_true(flag_set(&ex->loops[0]->sleeping));
	}
	f = concur_spawn(ex, nothing, NULL);
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	concur_exec_stats(ex, &after);
	concur_exec_free(ex);
	return after.doorbells - before.doorbells;
}

static void test_idle_poll_catches_post(void **state)
{
	assert_int_equal(doorbells_for_late_post(1000000000u), 0);
	assert_true(doorbells_for_late_post(0) >= 1); /* the control: asleep without the poll */
}

/*
 * A loop watching before a sleep is handed unstarted tasks as a sleeping one is: loop 1 polls
 * (1 s window) after an op, while a task on loop 0 spawns CHILDREN tasks at once, more than a
 * turn runs; loop 0 hands half of the rest to loop 1, which runs some of them.
 */
#define CHILDREN 1000
static pthread_t poller_thread;
static atomic_int ran_on_poller;

static int64_t poller_nop(void *arg)
{
	poller_thread = pthread_self();
	return concur_await_nop();
}

static int64_t child(void *arg)
{
	if (pthread_equal(pthread_self(), poller_thread))
		atomic_fetch_add(&ran_on_poller, 1);
	return 0;
}

static int64_t parent(void *arg)
{
	for (int i = 0; i < CHILDREN; i++)
		concur_release(concur_spawn(ex, child, NULL));
	return 0;
}

static void test_idle_poll_takes_handoff(void **state)
{
	struct concur_exec_opts o = {.loops = 2, .idle_poll_ns = 1000000000u};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	atomic_store(&ran_on_poller, 0);
	concur_future *f = concur_spawn_on(ex, 1, poller_nop, NULL);
	assert_int_equal(concur_result(f, -1), 0); /* loop 1 now watches for up to 1 s */
	concur_release(f);
	/* once it is seen watching, and counted (just after its flag) */
	assert_true(flag_set(&ex->loops[1]->watching));
	for (int tries = 0; tries < 100000 && !atomic_load(&ex->nsleeping); tries++)
		usleep(100);
	f = concur_spawn_on(ex, 0, parent, NULL);
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	struct concur_stats st;
	concur_exec_stats(ex, &st);
	concur_exec_free(ex);
	assert_true(st.steals > 0);
	assert_true(atomic_load(&ran_on_poller) > 0);
}

/*
 * A task that spawns many and has not yielded yet shares them with a sleeping loop at once: the
 * parent on loop 0 spawns past CONCUR__SHARE_AT while loop 1 is seen asleep, then waits (up to
 * 10 s, without yielding) for a child to run. Before, they ran only once it yielded. Then it
 * spawns FANOUT more, handed off as loop 1 sleeps again (cut where the last handoff left off):
 * each child runs once.
 */
#define FANOUT 20000
static atomic_int fanout_ran, fanout_runs[2 * CONCUR__SHARE_AT + FANOUT];

static int64_t fanout_child(void *arg)
{
	atomic_fetch_add(&fanout_runs[(intptr_t)arg], 1);
	atomic_fetch_add(&fanout_ran, 1);
	return 0;
}

static int64_t fanout_parent(void *arg)
{
	intptr_t i = 0;
	for (; i < 2 * CONCUR__SHARE_AT; i++)
		concur_release(concur_spawn(ex, fanout_child, (void *)i));
	for (int tries = 0; tries < 100000 && !atomic_load(&fanout_ran); tries++)
		usleep(100); /* blocks loop 0: only another loop can run a child */
	int64_t early = atomic_load(&fanout_ran);
	for (; i < 2 * CONCUR__SHARE_AT + FANOUT; i++)
		concur_release(concur_spawn(ex, fanout_child, (void *)i));
	return early;
}

static void test_fanout_shared_before_yield(void **state)
{
	struct concur_exec_opts o = {.loops = 2};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	atomic_store(&fanout_ran, 0);
	for (int i = 0; i < 2 * CONCUR__SHARE_AT + FANOUT; i++)
		atomic_store(&fanout_runs[i], 0);
	assert_true(flag_set(&ex->loops[1]->sleeping));
	for (int tries = 0; tries < 100000 && !atomic_load(&ex->nsleeping); tries++)
		usleep(100); /* it is counted just after its flag is set */
	concur_future *f = concur_spawn_on(ex, 0, fanout_parent, NULL);
	assert_true(concur_result(f, -1) > 0);
	concur_release(f);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	assert_int_equal(atomic_load(&fanout_ran), 2 * CONCUR__SHARE_AT + FANOUT);
	for (int i = 0; i < 2 * CONCUR__SHARE_AT + FANOUT; i++)
		assert_int_equal(atomic_load(&fanout_runs[i]), 1);
	struct concur_stats st;
	concur_exec_stats(ex, &st);
	concur_exec_free(ex);
	assert_true(st.steals >= CONCUR__SHARE_AT / 2);
}

/* Ring flags: SINGLE_ISSUER | DEFER_TASKRUN on this kernel (6.1+), else a fallback. */
static void test_ring_flags(void **state)
{
	ex = new_exec(1);
	unsigned flags = concur_exec_ring_flags(ex);
	assert_true(flags & IORING_SETUP_CQSIZE);
	if (flags & IORING_SETUP_DEFER_TASKRUN)
		assert_true(flags & IORING_SETUP_SINGLE_ISSUER);
	concur_exec_free(ex);

	struct concur_exec_opts o = {.loops = 1, .flags = CONCUR_EXEC_PIN, .ring_entries = 8};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	concur_future *f = concur_spawn(ex, nothing, NULL);
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	concur_exec_free(ex);
}

/* The largest ring the header allows (32768 entries) gets the same setup flags as the default:
 * its 4x completion queue is clamped to the kernel's maximum (65536), not refused. */
static void test_largest_ring_keeps_flags(void **state)
{
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	unsigned want = concur_exec_ring_flags(ex);
	concur_exec_free(ex);
	o.ring_entries = 32768;
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	unsigned got = concur_exec_ring_flags(ex);
	concur_future *f = concur_spawn(ex, nothing, NULL);
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	concur_exec_free(ex);
	assert_int_equal(got & ~(unsigned)IORING_SETUP_CLAMP, want & ~(unsigned)IORING_SETUP_CLAMP);
}

/* CONCUR_EXEC_PIN pins each loop to a CPU the process may use: a server started under taskset
 * (or systemd's CPUAffinity=) keeps its loops on the CPUs it was given. Loop 0 went to CPU 0, and
 * a loop whose CPU was not allowed stayed unpinned. Confined to the last CPU allowed (CPU 1 on
 * two), as `taskset -c 1` would. And with loops = 0 an executor makes a loop per CPU allowed. */
static int64_t my_cpus(void *arg)
{
	cpu_set_t *out = arg;
	return pthread_getaffinity_np(pthread_self(), sizeof(*out), out);
}

static void pin_stays_in_affinity(void)
{
	cpu_set_t saved, only;
	assert_int_equal(pthread_getaffinity_np(pthread_self(), sizeof(saved), &saved), 0);
	int last = -1;
	for (int c = 0; c < CPU_SETSIZE; c++)
		if (CPU_ISSET(c, &saved))
			last = c;
	assert_true(last >= 0);
	CPU_ZERO(&only);
	CPU_SET(last, &only); /* as `taskset -c <last>` would */
	assert_int_equal(pthread_setaffinity_np(pthread_self(), sizeof(only), &only), 0);
	struct concur_exec_opts o = {.loops = 2, .flags = CONCUR_EXEC_PIN};
	int r = concur_exec_new(&ex, &o);
	pthread_setaffinity_np(pthread_self(), sizeof(saved), &saved);
	assert_int_equal(r, 0);
	for (unsigned i = 0; i < 2; i++) {
		cpu_set_t got;
		CPU_ZERO(&got);
		concur_future *f = concur_spawn_on(ex, i, my_cpus, &got);
		assert_int_equal(concur_result(f, -1), 0);
		concur_release(f);
		assert_int_equal(CPU_COUNT(&got), 1);
		assert_true(CPU_ISSET(last, &got)); /* loop 0 was pinned to CPU 0 */
	}
	concur_exec_free(ex);

	assert_int_equal(pthread_setaffinity_np(pthread_self(), sizeof(only), &only), 0);
	o = (struct concur_exec_opts){0};
	r = concur_exec_new(&ex, &o);
	pthread_setaffinity_np(pthread_self(), sizeof(saved), &saved);
	assert_int_equal(r, 0);
	assert_int_equal(concur_exec_loops(ex), 1); /* not one per online CPU */
	concur_exec_free(ex);
}

static void test_pin_stays_in_affinity(void **state)
{
	pin_stays_in_affinity();
}

/* The same on a machine with more than 1024 CPU ids, where the kernel refuses a cpu_set_t's
 * mask (EINVAL): simulated by a wrap of sched_getaffinity refusing a mask under 2048 CPUs. The
 * default loop count fell back to the online CPUs (2, not 1) and a pinned loop stayed
 * unpinned. */
static atomic_bool many_cpus;
static atomic_int many_cpus_asked;
int __real_sched_getaffinity(pid_t pid, size_t size, cpu_set_t *set);
int __wrap_sched_getaffinity(pid_t pid, size_t size, cpu_set_t *set)
{
	if (atomic_load(&many_cpus)) {
		atomic_fetch_add(&many_cpus_asked, 1);
		if (size < 2048 / 8) {
			errno = EINVAL;
			return -1;
		}
	}
	return __real_sched_getaffinity(pid, size, set);
}

static void test_pin_beyond_1024_cpus(void **state)
{
	atomic_store(&many_cpus, true);
	pin_stays_in_affinity();
	atomic_store(&many_cpus, false);
	assert_true(atomic_load(&many_cpus_asked) >= 3); /* two loops' pins and the count */
}

/* A fiber on loop A awaits a future completed on loop B: the resume travels by MSG_RING. */
static concur_future *gate_promise;
static pthread_t awaiter_thread, setter_thread;
static int64_t awaiter(void *arg)
{
	awaiter_thread = pthread_self();
	return concur_result(gate_promise, -1);
}
static int64_t setter(void *arg)
{
	setter_thread = pthread_self();
	concur_sleep(MS(10));
	return concur_promise_set(gate_promise, 11);
}

static void test_cross_loop_resume(void **state)
{
	ex = new_exec(2);
	gate_promise = concur_promise_new(ex);
	struct concur_stats before, after;
	concur_exec_stats(ex, &before);
	concur_future *a = concur_spawn(ex, awaiter, NULL); /* round-robin: loop 0 */
	concur_future *s = concur_spawn(ex, setter, NULL);  /* loop 1 */
	assert_int_equal(concur_result(a, -1), 11);
	assert_int_equal(concur_result(s, -1), 0);
	assert_false(pthread_equal(awaiter_thread, setter_thread));
	concur_exec_stats(ex, &after);
	assert_true(after.msg_ring > before.msg_ring);
	concur_release(a);
	concur_release(s);
	concur_release(gate_promise);
	concur_exec_free(ex);
}

/* A thread outside the executor parked on a future is woken by the loop that completes it
 * (with the futex syscall). */
static int64_t slow_value(void *arg)
{
	concur_sleep(MS(30)); /* far longer than the waiter's spin */
	return 99;
}

static void test_parked_thread_woken_by_loop(void **state)
{
	ex = new_exec(1);
	struct concur_stats before, after;
	concur_exec_stats(ex, &before);
	for (int i = 0; i < 3; i++) {
		concur_future *f = concur_spawn(ex, slow_value, NULL);
		assert_int_equal(concur_result(f, -1), 99); /* parks */
		concur_release(f);
	}
	concur_exec_stats(ex, &after);
	assert_true(after.futex_wakes - before.futex_wakes >= 3);
	/* nothing else queued on the loop: each wake was the futex syscall */
	assert_int_equal(after.futex_ring_wakes, before.futex_ring_wakes);
	concur_exec_free(ex);
}

/*
 * When the loop completes a future in its reap, with SQEs queued anyway, the wake rides the
 * submit the reap ends with (IORING_OP_FUTEX_WAKE). Here a timeout's callback (run by the reap)
 * queues a NOP and sets the promise a thread is parked on.
 */
static _Atomic uint32_t refs_after_set;
static void queue_nop_then_set(concur_future *z, void *arg)
{
	concur_future *p = arg;
	concur_release(concur_nop(ex)); /* made on the loop: its SQE goes straight into the ring */
	assert_int_equal(concur_promise_set(p, 5), 0);
	atomic_store(&refs_after_set, atomic_load(&p->refs));
}

static bool kernel_has_futex_wake(void)
{
	struct io_uring ring;
	if (io_uring_queue_init(2, &ring, 0))
		return false;
	struct io_uring_probe *p = io_uring_get_probe_ring(&ring);
	bool has = p && io_uring_opcode_supported(p, 52 /* IORING_OP_FUTEX_WAKE */);
	io_uring_free_probe(p);
	io_uring_queue_exit(&ring);
	return has;
}

static void test_parked_thread_woken_through_ring(void **state)
{
	ex = new_exec(1);
	concur_future *p = concur_promise_new(ex);
	struct concur_stats before, after;
	concur_exec_stats(ex, &before);
	concur_future *z = concur_timeout(ex, MS(50)); /* long past the waiter's spin: it parks */
	assert_int_equal(concur_on_done(z, queue_nop_then_set, p), 0);
	assert_int_equal(concur_result(p, -1), 5);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	concur_exec_stats(ex, &after);
	assert_int_equal(after.futex_wakes - before.futex_wakes, 1);
	assert_int_equal(after.futex_ring_wakes - before.futex_ring_wakes,
	                 kernel_has_futex_wake() ? 1 : 0);
	concur_release(z);
	concur_release(p);
	concur_exec_free(ex);
}

/*
 * A ring wake owns nothing: the future's references right after the completion that queued it are
 * its owners' alone. (With a reference held until the wake's CQE, a join could return while the
 * ring was the only owner of a future its caller had released: the fuzzer's exit-time leak.) The
 * waiter parks and times out first, so the completion still sees it in the waiters word and wakes
 * through the ring.
 */
static void test_ring_wake_holds_no_reference(void **state)
{
	ex = new_exec(1);
	concur_future *p = concur_promise_new(ex);
	assert_int_equal(concur_result(p, MS(1)), -ETIMEDOUT); /* parked once: the flag stays */
	struct concur_stats before, after;
	concur_exec_stats(ex, &before);
	concur_future *z = concur_timeout(ex, MS(1));
	assert_int_equal(concur_on_done(z, queue_nop_then_set, p), 0);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	concur_exec_stats(ex, &after);
	assert_int_equal(after.futex_ring_wakes - before.futex_ring_wakes,
	                 kernel_has_futex_wake() ? 1 : 0);
	assert_int_equal(atomic_load(&refs_after_set), 1); /* ours */
	assert_int_equal(concur_result(p, 0), 5);
	concur_release(z);
	concur_release(p);
	concur_exec_free(ex);
}

/*
 * A task that completes a future a thread is parked on wakes it at once, even with SQEs queued:
 * the loop's next submit may be the whole task away. The task sets the promise, then waits,
 * without yielding, for the parked thread to say it woke (it used to wait for the task's end:
 * a task waiting on it by other means never ended).
 */
static concur_future *parked_on;
static atomic_bool parked_woke;
static void *park_on_promise(void *arg)
{
	int64_t r = concur_result(parked_on, -1);
	atomic_store(&parked_woke, true);
	return (void *)(intptr_t)r;
}
static int64_t set_and_wait_for_waker(void *arg)
{
	concur_release(concur_nop(ex)); /* an SQE queued on the loop */
	concur_promise_set(parked_on, 5);
	int64_t t0 = now_ns();
	while (!atomic_load(&parked_woke) && now_ns() - t0 < MS(5000))
		;
	return atomic_load(&parked_woke);
}

static void test_parked_thread_woken_from_task(void **state)
{
	ex = new_exec(1);
	parked_on = concur_promise_new(ex);
	atomic_store(&parked_woke, false);
	pthread_t th;
	assert_int_equal(pthread_create(&th, NULL, park_on_promise, NULL), 0);
	for (int i = 0; i < 100000 && !(atomic_load(&parked_on->waiters) & CONCUR__WAITERS_PARKED);
	     i++)
		usleep(100);
	assert_true(atomic_load(&parked_on->waiters) & CONCUR__WAITERS_PARKED);
	concur_future *t = concur_spawn(ex, set_and_wait_for_waker, NULL);
	assert_int_equal(concur_result(t, -1), 1);
	void *r;
	assert_int_equal(pthread_join(th, &r), 0);
	assert_int_equal((intptr_t)r, 5);
	concur_release(t);
	concur_release(parked_on);
	concur_exec_free(ex);
}

/* A timed blocking wait from a foreign thread times out and leaves the future alone. */
static void test_blocking_timeout(void **state)
{
	concur_future *p = concur_promise_new(NULL);
	int64_t t0 = now_ns();
	assert_int_equal(concur_result(p, MS(20)), -ETIMEDOUT);
	assert_true(now_ns() - t0 >= MS(20));
	assert_false(concur_done(p));
	concur_release(p);
}

/* ---- resource exhaustion: every post reaches a sleeping loop ------------------------------- */

/*
 * Each case runs in a forked child (limits set there stay there) under an alarm: a lost wake-up
 * makes the child hang, the alarm kills it, and the test fails instead of hanging CI. The child
 * exits 0 when all is well, 77 to skip, anything else names the failed check.
 */
static void run_in_child(int (*fn)(void), unsigned timeout_s)
{
	fflush(NULL);
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		alarm(timeout_s);
		_exit(fn());
	}
	int status = 0;
	assert_int_equal(waitpid(pid, &status, 0), pid);
	if (WIFSIGNALED(status))
		fail_msg("the child died of signal %d (%s)", WTERMSIG(status),
		         WTERMSIG(status) == SIGALRM ? "hung: a lost wake-up or a spin"
		                                     : "crashed");
	assert_true(WIFEXITED(status));
	if (WEXITSTATUS(status) == 77)
		SKIP_NO_KERNEL("a feature the case needs (its child exited 77)");
	if (WEXITSTATUS(status) != 0)
		fail_msg("the child failed check %d", WEXITSTATUS(status));
}

/* No fd can be opened from now on: the limit is lowered to the lowest free fd. */
static int exhaust_fds(void)
{
	int fd = dup(0);
	if (fd < 0)
		return -1;
	close(fd);
	struct rlimit rl = {.rlim_cur = (rlim_t)fd, .rlim_max = (rlim_t)fd};
	if (setrlimit(RLIMIT_NOFILE, &rl))
		return -1;
	return dup(0) < 0 && errno == EMFILE ? 0 : -1;
}

static int64_t value_7(void *arg)
{
	return 7;
}

/* concur_exec_new with 2 loops at RLIMIT_NOFILE 3..16 either works or fails with the error;
 * never hangs (the second ring's failure once stranded the first loop's teardown). */
static rlim_t nofile_limit;
static int exec_new_at_limit_child(void)
{
	struct rlimit rl = {.rlim_cur = nofile_limit, .rlim_max = nofile_limit};
	if (setrlimit(RLIMIT_NOFILE, &rl))
		return 1;
	struct concur_exec_opts o = {.loops = 2};
	concur_exec *e = NULL;
	int r = concur_exec_new(&e, &o);
	if (r < 0)
		return (r == -EMFILE || r == -ENFILE || r == -ENOMEM) && !e ? 0 : 2;
	concur_future *f = concur_spawn(e, value_7, NULL);
	if (concur_result(f, -1) != 7)
		return 3;
	concur_release(f);
	concur_exec_free(e);
	return 0;
}

static void test_exec_new_at_fd_limit(void **state)
{
	for (nofile_limit = 3; nofile_limit <= 16; nofile_limit++)
		run_in_child(exec_new_at_limit_child, 20);
}

/* A thread that never posted before posts to a sleeping loop while no fd can be opened. */
static concur_exec *limit_ex;
static void *spawn_from_new_thread(void *arg)
{
	concur_future *f = concur_spawn(limit_ex, value_7, NULL);
	intptr_t ok = concur_result(f, -1) == 7;
	concur_release(f);
	return (void *)ok;
}

static int first_spawn_at_limit_child(void)
{
	limit_ex = NULL;
	struct concur_exec_opts o = {.loops = 2};
	if (concur_exec_new(&limit_ex, &o))
		return 1;
	if (exhaust_fds())
		return 2;
	for (int i = 0; i < 3; i++) {
		concur_sleep(MS(20)); /* idle loops go to sleep at once: this is ample */
		pthread_t t;
		void *ok = NULL;
		if (pthread_create(&t, NULL, spawn_from_new_thread, NULL) || pthread_join(t, &ok) ||
		    !ok)
			return 3;
	}
	struct concur_stats st;
	concur_exec_stats(limit_ex, &st);
	if (!st.doorbells) /* the loops were asleep: the path under test was taken */
		return 4;
	concur_exec_free(limit_ex);
	return 0;
}

static void test_first_spawn_at_fd_limit(void **state)
{
	run_in_child(first_spawn_at_limit_child, 20);
}

/* A task awaiting a blocking job is resumed by the pool's helper (a fresh thread) while no fd
 * can be opened. (The child must not inherit the parent's pool: no test before used it.) */
static int64_t slow_blocking(void *arg)
{
	usleep(20000); /* the loop goes to sleep meanwhile */
	return 5;
}
static int64_t await_blocking(void *arg)
{
	concur_future *b = concur_spawn_blocking(limit_ex, slow_blocking, NULL);
	int64_t v = concur_result(b, -1);
	concur_release(b);
	return v;
}

static int blocking_at_limit_child(void)
{
	limit_ex = NULL;
	struct concur_exec_opts o = {.loops = 1};
	if (concur_exec_new(&limit_ex, &o))
		return 1;
	if (exhaust_fds())
		return 2;
	for (int i = 0; i < 3; i++) {
		concur_future *f = concur_spawn(limit_ex, await_blocking, NULL);
		if (concur_result(f, -1) != 5)
			return 3;
		concur_release(f);
	}
	concur_exec_free(limit_ex);
	return 0;
}

static void test_blocking_resume_at_fd_limit(void **state)
{
	run_in_child(blocking_at_limit_child, 20);
}

/* concur_exec_free wakes loops that all sleep, from a thread that never posted, with no fd left. */
static int free_asleep_child(void)
{
	concur_exec *e = NULL;
	struct concur_exec_opts o = {.loops = 2};
	if (concur_exec_new(&e, &o))
		return 1;
	if (exhaust_fds())
		return 2;
	concur_sleep(MS(20));
	concur_exec_free(e);
	return 0;
}

static void test_free_asleep_at_fd_limit(void **state)
{
	run_in_child(free_asleep_child, 20);
}

/* ---- a tiny ring under load: a full SQ and an overflowing CQ lose nothing ------------------ */

/*
 * ring_entries = 8 (a 32-entry CQ) and thousands of operations in flight at once: tasks queue
 * bursts of SQEs without waiting (nop futures), await ops one by one, use linked deadlines that
 * fire and that do not, and a foreign thread adds nop futures. Every op completes with its
 * result and join returns: a full SQ costs no spin and no SQE, an overflowing CQ no CQE.
 */
#define SMALL_RING_TASKS BULK(600)
#define SMALL_RING_BURST 40
static int empty_pipe[2], full_pipe[2];
static atomic_int small_ring_bad;

static void small_ring_check(bool ok)
{
	if (!ok)
		atomic_fetch_add(&small_ring_bad, 1);
}

static int64_t small_ring_task(void *arg)
{
	concur_exec *e = concur_current_exec();
	concur_future *fs[SMALL_RING_BURST];
	for (int i = 0; i < SMALL_RING_BURST; i++) /* one burst, far more than the SQ holds */
		fs[i] = (i & 1) ? concur_nop(e) : concur_timeout(e, 1000);
	for (int i = 0; i < SMALL_RING_BURST; i++) {
		small_ring_check(concur_result(fs[i], -1) == 0);
		concur_release(fs[i]);
	}
	for (int i = 0; i < 4; i++)
		small_ring_check(concur_await_nop() == 0);
	small_ring_check(concur_await_timeout(1000) == 0);
	/* linked pairs: a deadline that fires, and one that does not */
	small_ring_check(concur_await_poll(empty_pipe[0], POLLIN, MS(1)) == -ETIMEDOUT);
	small_ring_check(concur_await_poll(full_pipe[0], POLLIN, MS(10000)) == POLLIN);
	return 1;
}

static void test_small_ring_many_ops(void **state)
{
	assert_int_equal(pipe(empty_pipe), 0);
	assert_int_equal(pipe(full_pipe), 0);
	assert_int_equal(write(full_pipe[1], "x", 1), 1);
	atomic_store(&small_ring_bad, 0);
	struct concur_exec_opts o = {.loops = 2, .ring_entries = 8};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	const int n = SMALL_RING_TASKS, foreign = BULK(4000);
	concur_future **ts = calloc((size_t)n, sizeof(*ts));
	concur_future **nops = calloc((size_t)foreign, sizeof(*nops));
	for (int i = 0; i < n; i++)
		ts[i] = concur_spawn(ex, small_ring_task, NULL);
	for (int i = 0; i < foreign; i++)
		nops[i] = concur_nop(ex);
	for (int i = 0; i < foreign; i++) {
		assert_int_equal(concur_result(nops[i], -1), 0);
		concur_release(nops[i]);
	}
	for (int i = 0; i < n; i++) {
		assert_int_equal(concur_result(ts[i], -1), 1);
		concur_release(ts[i]);
	}
	assert_int_equal(concur_exec_join(ex, -1), 0);
	assert_int_equal(atomic_load(&small_ring_bad), 0);
	free(ts);
	free(nops);
	concur_exec_free(ex);
	for (int i = 0; i < 2; i++) {
		close(empty_pipe[i]);
		close(full_pipe[i]);
	}
}

/*
 * Memory runs out (RLIMIT_AS) while tasks are being spawned: the tasks that got no stack fail
 * with -ENOMEM, the others suspend on one promise. The address space is then filled up, and
 * the main thread (which never posted to a loop before) sets the promise: every suspended task
 * resumes. Not under ASan or TSan: their shadow memory needs terabytes of address space.
 */
#define EXHAUST_TASKS 2048
static concur_future *exhaust_promise, *exhaust_fs[EXHAUST_TASKS];
static atomic_int exhaust_waiting, exhaust_resumed;

static int64_t exhaust_waiter(void *arg)
{
	atomic_fetch_add(&exhaust_waiting, 1);
	int64_t v = concur_result(exhaust_promise, -1);
	if (v == 42)
		atomic_fetch_add(&exhaust_resumed, 1);
	return v;
}
static int64_t exhaust_spawner(void *arg)
{
	for (int i = 0; i < EXHAUST_TASKS; i++)
		exhaust_fs[i] = concur_spawn(limit_ex, exhaust_waiter, NULL);
	return 0;
}
static void *spawn_spawner(void *arg)
{
	concur_release(concur_spawn(limit_ex, exhaust_spawner, NULL));
	return NULL;
}

static int exhaustion_child(void)
{
	struct concur_exec_opts o = {.loops = 2, .stack_size = 1 << 20};
	if (concur_exec_new(&limit_ex, &o))
		return 1;
	exhaust_promise = concur_promise_new(limit_ex);
	long vm_kb = proc_status_kb("VmSize");
	struct rlimit rl = {.rlim_cur = (rlim_t)(vm_kb + 64 * 1024) * 1024,
	                    .rlim_max = RLIM_INFINITY};
	if (vm_kb < 0 || setrlimit(RLIMIT_AS, &rl))
		return 2;
	/* spawned by a task, so the only thread outside the executor that posts is short-lived */
	pthread_t t;
	if (pthread_create(&t, NULL, spawn_spawner, NULL) || pthread_join(t, NULL))
		return 3;
	int failed = 0;
	for (;;) { /* until every task either waits or has failed */
		failed = 0;
		for (int i = 0; i < EXHAUST_TASKS; i++) {
			concur_future *f = atomic_load((_Atomic(concur_future *) *)&exhaust_fs[i]);
			failed += f && concur_result(f, 0) == -ENOMEM;
		}
		if (failed + atomic_load(&exhaust_waiting) == EXHAUST_TASKS)
			break;
		concur_sleep(MS(1));
	}
	if (!failed || !atomic_load(&exhaust_waiting))
		return 4;
	/* now nothing at all can be mapped */
	for (size_t sz = (size_t)64 << 20; sz >= 4096; sz /= 2)
		while (mmap(NULL, sz, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1,
		            0) != MAP_FAILED)
			;
	concur_promise_set(exhaust_promise, 42);
	for (int i = 0; i < EXHAUST_TASKS; i++) {
		int64_t v = concur_result(exhaust_fs[i], -1);
		if (v != 42 && v != -ENOMEM)
			return 5;
	}
	if (atomic_load(&exhaust_resumed) != atomic_load(&exhaust_waiting))
		return 6;
	if (concur_exec_join(limit_ex, -1))
		return 7;
	return 0; /* the child exits without freeing: its address space is full */
}

static void test_exhaustion_resumes_waiters(void **state)
{
	if (SANITIZED)
		skip(); /* RLIMIT_AS: the sanitizers' shadow memory needs far more address space */
	run_in_child(exhaustion_child, 30);
}

/* The smallest ring: an op with a deadline (a linked pair) still fits a submit. */
static int one_entry_child(void)
{
	struct concur_exec_opts o = {.loops = 1, .ring_entries = 1};
	if (concur_exec_new(&ex, &o))
		return 1;
	concur_future *f = concur_spawn(ex, small_ring_task, NULL);
	if (concur_result(f, -1) != 1 || atomic_load(&small_ring_bad))
		return 2;
	concur_release(f);
	concur_exec_free(ex);
	return 0;
}

static void test_one_entry_ring(void **state)
{
	assert_int_equal(pipe(empty_pipe), 0);
	assert_int_equal(pipe(full_pipe), 0);
	assert_int_equal(write(full_pipe[1], "x", 1), 1);
	atomic_store(&small_ring_bad, 0);
	run_in_child(one_entry_child, 30); /* the spin this was would hang: let the alarm end it */
	for (int i = 0; i < 2; i++) {
		close(empty_pipe[i]);
		close(full_pipe[i]);
	}
}

/*
 * The kernel pushing back: every submit made while the CQ is full fails with -EBUSY and takes
 * nothing (as kernels before 5.19 did while CQEs overflowed), then every other submit fails
 * with -EAGAIN (no memory for a request). A loop that only retried the submit would spin
 * forever on its full SQ; it must make room in the CQ, and lose nothing.
 */
static atomic_uint fault_calls;
static int busy_when_cq_full(struct concur__loop *l)
{
	return io_uring_cq_ready(&l->ring) >= l->ring.cq.ring_entries ? -EBUSY : 0;
}
static int again_every_other(struct concur__loop *l)
{
	return (atomic_fetch_add(&fault_calls, 1) & 1) ? -EAGAIN : 0;
}

static int pushback_child(void)
{
	int (*faults[])(struct concur__loop *) = {busy_when_cq_full, again_every_other};
	for (int k = 0; k < 2; k++) {
		concur__submit_fault = faults[k];
		struct concur_exec_opts o = {.loops = 2, .ring_entries = 8};
		if (concur_exec_new(&ex, &o))
			return 1;
		const int n = BULK(200);
		concur_future **ts = calloc((size_t)n, sizeof(*ts));
		for (int i = 0; i < n; i++)
			ts[i] = concur_spawn(ex, small_ring_task, NULL);
		for (int i = 0; i < n; i++) {
			if (concur_result(ts[i], -1) != 1)
				return 2;
			concur_release(ts[i]);
		}
		free(ts);
		if (concur_exec_join(ex, -1) || atomic_load(&small_ring_bad))
			return 3;
		concur_exec_free(ex);
		concur__submit_fault = NULL;
	}
	return 0;
}

static void test_kernel_pushback(void **state)
{
	assert_int_equal(pipe(empty_pipe), 0);
	assert_int_equal(pipe(full_pipe), 0);
	assert_int_equal(write(full_pipe[1], "x", 1), 1);
	atomic_store(&small_ring_bad, 0);
	run_in_child(pushback_child, 60);
	for (int i = 0; i < 2; i++) {
		close(empty_pipe[i]);
		close(full_pipe[i]);
	}
}

/*
 * Executors created on one thread and freed on another, over and over: each new ring lands
 * where an earlier one was. Under TSan this must report nothing (TSan does not see liburing's
 * mappings unless concur shows them to it); elsewhere it must simply work.
 */
static int64_t ring_user(void *arg)
{
	for (int i = 0; i < 4; i++)
		if (concur_await_nop() != 0 || concur_await_timeout(1000) != 0)
			return -1;
	return 1;
}
/* One thread's executors, created and freed by turns on two threads of its own. */
static void *make_exec(void *arg)
{
	concur_exec *e = NULL;
	struct concur_exec_opts o = {.loops = 2, .ring_entries = 8};
	if (concur_exec_new(&e, &o))
		return NULL;
	concur_release(concur_spawn(e, ring_user, NULL)); /* posted from this thread */
	return e;
}
static void *use_and_free_exec(void *arg)
{
	concur_exec *e = arg;
	concur_future *f[4];
	intptr_t ok = 1;
	for (int i = 0; i < 4; i++)
		f[i] = concur_spawn(e, ring_user, NULL);
	for (int i = 0; i < 4; i++) {
		ok &= concur_result(f[i], -1) == 1;
		concur_release(f[i]);
	}
	concur_exec_free(e);
	return (void *)ok;
}
static void *exec_churn(void *arg)
{
	for (int i = 0; i < 20; i++) {
		pthread_t a, b;
		void *e = NULL, *ok = NULL;
		if (pthread_create(&a, NULL, make_exec, NULL) || pthread_join(a, &e) || !e ||
		    pthread_create(&b, NULL, use_and_free_exec, e) || pthread_join(b, &ok) || !ok)
			return NULL;
	}
	return (void *)1;
}

/* Two such threads at once, with nothing ordering one's executors after the other's: a ring
 * of one lands where a ring of the other was. */
static void test_rings_across_threads(void **state)
{
	pthread_t t[2];
	for (int i = 0; i < 2; i++)
		assert_int_equal(pthread_create(&t[i], NULL, exec_churn, NULL), 0);
	for (int i = 0; i < 2; i++) {
		void *ok = NULL;
		assert_int_equal(pthread_join(t[i], &ok), 0);
		assert_non_null(ok);
	}
}

/*
 * A task with a 1 KiB stack whose op finds the SQ full and the kernel pushing back: making room
 * (moving CQEs out of the CQ into the stash) runs on its stack, which concur's I/O calls promise
 * to fit in. It used to overflow into the neighbouring stack (a 512-byte array of CQE pointers,
 * the stash's realloc, and liburing's wait resolved lazily through the PLT on that stack): the
 * canary's abort, or a crash. (Yielding to the loop instead, tried first, left a wait set up but
 * not yet interruptible: a cancel or a deadline arriving then was lost.)
 */
static atomic_int tiny_pushbacks;
static int again_once_on_tiny_stack(struct concur__loop *l)
{
	struct concur__task *t = concur__tl_task;
	if (t && !concur__task_stack_big(t) && atomic_exchange(&tiny_pushbacks, 1) == 0)
		return -EAGAIN;
	return 0;
}
static int64_t tiny_nops(void *arg)
{
	for (int i = 0; i < 4; i++)
		if (concur_await_nop() != 0)
			return -1;
	return 1;
}

/* The tiny tasks are spawned from a task of the loop: all start in one turn, so the third's
 * op finds the 2-entry SQ full. (Spawned from this thread they could arrive one per turn, each
 * turn's submit made from the loop's stack: the case then tested nothing, once in ~7 runs.) */
static int64_t spawn_tiny(void *arg)
{
	struct concur_spawn_opts so = {.stack_size = SANITIZED ? 4096 : 1024};
	concur_future *ts[8];
	int64_t r = 1;
	for (int i = 0; i < 8; i++)
		ts[i] = concur_spawn_ex(concur_current_exec(), tiny_nops, NULL, &so);
	for (int i = 0; i < 8; i++) {
		if (concur_result(ts[i], -1) != 1)
			r = -1;
		concur_release(ts[i]);
	}
	return r;
}

static int tiny_pushback_child(void)
{
	concur__submit_fault = again_once_on_tiny_stack;
	struct concur_exec_opts o = {.loops = 1, .ring_entries = 2};
	if (concur_exec_new(&ex, &o))
		return 1;
	concur_future *f = concur_spawn(ex, spawn_tiny, NULL);
	if (concur_result(f, -1) != 1)
		return 2;
	concur_release(f);
	if (atomic_load(&tiny_pushbacks) != 1)
		return 3; /* the push-back never hit a tiny task: the case tested nothing */
	concur_exec_free(ex);
	concur__submit_fault = NULL;
	return 0;
}

static void test_tiny_stack_pushback(void **state)
{
	run_in_child(tiny_pushback_child, 30);
}

/*
 * A MSG_RING carrying a node that the kernel refuses (the target's CQ overflowed) comes back to
 * the sender; the node must still reach its target loop. The hook makes the next such message
 * from refuse_from fail as a refused one does: its fd made invalid, so its CQE (-EBADF) carries
 * the failure's user_data.
 */
static struct concur__loop *_Atomic refuse_from;
static atomic_int refused;
static int refuse_node_msg(struct concur__loop *l)
{
	if (l != atomic_load(&refuse_from))
		return 0;
	struct io_uring_sq *sq = &l->ring.sq;
	for (unsigned i = sq->sqe_head; i != sq->sqe_tail; i++) {
		struct io_uring_sqe *sqe = &sq->sqes[i & sq->ring_mask];
		if (sqe->opcode == IORING_OP_MSG_RING &&
		    (sqe->user_data & CONCUR__TAG_MASK) == CONCUR__TAG_NODE_FAILED) {
			sqe->fd = -1;
			atomic_fetch_add(&refused, 1);
			atomic_store(&refuse_from, NULL);
		}
	}
	return 0;
}

static concur_exec *other_ex; /* the executor a task of ex spawns on */
static atomic_int ran_on_other = -1;

static int64_t on_which_exec(void *arg)
{
	atomic_store(&ran_on_other, concur_current_exec() == other_ex);
	return 7;
}

static int64_t spawn_on_other(void *arg)
{
	atomic_store(&refuse_from, concur__tl_loop);
	concur_future *f = concur_spawn(other_ex, on_which_exec, NULL);
	int64_t r = concur_result(f, -1);
	concur_release(f);
	return r;
}

/* A task spawned on another executor, its message refused: it runs there, both joins end. */
static int refused_spawn_child(void)
{
	struct concur_exec_opts o = {.loops = 1};
	concur__submit_fault = refuse_node_msg; /* (set while no loop runs; idle until armed) */
	if (concur_exec_new(&ex, &o) || concur_exec_new(&other_ex, &o))
		return 1;
	concur_future *f = concur_spawn(ex, spawn_on_other, NULL);
	int64_t r = concur_result(f, -1);
	concur_release(f);
	if (r != 7 || atomic_load(&refused) != 1)
		return 2;
	if (atomic_load(&ran_on_other) != 1)
		return 3; /* it ran on the sender's executor */
	if (concur_exec_join(other_ex, MS(2000)) || concur_exec_join(ex, MS(2000)))
		return 4; /* its end counted on the wrong executor */
	concur_exec_free(other_ex);
	concur_exec_free(ex);
	concur__submit_fault = NULL;
	return 0;
}

static int cancel_pipe[2];

static int64_t read_pipe(void *arg)
{
	char c;
	return concur_await_read(cancel_pipe[0], &c, 1, -1, -1);
}

static int64_t cancel_refused(void *arg)
{
	atomic_store(&refuse_from, concur__tl_loop);
	return concur_cancel(arg);
}

/* A cancel sent to another loop, its message refused: the wait there is still broken. */
static int refused_cancel_child(void)
{
	struct concur_exec_opts o = {.loops = 2};
	concur__submit_fault = refuse_node_msg;
	if (pipe(cancel_pipe) || concur_exec_new(&ex, &o))
		return 1;
	concur_future *reader = concur_spawn_on(ex, 1, read_pipe, NULL);
	if (!flag_set(&ex->loops[1]->sleeping))
		return 2; /* loop 1 asleep: the reader is in its wait, with nothing else to run */
	concur_future *c = concur_spawn_on(ex, 0, cancel_refused, reader);
	if (concur_result(c, -1) != -EINPROGRESS)
		return 3;
	concur_release(c);
	int64_t r = concur_result(reader, MS(2000));
	if (atomic_load(&refused) != 1)
		return 4;
	if (write(cancel_pipe[1], "x", 1) != 1) /* (a lost cancel: lets the reader end) */
		return 5;
	if (r != -ECANCELED)
		return 6;
	concur_release(reader);
	concur_exec_free(ex);
	concur__submit_fault = NULL;
	return 0;
}

/*
 * A cancel sent from another executor's loop, its message refused, while the target's task ends
 * by itself and its executor is freed: the message came back to the sender after the free and
 * was pushed into the freed loop's inbox (ASan: a use after free). It is the target executor's
 * work until it ran: the free waits for it. Forced: the sender holds its loop (the message not
 * yet submitted) until the free returned, or 300 ms.
 */
static atomic_int target_freed;

static int64_t cancel_refused_held(void *arg)
{
	atomic_store(&refuse_from, concur__tl_loop);
	int64_t r = concur_cancel(arg);
	if (write(cancel_pipe[1], "x", 1) != 1) /* the reader ends by itself */
		return -EIO;
	int64_t until = now_ns() + MS(300);
	while (!atomic_load(&target_freed) && now_ns() < until)
		;
	return r;
}

static int refused_cancel_freed_child(void)
{
	struct concur_exec_opts o = {.loops = 1};
	concur__submit_fault = refuse_node_msg;
	if (pipe(cancel_pipe) || concur_exec_new(&ex, &o) || concur_exec_new(&other_ex, &o))
		return 1;
	concur_future *reader = concur_spawn(ex, read_pipe, NULL);
	if (!flag_set(&ex->loops[0]->sleeping))
		return 2; /* the reader is in its wait */
	concur_future *c = concur_spawn(other_ex, cancel_refused_held, reader);
	if (concur_result(reader, -1) != 1)
		return 3;
	concur_release(reader);
	concur_exec_free(ex);
	atomic_store(&target_freed, 1);
	if (atomic_load(&refused) != 1)
		return 4; /* the free did not wait for the message on its way */
	if (concur_result(c, -1) != -EINPROGRESS)
		return 5;
	concur_release(c);
	concur_exec_free(other_ex);
	concur__submit_fault = NULL;
	return 0;
}

/*
 * A loop that stops with SQEs its last turn queued and no enter took: a cancel's MSG_RING to a
 * task of another executor was never submitted (the cancel lost; the target's join, which counts
 * the message as work, waited for ever). Forced: the canceller returns once its executor's free
 * is joining, and its loop, having woken the joiner (test_loop links concur__futex_wake
 * wrapped), waits there until the free has set `stopping`: its next look at the queues ends the
 * loop, before any enter.
 */
void __real_concur__futex_wake(_Atomic uint32_t *word, int n);
static concur_exec *_Atomic hold_after_join_wake;

void __wrap_concur__futex_wake(_Atomic uint32_t *word, int n)
{
	__real_concur__futex_wake(word, n);
	concur_exec *e = atomic_load(&hold_after_join_wake);
	if (e && word == &e->join_seq && concur__tl_loop && concur__tl_loop->ex == e) {
		atomic_store(&hold_after_join_wake, NULL);
		while (!atomic_load(&e->stopping))
			sched_yield();
	}
}

static int64_t cancel_then_wait_joiner(void *arg)
{
	int64_t r = concur_cancel(arg); /* its MSG_RING is queued on this loop */
	while (!atomic_load(&other_ex->joiners))
		sched_yield();
	return r;
}

static int queued_message_at_stop_child(void)
{
	struct concur_exec_opts o = {.loops = 1};
	if (pipe(cancel_pipe) || concur_exec_new(&ex, &o) || concur_exec_new(&other_ex, &o))
		return 1;
	concur_future *reader = concur_spawn(ex, read_pipe, NULL);
	if (!flag_set(&ex->loops[0]->sleeping))
		return 2; /* the reader is in its wait */
	atomic_store(&hold_after_join_wake, other_ex);
	concur_future *c = concur_spawn(other_ex, cancel_then_wait_joiner, reader);
	concur_exec_free(other_ex); /* c's future stays valid */
	if (concur_result(c, 0) != -EINPROGRESS)
		return 3;
	concur_release(c);
	int64_t r = concur_result(reader, MS(2000));
	if (r == -ETIMEDOUT && write(cancel_pipe[1], "x", 1) != 1) /* lost: let it end */
		return 4;
	if (r != -ECANCELED)
		return 5;
	concur_release(reader);
	concur_exec_free(ex);
	return 0;
}

static void test_refused_message_reaches_its_loop(void **state)
{
	atomic_store(&refused, 0);
	run_in_child(refused_spawn_child, 30);
	run_in_child(refused_cancel_child, 30);
	run_in_child(refused_cancel_freed_child, 30);
	run_in_child(queued_message_at_stop_child, 30);
}

/*
 * A FUTEX_WAKE queued in a reap leaves with the reap's last submit even when the kernel pushes
 * that submit back for a moment. Forced: a callback (in the reap) sets a promise a thread is
 * parked on, with an SQE queued so the wake rides the ring; the submit carrying the wake fails
 * once with -EAGAIN; the task the callback spawned then waits, without yielding, for the thread
 * to wake. The wake used to stay in the SQ until the loop's next submit, after that task.
 */
static concur_future *pb_promise;
static atomic_bool pb_woke, pb_fault_armed;
static atomic_int pb_faults;
static concur_future *_Atomic pb_waiter;
static int pb_set;

static int pb_fail_futex_submit(struct concur__loop *loop)
{
	if (!atomic_load(&pb_fault_armed))
		return 0;
	struct io_uring *ring = &loop->ring;
	for (unsigned h = ring->sq.sqe_head; h != ring->sq.sqe_tail; h++)
		if (ring->sq.sqes[h & ring->sq.ring_mask].opcode == CONCUR__OP_FUTEX_WAKE) {
			atomic_store(&pb_fault_armed, false);
			atomic_fetch_add(&pb_faults, 1);
			return -EAGAIN;
		}
	return 0;
}

static void *pb_park(void *arg)
{
	(void)arg;
	int64_t r = concur_result(pb_promise, -1);
	atomic_store(&pb_woke, true);
	return (void *)(intptr_t)r;
}

static int64_t pb_wait_for_parked(void *arg)
{
	(void)arg;
	int64_t t0 = now_ns();
	while (!atomic_load(&pb_woke) && now_ns() - t0 < MS(2000))
		;
	return atomic_load(&pb_woke);
}

static void pb_on_timeout(concur_future *z, void *arg)
{
	(void)z;
	(void)arg;
	concur_release(concur_nop(ex)); /* an SQE queued: the wake rides the ring */
	atomic_store(&pb_waiter, concur_spawn(ex, pb_wait_for_parked, NULL)); /* runs after */
	atomic_store(&pb_fault_armed, true);
	pb_set = concur_promise_set(pb_promise, 5);
}

static void test_futex_wake_through_pushback(void **state)
{
	/* set while no loop runs (a plain pointer the loop reads); idle until armed */
	concur__submit_fault = pb_fail_futex_submit;
	ex = new_exec(1);
	pb_promise = concur_promise_new(ex);
	pthread_t th;
	assert_int_equal(pthread_create(&th, NULL, pb_park, NULL), 0);
	for (int i = 0; i < 100000 && !(atomic_load(&pb_promise->waiters) & CONCUR__WAITERS_PARKED);
	     i++)
		usleep(100);
	assert_true(atomic_load(&pb_promise->waiters) & CONCUR__WAITERS_PARKED);
	concur_future *z = concur_timeout(ex, MS(10));
	assert_int_equal(concur_on_done(z, pb_on_timeout, NULL), 0);
	EVENTUALLY(atomic_load(&pb_waiter) != NULL);
	int64_t saw = concur_result(atomic_load(&pb_waiter), -1);
	void *r;
	assert_int_equal(pthread_join(th, &r), 0);
	assert_int_equal(pb_set, 0);
	assert_int_equal((intptr_t)r, 5);
	assert_int_equal(atomic_load(&pb_faults), 1);
	assert_int_equal(saw, 1); /* the thread woke while the task waited */
	concur_release(atomic_load(&pb_waiter));
	concur_release(z);
	concur_release(pb_promise);
	concur_exec_free(ex);
	concur__submit_fault = NULL;
}

/*
 * fork() after threads of our own posted to an executor (each such thread's slot is listed, on
 * its stack): the child's list still named them, glibc unmaps their stacks in the child (it
 * keeps 40 MiB of them), and the child's concur_exec_free walked the list into unmapped memory
 * (SIGSEGV). The child now keeps only its own thread's slot. (Under TSan a child of a threaded
 * parent may not start threads: there it makes no executor.)
 */
#define FORK_POSTERS 8
static pthread_barrier_t posters_posted, posters_go;
static concur_exec *posted_ex;

static void *post_then_wait(void *arg)
{
	concur_future *f = concur_spawn(posted_ex, nothing, NULL); /* lists this thread's slot */
	concur_result(f, -1);
	concur_release(f);
	pthread_barrier_wait(&posters_posted);
	pthread_barrier_wait(&posters_go); /* alive, in no concur call, across the fork */
	return NULL;
}

/* The child: an executor of its own, a post from outside it, and its free. */
static int posters_child(int unused)
{
	int bad = 0;
#if !defined(__SANITIZE_THREAD__)
	concur_exec *c = NULL;
	struct concur_exec_opts o = {.loops = 1};
	if (concur_exec_new(&c, &o))
		return 2;
	concur_future *f = concur_spawn(c, nothing, NULL); /* from outside: a post */
	bad = concur_result(f, MS(5000)) != 0;
	concur_release(f);
	concur_exec_free(c); /* walks the posters' list */
#endif
	return bad;
}

static void test_fork_after_foreign_posters(void **state)
{
	posted_ex = new_exec(1);
	pthread_barrier_init(&posters_posted, NULL, FORK_POSTERS + 1);
	pthread_barrier_init(&posters_go, NULL, FORK_POSTERS + 1);
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 16 << 20); /* 8 x 16 MiB: past glibc's stack cache */
	pthread_t th[FORK_POSTERS];
	for (int i = 0; i < FORK_POSTERS; i++)
		assert_int_equal(pthread_create(&th[i], &attr, post_then_wait, NULL), 0);
	pthread_attr_destroy(&attr);
	pthread_barrier_wait(&posters_posted);
	int status = child_status(posters_child, 0);
	pthread_barrier_wait(&posters_go);
	for (int i = 0; i < FORK_POSTERS; i++)
		pthread_join(th[i], NULL);
	pthread_barrier_destroy(&posters_posted);
	pthread_barrier_destroy(&posters_go);
	concur_exec_free(posted_ex);
	assert_true(status >= 0 && WIFEXITED(status)); /* killed by SIGSEGV before */
	assert_int_equal(WEXITSTATUS(status), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    /* first: the forking tests want a single-threaded parent, and a pool of blocking
	     * helpers the child would not inherit */
	    cmocka_unit_test(test_exec_new_at_fd_limit),
	    cmocka_unit_test(test_first_spawn_at_fd_limit),
	    cmocka_unit_test(test_blocking_resume_at_fd_limit),
	    cmocka_unit_test(test_free_asleep_at_fd_limit),
	    cmocka_unit_test(test_exhaustion_resumes_waiters),
	    cmocka_unit_test(test_idle_is_idle),
	    cmocka_unit_test(test_idle_poll_ends),
	    cmocka_unit_test(test_idle_poll_catches_post),
	    cmocka_unit_test(test_idle_poll_takes_handoff),
	    cmocka_unit_test(test_fanout_shared_before_yield),
	    cmocka_unit_test(test_ring_flags),
	    cmocka_unit_test(test_largest_ring_keeps_flags),
	    cmocka_unit_test(test_pin_stays_in_affinity),
	    cmocka_unit_test(test_pin_beyond_1024_cpus),
	    cmocka_unit_test(test_fork_after_foreign_posters),
	    cmocka_unit_test(test_cross_loop_resume),
	    cmocka_unit_test(test_parked_thread_woken_by_loop),
	    cmocka_unit_test(test_parked_thread_woken_through_ring),
	    cmocka_unit_test(test_ring_wake_holds_no_reference),
	    cmocka_unit_test(test_parked_thread_woken_from_task),
	    cmocka_unit_test(test_blocking_timeout),
	    cmocka_unit_test(test_small_ring_many_ops),
	    cmocka_unit_test(test_one_entry_ring),
	    cmocka_unit_test(test_kernel_pushback),
	    cmocka_unit_test(test_refused_message_reaches_its_loop),
	    cmocka_unit_test(test_tiny_stack_pushback),
	    cmocka_unit_test(test_rings_across_threads),
	    cmocka_unit_test(test_futex_wake_through_pushback),
	};
	return TESTS_EXIT(cmocka_run_group_tests(tests, NULL, NULL));
}

// SPDX-License-Identifier: MIT
//
// tasks/1M, Boost.Fiber's side: n fibers on one thread (round_robin), each waiting on its own
// boost::fibers::promise's future; once all wait, main sets promise i to i and joins them.
// Stacks: pooled_fixedsize_stack of -b bytes (default 16 KiB), no guard page: Boost's default
// fixedsize_stack mallocs 128 KiB apiece, each an mmap of its own, and stops short of 10^6 at
// vm.max_map_count. Prints bench_tasks.c's JSON (KiB per waiting fiber, park_ms, wake_ms, ...).
//
//   peer_boost_tasks --variant boost [-n N] [-b STACK_BYTES]
#include <boost/fiber/all.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

static long status_kb(const char *field)
{
	FILE *f = std::fopen("/proc/self/status", "r");
	char line[256];
	long v = -1;
	size_t n = std::strlen(field);
	while (f && std::fgets(line, sizeof(line), f))
		if (!std::strncmp(line, field, n) && line[n] == ':')
			v = std::strtol(line + n + 1, nullptr, 10);
	if (f)
		std::fclose(f);
	return v;
}

static void usage(const char *prog)
{
	std::fprintf(stderr, "usage: %s --variant boost [-n N] [-b STACK_BYTES]\n", prog);
	std::exit(2);
}

int main(int argc, char **argv)
{
	long n = 1000000, stack = 16384;
	const char *variant = nullptr;
	for (int i = 1; i + 1 < argc; i += 2) {
		if (!std::strcmp(argv[i], "--variant"))
			variant = argv[i + 1];
		else if (!std::strcmp(argv[i], "-n"))
			n = (long)std::strtod(argv[i + 1], nullptr);
		else if (!std::strcmp(argv[i], "-b"))
			stack = (long)std::strtod(argv[i + 1], nullptr);
		else if (std::strcmp(argv[i], "-l"))
			usage(argv[0]);
	}
	if (!variant || std::strcmp(variant, "boost") || n <= 0 || stack <= 0)
		usage(argv[0]);
	using clock = std::chrono::steady_clock;
	std::vector<boost::fibers::promise<long>> promises(n);
	std::vector<boost::fibers::fiber> fibers;
	fibers.reserve(n);
	std::vector<long> results(n, -1);
	long parked = 0;
	long base_kb = status_kb("VmRSS");
	boost::fibers::pooled_fixedsize_stack salloc((std::size_t)stack);

	auto t0 = clock::now();
	for (long i = 0; i < n; i++) {
		boost::fibers::future<long> fut = promises[i].get_future();
		fibers.emplace_back(std::allocator_arg, salloc,
		                    [i, &results, &parked, fut = std::move(fut)]() mutable {
			                    parked++;
			                    results[i] = fut.get();
		                    });
	}
	while (parked < n) /* the fibers run when main yields: each waits on its future */
		boost::this_fiber::yield();
	auto t1 = clock::now();
	long hwm_kb = status_kb("VmHWM"), pte_kb = status_kb("VmPTE");
	for (long i = 0; i < n; i++)
		promises[i].set_value(i);
	for (auto &f : fibers)
		f.join();
	auto t2 = clock::now();
	for (long i = 0; i < n; i++)
		if (results[i] != i) {
			std::fprintf(stderr, "fiber %ld got %ld\n", i, results[i]);
			return 1;
		}
	double park_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
	double wake_ms = std::chrono::duration<double, std::milli>(t2 - t1).count();
	std::printf("{\"value\": %.6g, \"unit\": \"KiB/task\", \"better\": \"lower\", \"params\": "
	            "{\"n\": %ld, \"stack_size\": %ld, \"park_ms\": %.1f, \"wake_ms\": %.1f, "
	            "\"pte_kb\": %ld}, \"stats\": {}, \"extra\": {\"park_ms\": %.1f, "
	            "\"wake_ms\": %.1f}}\n",
	            (double)(hwm_kb - base_kb) / (double)n, n, stack, park_ms, wake_ms, pte_kb,
	            park_ms, wake_ms);
	return 0;
}

// SPDX-License-Identifier: MIT
/*
 * Boost peers of the hot-path workloads (Debian's libboost-context-dev, libboost-fiber-dev), in
 * the suite's format: --variant NAME -n N, one JSON line on stdout.
 *   context_switch: Boost.Context's boost::context::fiber: main and one fiber resume each other;
 *                   elapsed / (2n) per switch (a bare switch with Boost's own stack handling).
 *   fiber_switch:   Boost.Fiber: two fibers on the default round-robin scheduler, each calling
 *                   boost::this_fiber::yield() n times; elapsed / (2n) per switch (what a yield
 *                   costs with a scheduler, like concur_yield).
 *   fiber_spawn_one: Boost.Fiber: boost::fibers::async(trivial, i).get() n times from the main
 *                   fiber (a new fiber with a future for its result, run, its result taken);
 *                   ns per task.
 * All on one thread, as concur's side runs on 1 loop.
 */
#include <boost/context/fiber.hpp>
#include <boost/fiber/all.hpp>
#include <boost/version.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace ctx = boost::context;

static long iters = 1000000;

static double now_ns()
{
	return std::chrono::duration<double, std::nano>(
	           std::chrono::steady_clock::now().time_since_epoch())
	    .count();
}

static void emit(double value, const char *unit)
{
	std::printf("{\"value\": %.6g, \"unit\": \"%s\", \"better\": \"lower\", \"params\": "
	            "{\"n\": %ld, \"boost\": \"%d.%d.%d\"}, \"stats\": {}}\n",
	            value, unit, iters, BOOST_VERSION / 100000, BOOST_VERSION / 100 % 1000,
	            BOOST_VERSION % 100);
}

static void context_switch()
{
	ctx::fiber f{[](ctx::fiber &&back) {
		for (;;)
			back = std::move(back).resume();
		return std::move(back);
	}};
	f = std::move(f).resume(); // warm
	double t0 = now_ns();
	for (long i = 0; i < iters; i++)
		f = std::move(f).resume();
	double t1 = now_ns();
	emit((t1 - t0) / (2.0 * (double)iters), "ns/switch");
	// f still holds the suspended fiber: its stack is unwound when f goes out of scope
}

static void fiber_switch()
{
	auto body = [] {
		for (long i = 0; i < iters; i++)
			boost::this_fiber::yield();
	};
	double t0 = now_ns();
	boost::fibers::fiber a(body), b(body);
	a.join();
	b.join();
	double t1 = now_ns();
	emit((t1 - t0) / (2.0 * (double)iters), "ns/switch");
}

static long trivial(long i)
{
	return i & 1;
}

static void fiber_spawn_one()
{
	long sum = 0;
	double t0 = now_ns();
	for (long i = 0; i < iters; i++)
		sum += boost::fibers::async(trivial, i).get();
	double t1 = now_ns();
	if (sum != iters / 2) {
		std::fprintf(stderr, "bench_boost: wrong sum %ld\n", sum);
		std::exit(1);
	}
	emit((t1 - t0) / (double)iters, "ns/task");
}

int main(int argc, char **argv)
{
	const char *variant = nullptr;
	for (int i = 1; i + 1 < argc; i += 2) {
		if (!std::strcmp(argv[i], "--variant"))
			variant = argv[i + 1];
		else if (!std::strcmp(argv[i], "-n"))
			iters = std::atol(argv[i + 1]) > 0 ? std::atol(argv[i + 1]) : 1;
	}
	if (variant && !std::strcmp(variant, "context_switch"))
		context_switch();
	else if (variant && !std::strcmp(variant, "fiber_switch"))
		fiber_switch();
	else if (variant && !std::strcmp(variant, "fiber_spawn_one"))
		fiber_spawn_one();
	else {
		std::fprintf(stderr, "usage: %s --variant {context_switch|fiber_switch|"
		                     "fiber_spawn_one} [-n N]\n",
		             argv[0]);
		return 2;
	}
	return 0;
}

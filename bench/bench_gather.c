/* SPDX-License-Identifier: MIT */
/*
 * gather: spawn n trivial tasks (10^5), then collect every result.
 *   gather:        one concur_gather() over all n futures;
 *   one_by_one:    concur_result() on each future in turn;
 *   as_completed:  a concur_as_completed iterator over all n.
 * The spawning is the same in every variant. Unit: ns per future (spawn + collect).
 */
#include "comp_bench.h"

#define VARIANTS "gather|one_by_one|as_completed"

static int64_t trivial(void *arg)
{
	return (intptr_t)arg & 0xff;
}

int main(int argc, char **argv)
{
	struct comp_args a = comp_parse(argc, argv, VARIANTS);
	long n = a.n ? a.n : a.quick ? 10000 : 100000;
	concur_exec *ex = comp_exec(0);
	concur_future **fs = calloc((size_t)n, sizeof(*fs));
	int64_t *vals = calloc((size_t)n, sizeof(*vals));
	if (!fs || !vals)
		comp_die("calloc", -ENOMEM);
	struct concur_stats before = comp_stats(ex);
	int64_t sum = 0, t0 = comp_now_ns();
	for (long i = 0; i < n; i++)
		fs[i] = concur_spawn(ex, trivial, (void *)(intptr_t)i);
	if (!strcmp(a.variant, "gather")) {
		int64_t r = concur_gather(fs, (size_t)n, -1, vals, NULL);
		if (r < 0)
			comp_die("concur_gather", r);
		for (long i = 0; i < n; i++)
			sum += vals[i];
	} else if (!strcmp(a.variant, "one_by_one")) {
		for (long i = 0; i < n; i++)
			sum += concur_result(fs[i], -1);
	} else {
		concur_as_completed *it;
		int rc = concur_as_completed_new(&it, fs, (size_t)n, -1);
		if (rc < 0)
			comp_die("concur_as_completed_new", rc);
		concur_future *f;
		while ((rc = concur_as_completed_next(it, &f)) == 1) {
			sum += concur_result(f, 0);
			concur_release(f);
		}
		if (rc < 0)
			comp_die("concur_as_completed_next", rc);
		concur_as_completed_free(it);
	}
	int64_t ns = comp_now_ns() - t0;
	int64_t expect = 0;
	for (long i = 0; i < n; i++)
		expect += i & 0xff;
	if (sum != expect)
		comp_die("gather: wrong sum", -EPROTO);
	comp_emit(ns, n, a.variant, concur_exec_loops(ex), ex, &before);
	for (long i = 0; i < n; i++)
		concur_release(fs[i]);
	free(fs);
	free(vals);
	concur_exec_free(ex);
	return 0;
}

/* SPDX-License-Identifier: MIT */
/* The composition tests' fixture (test_wait, test_group, test_sync, test_blocking): one
 * executor for the whole group. The helpers themselves are in helpers.h. */
#ifndef COMP_TEST_H
#define COMP_TEST_H

#include "helpers.h"

/* A 2-loop executor for the whole test group. */
static concur_exec *ex;

static inline int setup_ex2(void **state)
{
	struct concur_exec_opts o = {.loops = 2};
	return concur_exec_new(&ex, &o);
}

static inline int teardown_ex(void **state)
{
	concur_exec_free(ex);
	return 0;
}

#endif /* COMP_TEST_H */

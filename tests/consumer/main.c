/* SPDX-License-Identifier: MIT */
/* A program built against an installed concur, to prove the install works. */
#include <concur.h>
#include <stdio.h>

static int64_t answer(void *arg)
{
	return 42;
}

int main(void)
{
	concur_exec *ex;
	int r = concur_exec_new(&ex, NULL);
	if (r < 0) {
		fprintf(stderr, "concur_exec_new: %s\n", concur_strerror(r));
		return 1;
	}
	concur_future *f = concur_spawn(ex, answer, NULL);
	int64_t v = concur_result(f, -1);
	concur_release(f);
	concur_exec_free(ex);
	printf("consumer: %lld\n", (long long)v);
	return v == 42 ? 0 : 1;
}

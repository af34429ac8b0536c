/* SPDX-License-Identifier: MIT */
/* Prints, as one JSON line, what the runner's header needs from concur and liburing. */
#include "common.h"

static const struct {
	unsigned bit;
	const char *name;
} ring_flags[] = {
    {1u << 0, "IOPOLL"},         {1u << 1, "SQPOLL"},
    {1u << 2, "SQ_AFF"},         {1u << 3, "CQSIZE"},
    {1u << 4, "CLAMP"},          {1u << 5, "ATTACH_WQ"},
    {1u << 6, "R_DISABLED"},     {1u << 7, "SUBMIT_ALL"},
    {1u << 8, "COOP_TASKRUN"},   {1u << 9, "TASKRUN_FLAG"},
    {1u << 10, "SQE128"},        {1u << 11, "CQE32"},
    {1u << 12, "SINGLE_ISSUER"}, {1u << 13, "DEFER_TASKRUN"},
    {1u << 14, "NO_MMAP"},       {1u << 15, "REGISTERED_FD_ONLY"},
    {1u << 16, "NO_SQARRAY"},
};

int main(void)
{
	concur_exec *ex = NULL;
	int rc = concur_exec_new(&ex, NULL);
	if (rc < 0) {
		printf("{\"error\": \"concur_exec_new: %s\"}\n", concur_strerror(rc));
		return 1;
	}
	unsigned flags = concur_exec_ring_flags(ex);
	printf("{\"concur_version\": \"%d.%d\", \"loops\": %d, \"ring_flags\": %u, "
	       "\"ring_flags_names\": [",
	       CONCUR_VERSION_MAJOR, CONCUR_VERSION_MINOR, concur_exec_loops(ex), flags);
	const char *sep = "";
	for (size_t i = 0; i < sizeof(ring_flags) / sizeof(ring_flags[0]); i++) {
		if (flags & ring_flags[i].bit) {
			printf("%s\"%s\"", sep, ring_flags[i].name);
			sep = ", ";
			flags &= ~ring_flags[i].bit;
		}
	}
	if (flags)
		printf("%s\"0x%x\"", sep, flags);
	printf("]}\n");
	concur_exec_free(ex);
	return 0;
}

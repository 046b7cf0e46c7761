/*
 * Shared by every C test app. The contract (see testapps/README.md):
 *   set up distinctive state, print READY on stderr, compute for 1-3 s while printing
 *   deterministic progress on stdout (through stdio, so buffered output sits in memory at
 *   checkpoint time), print PHASE 2 on stderr halfway, verify the state, print PASS on stdout
 *   (or FAIL: reason on stdout and stderr, exit 1).
 */
#ifndef SNAPSHIM_TESTAPP_COMMON_H
#define SNAPSHIM_TESTAPP_COMMON_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* stderr is unbuffered; the explicit flush is for readers of this code. */
static inline void marker(const char *what)
{
	fprintf(stderr, "%s\n", what);
	fflush(stderr);
}

static inline void ready(void) { marker("READY"); }
static inline void phase2(void) { marker("PHASE 2"); }

__attribute__((noreturn, format(printf, 1, 2))) static inline void fail(const char *fmt, ...)
{
	va_list ap;
	char msg[512];

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	printf("FAIL: %s\n", msg);
	fflush(stdout);
	fprintf(stderr, "FAIL: %s\n", msg);
	exit(1);
}

static inline void pass(void)
{
	printf("PASS\n");
	fflush(stdout);
}

/* splitmix64: a good 64-bit mixer, used as the deterministic "computation" everywhere. */
static inline uint64_t mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

#endif

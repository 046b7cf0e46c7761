/*
 * fpu: distinctive values in all sixteen ymm registers (both 128-bit halves), all eight x87
 * stack slots, MXCSR and the x87 control word, held across a long integer-only spin in one asm
 * block, so a checkpoint almost always lands while they are live. Read back and compared after
 * every round. Built with -mavx2 where the CPU has it; without AVX2 only xmm registers are used.
 *
 * Usage: fpu [ROUNDS]     (default 24, about 1.5 s here)
 */
#include <string.h>

#include "common.h"

#define MAX_ROUNDS 1000
#define SPIN 30000000ULL

#ifdef __AVX2__
#define VBYTES 32
#define VNAME "ymm"
#else
#define VBYTES 16
#define VNAME "xmm"
#endif

struct fpu_state {
	unsigned char v[16][32] __attribute__((aligned(32))); /* only VBYTES of each used */
	long double st[8];
	uint32_t mxcsr;
	uint16_t fcw;
};

static struct fpu_state in, out;

static void fill(struct fpu_state *s, int round)
{
	memset(s, 0, sizeof *s);
	for (int r = 0; r < 16; r++)
		for (int b = 0; b < VBYTES; b += 8) {
			uint64_t x = mix64((uint64_t)round * 1000 + (uint64_t)r * 8 + (uint64_t)b);

			memcpy(&s->v[r][b], &x, 8);
		}
	for (int i = 0; i < 8; i++)
		s->st[i] = (long double)(mix64((uint64_t)round * 77 + (uint64_t)i) >> 11) / 3.0L;
	/* All exceptions masked, flush-to-zero and denormals-are-zero on, rounding mode varies. */
	s->mxcsr = 0x1f80u | 0x8040u | ((uint32_t)(round % 4) << 13);
	/* 53-bit precision, rounding mode varies, all exceptions masked. */
	s->fcw = (uint16_t)(0x007fu | (2u << 8) | ((unsigned)((round + 1) % 4) << 10));
}

/* Loads `in` into the registers, spins `n` times on general-purpose registers only, stores the
 * registers into `out`. Returns the spin's result. */
static uint64_t hold_and_spin(uint64_t x, uint64_t n)
{
	uint32_t mxcsr_save;
	uint16_t fcw_save;
	const uint64_t mul = 6364136223846793005ULL;

	__asm__ volatile(
		"stmxcsr %[mxsave]\n\t"
		"fnstcw %[cwsave]\n\t"
#ifdef __AVX2__
#define LOADV(i) "vmovdqu " #i "*32(%[vin]), %%ymm" #i "\n\t"
#define STOREV(i) "vmovdqu %%ymm" #i ", " #i "*32(%[vout])\n\t"
#else
#define LOADV(i) "movdqu " #i "*32(%[vin]), %%xmm" #i "\n\t"
#define STOREV(i) "movdqu %%xmm" #i ", " #i "*32(%[vout])\n\t"
#endif
		LOADV(0) LOADV(1) LOADV(2) LOADV(3) LOADV(4) LOADV(5) LOADV(6) LOADV(7)
		LOADV(8) LOADV(9) LOADV(10) LOADV(11) LOADV(12) LOADV(13) LOADV(14) LOADV(15)
		"fldt 0*16(%[stin])\n\t"
		"fldt 1*16(%[stin])\n\t"
		"fldt 2*16(%[stin])\n\t"
		"fldt 3*16(%[stin])\n\t"
		"fldt 4*16(%[stin])\n\t"
		"fldt 5*16(%[stin])\n\t"
		"fldt 6*16(%[stin])\n\t"
		"fldt 7*16(%[stin])\n\t"
		"ldmxcsr %[mxin]\n\t"
		"fldcw %[cwin]\n\t"
		"1:\n\t"
		"imul %[mul], %[x]\n\t"
		"add %[n], %[x]\n\t"
		"mov %[x], %%rdx\n\t"
		"shr $29, %%rdx\n\t"
		"xor %%rdx, %[x]\n\t"
		"dec %[n]\n\t"
		"jnz 1b\n\t"
		"stmxcsr %[mxout]\n\t"
		"fnstcw %[cwout]\n\t"
		STOREV(0) STOREV(1) STOREV(2) STOREV(3) STOREV(4) STOREV(5) STOREV(6) STOREV(7)
		STOREV(8) STOREV(9) STOREV(10) STOREV(11) STOREV(12) STOREV(13) STOREV(14) STOREV(15)
		/* st(0) holds st[7]: pop into the slots in reverse load order. */
		"fstpt 7*16(%[stout])\n\t"
		"fstpt 6*16(%[stout])\n\t"
		"fstpt 5*16(%[stout])\n\t"
		"fstpt 4*16(%[stout])\n\t"
		"fstpt 3*16(%[stout])\n\t"
		"fstpt 2*16(%[stout])\n\t"
		"fstpt 1*16(%[stout])\n\t"
		"fstpt 0*16(%[stout])\n\t"
		"ldmxcsr %[mxsave]\n\t"
		"fldcw %[cwsave]\n\t"
#ifdef __AVX2__
		"vzeroupper\n\t"
#endif
		: [x] "+r"(x), [n] "+r"(n), [mxsave] "=m"(mxcsr_save), [cwsave] "=m"(fcw_save),
		  [mxout] "=m"(out.mxcsr), [cwout] "=m"(out.fcw)
		: [mul] "r"(mul), [vin] "r"(in.v), [vout] "r"(out.v), [stin] "r"(in.st),
		  [stout] "r"(out.st), [mxin] "m"(in.mxcsr), [cwin] "m"(in.fcw)
		: "rdx", "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
		  "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "st",
		  "st(1)", "st(2)", "st(3)", "st(4)", "st(5)", "st(6)", "st(7)");
	return x;
}

static uint64_t hash_bytes(const void *p, size_t n)
{
	const unsigned char *b = p;
	uint64_t h = 0;

	for (size_t i = 0; i < n; i++)
		h = mix64(h ^ b[i]);
	return h;
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 24;
	uint64_t x = 1;

	if (rounds < 2 || rounds > MAX_ROUNDS)
		fail("rounds must be in 2..%d", MAX_ROUNDS);
	printf("fpu: %d rounds, 16 %s registers, 8 x87 registers\n", rounds, VNAME);
	ready();
	for (int round = 0; round < rounds; round++) {
		if (round == rounds / 2)
			phase2();
		fill(&in, round);
		memset(&out, 0xa5, sizeof out);
		x = hold_and_spin(x, SPIN);
		for (int r = 0; r < 16; r++) {
			if (memcmp(in.v[r], out.v[r], VBYTES))
				fail("round %d: %s%d changed", round, VNAME, r);
			printf("round %2d %s%-2d %016llx\n", round, VNAME, r,
			       (unsigned long long)hash_bytes(out.v[r], VBYTES));
		}
		for (int i = 0; i < 8; i++) {
			/* Only the 80 significant bits: the rest of the 16-byte slot is padding. */
			if (memcmp(&in.st[i], &out.st[i], 10))
				fail("round %d: x87 st(%d) changed", round, 7 - i);
			printf("round %2d st(%d)  %016llx\n", round, 7 - i,
			       (unsigned long long)hash_bytes(&out.st[i], 10));
		}
		if (out.mxcsr != in.mxcsr)
			fail("round %d: MXCSR %#x, want %#x", round, out.mxcsr, in.mxcsr);
		if (out.fcw != in.fcw)
			fail("round %d: x87 control word %#x, want %#x", round, out.fcw, in.fcw);
		printf("round %2d spin %016llx mxcsr %04x fcw %04x\n", round, (unsigned long long)x,
		       out.mxcsr, out.fcw);
	}
	pass();
	return 0;
}

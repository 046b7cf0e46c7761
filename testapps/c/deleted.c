/*
 * deleted: files that have no name any more, used all through the run.
 *   - "log": a file opened three times (read-write, read-only, write-only O_APPEND) and once
 *     dup'ed, then unlinked: records are appended through one descriptor, read back in order
 *     through another (whose dup must keep the same offset), and a header rewritten through
 *     the third;
 *   - an O_TMPFILE file in the working directory, 1 MiB rewritten at pseudo-random offsets
 *     (checked against a copy in memory), read sequentially through its own offset;
 *   - a memfd ("snapshim-test", sealed against shrinking), grown every round;
 *   - a deleted file mapped MAP_SHARED whose descriptor is closed (only the mapping holds it).
 * Every 4 rounds: sizes, offsets, checksums. At the end: every byte of each file checked, the
 * open flags, the memfd's name and seals.
 *
 * Usage: deleted [ROUNDS [sub|big]]      (ROUNDS: default 480)
 *   sub: the log and the tmpfile are in the directory "sub" (made here), which a test can
 *        remove before the restore;
 *   big: also holds a deleted file of 65 MiB (sparse), more than an image keeps;
 *   private: the "mapping" is private anonymous memory instead (the fork engine's child sees
 *        shared memory live, so it cannot snapshot a shared mapping).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"

#define REC 4096
#define TMPSZ (1u << 20)
#define MAPSZ (64u << 10)
#define MAX_ROUNDS 4000

static unsigned char tmp_model[TMPSZ];

static void record(unsigned char *b, uint64_t i)
{
	for (unsigned k = 0; k < REC; k += 8) {
		uint64_t v = mix64(i << 20 | k);
		memcpy(b + k, &v, 8);
	}
}

static uint64_t sum_bytes(const unsigned char *b, size_t n, uint64_t h)
{
	for (size_t k = 0; k < n; k++)
		h = (h ^ b[k]) * 0x100000001b3ULL;
	return h;
}

/* Checksum of a whole file through pread (leaves the offset alone). */
static uint64_t sum_file(int fd, off_t size)
{
	static unsigned char buf[1 << 16];
	uint64_t h = 0xcbf29ce484222325ULL;

	for (off_t at = 0; at < size;) {
		ssize_t n = pread(fd, buf, sizeof buf, at);

		if (n <= 0)
			fail("pread at %lld: %s", (long long)at, n ? strerror(errno) : "end of file");
		h = sum_bytes(buf, (size_t)n, h);
		at += n;
	}
	return h;
}

static off_t size_of(int fd)
{
	struct stat st;

	if (fstat(fd, &st))
		fail("fstat: %s", strerror(errno));
	return st.st_size;
}

static off_t where(int fd) { return lseek(fd, 0, SEEK_CUR); }

static void xwrite(int fd, const void *b, size_t n, const char *what)
{
	if (write(fd, b, n) != (ssize_t)n)
		fail("write to %s: %s", what, strerror(errno));
}

static void xpwrite(int fd, const void *b, size_t n, off_t at, const char *what)
{
	if (pwrite(fd, b, n, at) != (ssize_t)n)
		fail("pwrite to %s: %s", what, strerror(errno));
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 480;
	unsigned char rec[REC], back[REC];
	uint64_t header[2] = {0, 0};
	int log_rw, log_ro, log_app, log_dup, tmp, mfd, mapfd;
	unsigned char *map;
	uint64_t busy = 0;

	const char *mode = argc > 2 ? argv[2] : "";
	const char *dir = strcmp(mode, "sub") ? "." : "sub";
	char log_path[64];

	if (rounds < 2 || rounds > MAX_ROUNDS)
		fail("rounds must be in 2..%d", MAX_ROUNDS);
	if (!strcmp(mode, "sub") && mkdir("sub", 0755) && errno != EEXIST)
		fail("mkdir sub: %s", strerror(errno));
	if (!strcmp(mode, "big")) {
		int big = open("deleted-big", O_RDWR | O_CREAT | O_TRUNC, 0600);

		if (big < 0 || ftruncate(big, 65 << 20) || unlink("deleted-big"))
			fail("deleted-big: %s", strerror(errno));
	}
	snprintf(log_path, sizeof log_path, "%s/deleted-log", dir);
	log_rw = open(log_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
	log_ro = open(log_path, O_RDONLY);
	log_app = open(log_path, O_WRONLY | O_APPEND);
	if (log_rw < 0 || log_ro < 0 || log_app < 0)
		fail("open deleted-log: %s", strerror(errno));
	log_dup = dup(log_ro);
	if (unlink(log_path))
		fail("unlink deleted-log: %s", strerror(errno));
	xwrite(log_rw, header, sizeof header, "log header");

	tmp = open(dir, O_TMPFILE | O_RDWR, 0600);
	if (tmp < 0)
		fail("O_TMPFILE in the working directory: %s", strerror(errno));
	for (uint32_t k = 0; k < TMPSZ; k++)
		tmp_model[k] = (unsigned char)mix64(k);
	xwrite(tmp, tmp_model, TMPSZ, "tmpfile");
	lseek(tmp, 0, SEEK_SET);

	mfd = memfd_create("snapshim-test", MFD_ALLOW_SEALING);
	if (mfd < 0)
		fail("memfd_create: %s", strerror(errno));
	if (fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK))
		fail("F_ADD_SEALS: %s", strerror(errno));

	if (!strcmp(mode, "private"))
		mapfd = open("/dev/zero", O_RDWR);
	else
		mapfd = open("deleted-map", O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (mapfd < 0 || (strcmp(mode, "private") && ftruncate(mapfd, MAPSZ)))
		fail("deleted-map: %s", strerror(errno));
	map = mmap(NULL, MAPSZ, PROT_READ | PROT_WRITE,
		   strcmp(mode, "private") ? MAP_SHARED : MAP_PRIVATE, mapfd, 0);
	if (map == MAP_FAILED)
		fail("mmap deleted-map: %s", strerror(errno));
	close(mapfd);
	if (strcmp(mode, "private"))
		unlink("deleted-map");

	printf("deleted: %d rounds\n", rounds);
	ready();
	for (int r = 0; r < rounds; r++) {
		uint64_t x = mix64((uint64_t)r * 7919);

		if (r == rounds / 2)
			phase2();
		/* The log: append a record, read the next one in order, rewrite the header. */
		record(rec, (uint64_t)r);
		xwrite(log_app, rec, REC, "log (append)");
		if (r == 0 && read(log_ro, back, sizeof header) != sizeof header)
			fail("reading the log header");
		if (read(r % 2 ? log_dup : log_ro, back, REC) != REC)
			fail("reading record %d: %s", r, strerror(errno));
		record(rec, (uint64_t)r);
		if (memcmp(rec, back, REC))
			fail("record %d read back wrong", r);
		header[0] = (uint64_t)r + 1;
		header[1] = sum_bytes(back, REC, header[1]);
		xpwrite(log_rw, header, sizeof header, 0, "log header");
		if (where(log_ro) != where(log_dup))
			fail("dup'ed descriptors at %lld and %lld", (long long)where(log_ro),
			     (long long)where(log_dup));

		/* The tmpfile: 16 pseudo-random patches, and 4 KiB read in order. */
		for (int p = 0; p < 16; p++) {
			uint64_t y = mix64(x + (uint64_t)p);
			uint32_t at = (uint32_t)(y % (TMPSZ - 64));

			for (int k = 0; k < 64; k++)
				tmp_model[at + k] = (unsigned char)(y >> (k % 8 * 8)) ^ (unsigned char)k;
			xpwrite(tmp, tmp_model + at, 64, at, "tmpfile");
		}
		if (where(tmp) >= TMPSZ)
			lseek(tmp, 0, SEEK_SET);
		{
			off_t at = where(tmp);

			if (read(tmp, back, REC) != REC)
				fail("reading the tmpfile: %s", strerror(errno));
			if (memcmp(back, tmp_model + at, REC))
				fail("tmpfile at %lld differs from the model", (long long)at);
		}

		/* The memfd grows by 1 KiB, and the mapping changes in one place. */
		memset(rec, 'a' + r % 26, 1024);
		xwrite(mfd, rec, 1024, "memfd");
		map[x % MAPSZ] ^= (unsigned char)(x >> 32) | 1;

		for (int k = 0; k < 500000; k++)
			busy = mix64(busy + (uint64_t)k);

		if (r % 4 == 3)
			printf("round %d: log %lld at %lld/%lld, tmp %016llx at %lld, memfd %lld "
			       "(%016llx), map %016llx\n",
			       r + 1, (long long)size_of(log_rw), (long long)where(log_ro),
			       (long long)where(log_app), (unsigned long long)sum_file(tmp, TMPSZ),
			       (long long)where(tmp), (long long)size_of(mfd),
			       (unsigned long long)sum_file(mfd, size_of(mfd)),
			       (unsigned long long)sum_bytes(map, MAPSZ, 0));
	}

	/* Every byte, the flags, the memfd's name and seals. */
	if (size_of(log_rw) != (off_t)sizeof header + (off_t)rounds * REC)
		fail("log is %lld bytes", (long long)size_of(log_rw));
	for (int r = 0; r < rounds; r++) {
		if (pread(log_rw, back, REC, (off_t)sizeof header + (off_t)r * REC) != REC)
			fail("pread of record %d", r);
		record(rec, (uint64_t)r);
		if (memcmp(rec, back, REC))
			fail("record %d differs at the end", r);
	}
	if (pread(log_ro, header, sizeof header, 0) != sizeof header || header[0] != (uint64_t)rounds)
		fail("log header says %llu rounds", (unsigned long long)header[0]);
	for (uint32_t at = 0; at < TMPSZ; at += REC) {
		if (pread(tmp, back, REC, at) != REC || memcmp(back, tmp_model + at, REC))
			fail("tmpfile differs at %u at the end", at);
	}
	if ((fcntl(log_app, F_GETFL) & (O_ACCMODE | O_APPEND)) != (O_WRONLY | O_APPEND) ||
	    (fcntl(log_ro, F_GETFL) & O_ACCMODE) != O_RDONLY ||
	    (fcntl(log_rw, F_GETFL) & O_ACCMODE) != O_RDWR || !(fcntl(log_rw, F_GETFD) & FD_CLOEXEC) ||
	    (fcntl(log_ro, F_GETFD) & FD_CLOEXEC))
		fail("open flags of the log changed");
	if (fcntl(mfd, F_GET_SEALS) != F_SEAL_SHRINK)
		fail("memfd seals are %#x", fcntl(mfd, F_GET_SEALS));
	if (ftruncate(mfd, 0) == 0 || errno != EPERM)
		fail("the sealed memfd could shrink");
	{
		char link[64], target[256];
		ssize_t n;

		snprintf(link, sizeof link, "/proc/self/fd/%d", mfd);
		n = readlink(link, target, sizeof target - 1);
		target[n > 0 ? n : 0] = 0;
		printf("memfd: %s\n", target);
	}
	{
		struct stat st;

		fstat(log_rw, &st);
		printf("log: mode %o, %ld links\n", (unsigned)(st.st_mode & 07777), (long)st.st_nlink);
		fstat(tmp, &st);
		printf("tmpfile: mode %o, %ld links\n", (unsigned)(st.st_mode & 07777), (long)st.st_nlink);
	}
	if (busy == 42)
		printf("busy\n");
	pass();
	return 0;
}

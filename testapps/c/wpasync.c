/*
 * wpasync: checks the kernel behaviour snapshim's incremental checkpoints rely on
 * (shim/src/track.rs): a userfaultfd with UFFD_FEATURE_WP_ASYNC, regions registered in
 * write-protect mode, and PAGEMAP_SCAN with PAGE_IS_WRITTEN + PM_SCAN_WP_MATCHING, which returns
 * the pages written since the last scan and protects them again in the same walk.
 *
 * Each case prints one line "case: written=W present=P" with the state of the page(s) it looks
 * at after the event, and compares with what track.rs assumes; any difference is a FAIL.
 * Without root it uses UFFD_USER_MODE_ONLY (as the shim does for unprivileged users). If the
 * kernel has neither, it prints "UNAVAILABLE: why" and exits 2.
 *
 * Not a checkpoint test app: it never prints READY and needs no shim.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/userfaultfd.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"

/* From linux/userfaultfd.h and linux/fs.h of Linux 6.7+ (older distribution headers lack them). */
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef PAGEMAP_SCAN
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PM_SCAN_WP_MATCHING (1UL << 0)
#define PM_SCAN_CHECK_WPASYNC (1UL << 1)
#define PAGE_IS_WRITTEN (1UL << 1)
#define PAGE_IS_PRESENT (1UL << 3)
#define PAGE_IS_SWAPPED (1UL << 4)
#define PAGE_IS_PFNZERO (1UL << 5)
struct page_region {
	uint64_t start, end, categories;
};
struct pm_scan_arg {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
	uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#endif

#define PAGE 4096UL
#define NPAGES 64

static int uffd, pm;
static int failures;

static int open_uffd(void)
{
	const char *why = NULL;
	for (int user_only = 0; user_only < 2; user_only++) {
		int fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | (user_only ? UFFD_USER_MODE_ONLY : 0));
		if (fd < 0) {
			why = "userfaultfd refused";
			continue;
		}
		struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_WP_ASYNC };
		if (ioctl(fd, UFFDIO_API, &api) != 0) {
			why = "no UFFD_FEATURE_WP_ASYNC";
			close(fd);
			continue;
		}
		fprintf(stderr, "userfaultfd%s\n", user_only ? " (user mode only)" : "");
		return fd;
	}
	printf("UNAVAILABLE: %s\n", why);
	exit(2);
}

static void reg(void *a, size_t len)
{
	struct uffdio_register r = { .range = { (unsigned long)a, len }, .mode = UFFDIO_REGISTER_MODE_WP };
	if (ioctl(uffd, UFFDIO_REGISTER, &r) != 0)
		fail("UFFDIO_REGISTER: %s", strerror(errno));
}

/* One PAGEMAP_SCAN over [a, a+len): flags of each page into out[] (0 = not returned). */
static long scan(void *a, size_t len, unsigned long flags, unsigned long mask, unsigned long anyof,
		 unsigned long inverted, unsigned long *out)
{
	struct page_region v[NPAGES];
	struct pm_scan_arg arg = {
		.size = sizeof arg,
		.flags = flags,
		.start = (unsigned long)a,
		.end = (unsigned long)a + len,
		.vec = (unsigned long)v,
		.vec_len = NPAGES,
		.category_inverted = inverted,
		.category_mask = mask,
		.category_anyof_mask = anyof,
		.return_mask = PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO,
	};
	long n = ioctl(pm, PAGEMAP_SCAN, &arg);
	if (n < 0)
		return -errno;
	memset(out, 0, len / PAGE * sizeof *out);
	for (long i = 0; i < n; i++)
		for (unsigned long p = v[i].start; p < v[i].end; p += PAGE)
			out[(p - (unsigned long)a) / PAGE] = v[i].categories | (1UL << 63);
	return n;
}

/* Pages written since the last call (and protects them again), as the shim's delta scan does. */
static long written(void *a, size_t len, unsigned long *out)
{
	return scan(a, len, PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, PAGE_IS_WRITTEN, 0, 0, out);
}

/*
 * Checks page `page` of the 64 at `a` after an event: whether the delta scan reports it written
 * and, if so, whether it holds data (present and not the shared zero page, or swapped out).
 * track.rs relies on exactly these two bits; a page not written is taken from the parent image.
 */
static void expect(const char *what, void *a, int page, int want_written, int want_data)
{
	unsigned long w[NPAGES];
	long n = written(a, NPAGES * PAGE, w);
	if (n < 0)
		fail("%s: PAGEMAP_SCAN (written): %s", what, strerror((int)-n));
	unsigned long c = w[page];
	int is_w = c != 0;
	int data = is_w && ((c & PAGE_IS_PRESENT && !(c & PAGE_IS_PFNZERO)) || c & PAGE_IS_SWAPPED);
	printf("%s: written=%d data=%d\n", what, is_w, data);
	if (is_w != want_written || data != want_data) {
		printf("  UNEXPECTED: want written=%d data=%d\n", want_written, want_data);
		failures++;
	}
}

int main(void)
{
	uffd = open_uffd();
	pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (pm < 0)
		fail("open pagemap: %s", strerror(errno));
	char *a = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (a == MAP_FAILED)
		fail("mmap: %s", strerror(errno));
	madvise(a, NPAGES * PAGE, MADV_NOHUGEPAGE);
	for (int i = 0; i < NPAGES; i++)
		a[i * PAGE] = 1;
	reg(a, NPAGES * PAGE);
	/* Registered after being written: every page counts as written once. */
	expect("registered after writes", a, 5, 1, 1);
	expect("nothing since", a, 5, 0, 0);
	a[3 * PAGE + 7] = 2;
	expect("user write", a, 3, 1, 1);
	expect("user write, next scan", a, 3, 0, 0);

	madvise(a + 4 * PAGE, PAGE, MADV_DONTNEED);
	expect("MADV_DONTNEED (a discard is a write: the page is zero now)", a, 4, 1, 0);
	volatile char c = a[4 * PAGE];
	(void)c;
	expect("MADV_DONTNEED, scanned, then read (still zero)", a, 4, 0, 0);
	a[4 * PAGE] = 3;
	expect("then write", a, 4, 1, 1);

	madvise(a + 6 * PAGE, PAGE, MADV_DONTNEED);
	a[6 * PAGE] = 3;
	expect("MADV_DONTNEED then write", a, 6, 1, 1);

	/* Kernel writes into a protected buffer: read() from a pipe. */
	int p[2];
	if (pipe(p) != 0 || write(p[1], "hello", 5) != 5 || read(p[0], a + 8 * PAGE + 100, 5) != 5)
		fail("pipe: %s", strerror(errno));
	expect("read() into the page", a, 8, 1, 1);

	/* A never-touched page read: the shared zero page. */
	char *z = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	madvise(z, NPAGES * PAGE, MADV_NOHUGEPAGE);
	reg(z, NPAGES * PAGE);
	expect("new registration, untouched (first scan: written, no data)", z, 9, 1, 0);
	c = z[9 * PAGE];
	expect("read-faulted zero page (unchanged)", z, 9, 0, 0);
	z[9 * PAGE] = 1;
	expect("zero page then written", z, 9, 1, 1);

	/* munmap + mmap at the same address: a new, unregistered VMA. */
	if (mmap(a + 16 * PAGE, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
		fail("mmap fixed: %s", strerror(errno));
	a[17 * PAGE] = 5;
	unsigned long w[NPAGES];
	long n = written(a, NPAGES * PAGE, w);
	printf("scan over an unregistered VMA: %s\n", n < 0 ? strerror((int)-n) : "accepted");
	if (n >= 0) {
		printf("  UNEXPECTED: PM_SCAN_CHECK_WPASYNC accepted an unregistered VMA\n");
		failures++;
	}
	reg(a + 16 * PAGE, 4 * PAGE);
	/* Registering an already registered range again (the shim does at every checkpoint). */
	reg(a, NPAGES * PAGE);
	expect("remapped, re-registered, written page", a, 17, 1, 1);
	/* (page 16 of the new VMA was never touched) */
	expect("remapped, untouched page, second scan", a, 16, 0, 0);

	/* mremap: pages moved to a new address. */
	char *m = mmap(NULL, 8 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	for (int i = 0; i < 8; i++)
		m[i * PAGE] = 7;
	reg(m, 8 * PAGE);
	written(m, 8 * PAGE, w);
	char *dst = mmap(NULL, NPAGES * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *moved = mremap(m, 8 * PAGE, 8 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
	if (moved == MAP_FAILED)
		fail("mremap: %s", strerror(errno));
	n = written(moved, 8 * PAGE, w);
	printf("scan of the moved VMA before re-registering: %s\n", n < 0 ? strerror((int)-n) : "accepted");
	if (n >= 0) {
		printf("  UNEXPECTED: the moved VMA kept its registration\n");
		failures++;
	}
	reg(moved, 8 * PAGE);
	n = written(moved, 8 * PAGE, w);
	printf("mremap-moved, re-registered, untouched pages: written=%d\n", w[2] != 0);
	if (w[2] == 0) {
		printf("  UNEXPECTED: moved pages kept their protection\n");
		failures++;
	}

	if (failures)
		fail("%d case(s) differ from what snapshim assumes", failures);
	pass();
	return 0;
}

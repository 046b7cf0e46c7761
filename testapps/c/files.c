/*
 * files: reads INPUT line by line with fgets, transforms every line (slowly), writes the result to
 * OUTPUT through stdio, and prints progress on stdout. At the end it reopens OUTPUT by the name it
 * was given (relative names need the working directory restored too) and checks that the file
 * holds exactly what it wrote. A restore must reopen both files at their saved offsets and cut
 * OUTPUT back to its checkpoint-time length, or the output is torn or duplicated.
 *
 * Usage: files INPUT OUTPUT [WORK]     (WORK: hashing rounds per line, default 160)
 */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#include "common.h"

static uint64_t out_hash, out_bytes;

static void emit(FILE *out, const char *s, size_t n)
{
	if (fwrite(s, 1, n, out) != n)
		fail("write to output: %s", strerror(errno));
	for (size_t i = 0; i < n; i++)
		out_hash = out_hash * 1099511628211ULL + (unsigned char)s[i];
	out_bytes += n;
}

static char rot13(char c)
{
	if (c >= 'a' && c <= 'z')
		return (char)('a' + (c - 'a' + 13) % 26);
	if (c >= 'A' && c <= 'Z')
		return (char)('A' + (c - 'A' + 13) % 26);
	return c;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		fail("usage: files INPUT OUTPUT [WORK]");
	const char *in_path = argv[1], *out_path = argv[2];
	int work = argc > 3 ? atoi(argv[3]) : 160;
	char line[4096], buf[4200];
	struct stat st;
	long lineno = 0;
	int phase2_done = 0;

	umask(0027);
	FILE *in = fopen(in_path, "r");
	if (!in)
		fail("cannot open %s: %s", in_path, strerror(errno));
	FILE *out = fopen(out_path, "w");
	if (!out)
		fail("cannot create %s: %s", out_path, strerror(errno));
	if (fstat(fileno(in), &st))
		fail("fstat: %s", strerror(errno));
	printf("files: %lld input bytes\n", (long long)st.st_size);
	ready();

	while (fgets(line, sizeof line, in)) {
		size_t len = strcspn(line, "\n");
		uint64_t h = (uint64_t)lineno;

		line[len] = 0;
		for (int k = 0; k < work; k++)
			for (size_t i = 0; i < len; i++)
				h = mix64(h ^ (unsigned char)line[i] ^ (uint64_t)k);
		int n = snprintf(buf, sizeof buf, "%06ld %016llx ", lineno, (unsigned long long)h);
		for (size_t i = 0; i < len; i++)
			buf[n + (int)i] = rot13(line[len - 1 - i]);
		n += (int)len;
		buf[n++] = '\n';
		emit(out, buf, (size_t)n);
		lineno++;
		if (lineno % 125 == 0)
			printf("line %6ld: output %8llu bytes, hash %016llx\n", lineno,
			       (unsigned long long)out_bytes, (unsigned long long)out_hash);
		if (!phase2_done && ftell(in) >= st.st_size / 2) {
			phase2();
			phase2_done = 1;
		}
	}
	if (ferror(in))
		fail("read from input: %s", strerror(errno));
	if (ftell(in) != st.st_size)
		fail("input ended at %ld of %lld bytes", ftell(in), (long long)st.st_size);
	fclose(in);
	if (fclose(out))
		fail("close output: %s", strerror(errno));

	/* Verify: the file holds exactly the bytes written, no more, no less. */
	FILE *check = fopen(out_path, "r");
	uint64_t h = 0, n = 0;
	int c;
	if (!check)
		fail("cannot reopen %s: %s", out_path, strerror(errno));
	while ((c = getc(check)) != EOF) {
		h = h * 1099511628211ULL + (unsigned char)c;
		n++;
	}
	fclose(check);
	if (n != out_bytes || h != out_hash)
		fail("output file has %llu bytes hash %016llx, wrote %llu bytes hash %016llx",
		     (unsigned long long)n, (unsigned long long)h, (unsigned long long)out_bytes,
		     (unsigned long long)out_hash);
	if (umask(0027) != 0027)
		fail("umask changed");
	printf("done: %ld lines, output %llu bytes, hash %016llx\n", lineno,
	       (unsigned long long)out_bytes, (unsigned long long)out_hash);
	pass();
	return 0;
}

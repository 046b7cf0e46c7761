/*
 * tcpcount FAMILY PORT
 *
 * A counter server with one client for its whole life, for live TCP connections across a
 * checkpoint (`--tcp-established`). Listens on 127.0.0.1:PORT (FAMILY 4) or [::1]:PORT (6),
 * prints READY on stderr, accepts one connection and keeps the listener open. Each request is
 * a number n (8 bytes, little-endian); the answer is ANSWER bytes: mix64(n), then bytes of a
 * sequence seeded by it. Requests are read 8 bytes at a time and answers written whole, so
 * while the client sends a batch of requests and only then reads, requests wait unread in this
 * side's receive queue and answers in its send queue, unsent once the client's window is full.
 * At end of file it prints how many requests it served and a digest of them on stdout, then
 * PASS; a connection that ends any other way is printed as such (ECONNRESET for a reset).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common.h"

#define ANSWER 4096

static int listen_on(int family, int port)
{
	struct sockaddr_in a4 = { .sin_family = AF_INET, .sin_port = htons(port) };
	struct sockaddr_in6 a6 = { .sin6_family = AF_INET6, .sin6_port = htons(port) };
	int one = 1, fd = socket(family, SOCK_STREAM, 0);

	a4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	a6.sin6_addr = in6addr_loopback;
	if (fd < 0)
		fail("socket: %s", strerror(errno));
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if ((family == AF_INET ? bind(fd, (void *)&a4, sizeof a4) : bind(fd, (void *)&a6, sizeof a6)) < 0)
		fail("bind port %d: %s", port, strerror(errno));
	if (listen(fd, 1) < 0)
		fail("listen: %s", strerror(errno));
	return fd;
}

/* Reads exactly len bytes: 1 when done, 0 at end of file, -errno on an error. */
static int read_all(int fd, void *buf, size_t len)
{
	size_t got = 0;
	while (got < len) {
		ssize_t n = read(fd, (char *)buf + got, len - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return got == 0 ? 0 : -EPROTO;
		got += n;
	}
	return 1;
}

static int write_all(int fd, const void *buf, size_t len)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = write(fd, (const char *)buf + done, len - done);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		done += n;
	}
	return 0;
}

static const char *name(int e)
{
	return e == ECONNRESET ? "ECONNRESET" : e == EPIPE ? "EPIPE" : strerror(e);
}

int main(int argc, char **argv)
{
	static uint64_t answer[ANSWER / 8];
	uint64_t n, served = 0, digest = 0;
	int listener, fd, r;

	if (argc != 3)
		fail("usage: tcpcount 4|6 PORT");
	listener = listen_on(argv[1][0] == '6' ? AF_INET6 : AF_INET, atoi(argv[2]));
	ready();
	fd = accept(listener, NULL, NULL);
	if (fd < 0)
		fail("accept: %s", strerror(errno));
	printf("client connected\n");
	while ((r = read_all(fd, &n, sizeof n)) == 1) {
		answer[0] = mix64(n);
		for (size_t i = 1; i < ANSWER / 8; i++)
			answer[i] = mix64(answer[i - 1] ^ i);
		if ((r = write_all(fd, answer, sizeof answer)) < 0)
			break;
		served++;
		digest = mix64(digest ^ n);
	}
	if (r < 0) {
		printf("connection ended: %s after %llu requests\n", name(-r),
		       (unsigned long long)served);
		return 0;
	}
	printf("served %llu requests, digest %016llx\n", (unsigned long long)served,
	       (unsigned long long)digest);
	pass();
	close(fd);
	close(listener);
	return 0;
}

/*
 * sockreset PORT_TCP4 PORT_TCP6 UNIX_PATH
 *
 * Clients of the test's listeners: a TCP connection to 127.0.0.1:PORT_TCP4, one to
 * [::1]:PORT_TCP6 and a Unix stream connection to UNIX_PATH. Prints READY on stderr, then
 * reads each connection until it ends and prints how it ended, with errno names: a reset
 * ("ECONNRESET"), then end of file, and what a write does afterwards. Uninterrupted, the test
 * resets the TCP connections (SO_LINGER 0) and closes the Unix one; restored after a
 * checkpoint, snapshim makes them connections that were reset or ended, so both runs print the
 * same. Interrupted calls are retried.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "common.h"

static int connect_to(int family, const void *addr, socklen_t len, const char *what)
{
	int fd = socket(family, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, addr, len) < 0)
		fail("connect %s: %s", what, strerror(errno));
	return fd;
}

static const char *name(int e)
{
	switch (e) {
	case ECONNRESET: return "ECONNRESET";
	case EPIPE: return "EPIPE";
	case ENOTCONN: return "ENOTCONN";
	case EBADF: return "EBADF";
	case ENOTSOCK: return "ENOTSOCK";
	default: return strerror(e);
	}
}

/* Reads until the connection ends; prints each error, then the end of file. */
static void until_the_end(int fd, const char *what)
{
	char buf[64];
	for (int i = 0; i < 4; i++) {
		ssize_t n = read(fd, buf, sizeof buf);
		if (n < 0 && errno == EINTR) {
			i--;
			continue;
		}
		if (n > 0)
			fail("%s: read %zd bytes nobody sent", what, n);
		if (n == 0) {
			printf("%s: end of file\n", what);
			break;
		}
		printf("%s: read fails with %s\n", what, name(errno));
	}
	ssize_t w;
	do
		w = send(fd, "x", 1, MSG_NOSIGNAL);
	while (w < 0 && errno == EINTR);
	printf("%s: then a write %s\n", what, w < 0 ? name(errno) : "succeeds");
}

int main(int argc, char **argv)
{
	if (argc != 4)
		fail("usage: sockreset PORT_TCP4 PORT_TCP6 UNIX_PATH");
	struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
	a4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons(atoi(argv[2]))};
	a6.sin6_addr = in6addr_loopback;
	struct sockaddr_un au = {.sun_family = AF_UNIX};
	strncpy(au.sun_path, argv[3], sizeof au.sun_path - 1);
	int t4 = connect_to(AF_INET, &a4, sizeof a4, "tcp4");
	int t6 = connect_to(AF_INET6, &a6, sizeof a6, "tcp6");
	int u = connect_to(AF_UNIX, &au, sizeof au, "unix");
	ready();
	until_the_end(t4, "tcp4");
	until_the_end(t6, "tcp6");
	until_the_end(u, "unix");
	pass();
	return 0;
}

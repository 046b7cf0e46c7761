/*
 * sockserv PORT_TCP4 PORT_TCP6 PORT_UDP4 PORT_UDP6 OUTSIDE_DGRAM_PATH
 *
 * A small server holding one socket of each kind snapshim restores, driven by a client (the
 * test, tests/sockets.rs); its stdout depends only on what clients ask, so a run checkpointed,
 * killed and restored prints exactly what an uninterrupted run does:
 *   - TCP listeners on 127.0.0.1:PORT_TCP4 (SO_REUSEADDR, TCP_NODELAY, SO_KEEPALIVE, backlog 7,
 *     and on a second descriptor, a dup)
 *     and [::1]:PORT_TCP6 (IPV6_V6ONLY, SO_REUSEPORT, SO_RCVBUF 65536, backlog 5, non-blocking);
 *   - UDP sockets bound to 127.0.0.1:PORT_UDP4 and [::1]:PORT_UDP6;
 *   - Unix stream listeners at the relative path srv.sock and the abstract name
 *     @sockserv-PORT_TCP4; a Unix datagram socket bound to dgram.sock, an unbound one;
 *   - a stream socketpair with data queued in each direction, a datagram socketpair with three
 *     datagrams queued (two one way, one the other);
 *   - a Unix datagram socket connected to OUTSIDE_DGRAM_PATH (a socket of the test's);
 *   - a bound NETLINK_ROUTE socket.
 * Prints READY on stderr, then serves: a line "WORD" on any stream listener's connection is
 * answered "NAME WORD-reversed" and printed as "served NAME WORD"; a datagram likewise. A
 * connection that fails (reset, end of file) is dropped. "QUIT" ends the loop: every socket is
 * checked (addresses, options, queued data and its boundaries), "hello outside" is sent to the
 * outside socket, and PASS printed. Interrupted calls are retried.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common.h"

enum { T4, T6, U4, U6, UL, UA, NLISTEN };
static const char *names[NLISTEN] = {"tcp4", "tcp6", "udp4", "udp6", "unix", "abstract"};
static int lfd[NLISTEN];
static struct sockaddr_storage laddr[NLISTEN];
static socklen_t llen[NLISTEN];

#define MAXCONN 64
static int conn[MAXCONN], conn_of[MAXCONN];
static int ud, un, sp[2], dp[2], out, nl, t4dup;

static int check(int r, const char *what)
{
	if (r < 0)
		fail("%s: %s", what, strerror(errno));
	return r;
}

static void set_int(int fd, int level, int name, int v, const char *what)
{
	check(setsockopt(fd, level, name, &v, sizeof v), what);
}

static int get_int(int fd, int level, int name)
{
	int v = -1;
	socklen_t l = sizeof v;
	check(getsockopt(fd, level, name, &v, &l), "getsockopt");
	return v;
}

static void inet_listener(int i, int family, int type, int port)
{
	struct sockaddr_storage a = {0};
	socklen_t len;
	int fd = check(socket(family, type, 0), "socket");

	if (family == AF_INET) {
		struct sockaddr_in *s = (struct sockaddr_in *)&a;
		s->sin_family = AF_INET;
		s->sin_port = htons(port);
		s->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		len = sizeof *s;
	} else {
		struct sockaddr_in6 *s = (struct sockaddr_in6 *)&a;
		s->sin6_family = AF_INET6;
		s->sin6_port = htons(port);
		s->sin6_addr = in6addr_loopback;
		len = sizeof *s;
		set_int(fd, IPPROTO_IPV6, IPV6_V6ONLY, 1, "IPV6_V6ONLY");
	}
	if (i == T4) {
		set_int(fd, SOL_SOCKET, SO_REUSEADDR, 1, "SO_REUSEADDR");
		set_int(fd, IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY");
		set_int(fd, SOL_SOCKET, SO_KEEPALIVE, 1, "SO_KEEPALIVE");
	}
	if (i == T6) {
		set_int(fd, SOL_SOCKET, SO_REUSEPORT, 1, "SO_REUSEPORT");
		set_int(fd, SOL_SOCKET, SO_RCVBUF, 65536, "SO_RCVBUF");
	}
	check(bind(fd, (struct sockaddr *)&a, len), names[i]);
	if (type == SOCK_STREAM)
		check(listen(fd, i == T4 ? 7 : 5), "listen");
	if (i == T6)
		check(fcntl(fd, F_SETFL, O_NONBLOCK), "O_NONBLOCK");
	lfd[i] = fd;
}

static socklen_t unix_addr(struct sockaddr_un *a, const char *name, int abstract)
{
	memset(a, 0, sizeof *a);
	a->sun_family = AF_UNIX;
	strcpy(a->sun_path + abstract, name);
	return offsetof(struct sockaddr_un, sun_path) + abstract + strlen(name) + !abstract;
}

static int unix_socket(int type, const char *name, int abstract)
{
	struct sockaddr_un a;
	int fd = check(socket(AF_UNIX, type, 0), "unix socket");

	if (name) {
		socklen_t len = unix_addr(&a, name, abstract);
		if (!abstract)
			unlink(name);
		check(bind(fd, (struct sockaddr *)&a, len), name);
	}
	return fd;
}

static void send_all(int fd, const char *s)
{
	check(send(fd, s, strlen(s), MSG_NOSIGNAL), "send");
}

static void setup(char **argv)
{
	char abstract[64];
	struct sockaddr_un a;

	inet_listener(T4, AF_INET, SOCK_STREAM, atoi(argv[1]));
	inet_listener(T6, AF_INET6, SOCK_STREAM, atoi(argv[2]));
	inet_listener(U4, AF_INET, SOCK_DGRAM, atoi(argv[3]));
	inet_listener(U6, AF_INET6, SOCK_DGRAM, atoi(argv[4]));
	lfd[UL] = unix_socket(SOCK_STREAM, "srv.sock", 0);
	check(listen(lfd[UL], 3), "listen unix");
	snprintf(abstract, sizeof abstract, "sockserv-%s", argv[1]);
	lfd[UA] = unix_socket(SOCK_STREAM, abstract, 1);
	check(listen(lfd[UA], 4), "listen abstract");
	ud = unix_socket(SOCK_DGRAM, "dgram.sock", 0);
	un = unix_socket(SOCK_DGRAM, NULL, 0);
	check(socketpair(AF_UNIX, SOCK_STREAM, 0, sp), "socketpair");
	send_all(sp[0], "queued from end 0\n");
	send_all(sp[1], "queued from end 1, a little longer\n");
	check(socketpair(AF_UNIX, SOCK_DGRAM, 0, dp), "socketpair dgram");
	send_all(dp[0], "d1");
	send_all(dp[0], "d22");
	send_all(dp[1], "d333");
	out = check(socket(AF_UNIX, SOCK_DGRAM, 0), "outside socket");
	check(connect(out, (struct sockaddr *)&a, unix_addr(&a, argv[5], 0)), argv[5]);
	nl = check(socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE), "netlink");
	struct sockaddr_nl snl = {.nl_family = AF_NETLINK};
	check(bind(nl, (struct sockaddr *)&snl, sizeof snl), "bind netlink");
	t4dup = check(dup(lfd[T4]), "dup");
	for (int i = 0; i < NLISTEN; i++) {
		llen[i] = sizeof laddr[i];
		check(getsockname(lfd[i], (struct sockaddr *)&laddr[i], &llen[i]), "getsockname");
	}
	for (int i = 0; i < MAXCONN; i++)
		conn[i] = -1;
}

static void same_name(int fd, const struct sockaddr_storage *want, socklen_t wlen, const char *what)
{
	struct sockaddr_storage a;
	socklen_t len = sizeof a;

	check(getsockname(fd, (struct sockaddr *)&a, &len), what);
	if (len != wlen || memcmp(&a, want, len) != 0)
		fail("%s is not bound to the same address any more", what);
}

static void want_int(int fd, int level, int name, int want, const char *what)
{
	int v = get_int(fd, level, name);
	if (v != want)
		fail("%s is %d, not %d", what, v, want);
}

static void want_recv(int fd, const char *want, const char *what)
{
	char buf[256];
	ssize_t n;

	do
		n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		fail("%s: nothing queued (%s)", what, strerror(errno));
	if ((size_t)n != strlen(want) || memcmp(buf, want, n) != 0)
		fail("%s: got %.*s instead of %s", what, (int)n, buf, want);
}

static void check_everything(int rcvbuf6)
{
	for (int i = 0; i < NLISTEN; i++)
		same_name(lfd[i], &laddr[i], llen[i], names[i]);
	want_int(lfd[T4], IPPROTO_TCP, TCP_NODELAY, 1, "tcp4 TCP_NODELAY");
	want_int(lfd[T4], SOL_SOCKET, SO_KEEPALIVE, 1, "tcp4 SO_KEEPALIVE");
	want_int(lfd[T4], SOL_SOCKET, SO_REUSEADDR, 1, "tcp4 SO_REUSEADDR");
	want_int(lfd[T4], SOL_SOCKET, SO_ACCEPTCONN, 1, "tcp4 listening");
	struct stat st1, st2;
	if (fstat(lfd[T4], &st1) || fstat(t4dup, &st2) || st1.st_ino != st2.st_ino)
		fail("the tcp4 listener and its dup are not one socket any more");
	want_int(lfd[T6], IPPROTO_IPV6, IPV6_V6ONLY, 1, "tcp6 IPV6_V6ONLY");
	want_int(lfd[T6], SOL_SOCKET, SO_REUSEPORT, 1, "tcp6 SO_REUSEPORT");
	want_int(lfd[T6], SOL_SOCKET, SO_REUSEADDR, 0, "tcp6 SO_REUSEADDR");
	want_int(lfd[T6], SOL_SOCKET, SO_RCVBUF, rcvbuf6, "tcp6 SO_RCVBUF");
	want_int(lfd[U6], IPPROTO_IPV6, IPV6_V6ONLY, 1, "udp6 IPV6_V6ONLY");
	want_int(lfd[UL], SOL_SOCKET, SO_ACCEPTCONN, 1, "unix listening");
	if (!(fcntl(lfd[T6], F_GETFL) & O_NONBLOCK) || (fcntl(lfd[T4], F_GETFL) & O_NONBLOCK))
		fail("O_NONBLOCK changed");
	struct sockaddr_un a;
	socklen_t len = unix_addr(&a, "dgram.sock", 0);
	struct sockaddr_storage want = {0};
	memcpy(&want, &a, len);
	same_name(ud, &want, len, "dgram.sock");
	want.ss_family = AF_UNIX;
	same_name(un, &want, sizeof(sa_family_t), "the unbound datagram socket");
	want_recv(sp[1], "queued from end 0\n", "socketpair end 1");
	want_recv(sp[0], "queued from end 1, a little longer\n", "socketpair end 0");
	want_recv(dp[1], "d1", "first datagram");
	want_recv(dp[1], "d22", "second datagram");
	want_recv(dp[0], "d333", "datagram the other way");
	want_int(nl, SOL_SOCKET, SO_PROTOCOL, NETLINK_ROUTE, "netlink protocol");
	struct sockaddr_nl snl;
	len = sizeof snl;
	check(getsockname(nl, (struct sockaddr *)&snl, &len), "netlink getsockname");
	if (snl.nl_family != AF_NETLINK || snl.nl_pid == 0)
		fail("the netlink socket is not bound");
	send_all(out, "hello outside");
	printf("every socket checked\n");
}

static void answer(int fd, int from, char *word, const struct sockaddr_storage *to, socklen_t tolen)
{
	char reply[320];
	size_t n = strlen(word);

	printf("served %s %s\n", names[from], word);
	snprintf(reply, sizeof reply, "%s ", names[from]);
	for (size_t i = 0; i < n; i++)
		reply[strlen(names[from]) + 1 + i] = word[n - 1 - i];
	strcpy(reply + strlen(names[from]) + 1 + n, "\n");
	if (to)
		sendto(fd, reply, strlen(reply), 0, (const struct sockaddr *)to, tolen);
	else
		send(fd, reply, strlen(reply), MSG_NOSIGNAL);
}

/* One request on connection c; returns 1 on QUIT. A failed connection is dropped. */
static int serve_conn(int c, int rcvbuf6)
{
	char buf[256];
	ssize_t n;

	do
		n = recv(conn[c], buf, sizeof buf - 1, 0);
	while (n < 0 && errno == EINTR);
	if (n <= 0 || buf[n - 1] != '\n') {
		close(conn[c]);
		conn[c] = -1;
		return 0;
	}
	buf[n - 1] = 0;
	if (strcmp(buf, "QUIT") == 0) {
		check_everything(rcvbuf6);
		pass();
		send_all(conn[c], "bye\n");
		return 1;
	}
	answer(conn[c], conn_of[c], buf, NULL, 0);
	return 0;
}

static void serve_listener(int i)
{
	if (i == U4 || i == U6) {
		char buf[256];
		struct sockaddr_storage from;
		socklen_t fl = sizeof from;
		ssize_t n = recvfrom(lfd[i], buf, sizeof buf - 1, 0, (struct sockaddr *)&from, &fl);
		if (n > 0) {
			buf[n] = 0;
			answer(lfd[i], i, buf, &from, fl);
		}
		return;
	}
	int fd = accept4(lfd[i], NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0)
		return; /* EINTR, EAGAIN: poll again */
	for (int c = 0; c < MAXCONN; c++) {
		if (conn[c] < 0) {
			conn[c] = fd;
			conn_of[c] = i;
			return;
		}
	}
	fail("too many connections");
}

int main(int argc, char **argv)
{
	if (argc != 6)
		fail("usage: sockserv PORT_TCP4 PORT_TCP6 PORT_UDP4 PORT_UDP6 OUTSIDE_PATH");
	setup(argv);
	int rcvbuf6 = get_int(lfd[T6], SOL_SOCKET, SO_RCVBUF);
	ready();
	for (;;) {
		struct pollfd p[NLISTEN + MAXCONN];
		int idx[NLISTEN + MAXCONN], n = 0;
		for (int i = 0; i < NLISTEN; i++) {
			p[n] = (struct pollfd){.fd = lfd[i], .events = POLLIN};
			idx[n++] = -1 - i;
		}
		for (int c = 0; c < MAXCONN; c++) {
			if (conn[c] >= 0) {
				p[n] = (struct pollfd){.fd = conn[c], .events = POLLIN};
				idx[n++] = c;
			}
		}
		if (poll(p, n, -1) < 0) {
			if (errno == EINTR)
				continue;
			fail("poll: %s", strerror(errno));
		}
		for (int k = 0; k < n; k++) {
			if (p[k].revents & POLLNVAL)
				fail("descriptor %d is not open", p[k].fd);
			if (!p[k].revents)
				continue;
			if (idx[k] < 0)
				serve_listener(-1 - idx[k]);
			else if (serve_conn(idx[k], rcvbuf6))
				return 0;
		}
	}
}

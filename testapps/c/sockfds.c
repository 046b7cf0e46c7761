/*
 * sockfds: a Unix socket pair with a descriptor in flight (the read end of a pipe, sent with
 * SCM_RIGHTS and not received yet), which snapshim cannot restore. Prints the number of the
 * socket that holds it ("in flight on descriptor N") and READY on stderr,
 * waits for SIGUSR1, then receives the descriptor and checks it is still the pipe (a
 * checkpoint meanwhile must not have taken it): PASS. Interrupted calls are retried.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common.h"

int main(void)
{
	int sp[2], pp[2];
	char byte = 'x', buf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = {.iov_base = &byte, .iov_len = 1};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = buf,
			     .msg_controllen = sizeof buf};
	sigset_t set;
	int sig;

	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp) || pipe(pp))
		fail("socketpair/pipe: %s", strerror(errno));
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &pp[0], sizeof(int));
	if (sendmsg(sp[0], &msg, 0) != 1)
		fail("sendmsg: %s", strerror(errno));
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_BLOCK, &set, NULL);
	fprintf(stderr, "in flight on descriptor %d\n", sp[1]);
	ready();
	while (sigwait(&set, &sig) != 0 || sig != SIGUSR1)
		;
	memset(buf, 0, sizeof buf);
	msg.msg_controllen = sizeof buf;
	ssize_t n;
	do
		n = recvmsg(sp[1], &msg, 0);
	while (n < 0 && errno == EINTR);
	c = CMSG_FIRSTHDR(&msg);
	if (n != 1 || !c || c->cmsg_type != SCM_RIGHTS)
		fail("the descriptor in flight is gone (%zd)", n);
	int got;
	memcpy(&got, CMSG_DATA(c), sizeof got);
	char out = 0;
	if (write(pp[1], "p", 1) != 1 || read(got, &out, 1) != 1 || out != 'p')
		fail("the descriptor received is not the pipe");
	printf("the descriptor in flight arrived\n");
	pass();
	return 0;
}

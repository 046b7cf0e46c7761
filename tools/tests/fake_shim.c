/*
 * A stand-in for libsnapshim.so that implements only the reply half of the
 * `snapshim checkpoint` protocol, so the tool can be tested without the real shim.
 * Built by tests/cli.rs as <tmp>/libsnapshim.so.
 *
 * FAKE_SIGNO     signal number to handle (default SIGUSR2)
 * FAKE_MODE      reply (default) | silent (never reply) | exit (exit 3 instead of replying)
 *                | split (write the line in two pieces)
 * FAKE_REPLY     the line to write, without its newline
 * FAKE_DELAY_MS  wait this long before acting
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int wake[2];
static volatile pid_t req_pid;
static volatile int req_fd;

static void on_signal(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)uc;
    if (si->si_code != SI_QUEUE)
        return;
    req_pid = si->si_pid;
    req_fd = si->si_value.sival_int;
    char c = 1;
    (void)!write(wake[1], &c, 1);
}

static int mode_is(const char *m)
{
    const char *mode = getenv("FAKE_MODE");
    return mode && !strcmp(mode, m);
}

static void *helper(void *arg)
{
    (void)arg;
    char c;
    while (read(wake[0], &c, 1) == 1) {
        const char *delay = getenv("FAKE_DELAY_MS");
        if (delay)
            usleep(atoi(delay) * 1000);
        if (mode_is("exit"))
            _exit(3);
        if (mode_is("silent"))
            continue;
        char path[64], line[4096];
        snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)req_pid, req_fd);
        const char *reply = getenv("FAKE_REPLY");
        snprintf(line, sizeof line, "%s\n", reply ? reply : "err FAKE_REPLY is not set");
        int fd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0) {
            perror("fake shim: open reply channel");
            continue;
        }
        size_t len = strlen(line), first = mode_is("split") ? len / 2 : len;
        (void)!write(fd, line, first);
        if (first < len) {
            usleep(300 * 1000);
            (void)!write(fd, line + first, len - first);
        }
        close(fd);
    }
    return NULL;
}

__attribute__((constructor)) static void fake_shim_init(void)
{
    const char *signo = getenv("FAKE_SIGNO");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    if (pipe2(wake, O_CLOEXEC) != 0)
        abort();
    sigaction(signo ? atoi(signo) : SIGUSR2, &sa, NULL);
    pthread_t t;
    pthread_create(&t, NULL, helper, NULL);
}

/*
 * A stand-in for libsnapshim.so that implements only the shim's side of the
 * `snapshim checkpoint` protocol (shim/src/pipeline/trigger.rs), so the tool can be tested
 * without the real shim. Built by tests/cli.rs as <tmp>/libsnapshim.so, and with -DOLD_SHIM as
 * <tmp>/old/libsnapshim.so: a shim from before requests came on the quiesce signal, which
 * handles only the checkpoint signal and does not export the marker symbol.
 *
 * Like the shim, the handler writes one record per request into a pipe, and the helper thread
 * answers each: requests sent at the same moment are all answered.
 *
 * FAKE_SIGNO       the checkpoint signal's number (default SIGUSR2); the quiesce signal, which
 *                  carries requests, is SIGRTMAX-1, or SIGRTMAX-2 when that is the checkpoint
 *                  signal (as image/src/settings.rs says)
 * FAKE_NO_QUIESCE  set: handle the checkpoint signal only (a broken shim)
 * FAKE_MODE        reply (default) | silent (never reply) | exit (exit 3 instead of replying)
 *                  | split (write the line in two pieces)
 * FAKE_REPLY       the line to write, without its newline
 * FAKE_DELAY_MS    wait this long before acting
 * FAKE_LOG         append "signal N" for each request answered to this file
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef OLD_SHIM
/* What `snapshim checkpoint` looks for before it sends a request on the quiesce signal. */
const unsigned snapshim_requests_on_quiesce_signal = 1;
#endif

struct record {
    int signo;
    pid_t pid;
    uint64_t value;
};

static int wake[2];

static void on_signal(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    if (si->si_code != SI_QUEUE)
        return;
    struct record r = {sig, si->si_pid, (uint64_t)(uintptr_t)si->si_value.sival_ptr};
    (void)!write(wake[1], &r, sizeof r);
}

static int mode_is(const char *m)
{
    const char *mode = getenv("FAKE_MODE");
    return mode && !strcmp(mode, m);
}

static void answer(const struct record *r)
{
    char path[64], line[4096];
    unsigned fd = (unsigned)r->value, ino = (unsigned)(r->value >> 32);
    snprintf(path, sizeof path, "/proc/%d/fd/%u", (int)r->pid, fd);
    const char *reply = getenv("FAKE_REPLY");
    snprintf(line, sizeof line, "%s\n", reply ? reply : "err FAKE_REPLY is not set");
    int out = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (out < 0) {
        perror("fake shim: open reply channel");
        return;
    }
    struct stat st;
    /* The tool names its pipe's inode; an older tool sent 0. */
    if (fstat(out, &st) != 0 || !S_ISFIFO(st.st_mode) || (ino && (unsigned)st.st_ino != ino))
        snprintf(line, sizeof line, "err fake shim: %s is not the requester's pipe\n", path);
    const char *log = getenv("FAKE_LOG");
    if (log) {
        FILE *f = fopen(log, "a");
        if (f) {
            fprintf(f, "signal %d\n", r->signo);
            fclose(f);
        }
    }
    size_t len = strlen(line), first = mode_is("split") ? len / 2 : len;
    (void)!write(out, line, first);
    if (first < len) {
        usleep(300 * 1000);
        (void)!write(out, line + first, len - first);
    }
    close(out);
}

static void *helper(void *arg)
{
    (void)arg;
    struct record r;
    while (read(wake[0], &r, sizeof r) == sizeof r) {
        const char *delay = getenv("FAKE_DELAY_MS");
        if (delay)
            usleep(atoi(delay) * 1000);
        if (mode_is("exit"))
            _exit(3);
        if (!mode_is("silent"))
            answer(&r);
    }
    return NULL;
}

__attribute__((constructor)) static void fake_shim_init(void)
{
    const char *signo = getenv("FAKE_SIGNO");
    int trigger = signo ? atoi(signo) : SIGUSR2;
    int quiesce = SIGRTMAX - 1 == trigger ? SIGRTMAX - 2 : SIGRTMAX - 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigfillset(&sa.sa_mask);
    if (pipe2(wake, O_CLOEXEC) != 0)
        abort();
    sigaction(trigger, &sa, NULL);
#ifndef OLD_SHIM
    if (!getenv("FAKE_NO_QUIESCE"))
        sigaction(quiesce, &sa, NULL);
#else
    (void)quiesce;
#endif
    pthread_t t;
    pthread_create(&t, NULL, helper, NULL);
}

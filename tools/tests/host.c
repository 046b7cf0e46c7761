/* Prints READY and its PID, then waits for signals forever. With HOST_BLOCK_USR2 set it blocks
 * SIGUSR2 first, so that a SIGUSR2 sent to it stays pending, for the tests to see. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(void)
{
    if (getenv("HOST_BLOCK_USR2")) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGUSR2);
        sigprocmask(SIG_BLOCK, &set, NULL);
    }
    printf("READY %d\n", (int)getpid());
    fflush(stdout);
    for (;;)
        pause();
}

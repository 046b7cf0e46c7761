/* Prints READY and its PID, then waits for signals forever. */
#include <stdio.h>
#include <unistd.h>

int main(void)
{
    printf("READY %d\n", (int)getpid());
    fflush(stdout);
    for (;;)
        pause();
}

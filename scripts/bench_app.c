/* Benchmark program: fills SIZE_MIB of heap with non-zero data (dense), or touches one page in
 * 16 (sparse), prints READY on stderr, then keeps rewriting its memory until killed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 1024;
    int sparse = argc > 2 && strcmp(argv[2], "sparse") == 0;
    size_t n = mib << 20, step = sparse ? 16 * 4096 : 8;
    unsigned char *a = malloc(n);
    if (!a) return 1;
    for (size_t i = 0; i < n; i += step) *(unsigned long *)(a + i) = i * 2654435761UL + 1;
    fprintf(stderr, "READY\n");
    for (unsigned long round = 1;; round++)
        for (size_t i = 0; i < n; i += 4096 * 7) a[i] ^= (unsigned char)round;
}

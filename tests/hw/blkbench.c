/* blkbench DEVICE MIB: guest-driven block I/O for the hardware tier's disk-io scenario (run by the L2 guest's
 * /init, tests/hw/l2-init.sh hw.mode=blkbench; built static by tests/hw/build.sh). On the device's first MIB
 * MiB, all with O_DIRECT (so every request reaches the virtual disk):
 *   seq-write   MIB requests of 1 MiB, a pattern that depends on the offset, then fdatasync
 *   seq-read    the same MIB requests of 1 MiB, each compared with the pattern (verify=ok|bad)
 *   rand-read   RAND_IOS requests of 4 KiB at 4 KiB-aligned offsets from a fixed xorshift sequence
 *   rand-write  RAND_IOS requests of 4 KiB likewise, then fdatasync
 * and prints one line, the seconds each took by the guest's monotonic clock (and, of the sequential write,
 * the time spent filling buffers, the slowest request and the final fdatasync):
 *   PORTHOLE-BLKBENCH mib=<MIB> rand-ios=<n> seq-write-s=<s> seq-read-s=<s> rand-read-s=<s> rand-write-s=<s>
 *                     verify=<ok|bad> seq-write-fill-s=<s> seq-write-slowest-s=<s> seq-write-sync-s=<s>
 * or `PORTHOLE-FAIL blkbench: <what>`. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SEQ (1 << 20)
#define BLOCK 4096
#define RAND_IOS 2048

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void fill(uint8_t *buf, size_t len, uint64_t offset) {
    for (size_t i = 0; i < len; i += 8) {
        uint64_t v = (offset + i) * 0x9E3779B97F4A7C15ull;
        memcpy(buf + i, &v, 8);
    }
}

static int fail(const char *what) {
    printf("PORTHOLE-FAIL blkbench: %s: %s\n", what, strerror(errno));
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        printf("PORTHOLE-FAIL blkbench: usage: blkbench DEVICE MIB\n");
        return 2;
    }
    long mib = atol(argv[2]);
    if (mib < 1 || mib > 4096) {
        printf("PORTHOLE-FAIL blkbench: MIB must be 1..4096\n");
        return 2;
    }
    int fd = open(argv[1], O_RDWR | O_DIRECT);
    if (fd < 0) return fail("open");
    uint8_t *buf, *want;
    if (posix_memalign((void **)&buf, BLOCK, SEQ) || posix_memalign((void **)&want, BLOCK, SEQ)) return fail("memory");
    uint64_t span = (uint64_t)mib << 20;

    double t0 = now(), slowest = 0, fill_s = 0;
    for (uint64_t off = 0; off < span; off += SEQ) {
        double f0 = now();
        fill(buf, SEQ, off);
        double w0 = now();
        fill_s += w0 - f0;
        if (pwrite(fd, buf, SEQ, off) != SEQ) return fail("seq-write");
        if (now() - w0 > slowest) slowest = now() - w0;
    }
    double s0 = now();
    if (fdatasync(fd)) return fail("fdatasync");
    double sync_s = now() - s0;
    double seq_write = now() - t0;

    int ok = 1;
    t0 = now();
    for (uint64_t off = 0; off < span; off += SEQ) {
        if (pread(fd, buf, SEQ, off) != SEQ) return fail("seq-read");
        fill(want, SEQ, off);
        ok &= memcmp(buf, want, SEQ) == 0;
    }
    double seq_read = now() - t0;

    uint64_t x = 0x2545F4914F6CDD1Dull, blocks = span / BLOCK;
    t0 = now();
    for (int i = 0; i < RAND_IOS; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        if (pread(fd, buf, BLOCK, (x % blocks) * BLOCK) != BLOCK) return fail("rand-read");
    }
    double rand_read = now() - t0;

    t0 = now();
    for (int i = 0; i < RAND_IOS; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        uint64_t off = (x % blocks) * BLOCK;
        fill(buf, BLOCK, off);
        if (pwrite(fd, buf, BLOCK, off) != BLOCK) return fail("rand-write");
    }
    if (fdatasync(fd)) return fail("fdatasync");
    double rand_write = now() - t0;

    printf("PORTHOLE-BLKBENCH mib=%ld rand-ios=%d seq-write-s=%.3f seq-read-s=%.3f rand-read-s=%.3f "
           "rand-write-s=%.3f verify=%s seq-write-fill-s=%.3f seq-write-slowest-s=%.3f seq-write-sync-s=%.3f\n",
           mib, RAND_IOS, seq_write, seq_read, rand_read, rand_write, ok ? "ok" : "bad", fill_s, slowest, sync_s);
    close(fd);
    return ok ? 0 : 1;
}

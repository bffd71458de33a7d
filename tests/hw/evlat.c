/* evlat — the pointer-latency probe of the hardware tier's `pointer` scenario (l2-init.sh hw.mode=evlat).
 *
 * Finds the first evdev device (/dev/input/event0..31, waiting up to 60 s for it) that reports absolute X
 * and whose name has "tablet" in it (porthole-vmm's "Porthole tablet", QEMU's "QEMU Virtio Tablet"; not,
 * say, a VMware mouse, which reports absolute X too), says
 *   EVLAT-READY dev=<path> name=<its name>
 * and then, for every report (SYN_REPORT) that changed X or Y, at once (stdout is line-buffered; the console
 * is the serial port, which the harness reads with arrival times):
 *   EVLAT x=<ABS_X> y=<ABS_Y>
 * It ends after COUNT reports (argv[1]) or when nothing came for 120 s:
 *   EVLAT-DONE reports=<n>
 * Static, no library beyond libc. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BITS_PER_LONG (8 * sizeof(long))
#define TEST_BIT(bit, array) ((array[(bit) / BITS_PER_LONG] >> ((bit) % BITS_PER_LONG)) & 1)

static int open_tablet(char *path, size_t len) {
    for (int tries = 0; tries < 600; tries++) {
        for (int i = 0; i < 32; i++) {
            snprintf(path, len, "/dev/input/event%d", i);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0) continue;
            unsigned long abs[(ABS_MAX + BITS_PER_LONG) / BITS_PER_LONG];
            memset(abs, 0, sizeof(abs));
            char name[128] = "";
            ioctl(fd, EVIOCGNAME(sizeof(name) - 1), name);
            if (ioctl(fd, EVIOCGBIT(EV_ABS, sizeof(abs)), abs) >= 0 && TEST_BIT(ABS_X, abs) && strcasestr(name, "tablet"))
                return fd;
            close(fd);
        }
        usleep(100000);
    }
    return -1;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    long count = argc > 1 ? atol(argv[1]) : 100;
    char path[64], name[128] = "?";
    int fd = open_tablet(path, sizeof(path));
    if (fd < 0) {
        printf("EVLAT-FAIL no evdev device with ABS_X after 60 s\n");
        return 1;
    }
    ioctl(fd, EVIOCGNAME(sizeof(name)), name);
    for (char *c = name; *c; c++)
        if (*c == ' ') *c = '_';
    printf("EVLAT-READY dev=%s name=%s\n", path, name);
    int x = -1, y = -1, changed = 0;
    long reports = 0;
    struct input_event ev[64];
    while (reports < count) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, 120000);
        if (r == 0) break;
        if (r < 0) {
            if (errno == EINTR) continue;
            break;
        }
        ssize_t n = read(fd, ev, sizeof(ev));
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            break;
        }
        for (size_t i = 0; i < (size_t)n / sizeof(ev[0]); i++) {
            if (ev[i].type == EV_ABS && ev[i].code == ABS_X) x = ev[i].value, changed = 1;
            if (ev[i].type == EV_ABS && ev[i].code == ABS_Y) y = ev[i].value, changed = 1;
            if (ev[i].type == EV_SYN && ev[i].code == SYN_REPORT && changed) {
                printf("EVLAT x=%d y=%d\n", x, y);
                changed = 0;
                reports++;
            }
        }
    }
    printf("EVLAT-DONE reports=%ld\n", reports);
    return 0;
}

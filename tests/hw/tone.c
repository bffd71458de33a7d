/* tone SECONDS [DEVICE]: plays a 480 Hz square wave (amplitude 8000, both channels) for SECONDS seconds through
 * the kernel's ALSA PCM interface directly (no alsa-lib: the hardware tier's L2 initramfs has none), for the
 * sound scenario (tests/hw/l2-init.sh hw.mode=sound; built static by tests/hw/build.sh). DEVICE defaults to
 * /dev/snd/pcmC0D0p.
 *
 * First the mixer (card 0's /dev/snd/controlC0): "Master Playback Volume" and "Master Playback Switch" to their
 * maximum (0 dB, unmuted), one `TONE mixer ...` line each.
 *
 * What alsa-lib would do, by hand: HW_REFINE with access RW_INTERLEAVED, format S16_LE, subformat STD,
 * 2 channels, 48000 Hz, periods of 480-1024 frames, 4 periods; the largest period the driver allows is taken
 * (fewer interrupts for a nested guest), then HW_PARAMS, PREPARE and WRITEI_FRAMES of whole buffers until
 * SECONDS are written; an underrun (-EPIPE) is counted, the stream prepared again and the writing goes on;
 * DRAIN at the end. One line:
 *   TONE ok frames=<written> underruns=<n> rate=<Hz> channels=2 period=<frames> buffer=<frames> seconds=<s>
 * (seconds: the guest's monotonic time from the first write to the end of the drain) or
 *   TONE FAIL <what> errno=<n> (<text>) */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include <sound/asound.h>

#define RATE 48000
#define CHANNELS 2
#define TONE_HZ 480
#define AMPLITUDE 8000
#define PERIODS 4

static int fail(const char *what) {
    int e = errno;
    printf("TONE FAIL %s errno=%d (%s)\n", what, e, strerror(e));
    return 1;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static struct snd_mask *mask(struct snd_pcm_hw_params *p, int param) {
    return &p->masks[param - SNDRV_PCM_HW_PARAM_FIRST_MASK];
}

static struct snd_interval *interval(struct snd_pcm_hw_params *p, int param) {
    return &p->intervals[param - SNDRV_PCM_HW_PARAM_FIRST_INTERVAL];
}

/* Only `value` in the mask. */
static void mask_only(struct snd_pcm_hw_params *p, int param, unsigned value) {
    struct snd_mask *m = mask(p, param);
    memset(m, 0, sizeof(*m));
    m->bits[value / 32] = 1u << (value % 32);
}

static void range(struct snd_pcm_hw_params *p, int param, unsigned min, unsigned max) {
    struct snd_interval *i = interval(p, param);
    i->min = min;
    i->max = max;
    i->integer = 1;
}

/* Everything allowed, as alsa-lib's snd_pcm_hw_params_any starts. */
static void any(struct snd_pcm_hw_params *p) {
    memset(p, 0, sizeof(*p));
    for (int n = SNDRV_PCM_HW_PARAM_FIRST_MASK; n <= SNDRV_PCM_HW_PARAM_LAST_MASK; n++)
        memset(mask(p, n), 0xff, sizeof(struct snd_mask));
    for (int n = SNDRV_PCM_HW_PARAM_FIRST_INTERVAL; n <= SNDRV_PCM_HW_PARAM_LAST_INTERVAL; n++) {
        interval(p, n)->min = 0;
        interval(p, n)->max = UINT_MAX;
    }
    p->rmask = ~0u;
    p->info = ~0u;
}

/* Sets the card's mixer control NAME (volume or switch) to its maximum, every channel; says what it was and is. The
 * generic HDA codec driver leaves its amps muted at the lowest volume (alsactl's job on a full system); here the
 * maximum of "Master Playback Volume" is the codec's 0 dB step, so the samples pass unchanged. */
static void control_to_max(int ctl, const char *name) {
    struct snd_ctl_elem_info info;
    memset(&info, 0, sizeof(info));
    info.id.iface = SNDRV_CTL_ELEM_IFACE_MIXER;
    snprintf((char *)info.id.name, sizeof(info.id.name), "%s", name);
    if (ioctl(ctl, SNDRV_CTL_IOCTL_ELEM_INFO, &info) < 0) {
        printf("TONE mixer \"%s\" none errno=%d\n", name, errno);
        return;
    }
    if ((info.type != SNDRV_CTL_ELEM_TYPE_BOOLEAN && info.type != SNDRV_CTL_ELEM_TYPE_INTEGER) || info.count > 128) {
        printf("TONE mixer \"%s\" type=%d count=%u left alone\n", name, (int)info.type, info.count);
        return;
    }
    long max = info.type == SNDRV_CTL_ELEM_TYPE_BOOLEAN ? 1 : info.value.integer.max;
    struct snd_ctl_elem_value v;
    memset(&v, 0, sizeof(v));
    v.id = info.id;
    long was[2] = {-1, -1};
    if (ioctl(ctl, SNDRV_CTL_IOCTL_ELEM_READ, &v) == 0)
        for (unsigned i = 0; i < info.count && i < 2; i++) was[i] = v.value.integer.value[i];
    for (unsigned i = 0; i < info.count; i++) v.value.integer.value[i] = max;
    int rc = ioctl(ctl, SNDRV_CTL_IOCTL_ELEM_WRITE, &v);
    int e = errno;
    memset(&v.value, 0, sizeof(v.value));
    ioctl(ctl, SNDRV_CTL_IOCTL_ELEM_READ, &v);
    printf("TONE mixer \"%s\" was=%ld,%ld now=%ld,%ld max=%ld%s\n", name, was[0], was[1], v.value.integer.value[0],
           info.count > 1 ? v.value.integer.value[1] : -1, max, rc < 0 ? (e == EPERM ? " write=EPERM" : " write=failed") : "");
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) {
        fprintf(stderr, "usage: tone SECONDS [DEVICE]\n");
        return 2;
    }
    double seconds = atof(argv[1]);
    const char *dev = argc > 2 ? argv[2] : "/dev/snd/pcmC0D0p";
    int ctl = open("/dev/snd/controlC0", O_RDWR | O_CLOEXEC);
    if (ctl < 0) return fail("open /dev/snd/controlC0");
    control_to_max(ctl, "Master Playback Volume");
    control_to_max(ctl, "Master Playback Switch");
    close(ctl);
    int fd = open(dev, O_RDWR | O_CLOEXEC);
    if (fd < 0) return fail("open");

    struct snd_pcm_hw_params p;
    any(&p);
    mask_only(&p, SNDRV_PCM_HW_PARAM_ACCESS, SNDRV_PCM_ACCESS_RW_INTERLEAVED);
    mask_only(&p, SNDRV_PCM_HW_PARAM_FORMAT, SNDRV_PCM_FORMAT_S16_LE);
    mask_only(&p, SNDRV_PCM_HW_PARAM_SUBFORMAT, SNDRV_PCM_SUBFORMAT_STD);
    range(&p, SNDRV_PCM_HW_PARAM_CHANNELS, CHANNELS, CHANNELS);
    range(&p, SNDRV_PCM_HW_PARAM_RATE, RATE, RATE);
    range(&p, SNDRV_PCM_HW_PARAM_PERIOD_SIZE, 480, 1024);
    range(&p, SNDRV_PCM_HW_PARAM_PERIODS, PERIODS, PERIODS);
    if (ioctl(fd, SNDRV_PCM_IOCTL_HW_REFINE, &p) < 0) return fail("HW_REFINE");
    struct snd_interval *ps = interval(&p, SNDRV_PCM_HW_PARAM_PERIOD_SIZE);
    unsigned period = ps->max;
    printf("TONE refined period=%u-%u periods=%u-%u buffer=%u-%u\n", ps->min, ps->max,
           interval(&p, SNDRV_PCM_HW_PARAM_PERIODS)->min, interval(&p, SNDRV_PCM_HW_PARAM_PERIODS)->max,
           interval(&p, SNDRV_PCM_HW_PARAM_BUFFER_SIZE)->min, interval(&p, SNDRV_PCM_HW_PARAM_BUFFER_SIZE)->max);
    range(&p, SNDRV_PCM_HW_PARAM_PERIOD_SIZE, period, period);
    p.rmask = ~0u;
    p.cmask = 0;
    if (ioctl(fd, SNDRV_PCM_IOCTL_HW_PARAMS, &p) < 0) return fail("HW_PARAMS");
    period = interval(&p, SNDRV_PCM_HW_PARAM_PERIOD_SIZE)->min;
    unsigned buffer = interval(&p, SNDRV_PCM_HW_PARAM_BUFFER_SIZE)->min;
    unsigned rate = interval(&p, SNDRV_PCM_HW_PARAM_RATE)->min;
    unsigned channels = interval(&p, SNDRV_PCM_HW_PARAM_CHANNELS)->min;
    if (rate != RATE || channels != CHANNELS || buffer == 0) {
        errno = EINVAL;
        printf("TONE params rate=%u channels=%u period=%u buffer=%u\n", rate, channels, period, buffer);
        return fail("HW_PARAMS gave other parameters");
    }
    if (ioctl(fd, SNDRV_PCM_IOCTL_PREPARE) < 0) return fail("PREPARE");

    /* Whole buffers of the square wave: 100 frames a cycle at 48000 Hz, 50 high and 50 low. */
    int16_t *buf = malloc((size_t)buffer * CHANNELS * sizeof(int16_t));
    if (!buf) return fail("malloc");
    /* Whole periods: Linux's virtio_snd hands the card only whole periods, so the rest of a last partial
     * one would never play and DRAIN would time out (EIO). */
    uint64_t total = ((uint64_t)(seconds * RATE) + period - 1) / period * period, written = 0, phase = 0;
    unsigned underruns = 0;
    double start = now();
    while (written < total) {
        uint64_t n = total - written < buffer ? total - written : buffer;
        for (uint64_t f = 0; f < n; f++) {
            int16_t s = (phase + f) % (RATE / TONE_HZ) < (RATE / TONE_HZ) / 2 ? AMPLITUDE : -AMPLITUDE;
            buf[f * CHANNELS] = s;
            buf[f * CHANNELS + 1] = s;
        }
        uint64_t done = 0;
        while (done < n) {
            struct snd_xferi x = {.result = 0, .buf = buf + done * CHANNELS, .frames = n - done};
            if (ioctl(fd, SNDRV_PCM_IOCTL_WRITEI_FRAMES, &x) < 0) {
                if (errno == EPIPE) {
                    underruns++;
                    if (ioctl(fd, SNDRV_PCM_IOCTL_PREPARE) < 0) return fail("PREPARE after an underrun");
                    continue;
                }
                if (errno == EINTR || errno == EAGAIN) continue;
                return fail("WRITEI_FRAMES");
            }
            done += x.result;
        }
        written += n;
        phase += n;
    }
    if (ioctl(fd, SNDRV_PCM_IOCTL_DRAIN) < 0 && errno != EPIPE) return fail("DRAIN");
    double took = now() - start;
    close(fd);
    printf("TONE ok frames=%llu underruns=%u rate=%u channels=%u period=%u buffer=%u seconds=%.2f\n",
           (unsigned long long)written, underruns, rate, channels, period, buffer, took);
    return 0;
}

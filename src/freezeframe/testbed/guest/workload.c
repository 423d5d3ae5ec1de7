/*
 * ff-workload: the test guest's writers. Static, no allocation in the hot loop.
 *
 *   ff-workload ledger <journal-mount> <state-mount>
 *     For i = start, start+1, ...: append record i to <journal>/ledger/journal (fsync), then rewrite
 *     <state>/ledger/state with i (fsync). Every point-in-time image of both disks therefore satisfies
 *     state <= last journal record <= state + 1. SIGUSR1 (sent by the fsfreeze hook) pauses the writer
 *     after a complete record pair; SIGUSR2 resumes it.
 *
 *   ff-workload heartbeat <mount>...
 *     Every ~5 ms append "seq realtime_ns" to <mount>/heartbeat.log on each mount (fsync each), so the
 *     longest stall the guest saw can be computed afterwards.
 *
 *   ff-workload rewrite <device> <region-bytes> <block> <count> <shift> <seed>
 *     Write <count> distinct random blocks of <block> bytes, at k * <block> + <shift> inside the first
 *     <region-bytes> of <device>, with random content (O_DIRECT, fdatasync at the end); print
 *     "rewrote <bytes> in <ns> ns". The benchmark's change maker and write-throughput probe.
 *
 * Records are fixed width so a torn record at the end of a file is detectable.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define LEDGER_REC 20    /* "%019llu\n" */
#define HEART_REC 42     /* "%020llu %020llu\n" */
#define PAUSED_FLAG "/run/ledger.paused"
#define LEDGER_PID "/run/ledger.pid"
#define THAW_SAFETY_S 60 /* resume on our own if no thaw ever comes */

static void die(const char *fmt, ...) {
    va_list ap;
    int e = errno;
    va_start(ap, fmt);
    fputs("ff-workload: ", stdout);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fprintf(stdout, ": %s\n", strerror(e));
    fflush(stdout);
    exit(1);
}

static long long now_ns(clockid_t clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void write_all_at(int fd, const char *buf, size_t len, off_t off, const char *what) {
    while (len > 0) {
        ssize_t n = pwrite(fd, buf, len, off);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("pwrite %s", what);
        }
        buf += n;
        len -= (size_t)n;
        off += n;
    }
}

static void sync_fd(int fd, const char *what) {
    while (fsync(fd) != 0) {
        if (errno != EINTR) die("fsync %s", what);
    }
}

static void ensure_dir(const char *path) {
    if (mkdir(path, 0755) != 0 && errno != EEXIST) die("mkdir %s", path);
}

static void sync_dir(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECTORY);
    if (fd < 0) die("open %s", path);
    sync_fd(fd, path);
    close(fd);
}

/* Parse a fixed-width record of digits followed by '\n'; returns 0 on success. */
static int parse_rec(const char *buf, size_t width, unsigned long long *out) {
    unsigned long long v = 0;
    if (buf[width - 1] != '\n') return -1;
    for (size_t k = 0; k < width - 1; k++) {
        if (buf[k] < '0' || buf[k] > '9') return -1;
        v = v * 10 + (unsigned long long)(buf[k] - '0');
    }
    *out = v;
    return 0;
}

static void append_event(int fd, const char *what, unsigned long long i) {
    char line[64];
    int len = snprintf(line, sizeof line, "%s i=%llu\n", what, i);
    off_t end = lseek(fd, 0, SEEK_END);
    if (end < 0) die("lseek app-events");
    write_all_at(fd, line, (size_t)len, end, "app-events");
    sync_fd(fd, "app-events");
}

/* Paused by the freeze hook: record the event, raise the flag, wait for SIGUSR2 (bounded). */
static void ledger_pause(int efd, unsigned long long cur, const sigset_t *sigs) {
    append_event(efd, "freeze", cur);
    int pf = open(PAUSED_FLAG, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (pf < 0) die("create %s", PAUSED_FLAG);
    close(pf);
    printf("ff-ledger paused i=%llu\n", cur);
    fflush(stdout);
    struct timespec limit = {THAW_SAFETY_S, 0};
    const char *how = "thaw";
    for (;;) {
        int sig = sigtimedwait(sigs, NULL, &limit);
        if (sig == SIGUSR2) break;
        if (sig < 0 && errno == EAGAIN) {
            how = "thaw-timeout";
            break;
        }
        /* EINTR or a repeated SIGUSR1: keep waiting */
    }
    unlink(PAUSED_FLAG);
    append_event(efd, how, cur);
    printf("ff-ledger resumed i=%llu\n", cur);
    fflush(stdout);
}

static int ledger(const char *jmount, const char *smount) {
    char path[512];
    char rec[LEDGER_REC + 1];

    snprintf(path, sizeof path, "%s/ledger", jmount);
    ensure_dir(path);
    snprintf(path, sizeof path, "%s/ledger", smount);
    ensure_dir(path);

    snprintf(path, sizeof path, "%s/ledger/journal", jmount);
    int jfd = open(path, O_RDWR | O_CREAT, 0644);
    if (jfd < 0) die("open %s", path);
    snprintf(path, sizeof path, "%s/ledger/app-events", jmount);
    int efd = open(path, O_RDWR | O_CREAT, 0644);
    if (efd < 0) die("open %s", path);
    snprintf(path, sizeof path, "%s/ledger/state", smount);
    int sfd = open(path, O_RDWR | O_CREAT, 0644);
    if (sfd < 0) die("open %s", path);
    snprintf(path, sizeof path, "%s/ledger", jmount);
    sync_dir(path);
    snprintf(path, sizeof path, "%s/ledger", smount);
    sync_dir(path);

    /* Resume from what the disks hold: drop a torn trailing record, continue after the last one. */
    off_t size = lseek(jfd, 0, SEEK_END);
    if (size < 0) die("lseek journal");
    unsigned long long n = (unsigned long long)size / LEDGER_REC;
    unsigned long long last = 0;
    if ((off_t)(n * LEDGER_REC) != size) {
        if (ftruncate(jfd, (off_t)(n * LEDGER_REC)) != 0) die("ftruncate journal");
        sync_fd(jfd, "journal");
    }
    while (n > 0) {
        if (pread(jfd, rec, LEDGER_REC, (off_t)((n - 1) * LEDGER_REC)) == LEDGER_REC &&
            parse_rec(rec, LEDGER_REC, &last) == 0)
            break;
        n--; /* garbage record (should not happen with ext4 ordered mode): drop it */
        if (ftruncate(jfd, (off_t)(n * LEDGER_REC)) != 0) die("ftruncate journal");
        last = 0;
    }
    unsigned long long i = n > 0 ? last + 1 : 1;
    off_t joff = (off_t)(n * LEDGER_REC);

    FILE *pf = fopen(LEDGER_PID, "w");
    if (pf != NULL) {
        fprintf(pf, "%d\n", (int)getpid());
        fclose(pf);
    }
    unlink(PAUSED_FLAG);

    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGUSR1);
    sigaddset(&sigs, SIGUSR2);
    sigprocmask(SIG_BLOCK, &sigs, NULL);
    struct timespec zero = {0, 0};

    printf("ff-ledger start i=%llu\n", i);
    fflush(stdout);
    long long next_report = now_ns(CLOCK_MONOTONIC) + 1000000000LL;
    for (;; i++) {
        snprintf(rec, sizeof rec, "%019llu\n", i);
        write_all_at(jfd, rec, LEDGER_REC, joff, "journal");
        sync_fd(jfd, "journal");
        joff += LEDGER_REC;
        write_all_at(sfd, rec, LEDGER_REC, 0, "state");
        sync_fd(sfd, "state");

        long long now = now_ns(CLOCK_MONOTONIC);
        if (now >= next_report) {
            printf("ff-ledger i=%llu\n", i);
            fflush(stdout);
            next_report = now + 1000000000LL;
        }
        for (;;) {
            int sig = sigtimedwait(&sigs, NULL, &zero);
            if (sig < 0) break;
            if (sig == SIGUSR1) ledger_pause(efd, i, &sigs);
            /* a stray SIGUSR2 (thaw without a pause) is ignored */
        }
    }
    return 0;
}

static int heartbeat(int nmounts, char **mounts) {
    enum { MAXM = 26 };
    int fds[MAXM];
    char path[512];
    char rec[HEART_REC + 1];
    if (nmounts > MAXM) nmounts = MAXM;
    if (nmounts == 0) {
        errno = EINVAL;
        die("heartbeat needs at least one mount");
    }
    unsigned long long seq = 0;
    for (int k = 0; k < nmounts; k++) {
        snprintf(path, sizeof path, "%s/heartbeat.log", mounts[k]);
        fds[k] = open(path, O_RDWR | O_CREAT, 0644);
        if (fds[k] < 0) die("open %s", path);
        off_t size = lseek(fds[k], 0, SEEK_END);
        unsigned long long have = (unsigned long long)size / HEART_REC;
        if ((off_t)(have * HEART_REC) != size && ftruncate(fds[k], (off_t)(have * HEART_REC)) != 0)
            die("ftruncate %s", path);
        if (have > seq) seq = have;
        sync_dir(mounts[k]);
    }
    printf("ff-heartbeat start seq=%llu mounts=%d\n", seq, nmounts);
    fflush(stdout);
    const long long period = 5000000LL;
    long long next = now_ns(CLOCK_MONOTONIC);
    long long next_report = next + 1000000000LL;
    for (;; seq++) {
        long long rt = now_ns(CLOCK_REALTIME);
        snprintf(rec, sizeof rec, "%020llu %020llu\n", seq, (unsigned long long)rt);
        for (int k = 0; k < nmounts; k++) {
            off_t end = lseek(fds[k], 0, SEEK_END);
            write_all_at(fds[k], rec, HEART_REC, end, "heartbeat");
            sync_fd(fds[k], "heartbeat");
        }
        long long now = now_ns(CLOCK_MONOTONIC);
        if (now >= next_report) {
            printf("ff-heartbeat seq=%llu\n", seq);
            fflush(stdout);
            next_report = now + 1000000000LL;
        }
        next += period;
        if (next < now) next = now; /* fell behind: no catch-up burst */
        struct timespec ts = {(time_t)(next / 1000000000LL), (long)(next % 1000000000LL)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
        }
    }
    return 0;
}

static unsigned long long xorshift(unsigned long long *state) {
    unsigned long long x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 2685821657736338717ULL;
}

static int rewrite(const char *dev, long long region, long long block, long long count, long long shift,
                   unsigned long long seed) {
    if (block <= 0 || block % 4096 != 0 || shift < 0 || shift % 4096 != 0 || region < block + shift) {
        fprintf(stderr, "ff-workload rewrite: block and shift must be multiples of 4096 within the region\n");
        return 2;
    }
    long long slots = (region - shift) / block;
    if (count < 0 || count > slots) {
        fprintf(stderr, "ff-workload rewrite: %lld blocks asked, %lld fit\n", count, slots);
        return 2;
    }
    int fd = open(dev, O_WRONLY | O_DIRECT);
    if (fd < 0) die("open %s", dev);
    unsigned char *used = calloc((size_t)slots, 1);
    void *buf = NULL;
    if (used == NULL || posix_memalign(&buf, 4096, (size_t)block) != 0) die("allocate");
    unsigned long long state = seed ? seed : 1;
    long long start = now_ns(CLOCK_MONOTONIC);
    for (long long done = 0; done < count; done++) {
        long long k = (long long)(xorshift(&state) % (unsigned long long)slots);
        while (used[k]) k = (k + 1) % slots;
        used[k] = 1;
        unsigned long long *words = buf;
        for (size_t w = 0; w < (size_t)block / sizeof *words; w++) words[w] = xorshift(&state);
        write_all_at(fd, buf, (size_t)block, (off_t)(k * block + shift), dev);
    }
    while (fdatasync(fd) != 0) {
        if (errno != EINTR) die("fdatasync %s", dev);
    }
    printf("rewrote %lld in %lld ns\n", count * block, now_ns(CLOCK_MONOTONIC) - start);
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 2 && strcmp(argv[1], "idle") == 0) return 0;
    if (argc == 4 && strcmp(argv[1], "ledger") == 0) return ledger(argv[2], argv[3]);
    if (argc >= 3 && strcmp(argv[1], "heartbeat") == 0) return heartbeat(argc - 2, argv + 2);
    if (argc == 8 && strcmp(argv[1], "rewrite") == 0)
        return rewrite(argv[2], atoll(argv[3]), atoll(argv[4]), atoll(argv[5]), atoll(argv[6]),
                       strtoull(argv[7], NULL, 10));
    fprintf(stderr, "usage: ff-workload idle | ledger <journal-mount> <state-mount> | heartbeat <mount>... | "
                    "rewrite <device> <region-bytes> <block> <count> <shift> <seed>\n");
    return 2;
}

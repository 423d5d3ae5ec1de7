/*
 * ff-workload: the test guest's writers. Static, no allocation in the hot loop.
 *
 *   ff-workload ledger <journal-mount> <state-mount>
 *     For i = start, start+1, ...: append record i to <journal>/ledger/journal (fsync), then rewrite
 *     <state>/ledger/state with i (fsync). Every point-in-time image of both disks therefore satisfies
 *     state <= last journal record <= state + 1. SIGUSR1 (sent by the fsfreeze hook) pauses the writer
 *     after a complete record pair; SIGUSR2 resumes it.
 *
 *   ff-workload link-send <mount> <port> / link-recv <mount> <port>
 *     The two-instance ledger: the sender appends record i to <mount>/ledger/journal (fsync), sends i over the
 *     virtio-serial port named <port> (joined to the other guest's port on the host), and waits for the receiver's
 *     acknowledgement before i+1 (resending i every 2 s meanwhile); the receiver appends each new i to its own
 *     journal (fsync) and acknowledges it. Any consistent cut across both guests has
 *     receiver.last <= sender.last <= receiver.last + 1.
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
#include <dirent.h>
#include <errno.h>
#include <poll.h>
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

/* The device of the virtio-serial port called `name` (/dev/vportNpM), waiting up to 60 s for it to appear. */
static int open_port(const char *name) {
    char path[512], dev[300], buf[128];
    for (int tries = 0; tries < 1200; tries++) {
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *e;
        while (d != NULL && (e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.') continue;
            snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
            FILE *f = fopen(path, "r");
            if (f == NULL) continue;
            int match = fgets(buf, sizeof buf, f) != NULL && (buf[strcspn(buf, "\n")] = 0, strcmp(buf, name) == 0);
            fclose(f);
            if (!match) continue;
            snprintf(dev, sizeof dev, "/dev/%s", e->d_name);
            closedir(d);
            int fd = open(dev, O_RDWR);
            if (fd < 0) die("open %s", dev);
            return fd;
        }
        if (d != NULL) closedir(d);
        usleep(50000);
    }
    errno = ENOENT;
    die("virtio-serial port %s", name);
    return -1;
}

/* Open (creating) <mount>/ledger/journal; return the fd, the next offset and the last record in *last. */
static int open_journal(const char *mount, off_t *end, unsigned long long *last) {
    char path[512], rec[LEDGER_REC];
    snprintf(path, sizeof path, "%s/ledger", mount);
    ensure_dir(path);
    snprintf(path, sizeof path, "%s/ledger/journal", mount);
    int fd = open(path, O_RDWR | O_CREAT, 0644);
    if (fd < 0) die("open %s", path);
    snprintf(path, sizeof path, "%s/ledger", mount);
    sync_dir(path);
    off_t size = lseek(fd, 0, SEEK_END);
    unsigned long long n = (unsigned long long)size / LEDGER_REC;
    *last = 0;
    if (n > 0 && (pread(fd, rec, LEDGER_REC, (off_t)((n - 1) * LEDGER_REC)) != LEDGER_REC ||
                  parse_rec(rec, LEDGER_REC, last) != 0))
        die("unreadable last record in %s/ledger/journal", mount);
    *end = (off_t)(n * LEDGER_REC);
    return fd;
}

static void append_record(int fd, off_t *end, unsigned long long i) {
    char rec[LEDGER_REC + 1];
    snprintf(rec, sizeof rec, "%019llu\n", i);
    write_all_at(fd, rec, LEDGER_REC, *end, "journal");
    sync_fd(fd, "journal");
    *end += LEDGER_REC;
}

/* Send one record over the port; a host side that is not connected yet drops it (the sender resends). */
static void send_record(int port, unsigned long long i) {
    char rec[LEDGER_REC + 1];
    snprintf(rec, sizeof rec, "%019llu\n", i);
    if (write(port, rec, LEDGER_REC) != LEDGER_REC) usleep(100000);
}

/* Read one record within timeout_ms: 1 with *out set, 0 on timeout (or nothing connected yet). */
static int recv_record(int port, int timeout_ms, unsigned long long *out) {
    static char buf[LEDGER_REC];
    static size_t have = 0;
    long long deadline = now_ns(CLOCK_MONOTONIC) + (long long)timeout_ms * 1000000LL;
    for (;;) {
        long long left = (deadline - now_ns(CLOCK_MONOTONIC)) / 1000000LL;
        if (left <= 0) return 0;
        struct pollfd p = {port, POLLIN, 0};
        int r = poll(&p, 1, (int)left);
        if (r < 0 && errno != EINTR) die("poll port");
        if (r <= 0) continue;
        ssize_t n = read(port, buf + have, LEDGER_REC - have);
        if (n <= 0) { /* host side not connected: nothing to read yet */
            usleep(50000);
            continue;
        }
        have += (size_t)n;
        if (have < LEDGER_REC) continue;
        have = 0;
        if (parse_rec(buf, LEDGER_REC, out) == 0) return 1;
    }
}

static int link_send(const char *mount, const char *port_name) {
    off_t end;
    unsigned long long last, ack;
    int fd = open_journal(mount, &end, &last);
    int port = open_port(port_name);
    printf("ff-link start i=%llu\n", last + 1);
    fflush(stdout);
    long long next_report = now_ns(CLOCK_MONOTONIC) + 1000000000LL;
    for (unsigned long long i = last + 1;; i++) {
        append_record(fd, &end, i);
        for (;;) {
            send_record(port, i);
            int got = 0;
            while (recv_record(port, 2000, &ack) == 1) {
                if (ack == i) {
                    got = 1;
                    break;
                }
            } /* a stale acknowledgement of a resent record is skipped */
            if (got) break;
        }
        long long now = now_ns(CLOCK_MONOTONIC);
        if (now >= next_report) {
            printf("ff-link i=%llu\n", i);
            fflush(stdout);
            next_report = now + 1000000000LL;
        }
    }
    return 0;
}

static int link_recv(const char *mount, const char *port_name) {
    off_t end;
    unsigned long long last, i;
    int fd = open_journal(mount, &end, &last);
    int port = open_port(port_name);
    printf("ff-link-recv start last=%llu\n", last);
    fflush(stdout);
    long long next_report = now_ns(CLOCK_MONOTONIC) + 1000000000LL;
    for (;;) {
        if (recv_record(port, 1000, &i) != 1) continue;
        if (i == last + 1) {
            append_record(fd, &end, i);
            last = i;
        } else if (i > last + 1) {
            printf("ff-link-recv gap: got %llu after %llu\n", i, last);
            fflush(stdout);
            continue;
        }
        send_record(port, i); /* a resent record already stored is acknowledged again */
        long long now = now_ns(CLOCK_MONOTONIC);
        if (now >= next_report) {
            printf("ff-link-recv i=%llu\n", last);
            fflush(stdout);
            next_report = now + 1000000000LL;
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
    if (argc == 4 && strcmp(argv[1], "link-send") == 0) return link_send(argv[2], argv[3]);
    if (argc == 4 && strcmp(argv[1], "link-recv") == 0) return link_recv(argv[2], argv[3]);
    fprintf(stderr, "usage: ff-workload idle | ledger <journal-mount> <state-mount> | heartbeat <mount>... | "
                    "rewrite <device> <region-bytes> <block> <count> <shift> <seed> | "
                    "link-send|link-recv <mount> <port>\n");
    return 2;
}

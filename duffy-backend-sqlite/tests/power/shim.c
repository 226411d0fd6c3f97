/*
 * The power-cut test's disk model, loaded into the child with LD_PRELOAD.
 *
 * It watches two files, the database ($POWERCUT_DB) and its WAL
 * ($POWERCUT_DB-wal), whoever writes them: SQLite (pwrite64, write,
 * ftruncate) or the store's syncer thread (fdatasync on its own handle).
 * For each it keeps the byte ranges written, and the smallest length
 * truncated to, since its last fsync. At each fsync/fdatasync of a watched
 * file, before the real call, it copies those ranges (as they are in the
 * file now) into the file's shadow ($POWERCUT_SHADOW/db or /wal) and sets
 * the shadow's length: the shadow is what a disk holds after the last
 * completed fsync, everything synced and nothing after. The page cache
 * (the real files, which a SIGKILL leaves intact) holds the rest: the
 * parent rebuilds the files after a cut from the shadows alone, or from
 * the shadows plus a random subset of the pages that differ.
 *
 * A cut can also be made here: with $POWERCUT_CUT_AT=N, the N-th fsync of
 * a watched file waits $POWERCUT_PAUSE_MS (other threads run on, writing
 * and, in a broken store, answering) and then SIGKILLs the process before
 * anything of that fsync reaches the shadow.
 *
 * Writes it cannot model (writev to a watched file, a shared writable
 * mapping of one) abort the process loudly.
 *
 * Built by the test with the system C compiler:
 *   cc -shared -fPIC -O2 -o libpowercut.so shim.c -ldl -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    off_t start, end;
} range_t;

typedef struct {
    char path[PATH_MAX];
    char shadow[PATH_MAX];
    range_t *dirty;
    size_t n, cap;
    off_t trunc_min; /* -1: no truncation since the last fsync */
} watched_t;

static watched_t files[2];
static int active;
static long cut_at;
static long pause_ms;
static long syncs, writes;
static char stats_path[PATH_MAX];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off64_t);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static void *(*real_mmap64)(void *, size_t, int, int, int, off64_t);

static void die(const char *what) {
    char msg[512];
    int n = snprintf(msg, sizeof msg, "powercut shim: %s\n", what);
    if (real_write && n > 0) real_write(2, msg, (size_t)n);
    abort();
}

static void init(void) {
    real_write = dlsym(RTLD_NEXT, "write");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_writev = dlsym(RTLD_NEXT, "writev");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    real_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
    real_mmap = dlsym(RTLD_NEXT, "mmap");
    real_mmap64 = dlsym(RTLD_NEXT, "mmap64");
    const char *db = getenv("POWERCUT_DB");
    const char *shadow = getenv("POWERCUT_SHADOW");
    if (!db || !shadow) return;
    if (strlen(db) + 8 >= PATH_MAX || strlen(shadow) + 8 >= PATH_MAX) die("paths too long");
    snprintf(files[0].path, PATH_MAX, "%s", db);
    snprintf(files[1].path, PATH_MAX, "%s-wal", db);
    snprintf(files[0].shadow, PATH_MAX, "%s/db", shadow);
    snprintf(files[1].shadow, PATH_MAX, "%s/wal", shadow);
    snprintf(stats_path, PATH_MAX, "%s/stats", shadow);
    files[0].trunc_min = files[1].trunc_min = -1;
    const char *c = getenv("POWERCUT_CUT_AT");
    cut_at = c ? atol(c) : 0;
    const char *p = getenv("POWERCUT_PAUSE_MS");
    pause_ms = p ? atol(p) : 0;
    active = 1;
}

/* Which watched file `fd` is, or NULL. */
static watched_t *watched(int fd) {
    pthread_once(&once, init);
    if (!active || fd < 0) return NULL;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return NULL;
    path[n] = 0;
    for (int i = 0; i < 2; i++)
        if (strcmp(path, files[i].path) == 0) return &files[i];
    return NULL;
}

static void mark(watched_t *w, off_t start, off_t end) {
    if (end <= start) return;
    writes++;
    if (w->n > 0) {
        range_t *last = &w->dirty[w->n - 1];
        if (start <= last->end && end >= last->start) {
            if (start < last->start) last->start = start;
            if (end > last->end) last->end = end;
            return;
        }
    }
    if (w->n == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 256;
        range_t *d = realloc(w->dirty, cap * sizeof *d);
        if (!d) die("out of memory");
        w->dirty = d;
        w->cap = cap;
    }
    w->dirty[w->n].start = start;
    w->dirty[w->n].end = end;
    w->n++;
}

static void truncated(watched_t *w, off_t len) {
    if (w->trunc_min < 0 || len < w->trunc_min) w->trunc_min = len;
    for (size_t i = 0; i < w->n; i++) {
        if (w->dirty[i].end > len) w->dirty[i].end = len;
        if (w->dirty[i].start > len) w->dirty[i].start = len;
    }
}

/* Fixed width, one pwrite at offset 0: a cut never leaves it half written. */
static void write_stats(void) {
    int fd = open(stats_path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    char line[128];
    int n = snprintf(line, sizeof line, "syncs %012ld writes %012ld\n", syncs, writes);
    if (n > 0) real_pwrite(fd, line, (size_t)n, 0);
    close(fd);
}

/* The fsync of `w`: the shadow becomes the file as it is now. */
static void persist(watched_t *w) {
    int src = open(w->path, O_RDONLY | O_CLOEXEC);
    if (src < 0) die("cannot reopen a watched file");
    int dst = open(w->shadow, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (dst < 0) die("cannot open a shadow file");
    if (w->trunc_min >= 0 && real_ftruncate(dst, w->trunc_min) != 0) die("cannot truncate a shadow file");
    static char buf[1 << 16];
    for (size_t i = 0; i < w->n; i++) {
        off_t at = w->dirty[i].start;
        while (at < w->dirty[i].end) {
            size_t want = (size_t)(w->dirty[i].end - at);
            if (want > sizeof buf) want = sizeof buf;
            ssize_t got = pread(src, buf, want, at);
            if (got < 0) die("cannot read a watched file");
            if (got == 0) break; /* beyond the end: truncated meanwhile */
            if (real_pwrite(dst, buf, (size_t)got, at) != got) die("cannot write a shadow file");
            at += got;
        }
    }
    struct stat st;
    if (fstat(src, &st) != 0) die("cannot stat a watched file");
    if (real_ftruncate(dst, st.st_size) != 0) die("cannot size a shadow file");
    close(src);
    close(dst);
    w->n = 0;
    w->trunc_min = -1;
}

static void before_sync(int fd) {
    watched_t *w = watched(fd);
    if (!w) return;
    pthread_mutex_lock(&lock);
    syncs++;
    if (cut_at > 0 && syncs == cut_at) {
        pthread_mutex_unlock(&lock);
        struct timespec t = {pause_ms / 1000, (pause_ms % 1000) * 1000000L};
        nanosleep(&t, NULL);
        kill(getpid(), SIGKILL);
        for (;;) pause();
    }
    persist(w);
    write_stats();
    pthread_mutex_unlock(&lock);
}

int fsync(int fd) {
    pthread_once(&once, init);
    before_sync(fd);
    return real_fsync(fd);
}

int fdatasync(int fd) {
    pthread_once(&once, init);
    before_sync(fd);
    return real_fdatasync(fd);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off) {
    pthread_once(&once, init);
    watched_t *w = watched(fd);
    if (!w) return real_pwrite64(fd, buf, n, off);
    pthread_mutex_lock(&lock);
    ssize_t r = real_pwrite64(fd, buf, n, off);
    int e = errno;
    if (r > 0) mark(w, off, off + r);
    pthread_mutex_unlock(&lock);
    errno = e;
    return r;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    pthread_once(&once, init);
    watched_t *w = watched(fd);
    if (!w) return real_pwrite(fd, buf, n, off);
    pthread_mutex_lock(&lock);
    ssize_t r = real_pwrite(fd, buf, n, off);
    int e = errno;
    if (r > 0) mark(w, off, off + r);
    pthread_mutex_unlock(&lock);
    errno = e;
    return r;
}

ssize_t write(int fd, const void *buf, size_t n) {
    pthread_once(&once, init);
    watched_t *w = watched(fd);
    if (!w) return real_write(fd, buf, n);
    pthread_mutex_lock(&lock);
    off_t off = lseek(fd, 0, SEEK_CUR);
    ssize_t r = real_write(fd, buf, n);
    int e = errno;
    if (r > 0) mark(w, off, off + r);
    pthread_mutex_unlock(&lock);
    errno = e;
    return r;
}

ssize_t writev(int fd, const struct iovec *iov, int n) {
    pthread_once(&once, init);
    if (watched(fd)) die("writev on a watched file: not modelled");
    return real_writev(fd, iov, n);
}

int ftruncate(int fd, off_t len) {
    pthread_once(&once, init);
    watched_t *w = watched(fd);
    if (!w) return real_ftruncate(fd, len);
    pthread_mutex_lock(&lock);
    int r = real_ftruncate(fd, len);
    int e = errno;
    if (r == 0) truncated(w, len);
    pthread_mutex_unlock(&lock);
    errno = e;
    return r;
}

int ftruncate64(int fd, off64_t len) {
    pthread_once(&once, init);
    watched_t *w = watched(fd);
    if (!w) return real_ftruncate64(fd, len);
    pthread_mutex_lock(&lock);
    int r = real_ftruncate64(fd, len);
    int e = errno;
    if (r == 0) truncated(w, len);
    pthread_mutex_unlock(&lock);
    errno = e;
    return r;
}

static void check_map(int prot, int flags, int fd) {
    if ((prot & PROT_WRITE) && (flags & MAP_SHARED) && watched(fd)) die("shared writable mapping of a watched file");
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    pthread_once(&once, init);
    check_map(prot, flags, fd);
    return real_mmap(addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off) {
    pthread_once(&once, init);
    check_map(prot, flags, fd);
    return real_mmap64(addr, len, prot, flags, fd, off);
}

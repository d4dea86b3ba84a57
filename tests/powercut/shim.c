/* LD_PRELOAD shim for tests/test_powercut.py: records what a power cut could keep.
 *
 * Every directory-entry change (file creation, mkdir, rename, unlink, rmdir) and every
 * fsync/fdatasync of a path under $CKPTMGR_POWERCUT_ROOT is appended, in the order it
 * happened, as one tab-separated line to the file $CKPTMGR_POWERCUT_LOG:
 *
 *     create   DEV:INO  PATH        O_CREAT made a new entry (the file's inode)
 *     mkdir    PATH
 *     rename   SRC      DST         rename, renameat, renameat2 (flags 0 only)
 *     link     SRC      DST         link, linkat (a second name for SRC's file)
 *     unlink   PATH
 *     rmdir    PATH
 *     fsyncdir PATH                 fsync or fdatasync of a directory
 *     fsync    DEV:INO  SNAP  PATH  fsync or fdatasync of a regular file; SNAP names the
 *                                   copy of its content, taken before the call, in
 *                                   $CKPTMGR_POWERCUT_SNAPSHOTS
 *     mark     TEXT                 powercut_mark(TEXT), called by the workload
 *     error    TEXT                 something the shim could not record (the test fails)
 *
 * Paths are absolute and lexically normalised (dirfd-relative ones resolved through
 * /proc/self/fd). A mutex held across the real call and the write of its line keeps
 * the log in the order the calls took effect, threads included; the log is opened
 * O_APPEND and each line is written with one write().
 *
 * Build: cc -shared -fPIC -O1 -o shim.so shim.c -ldl   (Linux, glibc)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef O_TMPFILE
#define O_TMPFILE 0
#endif

#define PATH_BUF (PATH_MAX * 2)

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int log_fd = -1;
static char root[PATH_MAX];
static size_t root_len;
static char snap_dir[PATH_MAX];
static unsigned long snap_seq;
static int ready;

typedef int (*open_fn)(const char *, int, ...);
typedef int (*openat_fn)(int, const char *, int, ...);
typedef int (*open2_fn)(const char *, int);
typedef int (*openat2_fn)(int, const char *, int);

static void *real(const char *name) {
    void *fn = dlsym(RTLD_NEXT, name);
    if (fn == NULL) {
        fprintf(stderr, "powercut shim: no %s in libc\n", name);
        abort();
    }
    return fn;
}

#define REAL(type, name) \
    static type real_##name; \
    if (real_##name == NULL) real_##name = (type)real(#name)

static int raw_open(const char *path, int flags, mode_t mode) {
    REAL(open_fn, open);
    return real_open(path, flags, mode);
}

static void write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            return;
        }
        buf += n;
        len -= (size_t)n;
    }
}

__attribute__((constructor)) static void init(void) {
    const char *log_path = getenv("CKPTMGR_POWERCUT_LOG");
    const char *root_env = getenv("CKPTMGR_POWERCUT_ROOT");
    const char *snaps = getenv("CKPTMGR_POWERCUT_SNAPSHOTS");
    if (log_path == NULL || root_env == NULL || snaps == NULL) return;
    if (strlen(root_env) >= sizeof root || strlen(snaps) >= sizeof snap_dir) return;
    strcpy(root, root_env);
    root_len = strlen(root);
    while (root_len > 1 && root[root_len - 1] == '/') root[--root_len] = '\0';
    strcpy(snap_dir, snaps);
    log_fd = raw_open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    ready = log_fd >= 0;
}

static void log_line(const char *kind, const char *a, const char *b, const char *c) {
    char line[PATH_BUF * 2 + 64];
    int n = snprintf(line, sizeof line, "%s\t%s%s%s%s%s\n", kind, a, b ? "\t" : "", b ? b : "",
                     c ? "\t" : "", c ? c : "");
    if (n < 0 || (size_t)n >= sizeof line) {
        n = snprintf(line, sizeof line, "error\tline too long for %s\n", kind);
    }
    write_all(log_fd, line, (size_t)n);
}

/* Lexically normalise an absolute path in place: drop "." and empty parts, resolve "..". */
static void normalise(char *path) {
    char out[PATH_BUF];
    size_t len = 0;
    const char *p = path;
    while (*p) {
        while (*p == '/') p++;
        if (!*p) break;
        const char *end = strchr(p, '/');
        size_t part = end ? (size_t)(end - p) : strlen(p);
        if (part == 1 && p[0] == '.') {
            /* nothing */
        } else if (part == 2 && p[0] == '.' && p[1] == '.') {
            while (len > 0 && out[len - 1] != '/') len--;
            if (len > 0) len--;
        } else if (len + 1 + part < sizeof out) {
            out[len++] = '/';
            memcpy(out + len, p, part);
            len += part;
        }
        p += part;
    }
    if (len == 0) out[len++] = '/';
    out[len] = '\0';
    strcpy(path, out);
}

/* The absolute path of PATH relative to DIRFD; 0 when it cannot be told. */
static int absolute(int dirfd, const char *path, char *out) {
    if (path == NULL) return 0;
    if (path[0] == '/') {
        if (strlen(path) >= PATH_BUF) return 0;
        strcpy(out, path);
    } else {
        char base[PATH_MAX];
        if (dirfd == AT_FDCWD) {
            if (getcwd(base, sizeof base) == NULL) return 0;
        } else {
            char link[64];
            snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
            ssize_t n = readlink(link, base, sizeof base - 1);
            if (n < 0) return 0;
            base[n] = '\0';
        }
        if (strlen(base) + 1 + strlen(path) >= PATH_BUF) return 0;
        snprintf(out, PATH_BUF, "%s/%s", base, path);
    }
    normalise(out);
    return 1;
}

static int under_root(const char *abs) {
    return ready && strncmp(abs, root, root_len) == 0 && (abs[root_len] == '/' || abs[root_len] == '\0');
}

/* Whether DIRFD/PATH (resolved to ABS) is watched; fills ABS. */
static int watched(int dirfd, const char *path, char *abs) {
    return ready && absolute(dirfd, path, abs) && under_root(abs);
}

/* ------------------------------------------------------------------ file creation */

static int creates(int flags) {
    return (flags & O_CREAT) || (O_TMPFILE && (flags & O_TMPFILE) == O_TMPFILE);
}

static int do_open(int dirfd, const char *path, int flags, mode_t mode, int (*call)(int, const char *, int, mode_t)) {
    char abs[PATH_BUF];
    if (!(flags & O_CREAT) || !watched(dirfd, path, abs)) return call(dirfd, path, flags, mode);
    pthread_mutex_lock(&lock);
    struct stat st;
    int existed = fstatat(dirfd, path, &st, AT_SYMLINK_NOFOLLOW) == 0;
    int fd = call(dirfd, path, flags, mode);
    int saved = errno;
    if (fd >= 0 && !existed) {
        char id[64];
        if (fstat(fd, &st) == 0) {
            snprintf(id, sizeof id, "%llu:%llu", (unsigned long long)st.st_dev, (unsigned long long)st.st_ino);
            log_line("create", id, abs, NULL);
        } else {
            log_line("error", "fstat after create failed", abs, NULL);
        }
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return fd;
}

static int call_open(int dirfd, const char *path, int flags, mode_t mode) {
    (void)dirfd;
    REAL(open_fn, open);
    return real_open(path, flags, mode);
}
static int call_open64(int dirfd, const char *path, int flags, mode_t mode) {
    (void)dirfd;
    REAL(open_fn, open64);
    return real_open64(path, flags, mode);
}
static int call_openat(int dirfd, const char *path, int flags, mode_t mode) {
    REAL(openat_fn, openat);
    return real_openat(dirfd, path, flags, mode);
}
static int call_openat64(int dirfd, const char *path, int flags, mode_t mode) {
    REAL(openat_fn, openat64);
    return real_openat64(dirfd, path, flags, mode);
}

#define MODE_ARG(flags) \
    mode_t mode = 0; \
    if (creates(flags)) { \
        va_list ap; \
        va_start(ap, flags); \
        mode = (mode_t)va_arg(ap, int); \
        va_end(ap); \
    }

int open(const char *path, int flags, ...) {
    MODE_ARG(flags);
    return do_open(AT_FDCWD, path, flags, mode, call_open);
}
int open64(const char *path, int flags, ...) {
    MODE_ARG(flags);
    return do_open(AT_FDCWD, path, flags, mode, call_open64);
}
int openat(int dirfd, const char *path, int flags, ...) {
    MODE_ARG(flags);
    return do_open(dirfd, path, flags, mode, call_openat);
}
int openat64(int dirfd, const char *path, int flags, ...) {
    MODE_ARG(flags);
    return do_open(dirfd, path, flags, mode, call_openat64);
}
/* The _FORTIFY_SOURCE entry points (no mode: they never create with O_CREAT). */
int __open_2(const char *path, int flags) { return do_open(AT_FDCWD, path, flags, 0, call_open); }
int __open64_2(const char *path, int flags) { return do_open(AT_FDCWD, path, flags, 0, call_open64); }
int __openat_2(int dirfd, const char *path, int flags) { return do_open(dirfd, path, flags, 0, call_openat); }
int __openat64_2(int dirfd, const char *path, int flags) { return do_open(dirfd, path, flags, 0, call_openat64); }
int creat(const char *path, mode_t mode) {
    return do_open(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode, call_open);
}
int creat64(const char *path, mode_t mode) {
    return do_open(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode, call_open64);
}

/* ------------------------------------------------------------- directory entries */

typedef int (*mkdirat_fn)(int, const char *, mode_t);
typedef int (*mkdir_fn)(const char *, mode_t);
typedef int (*path_fn)(const char *);
typedef int (*unlinkat_fn)(int, const char *, int);
typedef int (*rename_fn)(const char *, const char *);
typedef int (*renameat_fn)(int, const char *, int, const char *);
typedef int (*renameat2_fn)(int, const char *, int, const char *, unsigned int);
typedef int (*link_fn)(const char *, const char *);
typedef int (*linkat_fn)(int, const char *, int, const char *, int);

int mkdir(const char *path, mode_t mode) {
    REAL(mkdir_fn, mkdir);
    char abs[PATH_BUF];
    if (!watched(AT_FDCWD, path, abs)) return real_mkdir(path, mode);
    pthread_mutex_lock(&lock);
    int rc = real_mkdir(path, mode);
    int saved = errno;
    if (rc == 0) log_line("mkdir", abs, NULL, NULL);
    pthread_mutex_unlock(&lock);
    errno = saved;
    return rc;
}

int mkdirat(int dirfd, const char *path, mode_t mode) {
    REAL(mkdirat_fn, mkdirat);
    char abs[PATH_BUF];
    if (!watched(dirfd, path, abs)) return real_mkdirat(dirfd, path, mode);
    pthread_mutex_lock(&lock);
    int rc = real_mkdirat(dirfd, path, mode);
    int saved = errno;
    if (rc == 0) log_line("mkdir", abs, NULL, NULL);
    pthread_mutex_unlock(&lock);
    errno = saved;
    return rc;
}

/* WHICH: 0 unlink(), 1 rmdir(), 2 unlinkat(). */
static int do_unlink(int dirfd, const char *path, int flags, int which) {
    REAL(unlinkat_fn, unlinkat);
    REAL(path_fn, unlink);
    REAL(path_fn, rmdir);
    char abs[PATH_BUF];
#define CALL_UNLINK() \
    (which == 0 ? real_unlink(path) : which == 1 ? real_rmdir(path) : real_unlinkat(dirfd, path, flags))
    if (!watched(dirfd, path, abs)) return CALL_UNLINK();
    pthread_mutex_lock(&lock);
    int rc = CALL_UNLINK();
    int saved = errno;
    if (rc == 0) log_line((flags & AT_REMOVEDIR) ? "rmdir" : "unlink", abs, NULL, NULL);
    pthread_mutex_unlock(&lock);
    errno = saved;
    return rc;
#undef CALL_UNLINK
}

int unlink(const char *path) { return do_unlink(AT_FDCWD, path, 0, 0); }
int rmdir(const char *path) { return do_unlink(AT_FDCWD, path, AT_REMOVEDIR, 1); }
int unlinkat(int dirfd, const char *path, int flags) { return do_unlink(dirfd, path, flags, 2); }

static int do_rename(int olddirfd, const char *old, int newdirfd, const char *new, unsigned int flags, int which) {
    REAL(rename_fn, rename);
    REAL(renameat_fn, renameat);
    REAL(renameat2_fn, renameat2);
    char src[PATH_BUF], dst[PATH_BUF];
    int watch_src = watched(olddirfd, old, src);
    int watch_dst = watched(newdirfd, new, dst);
#define CALL_RENAME() \
    (which == 0 ? real_rename(old, new) \
     : which == 1 ? real_renameat(olddirfd, old, newdirfd, new) \
     : real_renameat2(olddirfd, old, newdirfd, new, flags))
    if (!watch_src && !watch_dst) return CALL_RENAME();
    pthread_mutex_lock(&lock);
    int rc = CALL_RENAME();
    int saved = errno;
    if (rc == 0) {
        if (flags != 0) log_line("error", "renameat2 with flags (not modelled)", src, dst);
        else if (!watch_src || !watch_dst) log_line("error", "rename across the watched root", src, dst);
        else log_line("rename", src, dst, NULL);
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return rc;
#undef CALL_RENAME
}

int rename(const char *old, const char *new) { return do_rename(AT_FDCWD, old, AT_FDCWD, new, 0, 0); }
int renameat(int olddirfd, const char *old, int newdirfd, const char *new) {
    return do_rename(olddirfd, old, newdirfd, new, 0, 1);
}
int renameat2(int olddirfd, const char *old, int newdirfd, const char *new, unsigned int flags) {
    return do_rename(olddirfd, old, newdirfd, new, flags, 2);
}

/* WHICH: 0 link(), 1 linkat(). */
static int do_link(int olddirfd, const char *old, int newdirfd, const char *new, int flags, int which) {
    REAL(link_fn, link);
    REAL(linkat_fn, linkat);
    char src[PATH_BUF], dst[PATH_BUF];
    int watch_src = watched(olddirfd, old, src);
    int watch_dst = watched(newdirfd, new, dst);
#define CALL_LINK() (which == 0 ? real_link(old, new) : real_linkat(olddirfd, old, newdirfd, new, flags))
    if (!watch_src && !watch_dst) return CALL_LINK();
    pthread_mutex_lock(&lock);
    int rc = CALL_LINK();
    int saved = errno;
    if (rc == 0) {
        if (flags & ~AT_SYMLINK_FOLLOW) log_line("error", "linkat with flags (not modelled)", src, dst);
        else if (!watch_src || !watch_dst) log_line("error", "link across the watched root", src, dst);
        else log_line("link", src, dst, NULL);
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return rc;
#undef CALL_LINK
}

int link(const char *old, const char *new) { return do_link(AT_FDCWD, old, AT_FDCWD, new, 0, 0); }
int linkat(int olddirfd, const char *old, int newdirfd, const char *new, int flags) {
    return do_link(olddirfd, old, newdirfd, new, flags, 1);
}

/* --------------------------------------------------------------------------- fsync */

/* Copy the current content of regular file FD to a new snapshot file; its name in NAME. */
static int snapshot(int fd, char *name, size_t size) {
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    /* A new open file description: FD itself may be write-only. */
    int in = raw_open(proc, O_RDONLY | O_CLOEXEC, 0);
    if (in < 0) return 0;
    snprintf(name, size, "%lu", ++snap_seq);
    char out_path[PATH_BUF];
    snprintf(out_path, sizeof out_path, "%s/%s", snap_dir, name);
    int out = raw_open(out_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (out < 0) {
        close(in);
        return 0;
    }
    static char buf[1 << 16];
    off_t offset = 0;
    int ok = 1;
    for (;;) {
        ssize_t n = pread(in, buf, sizeof buf, offset);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            ok = 0;
            break;
        }
        if (n == 0) break;
        write_all(out, buf, (size_t)n);
        offset += n;
    }
    close(in);
    close(out);
    return ok;
}

static int do_sync(int fd, int data_only) {
    typedef int (*fd_fn)(int);
    REAL(fd_fn, fsync);
    REAL(fd_fn, fdatasync);
    char link[64], path[PATH_BUF];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = ready ? readlink(link, path, sizeof path - 1) : -1;
    if (n < 0) return data_only ? real_fdatasync(fd) : real_fsync(fd);
    path[n] = '\0';
    if (!under_root(path)) return data_only ? real_fdatasync(fd) : real_fsync(fd);
    pthread_mutex_lock(&lock);
    struct stat st;
    char name[64] = "";
    int have_stat = fstat(fd, &st) == 0;
    int copied = 0;
    /* Before the call: what was written before it began is what it makes durable. */
    if (have_stat && S_ISREG(st.st_mode)) copied = snapshot(fd, name, sizeof name);
    int rc = data_only ? real_fdatasync(fd) : real_fsync(fd);
    int saved = errno;
    if (rc == 0) {
        if (!have_stat) {
            log_line("error", "fstat before fsync failed", path, NULL);
        } else if (S_ISDIR(st.st_mode)) {
            log_line("fsyncdir", path, NULL, NULL);
        } else if (S_ISREG(st.st_mode)) {
            char id[64];
            snprintf(id, sizeof id, "%llu:%llu", (unsigned long long)st.st_dev, (unsigned long long)st.st_ino);
            if (copied) log_line("fsync", id, name, path);
            else log_line("error", "cannot copy the content of", path, NULL);
        }
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return rc;
}

int fsync(int fd) { return do_sync(fd, 0); }
int fdatasync(int fd) { return do_sync(fd, 1); }

/* ------------------------------------------------------------------------ markers */

void powercut_mark(const char *text) {
    if (!ready) return;
    pthread_mutex_lock(&lock);
    log_line("mark", text, NULL, NULL);
    pthread_mutex_unlock(&lock);
}

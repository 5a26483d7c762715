/* A disk that keeps only what was synced: LD_PRELOADed into the server's processes.

   POWERCUT_ROOT    the directory whose files are modelled (absolute, no symlinks)
   POWERCUT_SHADOW  where the durable state is recorded (outside the root)

   fsync and fdatasync of a descriptor under the root first record, in the
   shadow, what that call makes durable, then call the real function:

     f.<key>   a regular file: a full copy of its content
     d.<key>   a directory: its entries, one line each, "<kind> <key> <name>"
               (kind f, d or o for anything else)

   <key> is "<st_dev>-<st_ino>-<birth sec>.<birth nsec>": a file is known by
   its inode, whatever name it has (the store makes its directory under a
   temporary name and renames it), and the birth time tells a reused inode
   from the file that had it before. Each record is written to a temporary
   name unique to the process, thread and call, then renamed over the last
   one; records are taken under an flock of `<shadow>/lock`, so of two syncs
   of one file the later one copies later content and is renamed last. A line
   per record is appended to `<shadow>/log` ("<pid> <tid> <call> <path>").

   To cut at a chosen place, the test writes the end of a path to
   `<shadow>/freeze`: the next sync of such a path stops the whole process
   group (SIGSTOP) before it records anything, so the disk is as it was just
   before that sync (a checkpoint's sync of the store file, say).

   A file's content is read through the caller's own descriptor (pread never
   moves its offset), never through a new descriptor that would then be
   closed: closing any descriptor of a file drops every POSIX lock the
   process holds on it, and SQLite locks its files so. Only a descriptor
   opened write-only (the file sink's temporary file) is read through
   /proc/self/fd/N.

   Everything else that can make data durable is refused, loudly (a line on
   stderr, then abort()), for anything under the root: O_SYNC and O_DSYNC
   opens, sync_file_range, msync of a mapping of such a file, syncfs on its
   filesystem, and sync(). The model does not hold them, and a test that ran
   with them would claim what it did not check. */

#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

typedef int (*sync_fn)(int);

static atomic_ulong serial;

static void refuse(const char *what, const char *path)
{
    char line[PATH_MAX + 256];
    int n = snprintf(line, sizeof line, "powercut: %s on %s is not modelled: refused\n", what,
                     path);
    if (n > 0)
        (void)!write(2, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
    abort();
}

static void *real(const char *name)
{
    void *found = dlsym(RTLD_NEXT, name);
    if (found == NULL)
        refuse("a missing libc function", name);
    return found;
}

static const char *root(void)
{
    const char *found = getenv("POWERCUT_ROOT");
    return found != NULL && found[0] == '/' ? found : NULL;
}

static int under_root(const char *path)
{
    const char *top = root();
    if (top == NULL)
        return 0;
    size_t length = strlen(top);
    return strncmp(path, top, length) == 0 && (path[length] == '/' || path[length] == '\0');
}

/* The path of descriptor `fd` under the root into `path`, or 0 if it is not under it. */
static int fd_under_root(int fd, char *path, size_t size)
{
    if (root() == NULL)
        return 0;
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, size - 1);
    if (n < 0)
        return 0;
    path[n] = '\0';
    return under_root(path);
}

static void key_of(const struct statx *st, char *key, size_t size)
{
    long long sec = 0, nsec = 0;
    if (st->stx_mask & STATX_BTIME) {
        sec = st->stx_btime.tv_sec;
        nsec = st->stx_btime.tv_nsec;
    }
    snprintf(key, size, "%llu-%llu-%lld.%09lld",
             (unsigned long long)makedev(st->stx_dev_major, st->stx_dev_minor),
             (unsigned long long)st->stx_ino, sec, nsec);
}

static int stat_of(int dirfd, const char *name, int flags, struct statx *st)
{
    return statx(dirfd, name, flags | AT_SYMLINK_NOFOLLOW,
                 STATX_TYPE | STATX_INO | STATX_BTIME, st);
}

static void write_all(int fd, const char *data, size_t size, const char *what)
{
    while (size > 0) {
        ssize_t n = write(fd, data, size);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            refuse("a failed write of the shadow", what);
        data += n;
        size -= (size_t)n;
    }
}

static void copy_content(int fd, int into, const char *path)
{
    int source = fd;
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0 && (flags & O_ACCMODE) == O_WRONLY) {
        char link[64];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        source = open(link, O_RDONLY | O_CLOEXEC);
        if (source < 0)
            refuse("a file that cannot be read back", path);
    }
    /* From offset 0 to the end as it is now; the source's own offset is not moved. */
    loff_t offset = 0;
    for (;;) {
        ssize_t n = copy_file_range(source, &offset, into, NULL, 1 << 30, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            break; /* not between these files: by hand, from where it stopped */
        if (n == 0)
            goto done;
    }
    char chunk[1 << 16];
    for (;;) {
        ssize_t n = pread(source, chunk, sizeof chunk, offset);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            refuse("a file that cannot be read back", path);
        if (n == 0)
            break;
        write_all(into, chunk, (size_t)n, path);
        offset += n;
    }
done:
    if (source != fd)
        close(source);
}

static void list_entries(int fd, int into, const char *path)
{
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    int own = open(link, O_RDONLY | O_DIRECTORY | O_CLOEXEC); /* a directory holds no locks */
    DIR *dir = own < 0 ? NULL : fdopendir(own);
    if (dir == NULL)
        refuse("a directory that cannot be listed", path);
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        const char *name = entry->d_name;
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
            continue;
        if (strchr(name, '\n') != NULL)
            refuse("a name holding a newline", path);
        struct statx st;
        if (stat_of(dirfd(dir), name, 0, &st) != 0)
            continue; /* removed since readdir: not an entry any more */
        char key[128], line[NAME_MAX + 200];
        key_of(&st, key, sizeof key);
        char kind = S_ISREG(st.stx_mode) ? 'f' : S_ISDIR(st.stx_mode) ? 'd' : 'o';
        int n = snprintf(line, sizeof line, "%c %s %s\n", kind, key, name);
        write_all(into, line, (size_t)n, path);
    }
    closedir(dir);
}

/* Record what a sync of `fd` (at `path`) makes durable. */
static void record(int fd, const char *path, const char *call)
{
    const char *shadow = getenv("POWERCUT_SHADOW");
    if (shadow == NULL)
        refuse("a sync without POWERCUT_SHADOW", path);
    struct statx st;
    if (stat_of(fd, "", AT_EMPTY_PATH, &st) != 0)
        refuse("a descriptor that cannot be stat'ed", path);
    if (!S_ISREG(st.stx_mode) && !S_ISDIR(st.stx_mode))
        refuse("a sync of something neither a file nor a directory", path);
    char key[128], lock[PATH_MAX], temporary[PATH_MAX], final[PATH_MAX];
    key_of(&st, key, sizeof key);
    char kind = S_ISREG(st.stx_mode) ? 'f' : 'd';
    snprintf(lock, sizeof lock, "%s/lock", shadow);
    snprintf(temporary, sizeof temporary, "%s/.%c.%s.%d.%ld.%lu", shadow, kind, key, getpid(),
             (long)syscall(SYS_gettid), atomic_fetch_add(&serial, 1));
    snprintf(final, sizeof final, "%s/%c.%s", shadow, kind, key);
    /* A descriptor of its own per call: flock excludes other descriptions,
       so other threads of this process as well as other processes. */
    int held = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (held < 0 || flock(held, LOCK_EX) != 0)
        refuse("the shadow's lock", lock);
    int into = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (into < 0)
        refuse("a shadow file that cannot be made", temporary);
    if (kind == 'f')
        copy_content(fd, into, path);
    else
        list_entries(fd, into, path);
    if (close(into) != 0 || rename(temporary, final) != 0)
        refuse("a shadow file that cannot be put in place", final);
    char logged[PATH_MAX], line[PATH_MAX + 100];
    snprintf(logged, sizeof logged, "%s/log", shadow);
    int log = open(logged, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (log >= 0) {
        int n = snprintf(line, sizeof line, "%d %ld %s %s\n", getpid(),
                         (long)syscall(SYS_gettid), call, path);
        write_all(log, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1, logged);
        close(log);
    }
    close(held); /* releases the flock */
}

/* Whether the test asked to stop the processes at this sync, before it records
   anything: `<shadow>/freeze` holds the end of the path to stop at. The first
   sync of such a path takes the request (renames it to freeze.taken). */
static int freeze_requested(const char *path)
{
    const char *shadow = getenv("POWERCUT_SHADOW");
    char request[PATH_MAX], taken[PATH_MAX], suffix[256];
    snprintf(request, sizeof request, "%s/freeze", shadow != NULL ? shadow : "");
    int fd = open(request, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, suffix, sizeof suffix - 1);
    close(fd);
    if (n <= 0)
        return 0;
    suffix[n] = '\0';
    size_t length = strlen(path), wanted = strlen(suffix);
    if (wanted > length || strcmp(path + length - wanted, suffix) != 0)
        return 0;
    snprintf(taken, sizeof taken, "%s/freeze.taken", shadow);
    return rename(request, taken) == 0;
}

static int synced(int fd, const char *call)
{
    static sync_fn real_fsync, real_fdatasync;
    sync_fn call_real;
    if (strcmp(call, "fsync") == 0) {
        if (real_fsync == NULL)
            real_fsync = (sync_fn)real("fsync");
        call_real = real_fsync;
    } else {
        if (real_fdatasync == NULL)
            real_fdatasync = (sync_fn)real("fdatasync");
        call_real = real_fdatasync;
    }
    char path[PATH_MAX];
    if (fd_under_root(fd, path, sizeof path)) {
        int saved = errno;
        if (freeze_requested(path))
            kill(0, SIGSTOP); /* the whole process group, this thread included */
        record(fd, path, call);
        errno = saved;
    }
    return call_real(fd);
}

int fsync(int fd) { return synced(fd, "fsync"); }

int fdatasync(int fd) { return synced(fd, "fdatasync"); }

/* -- refused: what else could make data durable ---------------------------------------- */

static int opened(int fd, int flags)
{
    char path[PATH_MAX];
    if (fd >= 0 && (flags & O_DSYNC) && fd_under_root(fd, path, sizeof path))
        refuse((flags & O_SYNC) == O_SYNC ? "an O_SYNC open" : "an O_DSYNC open", path);
    return fd;
}

static mode_t mode_of(int flags, va_list arguments)
{
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? va_arg(arguments, mode_t)
                                                                 : 0;
}

int open(const char *path, int flags, ...)
{
    static int (*next)(const char *, int, ...);
    if (next == NULL)
        next = real("open");
    va_list arguments;
    va_start(arguments, flags);
    mode_t mode = mode_of(flags, arguments);
    va_end(arguments);
    return opened(next(path, flags, mode), flags);
}

int open64(const char *path, int flags, ...)
{
    static int (*next)(const char *, int, ...);
    if (next == NULL)
        next = real("open64");
    va_list arguments;
    va_start(arguments, flags);
    mode_t mode = mode_of(flags, arguments);
    va_end(arguments);
    return opened(next(path, flags, mode), flags);
}

int openat(int dirfd, const char *path, int flags, ...)
{
    static int (*next)(int, const char *, int, ...);
    if (next == NULL)
        next = real("openat");
    va_list arguments;
    va_start(arguments, flags);
    mode_t mode = mode_of(flags, arguments);
    va_end(arguments);
    return opened(next(dirfd, path, flags, mode), flags);
}

int openat64(int dirfd, const char *path, int flags, ...)
{
    static int (*next)(int, const char *, int, ...);
    if (next == NULL)
        next = real("openat64");
    va_list arguments;
    va_start(arguments, flags);
    mode_t mode = mode_of(flags, arguments);
    va_end(arguments);
    return opened(next(dirfd, path, flags, mode), flags);
}

int sync_file_range(int fd, off64_t offset, off64_t bytes, unsigned int flags)
{
    static int (*next)(int, off64_t, off64_t, unsigned int);
    if (next == NULL)
        next = real("sync_file_range");
    char path[PATH_MAX];
    if (fd_under_root(fd, path, sizeof path))
        refuse("sync_file_range", path);
    return next(fd, offset, bytes, flags);
}

int syncfs(int fd)
{
    static int (*next)(int);
    if (next == NULL)
        next = real("syncfs");
    struct stat on, top;
    const char *where = root();
    if (where != NULL && fstat(fd, &on) == 0 && stat(where, &top) == 0 && on.st_dev == top.st_dev)
        refuse("syncfs", where);
    return next(fd);
}

void sync(void)
{
    const char *where = root();
    if (where != NULL)
        refuse("sync", where);
    ((void (*)(void))real("sync"))();
}

int msync(void *address, size_t length, int flags)
{
    static int (*next)(void *, size_t, int);
    if (next == NULL)
        next = real("msync");
    FILE *maps = fopen("/proc/self/maps", "re");
    char line[PATH_MAX + 200];
    unsigned long at = (unsigned long)address;
    while (maps != NULL && fgets(line, sizeof line, maps) != NULL) {
        unsigned long start, end;
        int skip = 0;
        if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %n", &start, &end, &skip) < 2 || skip == 0)
            continue;
        char *path = line + skip;
        path[strcspn(path, "\n")] = '\0';
        if (at < end && at + length > start && under_root(path))
            refuse("msync", path);
    }
    if (maps != NULL)
        fclose(maps);
    return next(address, length, flags);
}

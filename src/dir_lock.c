#include "regfacade/dir_lock.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

int dir_lock_take(const char *dir, const char *what, char *err, size_t errlen) {
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s/lock", dir);
    int fd = open(p, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(err, errlen, "%s: open %s: %s", what, p, strerror(errno));
        return -1;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        char buf[32] = {0};
        ssize_t n = e == EWOULDBLOCK ? pread(fd, buf, sizeof buf - 1, 0) : -1;
        long pid = n > 0 ? strtol(buf, NULL, 10) : 0;
        if (e != EWOULDBLOCK)
            snprintf(err, errlen, "%s: flock %s: %s", what, p, strerror(e));
        else if (pid > 0)
            snprintf(err, errlen,
                     "%s %s is in use by another regfacade (PID %ld holds %s); "
                     "each process needs a folder of its own",
                     what, dir, pid, p);
        else
            snprintf(err, errlen,
                     "%s %s is in use by another regfacade (it holds %s and is writing its PID "
                     "there); each process needs a folder of its own",
                     what, dir, p);
        close(fd);
        return -1;
    }
    char pid[32];
    int n = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) != 0 || pwrite(fd, pid, (size_t)n, 0) != (ssize_t)n) {
        snprintf(err, errlen, "%s: writing the PID into %s: %s", what, p, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

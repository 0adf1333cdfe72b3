#include "regfacade/hardening.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <netinet/in.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "regfacade/log.h"

int hardening_listen(const char *host, int port, int backlog, int *fd_out, char *err, size_t errlen) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        snprintf(err, errlen, "listen: \"%s\" is not an IPv4 address", host);
        return -1;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "listen %s:%d: socket: %s", host, port, strerror(errno));
        return -1;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        snprintf(err, errlen, "listen %s:%d: cannot bind: %s%s", host, port, strerror(errno),
                 errno == EADDRINUSE ? " (port in use?)"
                 : errno == EACCES   ? " (a port below 1024 needs root)"
                                     : "");
        close(fd);
        return -1;
    }
    if (listen(fd, backlog) != 0) {
        snprintf(err, errlen, "listen %s:%d: listen: %s", host, port, strerror(errno));
        close(fd);
        return -1;
    }
    *fd_out = fd;
    return 0;
}

static int parse_id(const char *s, size_t n, unsigned long *out) {
    if (n == 0 || n > 10) return -1;
    unsigned long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (unsigned long)(s[i] - '0');
    }
    if (v > 0xfffffffeUL) return -1;
    *out = v;
    return 0;
}

int hardening_user_lookup(const char *spec, uid_t *uid, gid_t *gid, char *err, size_t errlen) {
    const char *colon = strchr(spec, ':');
    unsigned long u, g;
    if (colon) {
        if (parse_id(spec, (size_t)(colon - spec), &u) != 0 || parse_id(colon + 1, strlen(colon + 1), &g) != 0) {
            snprintf(err, errlen, "user: \"%s\" must be a user name, a uid, or uid:gid", spec);
            return -1;
        }
        *uid = (uid_t)u;
        *gid = (gid_t)g;
        return 0;
    }
    struct passwd pw, *res = NULL;
    char buf[4096];
    int rc;
    if (parse_id(spec, strlen(spec), &u) == 0)
        rc = getpwuid_r((uid_t)u, &pw, buf, sizeof buf, &res);
    else
        rc = getpwnam_r(spec, &pw, buf, sizeof buf, &res);
    if (rc != 0 || !res) {
        snprintf(err, errlen, "user: no user \"%s\" in the passwd database%s", spec,
                 parse_id(spec, strlen(spec), &u) == 0 ? " (give \"uid:gid\" for an id without an entry)" : "");
        return -1;
    }
    *uid = pw.pw_uid;
    *gid = pw.pw_gid;
    return 0;
}

static uid_t walk_uid;
static gid_t walk_gid;
static int walk_errno;
static char walk_path[4096];

static int walk_chown(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)flag;
    (void)ftw;
    if (st->st_uid == walk_uid && st->st_gid == walk_gid) return 0;
    if (lchown(path, walk_uid, walk_gid) != 0) {
        walk_errno = errno;
        snprintf(walk_path, sizeof walk_path, "%s", path);
        return 1;
    }
    return 0;
}

int hardening_prepare_dir(const char *dir, uid_t uid, gid_t gid, char *err, size_t errlen) {
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        snprintf(err, errlen, "cache.dir: cannot create %s: %s", dir, strerror(errno));
        return -1;
    }
    struct stat st;
    if (lstat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "cache.dir: %s is not a folder (a symlink is not followed)", dir);
        return -1;
    }
    walk_uid = uid;
    walk_gid = gid;
    walk_errno = 0;
    /* FTW_PHYS: symlinks are chowned themselves (lchown), never followed;
     * FTW_MOUNT: stay on the cache's file system. */
    int rc = nftw(dir, walk_chown, 32, FTW_PHYS | FTW_MOUNT);
    if (rc != 0) {
        snprintf(err, errlen, "cache.dir: cannot hand %s to uid %u: %s", rc == 1 ? walk_path : dir, (unsigned)uid,
                 strerror(rc == 1 ? walk_errno : errno));
        return -1;
    }
    if (chmod(dir, 0700) != 0) {
        snprintf(err, errlen, "cache.dir: chmod 0700 %s: %s", dir, strerror(errno));
        return -1;
    }
    return 0;
}

int hardening_drop_privileges(const char *spec, uid_t uid, gid_t gid, char *err, size_t errlen) {
    if (geteuid() != 0) {
        if (getuid() == uid && geteuid() == uid) return 0;
        snprintf(err, errlen, "user: cannot switch to \"%s\": only root can (running as uid %u)", spec,
                 (unsigned)geteuid());
        return -1;
    }
    if (setgroups(1, &gid) != 0 || setgid(gid) != 0 || setuid(uid) != 0) {
        snprintf(err, errlen, "user: cannot switch to \"%s\" (uid %u, gid %u): %s", spec, (unsigned)uid, (unsigned)gid,
                 strerror(errno));
        return -1;
    }
    if (uid != 0 && (setuid(0) == 0 || seteuid(0) == 0)) {
        snprintf(err, errlen, "user: switched to \"%s\" but root could be regained; refusing to run", spec);
        return -1;
    }
    if (getuid() != uid || geteuid() != uid || getgid() != gid || getegid() != gid) {
        snprintf(err, errlen, "user: switch to \"%s\" did not take", spec);
        return -1;
    }
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    return 0;
}

uint64_t hardening_raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) {
        log_warn("cannot read the open-files limit (RLIMIT_NOFILE): %s", strerror(errno));
        return 0;
    }
    uint64_t was = rl.rlim_cur == RLIM_INFINITY ? UINT64_MAX : (uint64_t)rl.rlim_cur;
    if (rl.rlim_cur >= rl.rlim_max) {
        log_info("open-files limit: %llu (already the hard limit)", (unsigned long long)was);
        return was;
    }
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
        log_warn("cannot raise the open-files limit from %llu to the hard limit %llu: %s", (unsigned long long)was,
                 (unsigned long long)rl.rlim_max, strerror(errno));
        return was;
    }
    uint64_t now = rl.rlim_cur == RLIM_INFINITY ? UINT64_MAX : (uint64_t)rl.rlim_cur;
    log_info("open-files limit raised from %llu to the hard limit %llu", (unsigned long long)was,
             (unsigned long long)now);
    return now;
}

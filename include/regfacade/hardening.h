/*
 * hardening: process-level protections for serve.
 *
 * Startup order (server_start): bind the listening socket (a low port may
 * need root), hand the cache folder to the configured user, drop to that
 * user (setgroups, setgid, setuid, no_new_privs), and only then open the
 * store, the upstream clients and the policy. The TLS key and upstream
 * passwords were read earlier, at config load.
 */
#ifndef REGFACADE_HARDENING_H
#define REGFACADE_HARDENING_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* A listening TCP socket on an IPv4 address (SO_REUSEADDR, CLOEXEC).
 * 0 with *fd set, -1 with err. */
int hardening_listen(const char *host, int port, int backlog, int *fd, char *err, size_t errlen);

/* "name", "uid" or "uid:gid". A bare uid must exist in the passwd
 * database (its group is taken from there); "uid:gid" need not. */
int hardening_user_lookup(const char *spec, uid_t *uid, gid_t *gid, char *err, size_t errlen);

/* Create dir (0700) if missing, refuse a symlink or a non-folder, and hand
 * dir and everything under it (without following symlinks) to uid:gid.
 * Only meaningful as root. */
int hardening_prepare_dir(const char *dir, uid_t uid, gid_t gid, char *err, size_t errlen);

/* Become uid:gid for good. Not root: fine when already uid, an error
 * otherwise. Verifies that root cannot be regained. */
int hardening_drop_privileges(const char *spec, uid_t uid, gid_t gid, char *err, size_t errlen);

/* Raise the soft open-files limit to the hard limit (every connection
 * holds a socket) and log what it is now. Returns the soft limit in force
 * (UINT64_MAX: unlimited; 0: unknown). */
uint64_t hardening_raise_nofile(void);

#endif

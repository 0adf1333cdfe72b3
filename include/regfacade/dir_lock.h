/*
 * dir_lock: one process per folder. An exclusive flock on DIR/lock, held
 * while the folder is in use (the kernel drops it when the process ends,
 * however it ends); the file holds the holder's PID so that a second
 * process, refused, can name it. The cache (store.c) and blobserve's
 * extraction cache both take one: a second process on either would clear
 * tmp/ under the first one's work and delete what it serves.
 */
#ifndef REGFACADE_DIR_LOCK_H
#define REGFACADE_DIR_LOCK_H

#include <stddef.h>

/* Take DIR/lock (DIR must exist). what names the folder in messages
 * ("cache.dir", "blobserve.cache.dir"). The locked fd (close it to release)
 * or -1 with err: "cache.dir DIR is in use by another regfacade (PID N
 * holds DIR/lock); ...". */
int dir_lock_take(const char *dir, const char *what, char *err, size_t errlen);

#endif

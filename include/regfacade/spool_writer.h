/*
 * spool_writer: moves a blob's body from the thread that receives it
 * (libcurl's write callback, 16 KiB at a time) to its spool file in
 * 256 KiB chunks. Two threads work on each chunk: one writes it to the
 * spool and then tells readers, the other feeds it to the sha256.
 *
 * Why: one pwrite, one sha256 update and one reader wakeup per 16 KiB
 * cost more than the copies themselves (bench/findings.md); and with
 * writing and hashing on threads of their own, receiving the next chunk,
 * writing and hashing run in parallel on a machine with cores to spare
 * (the stage that bounds a cold pull is then the hash, not their sum).
 * Bytes wait in the producer's buffer at most
 * SPOOL_WRITER_MAX_DELAY_MS (or until the next put/tick), so a slow
 * upstream's trickle still reaches readers promptly.
 *
 * The writer also starts the disk writeback of what it wrote every few
 * MiB (sync_file_range), so that the fsync of the commit has little left
 * to wait for.
 */
#ifndef REGFACADE_SPOOL_WRITER_H
#define REGFACADE_SPOOL_WRITER_H

#include <stddef.h>
#include <stdint.h>

#include "regfacade/digest.h"

#define SPOOL_WRITER_CHUNK (256 * 1024)
#define SPOOL_WRITER_MAX_DELAY_MS 5

typedef struct spool_writer spool_writer;

/* Called on the writer thread after bytes up to offset `end` are in the
 * spool (and in the digest). */
typedef void (*spool_writer_written_fn)(void *ud, uint64_t end);

/* Writes to fd from offset `start`, feeding dg. NULL on failure (err set). */
spool_writer *spool_writer_new(int fd, uint64_t start, digest_ctx *dg, spool_writer_written_fn on_written, void *ud,
                               char *err, size_t errlen);

/* Queues len bytes; blocks while both buffers are busy. -1 once a write
 * has failed (spool_writer_error says why); nothing more is written then. */
int spool_writer_put(spool_writer *w, const char *data, size_t len);

/* Hands over bytes that have waited longer than SPOOL_WRITER_MAX_DELAY_MS;
 * call it when no data arrives for a while (a stalled upstream). */
int spool_writer_tick(spool_writer *w);

/* Writes everything queued and waits until it is in the spool and the
 * digest. 0 on success, -1 after a write failure. */
int spool_writer_flush(spool_writer *w);

/* Bytes queued so far, written or not: where the next put goes. */
uint64_t spool_writer_end(const spool_writer *w);

/* The reason of the first failure, "" when none. */
const char *spool_writer_error(spool_writer *w);

/* Stops the thread; what is still queued is dropped (flush first to keep it). */
void spool_writer_free(spool_writer *w);

#endif

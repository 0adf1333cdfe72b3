/* specs: image specs from outside (see include/regfacade/specs.h and
 * docs/specs.md): the "specs" config section, the spec format check, the
 * pushed and fixed providers, the scratch base, and the glue run_resolve
 * uses. The pulled provider is spec_pulled.c; the admin API admin.c. */
#include "regfacade/specs.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "regfacade/admin.h"
#include "regfacade/clock.h"
#include "regfacade/cluster.h"
#include "regfacade/layers.h"
#include "regfacade/log.h"
#include "regfacade/metrics.h"
#include "regfacade/ref.h"
#include "regfacade/spec_pulled.h"

#define DEFAULT_FIXED_CHECK_MS 1000
#define FIXED_FILE_MAX_BYTES (64 * 1024 * 1024)
#define DEFAULT_MAX_SPECS 10000
#define DEFAULT_TTL_S 30

typedef enum { PROV_PULLED, PROV_PUSHED, PROV_FIXED } prov_type;

/* One pushed spec: its stored text and its tree. */
typedef struct {
    char *id;
    char *text;
    size_t len;
    json_value *tree;
} pushed_spec;

typedef struct {
    char *name;
    prov_type type;
    spec_pulled *pulled;
    /* fixed */
    char *file;
    long check_ms;
    json_value *map; /* id -> spec, every one checked */
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime;
    int64_t last_check_ms;
    bool bad_logged; /* a broken version of the file was reported */
    /* pushed */
    size_t max_specs;
} provider;

struct specs {
    const config *cfg;         /* the running configuration (specs_set_config on reload), under cfg_lock */
    pthread_rwlock_t cfg_lock; /* read while a spec is checked against cfg: a reload frees the old one */
    provider *provs;
    size_t n;
    size_t max_bytes;
    int max_depth;
    char **roots; /* specs.file_roots, resolved with realpath */
    size_t n_roots;
    pthread_mutex_t mu; /* fixed maps, pushed specs */
    provider *pushed;   /* the pushed provider, or NULL */
    pushed_spec *specs;
    size_t n_specs, cap_specs;
    char *push_dir;
    store *st;
    admin_config *admin_cfg;
    admin_server *admin;
    bool collecting; /* specs_collect is registered with metrics */
};

bool specs_valid_id(const char *id) {
    if (!id) return false;
    size_t n = strlen(id);
    if (n == 0 || n > SPECS_ID_MAX) return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)id[i];
        bool alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
        if (!alnum && (i == 0 || (c != '.' && c != '_' && c != '-'))) return false;
    }
    return true;
}

/* ---------- the scratch base ---------- */

/* Fixed bytes: their digests are part of the Lua library
 * (regfacade.specs.SCRATCH) and must never change. */
static const struct {
    const char *platform;
    const char *config;
} scratch_configs[] = {
    {"linux/amd64", "{\"created\":\"1970-01-01T00:00:00Z\",\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{},"
                    "\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]},\"history\":[]}"},
    {"linux/arm64", "{\"created\":\"1970-01-01T00:00:00Z\",\"architecture\":\"arm64\",\"os\":\"linux\",\"config\":{},"
                    "\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]},\"history\":[]}"},
};
#define N_SCRATCH (sizeof scratch_configs / sizeof *scratch_configs)

static struct {
    char manifest[512];
    char config_digest[DIGEST_STRING_LEN];
    char digest[DIGEST_STRING_LEN];
} scratch[N_SCRATCH];
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_init(void) {
    for (size_t i = 0; i < N_SCRATCH; i++) {
        const char *cfg = scratch_configs[i].config;
        char cd[DIGEST_STRING_LEN];
        digest_bytes(cfg, strlen(cfg), cd);
        memcpy(scratch[i].config_digest, cd, sizeof cd);
        snprintf(scratch[i].manifest, sizeof scratch[i].manifest,
                 "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{"
                 "\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"%s\",\"size\":%zu},"
                 "\"layers\":[]}",
                 cd, strlen(cfg));
        digest_bytes(scratch[i].manifest, strlen(scratch[i].manifest), scratch[i].digest);
    }
}

static int scratch_index(const char *platform) {
    for (size_t i = 0; platform && i < N_SCRATCH; i++)
        if (strcmp(scratch_configs[i].platform, platform) == 0) return (int)i;
    return -1;
}

const char *specs_scratch_digest(const char *platform) {
    pthread_once(&scratch_once, scratch_init);
    int i = scratch_index(platform);
    return i < 0 ? NULL : scratch[i].digest;
}

int specs_scratch_image(const char *platform, const char **manifest, const char **cfg) {
    pthread_once(&scratch_once, scratch_init);
    int i = scratch_index(platform);
    if (i < 0) return -1;
    *manifest = scratch[i].manifest;
    *cfg = scratch_configs[i].config;
    return 0;
}

/* Put the scratch images into the store unless they are there (they can be
 * evicted like any blob). */
static void scratch_store(store *st, int only) {
    pthread_once(&scratch_once, scratch_init);
    for (size_t i = 0; i < N_SCRATCH; i++) {
        if (only >= 0 && (size_t)only != i) continue;
        char err[512];
        const char *cfg = scratch_configs[i].config;
        if (!store_blob_exists(st, scratch[i].config_digest) &&
            store_put(st, scratch[i].config_digest, cfg, strlen(cfg), err, sizeof err) != 0)
            log_error("specs: storing the scratch config: %s", err);
        if (!store_blob_exists(st, scratch[i].digest) &&
            store_put(st, scratch[i].digest, scratch[i].manifest, strlen(scratch[i].manifest), err, sizeof err) != 0)
            log_error("specs: storing the scratch manifest: %s", err);
        /* regfacade's own bytes, in no upstream: every name may be served them. */
        store_scope everyone;
        store_scope_everyone(&everyone);
        if (store_link_put(st, &everyone, scratch[i].config_digest, NULL, NULL, err, sizeof err) != 0 ||
            store_link_put(st, &everyone, scratch[i].digest, NULL, NULL, err, sizeof err) != 0)
            log_error("specs: linking the scratch image: %s", err);
    }
}

/* ---------- the spec format ---------- */

typedef struct {
    char *err;
    size_t errlen;
} vctx;

static int bad(vctx *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int bad(vctx *v, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(v->err, v->errlen, fmt, ap);
    va_end(ap);
    return -1;
}

static bool plain_string(const json_value *v) { return v && v->type == JSON_STRING && strlen(v->str) == v->len; }

/* "a, b, c" of the configured upstreams. */
static void upstream_list(const config *c, char *out, size_t outlen) {
    size_t o = 0;
    out[0] = '\0';
    for (size_t i = 0; i < c->n_upstreams && o < outlen; i++)
        o += (size_t)snprintf(out + o, outlen - o, "%s%s", i ? ", " : "", c->upstreams[i].name);
    if (!c->n_upstreams) snprintf(out, outlen, "none");
}

/* "UPSTREAM/REPOSITORY[:TAG|@sha256:HEX]" with a configured UPSTREAM. */
static int check_image_ref(const config *c, const char *where, const char *ref, vctx *v) {
    char buf[600];
    if (strlen(ref) >= sizeof buf) return bad(v, "%s: \"%.64s...\" is too long", where, ref);
    snprintf(buf, sizeof buf, "%s", ref);
    char *slash = strchr(buf, '/');
    if (!slash)
        return bad(v, "%s: \"%s\" must be UPSTREAM/REPOSITORY[:TAG|@sha256:HEX], UPSTREAM a configured upstream", where,
                   ref);
    *slash = '\0';
    if (!config_find_upstream(c, buf)) {
        char list[512];
        upstream_list(c, list, sizeof list);
        return bad(v, "%s: \"%s\": \"%s\" is not a configured upstream (configured: %s)", where, ref, buf, list);
    }
    char *name = slash + 1, *reference = NULL;
    char *at = strchr(name, '@');
    if (at) {
        *at = '\0';
        reference = at + 1;
        if (!ref_is_sha256_digest(reference))
            return bad(v, "%s: \"%s\": \"%s\" is not a sha256 digest", where, ref, reference);
    } else {
        char *colon = strrchr(name, ':');
        if (colon) {
            *colon = '\0';
            reference = colon + 1;
            if (!ref_valid_tag(reference))
                return bad(v, "%s: \"%s\": \"%s\" is not a valid tag", where, ref, reference);
        }
    }
    if (!ref_valid_name(name)) return bad(v, "%s: \"%s\": \"%s\" is not a valid repository name", where, ref, name);
    return 0;
}

/* A file layer must be an existing regular file under one of file_roots. */
static int check_file(const specs *sp, const char *where, const char *path, vctx *v) {
    if (path[0] != '/') return bad(v, "%s.file: \"%s\" must be an absolute path", where, path);
    if (sp->n_roots == 0)
        return bad(v,
                   "%s.file: file layers in specs are refused unless specs.file_roots names the folders they may "
                   "come from (none is configured)",
                   where);
    char real[PATH_MAX];
    if (!realpath(path, real)) return bad(v, "%s.file: \"%s\": %s", where, path, strerror(errno));
    bool inside = false;
    for (size_t i = 0; i < sp->n_roots && !inside; i++) {
        size_t n = strlen(sp->roots[i]);
        inside = strncmp(real, sp->roots[i], n) == 0 && (real[n] == '/' || (n == 1 && sp->roots[i][0] == '/'));
    }
    if (!inside) return bad(v, "%s.file: \"%s\" is not under any of specs.file_roots", where, path);
    struct stat st;
    if (stat(real, &st) != 0 || !S_ISREG(st.st_mode))
        return bad(v, "%s.file: \"%s\" is not a regular file", where, path);
    return 0;
}

void specs_set_config(specs *sp, const config *c) {
    if (!sp) return;
    /* Once this returns, no check uses the old configuration. */
    pthread_rwlock_wrlock(&sp->cfg_lock);
    sp->cfg = c;
    pthread_rwlock_unlock(&sp->cfg_lock);
}

/* One entry of "layers". */
static int check_layer(const specs *sp, const config *c, const json_value *l, size_t i, bool has_base, int *bases,
                       vctx *v) {
    char where[64];
    snprintf(where, sizeof where, "layers[%zu]", i);
    if (l->type == JSON_STRING) {
        if (!plain_string(l) || l->len == 0) return bad(v, "%s: an empty layer name", where);
        if (strcmp(l->str, "base") == 0) {
            if (!has_base) return bad(v, "%s: \"base\" needs a base image, and this spec's base is null", where);
            if (++*bases > 1) return bad(v, "%s: \"base\" may appear once", where);
            return 0;
        }
        if (!json_object_get(c->layers, l->str)) {
            char list[512] = "";
            size_t o = 0;
            for (size_t k = 0; c->layers && k < c->layers->count && o < sizeof list; k++)
                o += (size_t)snprintf(list + o, sizeof list - o, "%s%s", k ? ", " : "", c->layers->keys[k]);
            return bad(v, "%s: \"%s\" is not a layer in the config's layers (defined: %s)", where, l->str,
                       o ? list : "none");
        }
        return 0;
    }
    if (l->type != JSON_OBJECT)
        return bad(v, "%s: a layer is \"base\", a name, or an object with file, image or blob", where);
    layer_spec ls;
    char err[600] = "";
    if (layer_spec_parse(l, NULL, where, &ls, err, sizeof err) != 0) return bad(v, "%s", err);
    int rc = 0;
    switch (ls.kind) {
        case LAYER_FILE:
            rc = check_file(sp, where, ls.file, v);
            break;
        case LAYER_IMAGE: {
            char w[80];
            snprintf(w, sizeof w, "%s.image", where);
            rc = check_image_ref(c, w, ls.image, v);
            break;
        }
        case LAYER_BLOB:
            if (ls.upstream && !config_find_upstream(c, ls.upstream)) {
                char list[512];
                upstream_list(c, list, sizeof list);
                rc = bad(v, "%s.upstream: \"%s\" is not a configured upstream (configured: %s)", where, ls.upstream,
                         list);
            } else if (!ls.upstream && !has_base) {
                rc = bad(v, "%s.upstream: a blob layer in a spec without base must name the upstream it comes from",
                         where);
            }
            break;
        default:
            break;
    }
    layer_spec_clear(&ls);
    return rc;
}

/* "env": NAME -> "value" | null | {"prepend": s} | {"append": s}. */
static int check_env(const json_value *env, vctx *v) {
    if (env->type != JSON_OBJECT) return bad(v, "env: must be an object of NAME: value");
    for (size_t i = 0; i < env->count; i++) {
        const char *k = env->keys[i];
        if (env->key_lens[i] == 0 || strlen(k) != env->key_lens[i] || strchr(k, '='))
            return bad(v, "env: \"%s\" is not a variable name (non-empty, no '=')", k);
        const json_value *x = env->items[i];
        if (x->type == JSON_NULL || plain_string(x)) continue;
        if (x->type == JSON_OBJECT && x->count == 1 &&
            (strcmp(x->keys[0], "prepend") == 0 || strcmp(x->keys[0], "append") == 0) && plain_string(x->items[0]))
            continue;
        return bad(v, "env.%s: must be a string (set), null (unset), {\"prepend\": string} or {\"append\": string}", k);
    }
    return 0;
}

/* "labels", "annotations": KEY -> "value" | null. */
static int check_string_map(const json_value *m, const char *what, vctx *v) {
    if (m->type != JSON_OBJECT) return bad(v, "%s: must be an object of KEY: string", what);
    for (size_t i = 0; i < m->count; i++) {
        if (m->key_lens[i] == 0 || strlen(m->keys[i]) != m->key_lens[i])
            return bad(v, "%s: keys must be non-empty strings", what);
        const json_value *x = m->items[i];
        if (x->type != JSON_NULL && !plain_string(x))
            return bad(v, "%s.%s: must be a string (set) or null (remove)", what, m->keys[i]);
    }
    return 0;
}

static int validate(const specs *sp, const config *c, const json_value *spec, char *err, size_t errlen) {
    vctx v = {err, errlen};
    if (!spec || spec->type != JSON_OBJECT) return bad(&v, "a spec must be a JSON object");
    for (size_t i = 0; i < spec->count; i++)
        for (size_t k = 0; k < i; k++)
            if (strcmp(spec->keys[i], spec->keys[k]) == 0) return bad(&v, "%s: given twice", spec->keys[i]);
    const json_value *base = json_object_get(spec, "base");
    bool has_base = base && base->type != JSON_NULL;
    if (has_base) {
        if (!plain_string(base)) return bad(&v, "base: must be \"UPSTREAM/REPOSITORY[:TAG|@sha256:HEX]\" or null");
        if (check_image_ref(c, "base", base->str, &v) != 0) return -1;
    }
    const json_value *platform = json_object_get(spec, "platform");
    if (platform) {
        if (has_base) return bad(&v, "platform: only for a spec without base (it picks the empty base's platform)");
        if (!plain_string(platform) || !specs_scratch_digest(platform->str))
            return bad(&v, "platform: must be \"linux/amd64\" or \"linux/arm64\"");
    }
    const json_value *layers = json_object_get(spec, "layers");
    if (layers) {
        if (layers->type != JSON_ARRAY) return bad(&v, "layers: must be an array of layers");
        if (layers->count > SPECS_MAX_LAYERS) return bad(&v, "layers: more than %d entries", SPECS_MAX_LAYERS);
        int bases = 0;
        for (size_t i = 0; i < layers->count; i++)
            if (check_layer(sp, c, layers->items[i], i, has_base, &bases, &v) != 0) return -1;
    }
    if (!has_base && (!layers || layers->count == 0)) return bad(&v, "a spec without base needs at least one layer");
    const json_value *x;
    if ((x = json_object_get(spec, "env")) && check_env(x, &v) != 0) return -1;
    if ((x = json_object_get(spec, "labels")) && check_string_map(x, "labels", &v) != 0) return -1;
    if ((x = json_object_get(spec, "annotations")) && check_string_map(x, "annotations", &v) != 0) return -1;
    return 0;
}

int specs_validate(const specs *sp, const json_value *spec, char *err, size_t errlen) {
    pthread_rwlock_t *lock = (pthread_rwlock_t *)&sp->cfg_lock;
    pthread_rwlock_rdlock(lock);
    int rc = validate(sp, sp->cfg, spec, err, errlen);
    pthread_rwlock_unlock(lock);
    return rc;
}

json_value *specs_parse(const specs *sp, const char *text, size_t len, char *err, size_t errlen) {
    if (len > sp->max_bytes) {
        snprintf(err, errlen, "the spec is %zu bytes, more than specs.max_bytes (%zu)", len, sp->max_bytes);
        return NULL;
    }
    char jerr[256];
    json_value *v = json_parse(text, len, sp->max_depth, jerr, sizeof jerr);
    if (!v) {
        snprintf(err, errlen, "invalid JSON: %s%s", jerr, strstr(jerr, "nesting") ? " (specs.max_depth)" : "");
        return NULL;
    }
    if (specs_validate(sp, v, err, errlen) != 0) {
        json_free(v);
        return NULL;
    }
    return v;
}

static json_value *pulled_parse(void *ud, const char *text, size_t len, char *err, size_t errlen) {
    return specs_parse(ud, text, len, err, errlen);
}

/* ---------- config ---------- */

typedef config_section pctx; /* the shared section parser (config.h) */

static int get_str(pctx *p, const json_value *obj, const char *key, const char *where, const char **out) {
    json_value *v = json_object_get(obj, key);
    if (!v) return 0;
    if (!plain_string(v) || v->len == 0) return config_section_fail(p, "%s.%s: must be a non-empty string", where, key);
    *out = v->str;
    return 0;
}

static int get_num(pctx *p, const json_value *obj, const char *key, const char *where, int64_t min, int64_t max,
                   int64_t *out) {
    json_value *v = json_object_get(obj, key);
    if (!v) return 0;
    int64_t n;
    if (!json_get_int64(v, &n) || n < min || n > max)
        return config_section_fail(p, "%s%s%s: must be an integer from %lld to %lld", where, *where ? "." : "", key,
                                   (long long)min, (long long)max);
    *out = n;
    return 0;
}

static int get_bool(pctx *p, const json_value *obj, const char *key, const char *where, bool *out) {
    json_value *v = json_object_get(obj, key);
    if (!v) return 0;
    if (v->type != JSON_TRUE && v->type != JSON_FALSE)
        return config_section_fail(p, "%s.%s: must be true or false", where, key);
    *out = v->type == JSON_TRUE;
    return 0;
}

/* A path from the config, relative ones against the config's folder. */
static char *config_path(const config *c, const char *s) {
    if (s[0] == '/' || !c->dir) return strdup(s);
    size_t n = strlen(c->dir) + strlen(s) + 2;
    char *out = malloc(n);
    if (out) snprintf(out, n, "%s/%s", c->dir, s);
    return out;
}

static char *read_whole(const char *path, size_t max, size_t *len, char *why, size_t whylen) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(why, whylen, "cannot open %s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        snprintf(why, whylen, "%s is not a regular file", path);
        return NULL;
    }
    if ((uint64_t)st.st_size > max) {
        close(fd);
        snprintf(why, whylen, "%s is %lld bytes, more than %zu", path, (long long)st.st_size, max);
        return NULL;
    }
    char *buf = malloc((size_t)st.st_size + 1);
    size_t n = 0;
    while (buf && n < (size_t)st.st_size) {
        ssize_t r = read(fd, buf + n, (size_t)st.st_size - n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        n += (size_t)r;
    }
    close(fd);
    if (!buf || n != (size_t)st.st_size) {
        free(buf);
        snprintf(why, whylen, "cannot read %s", path);
        return NULL;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* ---------- the fixed provider ---------- */

/* Read and check a fixed file: an object id -> spec. */
static json_value *fixed_load(const specs *sp, const provider *pv, struct stat *st_out, char *why, size_t whylen) {
    size_t len;
    char *text = read_whole(pv->file, FIXED_FILE_MAX_BYTES, &len, why, whylen);
    if (!text) return NULL;
    struct stat st;
    if (stat(pv->file, &st) == 0 && st_out) *st_out = st;
    char jerr[256];
    json_value *map = json_parse(text, len, sp->max_depth + 1, jerr, sizeof jerr);
    free(text);
    if (!map) {
        snprintf(why, whylen, "%s: invalid JSON: %s", pv->file, jerr);
        return NULL;
    }
    if (map->type != JSON_OBJECT) {
        snprintf(why, whylen, "%s: must be an object mapping ids to specs", pv->file);
        json_free(map);
        return NULL;
    }
    for (size_t i = 0; i < map->count; i++) {
        const char *id = map->keys[i];
        char err[1024];
        if (!specs_valid_id(id) || strlen(id) != map->key_lens[i]) {
            snprintf(why, whylen, "%s: \"%.200s\" is not a valid spec id ([A-Za-z0-9][A-Za-z0-9._-]{0,127})", pv->file,
                     id);
            json_free(map);
            return NULL;
        }
        for (size_t k = 0; k < i; k++)
            if (strcmp(map->keys[k], id) == 0) {
                snprintf(why, whylen, "%s: spec \"%s\" is given twice", pv->file, id);
                json_free(map);
                return NULL;
            }
        size_t n = 0;
        char *t = json_serialize(map->items[i], &n);
        free(t);
        if (n > sp->max_bytes) {
            snprintf(why, whylen, "%s: spec \"%s\" is %zu bytes, more than specs.max_bytes (%zu)", pv->file, id, n,
                     sp->max_bytes);
            json_free(map);
            return NULL;
        }
        if (specs_validate(sp, map->items[i], err, sizeof err) != 0) {
            snprintf(why, whylen, "%s: spec \"%s\": %s", pv->file, id, err);
            json_free(map);
            return NULL;
        }
    }
    return map;
}

/* Reload the file when it changed (at most every check_ms). Caller holds mu. */
static void fixed_refresh(specs *sp, provider *pv) {
    int64_t now = clock_monotonic_ms();
    if (now - pv->last_check_ms < pv->check_ms) return;
    pv->last_check_ms = now;
    struct stat st;
    if (stat(pv->file, &st) != 0) {
        if (!pv->bad_logged)
            log_error("spec provider %s: %s: %s; keeping the specs loaded before", pv->name, pv->file, strerror(errno));
        pv->bad_logged = true;
        return;
    }
    if (st.st_dev == pv->dev && st.st_ino == pv->ino && st.st_size == pv->size &&
        st.st_mtim.tv_sec == pv->mtime.tv_sec && st.st_mtim.tv_nsec == pv->mtime.tv_nsec)
        return;
    char why[1200];
    struct stat loaded;
    json_value *map = fixed_load(sp, pv, &loaded, why, sizeof why);
    if (!map) {
        /* Remember this version as seen, so it is reported once. */
        pv->dev = st.st_dev;
        pv->ino = st.st_ino;
        pv->size = st.st_size;
        pv->mtime = st.st_mtim;
        log_error("spec provider %s: not reloaded: %s; keeping the specs loaded before", pv->name, why);
        return;
    }
    json_free(pv->map);
    pv->map = map;
    pv->dev = loaded.st_dev;
    pv->ino = loaded.st_ino;
    pv->size = loaded.st_size;
    pv->mtime = loaded.st_mtim;
    pv->bad_logged = false;
    log_info("spec provider %s: reloaded %s (%zu specs)", pv->name, pv->file, map->count);
}

/* ---------- the pushed provider ---------- */

static pushed_spec *pushed_find(specs *sp, const char *id) {
    for (size_t i = 0; i < sp->n_specs; i++)
        if (strcmp(sp->specs[i].id, id) == 0) return &sp->specs[i];
    return NULL;
}

static void pushed_clear(pushed_spec *s) {
    free(s->id);
    free(s->text);
    json_free(s->tree);
    memset(s, 0, sizeof *s);
}

/* Take id, text and tree into the table (caller holds mu). */
static int pushed_set(specs *sp, const char *id, char *text, size_t len, json_value *tree) {
    pushed_spec *s = pushed_find(sp, id);
    if (s) {
        free(s->text);
        json_free(s->tree);
        s->text = text;
        s->len = len;
        s->tree = tree;
        return 0;
    }
    if (sp->n_specs == sp->cap_specs) {
        size_t cap = sp->cap_specs ? sp->cap_specs * 2 : 64;
        pushed_spec *n = realloc(sp->specs, cap * sizeof *n);
        if (!n) return -1;
        sp->specs = n;
        sp->cap_specs = cap;
    }
    char *idc = strdup(id);
    if (!idc) return -1;
    sp->specs[sp->n_specs++] = (pushed_spec){idc, text, len, tree};
    return 0;
}

static int fsync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

/* Write <dir>/<id>.json: temp file, fsync, rename, fsync the folder. */
static int pushed_write(const specs *sp, const char *id, const char *text, size_t len, char *msg, size_t msglen) {
    char tmp[4096], final[4096];
    static unsigned long counter;
    snprintf(tmp, sizeof tmp, "%s/.tmp-%d-%lu", sp->push_dir, (int)getpid(),
             __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED));
    snprintf(final, sizeof final, "%s/%s.json", sp->push_dir, id);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(msg, msglen, "cannot create %s: %s", tmp, strerror(errno));
        return -1;
    }
    size_t off = 0;
    while (off < len) {
        ssize_t w = write(fd, text + off, len - off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) break;
        off += (size_t)w;
    }
    int ok = off == len && fsync(fd) == 0;
    int saved = errno;
    close(fd);
    if (!ok || rename(tmp, final) != 0) {
        if (ok) saved = errno;
        unlink(tmp);
        snprintf(msg, msglen, "cannot write %s: %s", final, strerror(saved));
        return -1;
    }
    fsync_dir(sp->push_dir);
    return 0;
}

/* Load the <id>.json files of <cache.dir>/specs (once, before any listener). */
static int pushed_load(specs *sp, char *err, size_t errlen) {
    if (mkdir(sp->push_dir, 0700) != 0 && errno != EEXIST) {
        snprintf(err, errlen, "specs: cannot create %s: %s", sp->push_dir, strerror(errno));
        return -1;
    }
    DIR *d = opendir(sp->push_dir);
    if (!d) {
        snprintf(err, errlen, "specs: cannot open %s: %s", sp->push_dir, strerror(errno));
        return -1;
    }
    struct dirent *de;
    size_t loaded = 0, skipped = 0;
    while ((de = readdir(d)) != NULL) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", sp->push_dir, de->d_name);
        if (strncmp(de->d_name, ".tmp-", 5) == 0) { /* a write cut short by a crash */
            unlink(path);
            continue;
        }
        size_t n = strlen(de->d_name);
        if (n < 6 || strcmp(de->d_name + n - 5, ".json") != 0) continue;
        char id[SPECS_ID_MAX + 8];
        snprintf(id, sizeof id, "%.*s", (int)(n - 5), de->d_name);
        char why[1200];
        size_t len;
        char *text = specs_valid_id(id) ? read_whole(path, sp->max_bytes, &len, why, sizeof why) : NULL;
        if (!specs_valid_id(id)) snprintf(why, sizeof why, "not a valid spec id");
        json_value *tree = text ? specs_parse(sp, text, len, why, sizeof why) : NULL;
        if (!tree || sp->n_specs >= sp->pushed->max_specs) {
            if (tree) snprintf(why, sizeof why, "more than max_specs (%zu)", sp->pushed->max_specs);
            log_error("spec provider %s: %s left out: %s", sp->pushed->name, path, why);
            free(text);
            json_free(tree);
            skipped++;
            continue;
        }
        if (pushed_set(sp, id, text, len, tree) != 0) {
            free(text);
            json_free(tree);
            closedir(d);
            snprintf(err, errlen, "specs: out of memory");
            return -1;
        }
        loaded++;
    }
    closedir(d);
    log_info("spec provider %s: %zu pushed spec%s loaded from %s%s", sp->pushed->name, loaded, loaded == 1 ? "" : "s",
             sp->push_dir, skipped ? " (some left out: see above)" : "");
    return 0;
}

/* The cluster pushed specs are shared through (NULL: alone, or not started). */
static cluster *specs_cluster(const specs *sp) { return sp->st ? store_cluster(sp->st) : NULL; }

/* Remove this replica's copy of id (caller holds mu): 1 removed, 0 not
 * there, -1 disk error (msg). */
static int pushed_remove_locked(specs *sp, const char *id, char *msg, size_t msglen) {
    pushed_spec *s = pushed_find(sp, id);
    if (!s) return 0;
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.json", sp->push_dir, id);
    if (unlink(path) != 0 && errno != ENOENT) {
        snprintf(msg, msglen, "cannot remove %s: %s", path, strerror(errno));
        return -1;
    }
    fsync_dir(sp->push_dir);
    pushed_clear(s);
    *s = sp->specs[--sp->n_specs];
    return 1;
}

/* In a cluster, make this replica's copy of id what Redis holds (pushed
 * or replaced on another replica, or deleted there). Redis unreachable:
 * the copy stays as it is. A record that is not a valid spec is reported
 * and changes nothing. */
static void pushed_sync(specs *sp, const char *id) {
    cluster *cl = specs_cluster(sp);
    if (!cl) return;
    char *text = NULL, why[1200] = "";
    size_t len = 0;
    cluster_result r = cluster_spec_get(cl, sp->pushed->name, id, sp->max_bytes, &text, &len);
    if (r == CLUSTER_MISS) {
        pthread_mutex_lock(&sp->mu);
        int rc = pushed_remove_locked(sp, id, why, sizeof why);
        pthread_mutex_unlock(&sp->mu);
        if (rc < 0)
            log_error("spec provider %s: spec %s deleted in the cluster: %s", sp->pushed->name, id, why);
        else if (rc > 0)
            log_info("spec provider %s: spec %s deleted in the cluster", sp->pushed->name, id);
        return;
    }
    if (r != CLUSTER_HIT) return;
    pthread_mutex_lock(&sp->mu);
    pushed_spec *s = pushed_find(sp, id);
    bool same = s && s->len == len && memcmp(s->text, text, len) == 0;
    pthread_mutex_unlock(&sp->mu);
    if (same) {
        free(text);
        return;
    }
    json_value *tree = specs_parse(sp, text, len, why, sizeof why);
    if (!tree) {
        log_error("spec provider %s: spec %s in the cluster's Redis is not a valid spec (%s); left out",
                  sp->pushed->name, id, why);
        free(text);
        return;
    }
    pthread_mutex_lock(&sp->mu);
    int rc = pushed_write(sp, id, text, len, why, sizeof why) == 0 ? pushed_set(sp, id, text, len, tree) : -1;
    pthread_mutex_unlock(&sp->mu);
    if (rc != 0) {
        log_error("spec provider %s: spec %s from the cluster: %s", sp->pushed->name, id,
                  why[0] ? why : "out of memory");
        free(text);
        json_free(tree);
        return;
    }
    log_info("spec provider %s: spec %s taken from the cluster", sp->pushed->name, id);
}

specs_push_result specs_push(specs *sp, const char *id, const char *text, size_t len, char digest[DIGEST_STRING_LEN],
                             char *msg, size_t msglen) {
    if (!sp || !sp->pushed) {
        snprintf(msg, msglen, "no spec provider of type \"pushed\" is configured");
        return SPECS_PUSH_NO_PROVIDER;
    }
    if (!specs_valid_id(id)) {
        snprintf(msg, msglen, "\"%.200s\" is not a valid spec id ([A-Za-z0-9][A-Za-z0-9._-]{0,127})", id);
        return SPECS_PUSH_INVALID;
    }
    char why[1200];
    json_value *tree = specs_parse(sp, text, len, why, sizeof why);
    if (!tree) {
        snprintf(msg, msglen, "spec %s: %s", id, why);
        return SPECS_PUSH_INVALID;
    }
    /* Stored compact: GET answers the same bytes for the same spec. */
    size_t slen = 0;
    char *stored = json_serialize(tree, &slen);
    if (!stored) {
        json_free(tree);
        snprintf(msg, msglen, "out of memory");
        return SPECS_PUSH_FAILED;
    }
    digest_bytes(stored, slen, digest);
    pthread_mutex_lock(&sp->mu);
    bool exists = pushed_find(sp, id) != NULL;
    specs_push_result r = SPECS_PUSH_CREATED;
    if (!exists && sp->n_specs >= sp->pushed->max_specs) {
        snprintf(msg, msglen, "spec provider %s holds %zu specs, its max_specs", sp->pushed->name, sp->n_specs);
        r = SPECS_PUSH_TOO_MANY;
    }
    pthread_mutex_unlock(&sp->mu);
    /* In a cluster, Redis first (outside the lock: it may take the
     * cluster's timeout): a spec this replica alone would know is refused. */
    bool replaced = false; /* in the cluster: pushed before, to any replica */
    if (r == SPECS_PUSH_CREATED &&
        cluster_spec_put(specs_cluster(sp), sp->pushed->name, id, stored, slen, &replaced) == CLUSTER_DOWN) {
        snprintf(msg, msglen,
                 "spec provider %s: the cluster's Redis is unreachable, and a spec pushed now would "
                 "exist on this replica only; nothing changed, push it again",
                 sp->pushed->name);
        r = SPECS_PUSH_UNAVAILABLE;
    }
    pthread_mutex_lock(&sp->mu);
    exists = pushed_find(sp, id) != NULL || replaced;
    if (r != SPECS_PUSH_CREATED) {
        /* refused above */
    } else if (pushed_write(sp, id, stored, slen, msg, msglen) != 0) {
        r = SPECS_PUSH_FAILED;
    } else if (pushed_set(sp, id, stored, slen, tree) != 0) {
        snprintf(msg, msglen, "out of memory");
        r = SPECS_PUSH_FAILED;
    } else {
        stored = NULL;
        tree = NULL;
        r = exists ? SPECS_PUSH_REPLACED : SPECS_PUSH_CREATED;
    }
    pthread_mutex_unlock(&sp->mu);
    free(stored);
    json_free(tree);
    if (r == SPECS_PUSH_CREATED || r == SPECS_PUSH_REPLACED)
        log_info("spec provider %s: spec %s %s (%s)", sp->pushed->name, id, exists ? "replaced" : "registered", digest);
    return r;
}

char *specs_pushed_text(specs *sp, const char *id, size_t *len) {
    if (!sp || !sp->pushed) return NULL;
    pushed_sync(sp, id);
    pthread_mutex_lock(&sp->mu);
    pushed_spec *s = pushed_find(sp, id);
    char *out = NULL;
    if (s && (out = malloc(s->len + 1))) {
        memcpy(out, s->text, s->len);
        out[s->len] = '\0';
        *len = s->len;
    }
    pthread_mutex_unlock(&sp->mu);
    return out;
}

int specs_pushed_delete(specs *sp, const char *id, char *msg, size_t msglen) {
    if (!sp || !sp->pushed) return 0;
    cluster_result cr = cluster_spec_del(specs_cluster(sp), sp->pushed->name, id);
    if (cr == CLUSTER_DOWN) {
        snprintf(msg, msglen,
                 "spec provider %s: the cluster's Redis is unreachable, and a spec deleted now would "
                 "stay on the other replicas; nothing changed, delete it again",
                 sp->pushed->name);
        return -2;
    }
    pthread_mutex_lock(&sp->mu);
    int rc = pushed_remove_locked(sp, id, msg, msglen);
    pthread_mutex_unlock(&sp->mu);
    if (rc == 0 && cr == CLUSTER_HIT) rc = 1; /* pushed on another replica, never asked for here */
    if (rc == 1) log_info("spec provider %s: spec %s deleted", sp->pushed->name, id);
    return rc;
}

static int cmp_id(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

char *specs_pushed_list(specs *sp, size_t *len) {
    json_value *root = json_new_object(), *ids = json_new_array();
    if (!root || !ids) {
        json_free(root);
        json_free(ids);
        return NULL;
    }
    if (sp && sp->pushed) {
        pthread_mutex_lock(&sp->mu);
        char **names = calloc(sp->n_specs ? sp->n_specs : 1, sizeof *names);
        for (size_t i = 0; names && i < sp->n_specs; i++) names[i] = sp->specs[i].id;
        if (names) qsort(names, sp->n_specs, sizeof *names, cmp_id);
        for (size_t i = 0; names && i < sp->n_specs; i++) json_array_append(ids, json_new_string(names[i]));
        free(names);
        pthread_mutex_unlock(&sp->mu);
    }
    json_object_set(root, "ids", ids);
    char *out = json_serialize(root, len);
    json_free(root);
    return out;
}

size_t specs_max_bytes(const specs *sp) { return sp ? sp->max_bytes : SPECS_DEFAULT_MAX_BYTES; }

/* ---------- lifecycle ---------- */

static provider *find_provider(const specs *sp, const char *name) {
    for (size_t i = 0; sp && i < sp->n; i++)
        if (strcmp(sp->provs[i].name, name) == 0) return &sp->provs[i];
    return NULL;
}

bool specs_has_provider(const specs *sp, const char *provider_name) { return find_provider(sp, provider_name) != NULL; }

static int parse_provider(pctx *p, specs *sp, const char *name, const json_value *o, provider *pv) {
    const config *c = p->c;
    char where[200];
    snprintf(where, sizeof where, "providers.%s", name);
    pv->name = strdup(name);
    if (!pv->name) return config_section_fail(p, "%s: out of memory", where);
    if (o->type != JSON_OBJECT) return config_section_fail(p, "%s: must be an object with a \"type\"", where);
    const char *type = NULL;
    if (get_str(p, o, "type", where, &type) != 0) return -1;
    if (!type) return config_section_fail(p, "%s.type: required: \"pulled\", \"pushed\" or \"fixed\"", where);
    if (strcmp(type, "pushed") == 0) {
        static const char *const keys[] = {"type", "max_specs", NULL};
        if (config_section_check_keys(p, o, where, keys) != 0) return -1;
        pv->type = PROV_PUSHED;
        int64_t max = DEFAULT_MAX_SPECS;
        if (get_num(p, o, "max_specs", where, 1, 10000000, &max) != 0) return -1;
        pv->max_specs = (size_t)max;
        if (sp->pushed)
            return config_section_fail(p, "%s: only one provider may be of type \"pushed\" (%s is)", where,
                                       sp->pushed->name);
        sp->pushed = pv;
        return 0;
    }
    if (strcmp(type, "fixed") == 0) {
        static const char *const keys[] = {"type", "file", "check_interval_ms", NULL};
        if (config_section_check_keys(p, o, where, keys) != 0) return -1;
        pv->type = PROV_FIXED;
        const char *file = NULL;
        if (get_str(p, o, "file", where, &file) != 0) return -1;
        if (!file) return config_section_fail(p, "%s.file: required (a JSON file mapping ids to specs)", where);
        int64_t ms = DEFAULT_FIXED_CHECK_MS;
        if (get_num(p, o, "check_interval_ms", where, 0, 3600000, &ms) != 0) return -1;
        pv->check_ms = (long)ms;
        if (!(pv->file = config_path(c, file))) return config_section_fail(p, "%s: out of memory", where);
        return 0; /* loaded once every provider is known (it checks specs) */
    }
    if (strcmp(type, "pulled") != 0)
        return config_section_fail(p, "%s.type: \"%s\" is not \"pulled\", \"pushed\" or \"fixed\"", where, type);
    static const char *const keys[] = {
        "type",       "url",         "ca_file",           "tls_verify",      "client_cert_file", "client_key_file",
        "token_file", "ttl_seconds", "cache_max_entries", "cache_max_bytes", "timeout_ms",       "retries",
        NULL};
    if (config_section_check_keys(p, o, where, keys) != 0) return -1;
    pv->type = PROV_PULLED;
    const char *url = NULL, *ca = NULL, *cert = NULL, *key = NULL, *token_file = NULL;
    if (get_str(p, o, "url", where, &url) != 0 || get_str(p, o, "ca_file", where, &ca) != 0 ||
        get_str(p, o, "client_cert_file", where, &cert) != 0 || get_str(p, o, "client_key_file", where, &key) != 0 ||
        get_str(p, o, "token_file", where, &token_file) != 0)
        return -1;
    if (!url)
        return config_section_fail(
            p, "%s.url: required: \"https://HOST/PATH/{id}\" or a base URL the id is appended to", where);
    if ((strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0) || strpbrk(url, " \t\r\n#"))
        return config_section_fail(p, "%s.url: \"%s\" must be an http:// or https:// URL without spaces or fragment",
                                   where, url);
    if (key && !cert) return config_section_fail(p, "%s.client_key_file: needs client_cert_file", where);
    bool verify = true;
    int64_t ttl = DEFAULT_TTL_S, entries = 1024, bytes = 16 * 1024 * 1024, timeout = 10000,
            retries = c->upstream_retries;
    if (get_bool(p, o, "tls_verify", where, &verify) != 0 || get_num(p, o, "ttl_seconds", where, 0, 86400, &ttl) != 0 ||
        get_num(p, o, "cache_max_entries", where, 1, 1000000, &entries) != 0 ||
        get_num(p, o, "cache_max_bytes", where, 1024, (int64_t)1 << 34, &bytes) != 0 ||
        get_num(p, o, "timeout_ms", where, 100, 600000, &timeout) != 0 ||
        get_num(p, o, "retries", where, 0, 20, &retries) != 0)
        return -1;
    char *ca_path = ca ? config_path(c, ca) : NULL, *cert_path = cert ? config_path(c, cert) : NULL,
         *key_path = key ? config_path(c, key) : NULL, *token = NULL;
    int rc = 0;
    const char *files[] = {ca_path, cert_path, key_path};
    const char *fkeys[] = {"ca_file", "client_cert_file", "client_key_file"};
    for (size_t i = 0; i < 3 && rc == 0; i++)
        if (files[i] && access(files[i], R_OK) != 0)
            rc = config_section_fail(p, "%s.%s: cannot read %s: %s", where, fkeys[i], files[i], strerror(errno));
    if (rc == 0 && token_file) {
        char *tpath = config_path(c, token_file), why[600];
        size_t len = 0;
        token = tpath ? read_whole(tpath, 64 * 1024, &len, why, sizeof why) : NULL;
        if (!tpath) snprintf(why, sizeof why, "out of memory");
        free(tpath);
        while (token && len > 0 && (token[len - 1] == '\n' || token[len - 1] == '\r' || token[len - 1] == ' '))
            token[--len] = '\0';
        if (!token)
            rc = config_section_fail(p, "%s.token_file: %s", where, why);
        else if (len == 0 || strlen(token) != len || strpbrk(token, "\r\n"))
            rc = config_section_fail(p, "%s.token_file: the file is empty or holds a NUL byte or a line break", where);
    }
    if (rc == 0) {
        spec_pulled_options po = {
            .name = name,
            .url = url,
            .ca_file = ca_path,
            .tls_verify = verify,
            .client_cert_file = cert_path,
            .client_key_file = key_path,
            .token = token,
            .connect_timeout_ms = c->upstream_connect_timeout_ms,
            .timeout_ms = (long)timeout,
            .retries = (int)retries,
            .retry_budget_ms = c->upstream_retry_budget_s * 1000,
            .ttl_s = (long)ttl,
            .cache_max_entries = (size_t)entries,
            .cache_max_bytes = (size_t)bytes,
            .max_bytes = sp->max_bytes,
            .parse = pulled_parse,
            .ud = sp,
        };
        char err[600];
        pv->pulled = spec_pulled_new(&po, err, sizeof err);
        if (!pv->pulled) rc = config_section_fail(p, "%s: %s", where, err);
    }
    free(ca_path);
    free(cert_path);
    free(key_path);
    if (token) {
        memset(token, 0, strlen(token));
        free(token);
    }
    return rc;
}

static int parse_section(pctx *p, specs *sp) {
    const config *c = p->c;
    const json_value *sec = c->specs;
    static const char *const keys[] = {"providers", "max_bytes", "max_depth", "file_roots", NULL};
    if (config_section_check_keys(p, sec, "", keys) != 0) return -1;
    int64_t mb = SPECS_DEFAULT_MAX_BYTES, md = SPECS_DEFAULT_MAX_DEPTH;
    if (get_num(p, sec, "max_bytes", "", 64, 16 * 1024 * 1024, &mb) != 0 ||
        get_num(p, sec, "max_depth", "", 2, SPECS_HARD_MAX_DEPTH - 1, &md) != 0)
        return -1;
    sp->max_bytes = (size_t)mb;
    sp->max_depth = (int)md;
    const json_value *roots = json_object_get(sec, "file_roots");
    if (roots) {
        if (roots->type != JSON_ARRAY) return config_section_fail(p, "file_roots: must be an array of folders");
        sp->roots = calloc(roots->count ? roots->count : 1, sizeof *sp->roots);
        if (!sp->roots) return config_section_fail(p, "file_roots: out of memory");
        for (size_t i = 0; i < roots->count; i++) {
            const json_value *r = roots->items[i];
            if (!plain_string(r) || r->len == 0)
                return config_section_fail(p, "file_roots[%zu]: must be a non-empty string", i);
            char *path = config_path(c, r->str), real[PATH_MAX];
            bool ok = path && realpath(path, real);
            int saved = errno;
            struct stat st;
            if (!ok || stat(real, &st) != 0 || !S_ISDIR(st.st_mode)) {
                int rc = config_section_fail(p, "file_roots[%zu]: \"%s\" is not a folder%s%s", i, path ? path : r->str,
                                             ok ? "" : ": ", ok ? "" : strerror(saved));
                free(path);
                return rc;
            }
            free(path);
            if (!(sp->roots[i] = strdup(real))) return config_section_fail(p, "file_roots: out of memory");
            sp->n_roots = i + 1;
        }
    }
    const json_value *provs = json_object_get(sec, "providers");
    if (!provs || provs->type != JSON_OBJECT || provs->count == 0)
        return config_section_fail(
            p, "providers: required: an object of NAME: { \"type\": \"pulled\" | \"pushed\" | \"fixed\", ... }");
    sp->provs = calloc(provs->count, sizeof *sp->provs);
    if (!sp->provs) return config_section_fail(p, "providers: out of memory");
    for (size_t i = 0; i < provs->count; i++) {
        if (!specs_valid_id(provs->keys[i]))
            return config_section_fail(p, "providers.%s: a provider name is [A-Za-z0-9][A-Za-z0-9._-]*",
                                       provs->keys[i]);
        for (size_t k = 0; k < i; k++)
            if (strcmp(provs->keys[k], provs->keys[i]) == 0)
                return config_section_fail(p, "providers.%s: given twice", provs->keys[i]);
        sp->n = i + 1;
        if (parse_provider(p, sp, provs->keys[i], provs->items[i], &sp->provs[i]) != 0) return -1;
    }
    for (size_t i = 0; i < sp->n; i++) {
        provider *pv = &sp->provs[i];
        if (pv->type != PROV_FIXED) continue;
        char why[1200];
        struct stat st;
        memset(&st, 0, sizeof st);
        pv->map = fixed_load(sp, pv, &st, why, sizeof why);
        if (!pv->map) return config_section_fail(p, "providers.%s.file: %s", pv->name, why);
        pv->dev = st.st_dev;
        pv->ino = st.st_ino;
        pv->size = st.st_size;
        pv->mtime = st.st_mtim;
        pv->last_check_ms = clock_monotonic_ms();
    }
    if (sp->pushed && !c->admin)
        return config_section_fail(
            p, "providers.%s: a pushed provider needs the \"admin\" section (the API specs are pushed to)",
            sp->pushed->name);
    return 0;
}

int specs_new(const config *c, specs **out, char *err, size_t errlen) {
    *out = NULL;
    if (!c->specs && !c->admin) return 0;
    pctx p = {c, "specs", err, errlen};
    specs *sp = calloc(1, sizeof *sp);
    if (!sp) {
        snprintf(err, errlen, "specs: out of memory");
        return -1;
    }
    sp->cfg = c;
    pthread_mutex_init(&sp->mu, NULL);
    pthread_rwlock_init(&sp->cfg_lock, NULL);
    /* An admin section alone serves the cache endpoints; its /specs
     * answer that no provider takes pushed specs. */
    sp->max_bytes = SPECS_DEFAULT_MAX_BYTES;
    sp->max_depth = SPECS_DEFAULT_MAX_DEPTH;
    if (c->specs && parse_section(&p, sp) != 0) {
        specs_free(sp);
        return -1;
    }
    if (admin_config_parse(c, &sp->admin_cfg, err, errlen) != 0) {
        specs_free(sp);
        return -1;
    }
    pthread_once(&scratch_once, scratch_init);
    *out = sp;
    return 0;
}

int specs_check_config(const config *c, char *err, size_t errlen) {
    specs *sp = NULL;
    int rc = specs_new(c, &sp, err, errlen);
    specs_free(sp);
    return rc;
}

/* /metrics: each provider's look-ups (pulled providers), and the pushed
 * specs held. */
static void specs_collect(metrics_writer *w, void *ud) {
    specs *sp = ud;
    char t[160];
    static const struct {
        const char *name, *help;
        size_t off;
    } counters[] = {
        {"regfacade_spec_lookups_total", "Image spec look-ups of a pulled provider, by provider.",
         offsetof(spec_pulled_stats, lookups)},
        {"regfacade_spec_cache_hits_total", "Pulled spec look-ups answered from the provider's cache.",
         offsetof(spec_pulled_stats, hits)},
        {"regfacade_spec_requests_total", "Look-ups a pulled provider sent to its spec service.",
         offsetof(spec_pulled_stats, requests)},
        {"regfacade_spec_failures_total", "Pulled spec look-ups that ended without a spec (unknown, unavailable, bad).",
         offsetof(spec_pulled_stats, failures)},
    };
    for (size_t c = 0; c < sizeof counters / sizeof counters[0]; c++) {
        metrics_write_head(w, counters[c].name, "counter", counters[c].help);
        for (size_t i = 0; i < sp->n; i++) {
            const provider *pv = &sp->provs[i];
            if (pv->type != PROV_PULLED || !pv->pulled) continue;
            spec_pulled_stats ps;
            spec_pulled_get_stats(pv->pulled, &ps);
            unsigned long v = *(const unsigned long *)((const char *)&ps + counters[c].off);
            metrics_write(w, "%s{provider=\"%s\"} %lu\n", counters[c].name, metrics_label(pv->name, t, sizeof t), v);
        }
    }
    metrics_write_head(w, "regfacade_spec_cached_entries", "gauge", "Specs a pulled provider holds in its cache now.");
    for (size_t i = 0; i < sp->n; i++) {
        const provider *pv = &sp->provs[i];
        if (pv->type != PROV_PULLED || !pv->pulled) continue;
        spec_pulled_stats ps;
        spec_pulled_get_stats(pv->pulled, &ps);
        metrics_write(w, "regfacade_spec_cached_entries{provider=\"%s\"} %zu\n", metrics_label(pv->name, t, sizeof t),
                      ps.entries);
    }
    if (sp->pushed) {
        pthread_mutex_lock(&sp->mu);
        size_t n = sp->n_specs;
        pthread_mutex_unlock(&sp->mu);
        metrics_write_head(w, "regfacade_spec_pushed", "gauge",
                           "Image specs pushed through the admin API and held now.");
        metrics_write(w, "regfacade_spec_pushed{provider=\"%s\"} %zu\n", metrics_label(sp->pushed->name, t, sizeof t),
                      n);
    }
}

int specs_start(specs *sp, store *st, const generation_env *ge, char *err, size_t errlen) {
    if (!sp) return 0;
    if (metrics_add_collector(specs_collect, sp) != 0) {
        snprintf(err, errlen, "specs: cannot register the metrics collector (table full)");
        return -1;
    }
    sp->collecting = true;
    sp->st = st;
    scratch_store(st, -1);
    if (sp->pushed) {
        size_t n = strlen(store_dir(st)) + sizeof "/specs";
        sp->push_dir = malloc(n);
        if (!sp->push_dir) {
            snprintf(err, errlen, "specs: out of memory");
            return -1;
        }
        snprintf(sp->push_dir, n, "%s/specs", store_dir(st));
        if (pushed_load(sp, err, errlen) != 0) return -1;
    }
    if (sp->admin_cfg) {
        admin_config *ac = sp->admin_cfg;
        sp->admin_cfg = NULL;
        if (!(sp->admin = admin_start(sp->cfg, ac, sp, st, ge, err, errlen))) return -1;
    }
    for (size_t i = 0; i < sp->n; i++) {
        const provider *pv = &sp->provs[i];
        log_info("spec provider %s: %s", pv->name,
                 pv->type == PROV_PULLED   ? "pulled"
                 : pv->type == PROV_PUSHED ? "pushed (admin API)"
                                           : "fixed");
    }
    return 0;
}

void specs_free(specs *sp) {
    if (!sp) return;
    if (sp->collecting) metrics_remove_collector(specs_collect, sp);
    admin_stop(sp->admin); /* first: its handlers use the rest */
    admin_config_free(sp->admin_cfg);
    for (size_t i = 0; i < sp->n; i++) {
        provider *pv = &sp->provs[i];
        free(pv->name);
        spec_pulled_free(pv->pulled);
        free(pv->file);
        json_free(pv->map);
    }
    free(sp->provs);
    for (size_t i = 0; i < sp->n_roots; i++) free(sp->roots[i]);
    free(sp->roots);
    for (size_t i = 0; i < sp->n_specs; i++) pushed_clear(&sp->specs[i]);
    free(sp->specs);
    free(sp->push_dir);
    pthread_mutex_destroy(&sp->mu);
    pthread_rwlock_destroy(&sp->cfg_lock);
    free(sp);
}

/* ---------- look-ups ---------- */

specs_result specs_get(specs *sp, const char *provider_name, const char *id, json_value **out, char *why,
                       size_t whylen) {
    *out = NULL;
    provider *pv = find_provider(sp, provider_name);
    if (!pv) {
        snprintf(why, whylen, "no spec provider \"%s\" is configured", provider_name);
        return SPECS_UNAVAILABLE;
    }
    if (!specs_valid_id(id)) {
        snprintf(why, whylen, "\"%.200s\" is not a valid spec id", id);
        return SPECS_UNKNOWN;
    }
    if (pv->type == PROV_PULLED) return spec_pulled_get(pv->pulled, id, out, why, whylen);
    if (pv->type == PROV_PUSHED) pushed_sync(sp, id);
    pthread_mutex_lock(&sp->mu);
    const json_value *found = NULL;
    if (pv->type == PROV_FIXED) {
        fixed_refresh(sp, pv);
        found = json_object_get(pv->map, id);
    } else {
        pushed_spec *s = pushed_find(sp, id);
        found = s ? s->tree : NULL;
    }
    if (found) *out = json_clone(found);
    pthread_mutex_unlock(&sp->mu);
    if (!found) {
        snprintf(why, whylen, "spec provider %s has no spec \"%s\"", pv->name, id);
        return SPECS_UNKNOWN;
    }
    if (!*out) {
        snprintf(why, whylen, "out of memory");
        return SPECS_UNAVAILABLE;
    }
    return SPECS_FOUND;
}

/* ---------- request glue ---------- */

static const char *unknown_code(const char *kind) {
    if (kind && strcmp(kind, "blob") == 0) return "BLOB_UNKNOWN";
    if (kind && strcmp(kind, "manifest") == 0) return "MANIFEST_UNKNOWN";
    return "NAME_UNKNOWN";
}

int specs_resolve(specs *sp, policy *pol, policy_request *req, policy_resolution *out, json_value **spec_out,
                  policy_error *e) {
    json_free(*spec_out); /* a second resolve in one request replaces the first one's spec */
    *spec_out = NULL;
    memset(out, 0, sizeof *out);
    char provider_name[256], id[SPECS_ID_MAX + 2];
    int named = policy_spec_lookup(pol, req, provider_name, sizeof provider_name, id, sizeof id, e);
    if (named < 0) return -1;
    if (named == 0) return policy_resolve(pol, req, out, e);
    if (!specs_has_provider(sp, provider_name)) {
        policy_error_set(e, 500, "UNKNOWN",
                         "the policy's spec hook named provider \"%s\", which is not configured in specs.providers",
                         provider_name);
        log_error("%s (request %s)", e->message, req->repository);
        return -1;
    }
    if (!specs_valid_id(id)) {
        policy_error_set(e, 404, unknown_code(req->kind),
                         "%s: no image spec can have the id \"%s\" (ids are [A-Za-z0-9][A-Za-z0-9._-]{0,127})",
                         req->repository, id);
        return -1;
    }
    json_value *spec = NULL;
    char why[900];
    specs_result r = specs_get(sp, provider_name, id, &spec, why, sizeof why);
    switch (r) {
        case SPECS_FOUND:
            break;
        case SPECS_UNKNOWN:
            policy_error_set(e, 404, unknown_code(req->kind), "%s: %s", req->repository, why);
            return -1;
        case SPECS_UNAVAILABLE:
            policy_error_set(e, 503, "UNKNOWN", "%s: the image spec cannot be looked up now (try again): %s",
                             req->repository, why);
            return -1;
        case SPECS_BAD_ANSWER:
            policy_error_set(e, 502, "UNKNOWN", "%s: %s", req->repository, why);
            return -1;
    }
    req->spec = spec;
    if (policy_resolve(pol, req, out, e) != 0) {
        req->spec = NULL;
        json_free(spec);
        return -1;
    }
    /* The rewrite hook sees req.spec (and may name the id): the generated
     * image depends on which spec it is and on its content. */
    size_t len = 0;
    char *text = json_serialize(spec, &len);
    char d[DIGEST_STRING_LEN] = "";
    if (text) digest_bytes(text, len, d);
    free(text);
    const char *fp = out->fingerprint ? out->fingerprint : "";
    size_t n = strlen(fp) + strlen(provider_name) + strlen(id) + strlen(d) + 16;
    char *nfp = malloc(n);
    if (!nfp || !d[0]) {
        free(nfp);
        policy_resolution_clear(out);
        req->spec = NULL;
        json_free(spec);
        policy_error_set(e, 500, "UNKNOWN", "out of memory");
        return -1;
    }
    snprintf(nfp, n, "%s|spec:%s/%s:%s", fp, provider_name, id, d);
    free(out->fingerprint);
    out->fingerprint = nfp;
    /* A base of nothing: keep the scratch image in the store. */
    if (sp->st && ref_is_sha256_digest(out->reference))
        for (size_t i = 0; i < N_SCRATCH; i++)
            if (strcmp(out->reference, scratch[i].digest) == 0) scratch_store(sp->st, (int)i);
    *spec_out = spec;
    return 0;
}

/* blobserve_config: the "blobserve" section of the config, validated
 * strictly ("FILE: blobserve.KEY: why"; unknown keys are errors). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "regfacade/blobserve.h"
#include "regfacade/blobserve_fs.h"
#include "regfacade/digest.h"
#include "regfacade/ref.h"

#define DEFAULT_MAX_BYTES (2ULL * 1024 * 1024 * 1024)
#define DEFAULT_MAX_REPLACE_BYTES (16ULL * 1024 * 1024)
#define DEFAULT_INLINE_MAX_BYTES (16ULL * 1024)

typedef config_section pctx; /* the shared section parser (config.h) */

static const char *str_of(const json_value *v) {
    return v && v->type == JSON_STRING && v->len > 0 && strlen(v->str) == v->len ? v->str : NULL;
}

static int get_u64(pctx *p, const json_value *obj, const char *key, const char *where, uint64_t min, uint64_t max,
                   uint64_t *out) {
    json_value *v = json_object_get(obj, key);
    if (!v) return 0;
    uint64_t n;
    if (config_value_uint(v, key, &n) != 0 || n < min || n > max)
        return config_section_fail(p, "%s: must be %s from %llu to %llu", where,
                                   strstr(key, "_bytes") ? "a size (bytes, or a string such as \"512MiB\")"
                                                         : "an integer",
                                   (unsigned long long)min, (unsigned long long)max);
    *out = n;
    return 0;
}

static int get_bool(pctx *p, const json_value *obj, const char *key, bool *out) {
    json_value *v = json_object_get(obj, key);
    if (!v) return 0;
    if (v->type != JSON_TRUE && v->type != JSON_FALSE) return config_section_fail(p, "%s: must be true or false", key);
    *out = v->type == JSON_TRUE;
    return 0;
}

static char *resolve_path(const config *c, const char *s) {
    if (s[0] == '/' || !c->dir) return strdup(s);
    size_t n = strlen(c->dir) + strlen(s) + 2;
    char *out = malloc(n);
    if (out) snprintf(out, n, "%s/%s", c->dir, s);
    return out;
}

static int parse_listen(pctx *p, const char *s, blobserve_config *bc) {
    char why[300];
    if (config_parse_listen(s, &bc->listen_host, &bc->listen_port, why, sizeof why) != 0)
        return config_section_fail(p, "listen: %s", why);
    if (strcmp(bc->listen_host, p->c->listen_host) == 0 && bc->listen_port == p->c->listen_port)
        return config_section_fail(p, "listen: \"%s\" is the registry listener's address; blobserve needs its own", s);
    return 0;
}

static int string_list(pctx *p, const json_value *v, const char *key, char ***out, size_t *n) {
    if (v->type != JSON_ARRAY) return config_section_fail(p, "%s: must be an array of strings", key);
    *out = calloc(v->count ? v->count : 1, sizeof **out);
    if (!*out) return config_section_fail(p, "%s: out of memory", key);
    for (size_t i = 0; i < v->count; i++) {
        const char *s = str_of(v->items[i]);
        if (!s) return config_section_fail(p, "%s[%zu]: must be a non-empty string", key, i);
        if (!((*out)[i] = strdup(s))) return config_section_fail(p, "%s: out of memory", key);
        *n = i + 1;
    }
    return 0;
}

/* A prepull entry: "repo:tag" or "repo@sha256:hex", parsed by the URL grammar. */
static int check_ref(pctx *p, const blobserve_config *bc, const char *ref, size_t i) {
    char url[1024], why[256];
    if (snprintf(url, sizeof url, "/%s/", ref) >= (int)sizeof url)
        return config_section_fail(p, "prepull[%zu]: too long", i);
    bs_url u;
    if (bs_url_parse(url, &u, why, sizeof why) != 0 || u.path[0])
        return config_section_fail(p, "prepull[%zu]: \"%s\" is not REPOSITORY:TAG or REPOSITORY@sha256:HEX (%s)", i,
                                   ref, u.path[0] ? "a path is not allowed" : why);
    if (!blobserve_config_allows(bc, u.repository))
        return config_section_fail(p, "prepull[%zu]: repository \"%s\" is not in blobserve.repositories", i,
                                   u.repository);
    return 0;
}

static int parse_edits(pctx *p, const json_value *v, blobserve_config *bc) {
    static const char *const keys[] = {"path", "search", "replacement", NULL};
    if (v->type != JSON_OBJECT) return config_section_fail(p, "replacements: must be an object {REPOSITORY: [edits]}");
    bc->edits = calloc(v->count ? v->count : 1, sizeof *bc->edits);
    if (!bc->edits) return config_section_fail(p, "replacements: out of memory");
    for (size_t r = 0; r < v->count; r++) {
        const char *repo = v->keys[r];
        const json_value *list = v->items[r];
        char where[400];
        snprintf(where, sizeof where, "replacements.%s", repo);
        if (!ref_valid_name(repo)) return config_section_fail(p, "%s: not a valid repository name", where);
        for (size_t j = 0; j < r; j++)
            if (strcmp(bc->edits[j].repository, repo) == 0) return config_section_fail(p, "%s: given twice", where);
        if (!blobserve_config_allows(bc, repo))
            return config_section_fail(p, "%s: repository \"%s\" is not in blobserve.repositories", where, repo);
        if (list->type != JSON_ARRAY || list->count == 0)
            return config_section_fail(p, "%s: must be a non-empty array of {path, search, replacement}", where);
        blobserve_repo_edits *re = &bc->edits[r];
        bc->n_edits = r + 1;
        if (!(re->repository = strdup(repo)) || !(re->items = calloc(list->count, sizeof *re->items)))
            return config_section_fail(p, "%s: out of memory", where);
        digest_ctx *d = digest_new();
        if (!d) return config_section_fail(p, "%s: out of memory", where);
        for (size_t i = 0; i < list->count; i++) {
            const json_value *o = list->items[i];
            char w2[420];
            snprintf(w2, sizeof w2, "%s[%zu]", where, i);
            if (o->type != JSON_OBJECT) {
                digest_free(d);
                return config_section_fail(p, "%s: must be an object {path, search, replacement}", w2);
            }
            if (config_section_check_keys(p, o, w2, keys) != 0) {
                digest_free(d);
                return -1;
            }
            const char *path = str_of(json_object_get(o, "path"));
            const json_value *s = json_object_get(o, "search");
            const json_value *rp = json_object_get(o, "replacement");
            char norm[BS_FS_PATH_MAX];
            if (!path || !bs_path_normalize(path, norm, sizeof norm)) {
                digest_free(d);
                return config_section_fail(p, "%s.path: must name a file in the image (no \"..\")", w2);
            }
            if (!s || s->type != JSON_STRING || s->len == 0) {
                digest_free(d);
                return config_section_fail(p, "%s.search: must be a non-empty string", w2);
            }
            if (!rp || rp->type != JSON_STRING) {
                digest_free(d);
                return config_section_fail(p, "%s.replacement: must be a string", w2);
            }
            blobserve_replacement *it = &re->items[i];
            re->n = i + 1;
            it->path = strdup(norm);
            it->search = malloc(s->len + 1);
            it->replacement = malloc(rp->len + 1);
            if (!it->path || !it->search || !it->replacement) {
                digest_free(d);
                return config_section_fail(p, "%s: out of memory", w2);
            }
            memcpy(it->search, s->str, s->len + 1);
            it->search_len = s->len;
            memcpy(it->replacement, rp->str, rp->len + 1);
            it->replacement_len = rp->len;
            /* The variant: a digest of every edit, lengths first so no two
             * lists hash alike. */
            char lens[64];
            int ln = snprintf(lens, sizeof lens, "%zu:%zu:%zu:", strlen(norm), s->len, rp->len);
            digest_update(d, lens, (size_t)ln);
            digest_update(d, norm, strlen(norm));
            digest_update(d, s->str, s->len);
            digest_update(d, rp->str, rp->len);
        }
        char hex[DIGEST_STRING_LEN];
        digest_final(d, hex);
        digest_free(d);
        memcpy(re->variant, hex + 7, 16);
        re->variant[16] = '\0';
    }
    return 0;
}

static int parse_platform(pctx *p, const char *s, blobserve_config *bc) {
    char buf[128];
    if (strlen(s) >= sizeof buf) return config_section_fail(p, "platform: too long");
    snprintf(buf, sizeof buf, "%s", s);
    char *save = NULL;
    char *os = strtok_r(buf, "/", &save);
    char *arch = os ? strtok_r(NULL, "/", &save) : NULL;
    char *variant = arch ? strtok_r(NULL, "/", &save) : NULL;
    if (!os || !arch || strtok_r(NULL, "/", &save))
        return config_section_fail(p, "platform: \"%s\" must be OS/ARCH or OS/ARCH/VARIANT (e.g. linux/amd64)", s);
    free(bc->platform_os);
    free(bc->platform_arch);
    bc->platform_os = strdup(os);
    bc->platform_arch = strdup(arch);
    bc->platform_variant = variant ? strdup(variant) : NULL;
    if (!bc->platform_os || !bc->platform_arch || (variant && !bc->platform_variant))
        return config_section_fail(p, "platform: out of memory");
    return 0;
}

int blobserve_config_parse(const config *c, blobserve_config **out, char *err, size_t errlen) {
    static const char *const top[] = {"listen",
                                      "repositories",
                                      "any_repository",
                                      "platform",
                                      "cache",
                                      "prepull",
                                      "wait_for_prepull",
                                      "tag_max_age_seconds",
                                      "max_replace_file_bytes",
                                      "inline_max_bytes",
                                      "replacements",
                                      NULL};
    static const char *const cache_keys[] = {"dir", "max_bytes", NULL};
    *out = NULL;
    const json_value *sec = c->blobserve;
    if (!sec) return 0;
    pctx p = {c, "blobserve", err, errlen};
    if (sec->type != JSON_OBJECT) {
        snprintf(err, errlen, "%s: blobserve: must be an object", c->path ? c->path : "config");
        return -1;
    }
    blobserve_config *bc = calloc(1, sizeof *bc);
    if (!bc) {
        snprintf(err, errlen, "blobserve: out of memory");
        return -1;
    }
    bc->cache_max_bytes = DEFAULT_MAX_BYTES;
    bc->tag_max_age_s = 60;
    bc->max_replace_file_bytes = DEFAULT_MAX_REPLACE_BYTES;
    bc->inline_max_bytes = DEFAULT_INLINE_MAX_BYTES;
    int rc = -1;
    if (config_section_check_keys(&p, sec, "", top) != 0) goto out;

    const char *listen = str_of(json_object_get(sec, "listen"));
    if (!listen) {
        config_section_fail(&p, "listen: required, \"HOST:PORT\" (e.g. \"127.0.0.1:5080\")");
        goto out;
    }
    if (parse_listen(&p, listen, bc) != 0) goto out;

    if (get_bool(&p, sec, "any_repository", &bc->any_repository) != 0) goto out;
    json_value *repos = json_object_get(sec, "repositories");
    if (repos) {
        if (string_list(&p, repos, "repositories", &bc->repositories, &bc->n_repositories) != 0) goto out;
        for (size_t i = 0; i < bc->n_repositories; i++)
            if (!ref_valid_name(bc->repositories[i])) {
                config_section_fail(&p, "repositories[%zu]: \"%s\" is not a valid repository name", i,
                                    bc->repositories[i]);
                goto out;
            }
    }
    if (!bc->any_repository && bc->n_repositories == 0) {
        config_section_fail(
            &p, "repositories: required (a list of repositories to serve), unless \"any_repository\": true");
        goto out;
    }

    const char *platform = "linux/amd64";
    json_value *pv = json_object_get(sec, "platform");
    if (pv && !(platform = str_of(pv))) {
        config_section_fail(&p, "platform: must be a string such as \"linux/amd64\"");
        goto out;
    }
    if (parse_platform(&p, platform, bc) != 0) goto out;

    json_value *cache = json_object_get(sec, "cache");
    if (cache) {
        if (cache->type != JSON_OBJECT) {
            config_section_fail(&p, "cache: must be an object {dir, max_bytes}");
            goto out;
        }
        if (config_section_check_keys(&p, cache, "cache", cache_keys) != 0) goto out;
        json_value *dv = json_object_get(cache, "dir");
        if (dv) {
            const char *d = str_of(dv);
            if (!d) {
                config_section_fail(&p, "cache.dir: must be a non-empty string");
                goto out;
            }
            bc->cache_dir = resolve_path(c, d);
        }
        if (get_u64(&p, cache, "max_bytes", "cache.max_bytes", 1024 * 1024, UINT64_MAX / 4, &bc->cache_max_bytes) != 0)
            goto out;
    }
    if (!bc->cache_dir) {
        size_t n = strlen(c->cache_dir) + sizeof "/blobserve";
        if ((bc->cache_dir = malloc(n))) snprintf(bc->cache_dir, n, "%s/blobserve", c->cache_dir);
    }
    if (!bc->cache_dir) {
        config_section_fail(&p, "cache.dir: out of memory");
        goto out;
    }

    uint64_t age = (uint64_t)bc->tag_max_age_s;
    if (get_u64(&p, sec, "tag_max_age_seconds", "tag_max_age_seconds", 0, 31536000, &age) != 0) goto out;
    bc->tag_max_age_s = (long)age;
    if (get_u64(&p, sec, "max_replace_file_bytes", "max_replace_file_bytes", 1, 1024ULL * 1024 * 1024,
                &bc->max_replace_file_bytes) != 0)
        goto out;
    if (get_u64(&p, sec, "inline_max_bytes", "inline_max_bytes", 0, 1024 * 1024, &bc->inline_max_bytes) != 0) goto out;
    if (get_bool(&p, sec, "wait_for_prepull", &bc->wait_for_prepull) != 0) goto out;

    json_value *pre = json_object_get(sec, "prepull");
    if (pre) {
        if (string_list(&p, pre, "prepull", &bc->prepull, &bc->n_prepull) != 0) goto out;
        for (size_t i = 0; i < bc->n_prepull; i++)
            if (check_ref(&p, bc, bc->prepull[i], i) != 0) goto out;
    }
    json_value *reps = json_object_get(sec, "replacements");
    if (reps && parse_edits(&p, reps, bc) != 0) goto out;
    rc = 0;
out:
    if (rc != 0) {
        blobserve_config_free(bc);
        return -1;
    }
    *out = bc;
    return 0;
}

void blobserve_config_free(blobserve_config *bc) {
    if (!bc) return;
    free(bc->listen_host);
    for (size_t i = 0; i < bc->n_repositories; i++) free(bc->repositories[i]);
    free(bc->repositories);
    free(bc->platform_os);
    free(bc->platform_arch);
    free(bc->platform_variant);
    free(bc->cache_dir);
    for (size_t i = 0; i < bc->n_prepull; i++) free(bc->prepull[i]);
    free(bc->prepull);
    for (size_t r = 0; r < bc->n_edits; r++) {
        blobserve_repo_edits *re = &bc->edits[r];
        for (size_t i = 0; i < re->n; i++) {
            free(re->items[i].path);
            free(re->items[i].search);
            free(re->items[i].replacement);
        }
        free(re->items);
        free(re->repository);
    }
    free(bc->edits);
    free(bc);
}

bool blobserve_config_allows(const blobserve_config *bc, const char *repository) {
    if (bc->any_repository) return true;
    for (size_t i = 0; i < bc->n_repositories; i++)
        if (strcmp(bc->repositories[i], repository) == 0) return true;
    return false;
}

const blobserve_repo_edits *blobserve_config_edits(const blobserve_config *bc, const char *repository) {
    for (size_t r = 0; r < bc->n_edits; r++)
        if (strcmp(bc->edits[r].repository, repository) == 0) return &bc->edits[r];
    return NULL;
}

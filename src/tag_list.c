#include "regfacade/tag_list.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "regfacade/json.h"
#include "regfacade/ref.h"

static void set_err(char *err, size_t errlen, const char *msg, long i) {
    if (i >= 0)
        snprintf(err, errlen, "tags[%ld] %s", i, msg);
    else
        snprintf(err, errlen, "%s", msg);
}

int tag_list_add(tag_list *l, const char *item) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        char **nt = realloc(l->tags, cap * sizeof *nt);
        if (!nt) return -1;
        l->tags = nt;
        l->cap = cap;
    }
    if (!(l->tags[l->n] = strdup(item))) return -1;
    l->n++;
    return 0;
}

int tag_list_add_page(tag_list *l, const char *body, size_t len, char *err, size_t errlen) {
    char jerr[256];
    json_value *v = json_parse(body ? body : "", len, 8, jerr, sizeof jerr);
    if (!v) {
        snprintf(err, errlen, "not JSON: %s", jerr);
        return -1;
    }
    int rc = -1;
    if (v->type != JSON_OBJECT) {
        set_err(err, errlen, "not an object", -1);
        goto out;
    }
    const json_value *tags = json_object_get(v, "tags");
    if (!tags || tags->type == JSON_NULL) { /* a repository without tags */
        rc = 0;
        goto out;
    }
    if (tags->type != JSON_ARRAY) {
        set_err(err, errlen, "\"tags\" is not an array", -1);
        goto out;
    }
    if (l->n + tags->count > TAG_LIST_MAX_TAGS) {
        snprintf(err, errlen, "more than %d tags", TAG_LIST_MAX_TAGS);
        goto out;
    }
    for (size_t i = 0; i < tags->count; i++) {
        const json_value *t = tags->items[i];
        if (t->type != JSON_STRING || strlen(t->str) != t->len || !ref_valid_tag(t->str)) {
            set_err(err, errlen, "is not a valid tag", (long)i);
            goto out;
        }
        if (tag_list_add(l, t->str) != 0) {
            set_err(err, errlen, "out of memory", -1);
            goto out;
        }
    }
    rc = 0;
out:
    json_free(v);
    return rc;
}

static int cmp_tag(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

void tag_list_finish(tag_list *l) {
    if (l->n < 2) return;
    qsort(l->tags, l->n, sizeof *l->tags, cmp_tag);
    size_t w = 1;
    for (size_t i = 1; i < l->n; i++) {
        if (strcmp(l->tags[i], l->tags[w - 1]) == 0)
            free(l->tags[i]);
        else
            l->tags[w++] = l->tags[i];
    }
    l->n = w;
}

void tag_list_page(const tag_list *l, const char *last, long n, size_t *start, size_t *end, bool *more) {
    size_t s = 0;
    if (last) { /* the first tag after last, in the same order */
        size_t lo = 0, hi = l->n;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (strcmp(l->tags[mid], last) <= 0)
                lo = mid + 1;
            else
                hi = mid;
        }
        s = lo;
    }
    size_t e = l->n;
    if (n >= 0 && (size_t)n < e - s) e = s + (size_t)n;
    *start = s;
    *end = e;
    *more = e < l->n;
}

char *tag_list_json(const tag_list *l, const char *name, size_t start, size_t end, size_t *len) {
    return tag_list_json_as(l, name, "tags", start, end, len);
}

char *tag_list_json_as(const tag_list *l, const char *name, const char *key, size_t start, size_t end, size_t *len) {
    json_value *o = json_new_object(), *arr = json_new_array();
    if (!o || !arr || (name && json_object_set(o, "name", json_new_string(name)) != 0)) {
        json_free(o);
        json_free(arr);
        return NULL;
    }
    for (size_t i = start; i < end; i++)
        if (json_array_append(arr, json_new_string(l->tags[i])) != 0) {
            json_free(o);
            json_free(arr);
            return NULL;
        }
    if (json_object_set(o, key, arr) != 0) { /* frees arr */
        json_free(o);
        return NULL;
    }
    char *out = json_serialize(o, len);
    json_free(o);
    return out;
}

void tag_list_free(tag_list *l) {
    for (size_t i = 0; i < l->n; i++) free(l->tags[i]);
    free(l->tags);
    memset(l, 0, sizeof *l);
}

int tag_list_next_path(const char *link, const char *repository, char *out, size_t outlen) {
    if (!link || !strstr(link, "rel=\"next\"")) return 0;
    const char *lt = strchr(link, '<'), *gt = lt ? strchr(lt, '>') : NULL;
    if (!lt || !gt) return 0;
    const char *p = lt + 1;
    /* An absolute URL's path, or the path itself: /v2/REPO/tags/list?... */
    const char *v2 = strstr(p, "/v2/");
    if (!v2 || v2 >= gt) return 0;
    p = v2 + 4;
    size_t rl = strlen(repository);
    if ((size_t)(gt - p) <= rl || strncmp(p, repository, rl) != 0 || strncmp(p + rl, "/tags/list?", 11) != 0) return 0;
    size_t n = (size_t)(gt - p);
    if (n >= outlen) return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)p[i] <= ' ' || p[i] == '#') return 0;
    memcpy(out, p, n);
    out[n] = '\0';
    return 1;
}

/*
 * tag_list: a repository's tags as a client asked for them (GET
 * /v2/NAME/tags/list?n=&last=). The upstream's answer, in one or more
 * pages, is merged into one list in lexical order without duplicates; the
 * client's page is then cut from it here, so `n` and `last` work even where
 * the upstream ignores them (distribution 2.8 does). The catalog
 * (/v2/_catalog) pages its repository names with the same list.
 */
#ifndef REGFACADE_TAG_LIST_H
#define REGFACADE_TAG_LIST_H

#include <stdbool.h>
#include <stddef.h>

#define TAG_LIST_MAX_TAGS 100000 /* tags one repository may list */

typedef struct {
    char **tags;
    size_t n, cap;
} tag_list;

/* Add the tags of one upstream page, {"name": ..., "tags": [..] | null}.
 * 0, or -1 with err ("not an object", "tags[3] is not a valid tag", ...). */
int tag_list_add_page(tag_list *l, const char *body, size_t len, char *err, size_t errlen);
/* Sort in lexical (byte) order and drop duplicates; call once, after the
 * last page. */
void tag_list_finish(tag_list *l);
/* The client's page: tags after `last` (NULL: from the start), at most n of
 * them (n < 0: all). [*start, *end) index l->tags; *more is true when tags
 * follow the page (a Link rel="next" is due). */
void tag_list_page(const tag_list *l, const char *last, long n, size_t *start, size_t *end, bool *more);
/* {"name": name, "tags": [...]} of [start, end) (malloc'd), NULL on
 * allocation failure. */
char *tag_list_json(const tag_list *l, const char *name, size_t start, size_t end, size_t *len);
/* The same list as {key: [...]} without "name" when name is NULL (the
 * catalog's {"repositories": [...]}). */
char *tag_list_json_as(const tag_list *l, const char *name, const char *key, size_t start, size_t end, size_t *len);
/* One more item (a copy); 0, or -1 out of memory. Then tag_list_finish. */
int tag_list_add(tag_list *l, const char *item);
void tag_list_free(tag_list *l);

/* The path after "/v2/" of an upstream's Link rel="next" (as the upstream
 * client takes it), when it continues the list of repository: 1 found,
 * 0 none (or one that points elsewhere, which is not followed). */
int tag_list_next_path(const char *link, const char *repository, char *out, size_t outlen);

#endif

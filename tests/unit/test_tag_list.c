/* tag_list: merging upstream pages, lexical order, the client's page, and
 * which upstream Link is followed. */
#include "regfacade/tag_list.h"

#include <stdlib.h>
#include <string.h>

#include "unit.h"

static int add(tag_list *l, const char *body) {
    char err[256];
    return tag_list_add_page(l, body, strlen(body), err, sizeof err);
}

int main(void) {
    tag_list l = {0};
    CHECK(add(&l, "{\"name\":\"a\",\"tags\":[\"v2\",\"latest\",\"v10\"]}") == 0);
    CHECK(add(&l, "{\"name\":\"a\",\"tags\":[\"v1\",\"v2\"]}") == 0); /* a page repeating one */
    CHECK(add(&l, "{\"name\":\"a\",\"tags\":null}") == 0);
    tag_list_finish(&l);
    CHECK(l.n == 4);
    CHECK_STR(l.tags[0], "latest");
    CHECK_STR(l.tags[1], "v1");
    CHECK_STR(l.tags[2], "v10"); /* lexical, not numeric */
    CHECK_STR(l.tags[3], "v2");

    size_t s, e;
    bool more;
    tag_list_page(&l, NULL, -1, &s, &e, &more);
    CHECK(s == 0 && e == 4 && !more);
    tag_list_page(&l, NULL, 2, &s, &e, &more);
    CHECK(s == 0 && e == 2 && more);
    tag_list_page(&l, "v1", 2, &s, &e, &more);
    CHECK(s == 2 && e == 4 && !more);
    tag_list_page(&l, "v0", 1, &s, &e, &more); /* not in the list: after where it would sort */
    CHECK(s == 1 && e == 2 && more);
    tag_list_page(&l, "zzz", 5, &s, &e, &more);
    CHECK(s == 4 && e == 4 && !more);
    tag_list_page(&l, NULL, 0, &s, &e, &more);
    CHECK(s == 0 && e == 0 && more);

    size_t len;
    char *j = tag_list_json(&l, "acme/app", 1, 3, &len);
    CHECK(j && strcmp(j, "{\"name\":\"acme/app\",\"tags\":[\"v1\",\"v10\"]}") == 0 && len == strlen(j));
    free(j);
    j = tag_list_json(&l, "acme/app", 4, 4, &len);
    CHECK(j && strcmp(j, "{\"name\":\"acme/app\",\"tags\":[]}") == 0);
    free(j);

    char err[256];
    CHECK(tag_list_add_page(&l, "[1]", 3, err, sizeof err) == -1 && strstr(err, "not an object"));
    CHECK(add(&l, "{\"tags\":[\"ok\",\"bad tag\"]}") == -1);
    CHECK(tag_list_add_page(&l, "{\"tags\":[\"ok\",\"bad tag\"]}", 25, err, sizeof err) == -1 &&
          strstr(err, "tags[1] is not a valid tag"));
    CHECK(add(&l, "{\"tags\":{}}") == -1);
    CHECK(add(&l, "not json") == -1);
    tag_list_free(&l);
    CHECK(l.n == 0 && l.tags == NULL);

    char p[512];
    CHECK(tag_list_next_path("</v2/acme/app/tags/list?n=100&last=v9>; rel=\"next\"", "acme/app", p, sizeof p) == 1);
    CHECK_STR(p, "acme/app/tags/list?n=100&last=v9");
    CHECK(tag_list_next_path("<https://reg.example/v2/acme/app/tags/list?last=b>; rel=\"next\"", "acme/app", p,
                             sizeof p) == 1);
    CHECK_STR(p, "acme/app/tags/list?last=b");
    /* another repository's list, no rel=next, or no path: not followed */
    CHECK(tag_list_next_path("</v2/other/tags/list?last=b>; rel=\"next\"", "acme/app", p, sizeof p) == 0);
    CHECK(tag_list_next_path("</v2/acme/app/tags/list?last=b>; rel=\"prev\"", "acme/app", p, sizeof p) == 0);
    CHECK(tag_list_next_path("</v2/acme/app/blobs/x?last=b>; rel=\"next\"", "acme/app", p, sizeof p) == 0);
    CHECK(tag_list_next_path("", "acme/app", p, sizeof p) == 0);
    CHECK(tag_list_next_path(NULL, "acme/app", p, sizeof p) == 0);
    return UNIT_DONE("tag_list");
}

/* client_auth: the client's Authorization header (client_auth.h). */
#include "regfacade/client_auth.h"

#include <string.h>

#include "unit.h"

static client_credentials c;

static void basic_ok(const char *header, const char *user, const char *password) {
    CHECK(client_auth_parse(header, &c) == CLIENT_AUTH_BASIC);
    CHECK_STR(c.user, user);
    CHECK_STR(c.password, password);
    CHECK(c.token[0] == '\0');
}

static void invalid(const char *header) {
    CHECK(client_auth_parse(header, &c) == CLIENT_AUTH_INVALID);
    CHECK(c.user[0] == '\0' && c.password[0] == '\0' && c.token[0] == '\0');
}

int main(void) {
    CHECK(client_auth_parse(NULL, &c) == CLIENT_AUTH_NONE);
    CHECK(client_auth_parse("", &c) == CLIENT_AUTH_NONE);
    CHECK(client_auth_parse("   ", &c) == CLIENT_AUTH_NONE);

    basic_ok("Basic YWxpY2U6czNjcmV0", "alice", "s3cret");     /* alice:s3cret */
    basic_ok("basic YWxpY2U6czNjcmV0", "alice", "s3cret");     /* scheme case-insensitive */
    basic_ok("BASIC   YWxpY2U6czNjcmV0  ", "alice", "s3cret"); /* extra spaces */
    basic_ok("Basic YWxpY2U6", "alice", "");                   /* alice: (empty password) */
    basic_ok("Basic YWxpY2U6YTpiOmM=", "alice", "a:b:c");      /* first ':' splits */
    basic_ok("Basic YWxpY2U6czNjcmV0", "alice", "s3cret");

    invalid("Basic");                    /* no credentials */
    invalid("Basic !!!");                /* not base64 */
    invalid("Basic bm9jb2xvbg==");       /* "nocolon" */
    invalid("Basic OnBhc3M=");           /* ":pass": empty user */
    invalid("Basic YQpiOmM=");           /* "a\nb:c": control character */
    invalid("Basic YWxpY2U6czNjcmV0 x"); /* trailing junk */
    invalid("Digest username=\"x\"");    /* another scheme */
    invalid("Bearer a b");
    invalid("Bearer");

    CHECK(client_auth_parse("Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", &c) == CLIENT_AUTH_BEARER);
    CHECK_STR(c.token, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln");
    CHECK(c.user[0] == '\0');
    CHECK(client_auth_parse("bearer abc+/~-._==", &c) == CLIENT_AUTH_BEARER);
    CHECK_STR(c.token, "abc+/~-._==");

    /* Oversize values are refused, not truncated. */
    static char big[CLIENT_AUTH_TOKEN_MAX + 64];
    strcpy(big, "Bearer ");
    memset(big + 7, 'a', CLIENT_AUTH_TOKEN_MAX);
    big[7 + CLIENT_AUTH_TOKEN_MAX] = '\0';
    invalid(big);
    big[7 + CLIENT_AUTH_TOKEN_MAX - 1] = '\0';
    CHECK(client_auth_parse(big, &c) == CLIENT_AUTH_BEARER && strlen(c.token) == CLIENT_AUTH_TOKEN_MAX - 1);

    /* A parse after a good one leaves nothing of the old credentials. */
    client_auth_parse("Basic YWxpY2U6czNjcmV0", &c);
    invalid("Basic !!!");
    client_auth_parse("Basic YWxpY2U6czNjcmV0", &c);
    client_credentials_wipe(&c);
    CHECK(c.kind == CLIENT_AUTH_NONE && c.user[0] == '\0' && c.password[0] == '\0');
    return UNIT_DONE("client_auth");
}

/* Docker config.json credential and helper lookup (ref.h). Input: HOST NUL JSON; with
 * no NUL, the whole input is the JSON and the host is docker.io. */
#include "fuzz.h"

#include "regfacade/ref.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *rest;
    size_t rest_size;
    size_t hl = fuzz_split(data, size, &rest, &rest_size);
    char *host;
    const uint8_t *json;
    size_t json_len;
    if (rest_size == 0 && hl == size) {
        host = fuzz_cstr((const uint8_t *)"docker.io", 9);
        json = data;
        json_len = size;
    } else {
        host = fuzz_cstr(data, hl);
        json = rest;
        json_len = rest_size;
    }
    /* Not NUL-terminated on purpose: the function takes a length. */
    char *text = malloc(json_len ? json_len : 1);
    if (!text) abort();
    if (json_len) memcpy(text, json, json_len);
    char user[64], pass[64], err[256];
    int rc = docker_config_lookup(text, json_len, host, user, sizeof user, pass, sizeof pass, err, sizeof err);
    FUZZ_ASSERT(rc == 1 || rc == 0 || rc == -1);
    if (rc == 1) FUZZ_ASSERT(memchr(user, 0, sizeof user) && memchr(pass, 0, sizeof pass));
    if (rc == -1) FUZZ_ASSERT(memchr(err, 0, sizeof err));
    char u1[1], p1[1];
    (void)docker_config_lookup(text, json_len, host, u1, sizeof u1, p1, sizeof p1, err, 8);
    char helper[32];
    rc = docker_config_helper(text, json_len, host, helper, sizeof helper, err, sizeof err);
    FUZZ_ASSERT(rc == 1 || rc == 0 || rc == -1);
    if (rc == 1) FUZZ_ASSERT(helper[0] && memchr(helper, 0, sizeof helper) && !strchr(helper, '/'));
    if (rc != 1) FUZZ_ASSERT(helper[0] == '\0');
    free(text);
    free(host);
    return 0;
}

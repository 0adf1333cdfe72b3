#include "regfacade/tls.h"

#include <errno.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "regfacade/errmsg.h"
#include "regfacade/log.h"

#define TLS_FILE_MAX (1024 * 1024)

/* GnuTLS priority strings for "min_version". */
#define PRIO_TLS12 "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"
#define PRIO_TLS13 "NORMAL:-VERS-ALL:+VERS-TLS1.3"

/* Whole file, NUL-terminated; NULL with errno set. Refuses NUL bytes (PEM
 * is text, and libmicrohttpd takes C strings). */
static char *slurp(const char *path, size_t *len) {
    char *buf = config_read_file(path, TLS_FILE_MAX, len);
    if (buf && strlen(buf) != *len) {
        explicit_bzero(buf, *len);
        free(buf);
        errno = EINVAL;
        return NULL;
    }
    return buf;
}

static char *resolve(const config *c, const char *p) {
    if (p[0] == '/' || !c->dir) return strdup(p);
    size_t n = strlen(c->dir) + strlen(p) + 2;
    char *out = malloc(n);
    if (out) snprintf(out, n, "%s/%s", c->dir, p);
    return out;
}

static int get_path(const config *c, const json_value *sec, const char *key, char **out, char *err, size_t errlen) {
    config_section p_ = {c, "tls", err, errlen}, *p = &p_;
    json_value *v = json_object_get(sec, key);
    if (!v) return 0;
    if (v->type != JSON_STRING || v->len == 0 || strlen(v->str) != v->len)
        return config_section_fail(p, "%s: must be a non-empty string (a file path)", key);
    *out = resolve(c, v->str);
    return *out ? 0 : config_section_fail(p, "%s: out of memory", key);
}

/* OpenSSL must never prompt on a terminal: an encrypted key without a
 * configured passphrase simply fails to load. */
static int pass_cb(char *buf, int size, int rwflag, void *u) {
    (void)rwflag;
    const char *p = u;
    if (!p) return 0;
    size_t n = strlen(p);
    if (n > (size_t)size) return 0;
    memcpy(buf, p, n);
    return (int)n;
}

static void openssl_reason(char *buf, size_t len) {
    unsigned long e = ERR_peek_last_error();
    if (e)
        ERR_error_string_n(e, buf, len);
    else
        snprintf(buf, len, "no PEM block found");
    ERR_clear_error();
}

static int check_pem(const config *c, tls_config *t, char *err, size_t errlen) {
    config_section p_ = {c, "tls", err, errlen}, *p = &p_;
    char why[256];
    BIO *b = BIO_new_mem_buf(t->cert_pem, -1);
    if (!b) return config_section_fail(p, ": out of memory");
    X509 *leaf = PEM_read_bio_X509(b, NULL, pass_cb, NULL);
    if (!leaf) {
        openssl_reason(why, sizeof why);
        BIO_free(b);
        return config_section_fail(p, "cert_file: %s holds no PEM certificate (%s)", t->cert_file, why);
    }
    /* The rest of the file must be certificates too (the chain). */
    for (;;) {
        X509 *more = PEM_read_bio_X509(b, NULL, pass_cb, NULL);
        if (!more) break;
        X509_free(more);
    }
    ERR_clear_error();
    BIO_free(b);

    b = BIO_new_mem_buf(t->key_pem, -1);
    if (!b) {
        X509_free(leaf);
        return config_section_fail(p, ": out of memory");
    }
    EVP_PKEY *key = PEM_read_bio_PrivateKey(b, NULL, pass_cb, t->key_password);
    BIO_free(b);
    if (!key) {
        openssl_reason(why, sizeof why);
        X509_free(leaf);
        if (strstr(t->key_pem, "ENCRYPTED") && !t->key_password)
            return config_section_fail(p, "key_file: %s is encrypted; set tls.key_password_file", t->key_file);
        return config_section_fail(p, "key_file: %s holds no usable PEM private key (%s)", t->key_file,
                                   t->key_password ? "wrong passphrase or not a key" : why);
    }
    int match = X509_check_private_key(leaf, key);
    ERR_clear_error();
    EVP_PKEY_free(key);
    if (match != 1) {
        X509_free(leaf);
        return config_section_fail(p, ": the key in %s does not belong to the certificate in %s", t->key_file,
                                   t->cert_file);
    }
    X509_NAME_oneline(X509_get_subject_name(leaf), t->subject, (int)sizeof t->subject);
    const ASN1_TIME *na = X509_get0_notAfter(leaf);
    BIO *mb = BIO_new(BIO_s_mem());
    if (mb && ASN1_TIME_print(mb, na)) {
        int n = BIO_read(mb, t->not_after, (int)sizeof t->not_after - 1);
        t->not_after[n > 0 ? n : 0] = '\0';
    }
    BIO_free(mb);
    t->expired = X509_cmp_current_time(na) < 0;
    X509_free(leaf);
    return 0;
}

int tls_config_load(const config *c, tls_config **out, char *err, size_t errlen) {
    config_section p_ = {c, "tls", err, errlen}, *p = &p_;
    static const char *const keys[] = {"cert_file", "key_file", "key_password_file", "min_version", NULL};
    *out = NULL;
    const json_value *sec = c->tls;
    if (!sec) return 0;
    if (sec->type != JSON_OBJECT) return config_section_fail(p, ": must be an object");
    if (config_section_check_keys(p, sec, "", keys) != 0) return -1;
    tls_config *t = calloc(1, sizeof *t);
    if (!t) return config_section_fail(p, ": out of memory");
    char *pass_file = NULL;
    int rc = -1;
    size_t len = 0;
    if (get_path(c, sec, "cert_file", &t->cert_file, err, errlen) != 0) goto done;
    if (get_path(c, sec, "key_file", &t->key_file, err, errlen) != 0) goto done;
    if (get_path(c, sec, "key_password_file", &pass_file, err, errlen) != 0) goto done;
    if (!t->cert_file || !t->key_file) {
        config_section_fail(p, ": cert_file and key_file are both required");
        goto done;
    }
    t->priorities = PRIO_TLS12;
    json_value *mv = json_object_get(sec, "min_version");
    if (mv) {
        if (mv->type == JSON_STRING && strcmp(mv->str, "1.2") == 0)
            t->priorities = PRIO_TLS12;
        else if (mv->type == JSON_STRING && strcmp(mv->str, "1.3") == 0)
            t->priorities = PRIO_TLS13;
        else {
            config_section_fail(p, "min_version: must be \"1.2\" or \"1.3\"");
            goto done;
        }
    }
    if (!(t->cert_pem = slurp(t->cert_file, &len))) {
        config_section_fail(p, "cert_file: cannot read %s: %s", t->cert_file,
                            errno == EINVAL ? "holds a NUL byte" : strerror(errno));
        goto done;
    }
    if (!(t->key_pem = slurp(t->key_file, &len))) {
        config_section_fail(p, "key_file: cannot read %s: %s", t->key_file,
                            errno == EINVAL ? "holds a NUL byte" : strerror(errno));
        goto done;
    }
    if (pass_file) {
        if (!(t->key_password = slurp(pass_file, &len))) {
            config_section_fail(p, "key_password_file: cannot read %s: %s", pass_file,
                                errno == EINVAL ? "holds a NUL byte" : strerror(errno));
            goto done;
        }
        while (len > 0 && (t->key_password[len - 1] == '\n' || t->key_password[len - 1] == '\r'))
            t->key_password[--len] = '\0';
        if (len == 0) {
            config_section_fail(p, "key_password_file: %s is empty", pass_file);
            goto done;
        }
    }
    if (check_pem(c, t, err, errlen) != 0) goto done;
    struct stat st;
    if (stat(t->key_file, &st) == 0 && (st.st_mode & 0077))
        log_warn("tls.key_file %s is readable by group or others (mode %03o); 0600 or 0400 is safer", t->key_file,
                 (unsigned)(st.st_mode & 0777));
    rc = 0;
done:
    free(pass_file);
    if (rc != 0)
        tls_config_free(t);
    else
        *out = t;
    return rc;
}

void tls_config_free(tls_config *t) {
    if (!t) return;
    free(t->cert_file);
    free(t->key_file);
    free(t->cert_pem);
    secret_free(t->key_pem);
    secret_free(t->key_password);
    free(t);
}

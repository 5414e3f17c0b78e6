/* train_state.json reader and writer (state_json.h). */
#include "train/state_json.h"

#include "io/atomic.h"
#include "io/ckpt.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int moe__train_curve_add(moe__train_curve *c, double step, double val) {
    if (c->n == c->cap) {
        if (c->cap >= MOE__TRAIN_STATE_MAX_POINTS) return MOE_ELIMIT;
        const int cap = c->cap ? 2 * c->cap : 256;
        double *s = moe__calloc((size_t)cap, sizeof(double)), *v = moe__calloc((size_t)cap, sizeof(double));
        if (!s || !v) {
            moe__free(s), moe__free(v);
            return MOE_ENOMEM;
        }
        if (c->n) memcpy(s, c->step, sizeof(double) * c->n), memcpy(v, c->val, sizeof(double) * c->n);
        moe__free(c->step), moe__free(c->val);
        c->step = s, c->val = v, c->cap = cap;
    }
    c->step[c->n] = step, c->val[c->n++] = val;
    return MOE_OK;
}

void moe__train_curve_free(moe__train_curve *c) {
    moe__free(c->step), moe__free(c->val);
    memset(c, 0, sizeof *c);
}

void moe__train_state_free(moe__train_state *s) {
    if (!s) return;
    moe__free(s->command);
    moe__free(s->data);
    moe__train_curve_free(&s->train), moe__train_curve_free(&s->val);
    memset(s, 0, sizeof *s);
}

/* ---- reader ------------------------------------------------------------------- */

typedef struct {
    const char *name;
    char *err;
    size_t errsz;
} ctx;

/* An integer-valued number in [0, max], range checked before any conversion
 * (a double past INT_MAX converted to int is undefined behaviour). */
static int get_count(const ctx *x, const cJSON *v, const char *key, double max, double *out) {
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble < 0 || v->valuedouble > max ||
        floor(v->valuedouble) != v->valuedouble)
        return moe__set_err(x->err, x->errsz, MOE_EFORMAT, "%s: \"%s\" must be an integer from 0 to %.0f", x->name,
                            key, max);
    *out = v->valuedouble + 0.0; /* -0 is written back as 0: a round trip must not change a bit */
    return MOE_OK;
}

static int get_curve(const ctx *x, const cJSON *arr, const char *key, moe__train_curve *c) {
    if (!cJSON_IsArray(arr))
        return moe__set_err(x->err, x->errsz, MOE_EFORMAT, "%s: \"%s\" must be an array of [step, loss] pairs",
                            x->name, key);
    int i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, arr) {
        const cJSON *a = cJSON_IsArray(it) ? it->child : NULL, *b = a ? a->next : NULL;
        double step = 0;
        if (!b || b->next || get_count(x, a, key, MOE__TRAIN_STATE_MAX_STEP, &step) || !cJSON_IsNumber(b) ||
            !isfinite(b->valuedouble))
            return moe__set_err(x->err, x->errsz, MOE_EFORMAT,
                                "%s: \"%s\"[%d] must be a pair [step, loss] of an integer step from 0 to %d and a "
                                "finite loss", x->name, key, i, MOE__TRAIN_STATE_MAX_STEP);
        int rc = moe__train_curve_add(c, step, b->valuedouble + 0.0);
        if (rc == MOE_ELIMIT)
            return moe__set_err(x->err, x->errsz, rc, "%s: \"%s\" has more than %d pairs", x->name, key,
                                MOE__TRAIN_STATE_MAX_POINTS);
        if (rc) return moe__set_err(x->err, x->errsz, rc, "%s: out of memory", x->name);
        i++;
    }
    return MOE_OK;
}

enum { K_STEP, K_TOKENS, K_TRAIN, K_VAL, K_SKIPPED, K_SPIKES, K_COMMAND, K_DATA, N_KEYS, N_REQUIRED = K_SKIPPED };
static const char *const KEYS[N_KEYS] = {"step", "tokens", "train", "val", "skipped_steps", "loss_spikes",
                                         "command", "data"};

/* An optional string of at most MAX_COMMAND bytes, copied to *out. */
static int get_string(const ctx *x, const cJSON *v, const char *key, char **out) {
    if (!v) return MOE_OK;
    const char *str = cJSON_GetStringValue(v);
    if (!str) return moe__set_err(x->err, x->errsz, MOE_EFORMAT, "%s: \"%s\" must be a string", x->name, key);
    if (strlen(str) > MOE__TRAIN_STATE_MAX_COMMAND)
        return moe__set_err(x->err, x->errsz, MOE_ELIMIT, "%s: \"%s\" is longer than %d bytes", x->name, key,
                            MOE__TRAIN_STATE_MAX_COMMAND);
    if (!(*out = moe__strdup(str))) return moe__set_err(x->err, x->errsz, MOE_ENOMEM, "%s: out of memory", x->name);
    return MOE_OK;
}

static int parse_root(const ctx *x, const cJSON *root, moe__train_state *s) {
    if (!cJSON_IsObject(root))
        return moe__set_err(x->err, x->errsz, MOE_EFORMAT, "%s: the top level must be a JSON object", x->name);
    /* one pass over the members: cJSON keeps duplicate keys, and a lookup
     * would silently take the first of two different values */
    const cJSON *v[N_KEYS] = {0};
    int seen[N_KEYS] = {0};
    for (const cJSON *it = root->child; it; it = it->next) {
        for (int k = 0; k < N_KEYS; k++) {
            if (!it->string || strcmp(it->string, KEYS[k])) continue;
            if (seen[k]++) return moe__set_err(x->err, x->errsz, MOE_EFORMAT, "%s: \"%s\" appears twice", x->name, KEYS[k]);
            v[k] = cJSON_IsNull(it) && k >= N_REQUIRED ? NULL : it;
        }
    }
    for (int k = 0; k < N_REQUIRED; k++)
        if (!v[k]) return moe__set_err(x->err, x->errsz, MOE_EFORMAT, "%s: \"%s\" is missing", x->name, KEYS[k]);
    double d = 0;
    int rc = get_count(x, v[K_STEP], KEYS[K_STEP], MOE__TRAIN_STATE_MAX_STEP, &d);
    if (rc) return rc;
    s->step = (int)d;
    if ((rc = get_count(x, v[K_TOKENS], KEYS[K_TOKENS], MOE__TRAIN_STATE_MAX_TOKENS, &s->tokens))) return rc;
    int *counts[2] = {&s->skipped_steps, &s->loss_spikes};
    for (int k = 0; k < 2; k++) {
        if (!v[K_SKIPPED + k]) continue;
        if ((rc = get_count(x, v[K_SKIPPED + k], KEYS[K_SKIPPED + k], MOE__TRAIN_STATE_MAX_STEP, &d))) return rc;
        *counts[k] = (int)d;
    }
    if ((rc = get_string(x, v[K_COMMAND], KEYS[K_COMMAND], &s->command))) return rc;
    if ((rc = get_string(x, v[K_DATA], KEYS[K_DATA], &s->data))) return rc;
    if ((rc = get_curve(x, v[K_TRAIN], KEYS[K_TRAIN], &s->train))) return rc;
    return get_curve(x, v[K_VAL], KEYS[K_VAL], &s->val);
}

int moe__train_state_parse(const char *text, size_t n, const char *name, moe__train_state *s, char *err,
                           size_t errsz) {
    ctx x = {name ? name : "train_state.json", err, errsz};
    memset(s, 0, sizeof *s);
    if (!text && n) return moe__set_err(err, errsz, MOE_EINVAL, "%s: text is NULL", x.name);
    if (n > MOE__TRAIN_STATE_MAX_BYTES)
        return moe__set_err(err, errsz, MOE_ELIMIT, "%s: %zu bytes, more than %zu", x.name, n,
                            MOE__TRAIN_STATE_MAX_BYTES);
    moe__json_oom();
    cJSON *root = cJSON_ParseWithLength(text, n);
    if (!root && moe__json_oom()) return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", x.name);
    if (!root) return moe__set_err(err, errsz, MOE_EFORMAT, "%s: not valid JSON", x.name);
    int rc = parse_root(&x, root, s);
    cJSON_Delete(root);
    if (rc) moe__train_state_free(s);
    return rc;
}

int moe__train_state_load(const char *dir, moe__train_state *s, char *err, size_t errsz) {
    char path[4200], *buf;
    size_t n;
    memset(s, 0, sizeof *s);
    int rc = moe__ckpt_path(dir, "train_state.json", path, sizeof path, err, errsz);
    if (!rc) rc = moe__read_file(path, MOE__TRAIN_STATE_MAX_BYTES, &buf, &n, err, errsz);
    if (rc) return rc;
    rc = moe__train_state_parse(buf, n, path, s, err, errsz);
    moe__free(buf);
    return rc;
}

/* ---- writer ------------------------------------------------------------------- */

/* A number node that reads back as exactly x: cJSON prints 15 significant
 * digits whenever they come within an epsilon of the value, which loses the
 * last bits of some doubles (the train_state fuzz target found 3.3333333333333397
 * coming back as ...401); the shortest of 15-17 digits that strtod maps back
 * to x does not. x is finite (the callers skip the others). */
static cJSON *exact_number(double x) {
    char buf[40];
    for (int digits = 15; digits <= 17; digits++) {
        snprintf(buf, sizeof buf, "%.*g", digits, x);
        if (strtod(buf, NULL) == x) break;
    }
    return cJSON_CreateRaw(buf);
}

static cJSON *curve_json(const moe__train_curve *c, int *ok) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; a && i < c->n; i++) {
        if (!isfinite(c->val[i])) continue;
        cJSON *p = cJSON_CreateArray();
        moe__json_add(ok, p, NULL, exact_number(c->step[i]));
        moe__json_add(ok, p, NULL, exact_number(c->val[i]));
        moe__json_add(ok, a, NULL, p);
    }
    return a;
}

char *moe__train_state_json(const moe__train_state *s) {
    cJSON *o = cJSON_CreateObject();
    int ok = o != NULL;
    moe__json_add(&ok, o, KEYS[K_STEP], cJSON_CreateNumber(s->step));
    moe__json_add(&ok, o, KEYS[K_TOKENS], exact_number(s->tokens));
    moe__json_add(&ok, o, KEYS[K_SKIPPED], cJSON_CreateNumber(s->skipped_steps));
    moe__json_add(&ok, o, KEYS[K_SPIKES], cJSON_CreateNumber(s->loss_spikes));
    if (s->command) moe__json_add(&ok, o, KEYS[K_COMMAND], cJSON_CreateString(s->command));
    if (s->data) moe__json_add(&ok, o, KEYS[K_DATA], cJSON_CreateString(s->data));
    moe__json_add(&ok, o, KEYS[K_TRAIN], curve_json(&s->train, &ok));
    moe__json_add(&ok, o, KEYS[K_VAL], curve_json(&s->val, &ok));
    char *text = ok ? cJSON_Print(o) : NULL; /* through the hooks: moe__free */
    cJSON_Delete(o);
    return text;
}

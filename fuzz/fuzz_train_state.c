/* train_state.json (src/train/state_json.c), which `moe train --resume`
 * reads: the parser with its type, range, duplicate-key and size checks; an
 * accepted state must survive a round trip through the writer unchanged
 * (every field, every pair bit for bit) and write the same text again. */
#include "fuzz.h"
#include "train/state_json.h"

#include <string.h>

static int same_curve(const moe__train_curve *a, const moe__train_curve *b) {
    return a->n == b->n && (!a->n || (!memcmp(a->step, b->step, sizeof(double) * a->n) &&
                                      !memcmp(a->val, b->val, sizeof(double) * a->n)));
}

MOE_FUZZ_TARGET(train_state) {
    moe__train_state s, s2;
    char err[256];
    int rc = moe__train_state_parse((const char *)data, size, "fuzz.json", &s, err, sizeof err);
    if (rc) return rc;
    if (s.step < 0 || s.step > MOE__TRAIN_STATE_MAX_STEP || !(s.tokens >= 0) || s.skipped_steps < 0 ||
        s.loss_spikes < 0)
        moe_fuzz_trap("an accepted state holds a value out of range");
    char *js = moe__train_state_json(&s);
    if (!js) {
        moe__train_state_free(&s);
        return 0; /* out of memory */
    }
    if (moe__train_state_parse(js, strlen(js), "roundtrip", &s2, err, sizeof err))
        moe_fuzz_trap("an accepted state does not parse back");
    if (s2.step != s.step || s2.tokens != s.tokens || s2.skipped_steps != s.skipped_steps ||
        s2.loss_spikes != s.loss_spikes || !s.command != !s2.command ||
        (s.command && strcmp(s.command, s2.command)) || !s.data != !s2.data || (s.data && strcmp(s.data, s2.data)) ||
        !same_curve(&s.train, &s2.train) ||
        !same_curve(&s.val, &s2.val))
        moe_fuzz_trap("train_state round trip changed a value");
    char *js2 = moe__train_state_json(&s2);
    if (js2 && strcmp(js, js2)) moe_fuzz_trap("train_state round trip changed the JSON");
    moe__free(js2);
    moe__free(js);
    moe__train_state_free(&s2);
    moe__train_state_free(&s);
    return 0;
}

/* config.json: the parser and range checks; an accepted config must survive
 * a round trip through the writer unchanged. */
#include "fuzz.h"
#include "moe.h"

#include <stdlib.h>
#include <string.h>

MOE_FUZZ_TARGET(config) {
    moe_model_config c, c2;
    char err[256];
    int rc = moe_model_config_parse((const char *)data, size, "fuzz.json", &c, err, sizeof err);
    if (rc) return rc;
    (void)moe_model_config_costs(&c, 128);
    char *js = moe_model_config_to_json(&c);
    if (!js) return 0; /* out of memory */
    if (moe_model_config_parse(js, strlen(js), "roundtrip", &c2, err, sizeof err))
        moe_fuzz_trap("an accepted config does not parse back");
    char *js2 = moe_model_config_to_json(&c2);
    if (js2 && strcmp(js, js2)) moe_fuzz_trap("config round trip changed the JSON");
    free(js2);
    free(js);
    return 0;
}

#include "internal.h"

#include <stdio.h>
#include <string.h>

const char *moe_version(void) { return "0.1.0"; }

const char *moe_strerror(int err) {
    switch (err) {
    case MOE_OK: return "success";
#define MOE__ERR_DESC(name, value, desc) case MOE_E##name: return desc;
    MOE_ERRNO_MAP(MOE__ERR_DESC)
#undef MOE__ERR_DESC
    default: return "unknown error";
    }
}

const char *moe_err_name(int err) {
    switch (err) {
    case MOE_OK: return "MOE_OK";
#define MOE__ERR_NAME(name, value, desc) case MOE_E##name: return "MOE_E" #name;
    MOE_ERRNO_MAP(MOE__ERR_NAME)
#undef MOE__ERR_NAME
    default: return "MOE_EUNKNOWN";
    }
}

int moe__set_err(char *buf, size_t size, int err, const char *fmt, ...) {
    if (buf && size > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, size, fmt, ap);
        va_end(ap);
    }
    return err;
}

/* moe convert: a trained model directory to a GGUF file llama.cpp loads
 * (--out ends in .gguf), or a GGUF MoE file / Hugging Face directory to a
 * model directory (any other --out). */
#include "args.h"
#include "cli.h"

#include <stdio.h>
#include <string.h>

int moe_cli_convert(int argc, char **argv) {
    const char *src = NULL, *dst = NULL, *type = "f32";
    cli_arg args[] = {
        {"--model", "-m", ARG_STR, &src, "source: a moe train model directory, a GGUF file or a HF directory (required)"},
        {"--out", "-o", ARG_STR, &dst, "destination: FILE.gguf (export), else a model directory (import) (required)"},
        {"--type", NULL, ARG_STR, &type, "GGUF export: weight type of the matrices, f32, f16, q8_0 or q4_0"},
    };
    int rc = cli_parse("moe convert -m MODEL_DIR --out FILE.gguf [--type f32|f16|q8_0|q4_0]\n"
                       "       moe convert -m FILE.gguf|HF_DIR --out MODEL_DIR", args,
                       sizeof args / sizeof args[0], argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    static const struct { const char *name; moe_convert_type t; } types[] = {
        {"f32", MOE_CONVERT_F32}, {"f16", MOE_CONVERT_F16}, {"q8_0", MOE_CONVERT_Q8_0}, {"q4_0", MOE_CONVERT_Q4_0}};
    int ti = -1;
    for (int i = 0; i < 4; i++)
        if (!strcmp(type, types[i].name)) ti = i;
    if (!src || !dst || ti < 0) {
        fprintf(stderr, "moe convert: -m MODEL_DIR and --out FILE.gguf are required; --type is f32, f16, q8_0 or q4_0\n");
        return 2;
    }
    char err[512];
    const size_t n = strlen(dst);
    if (n < 5 || strcmp(dst + n - 5, ".gguf")) {
        int tok = 0;
        rc = moe_convert_to_model_dir(src, dst, &tok, err, sizeof err);
        if (!rc)
            printf("wrote %s (config.json, model.safetensors%s)\n", dst,
                   tok ? ", tokenizer.json" : "; no tokenizer.json: the vocabulary is not a byte-level BPE of ours");
    } else {
        rc = moe_convert_model_to_gguf(src, dst, types[ti].t, err, sizeof err);
        if (!rc) printf("wrote %s (%s)\n", dst, type);
    }
    if (rc) {
        fprintf(stderr, "moe convert: %s\n", err);
        return 1;
    }
    return 0;
}

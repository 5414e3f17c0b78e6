/* Shared by moe route (cli/cmd_route.c, cli/route_report.c) and moe generate
 * --routing-log: the routing trace of a model's last forward, and the audit's
 * report. */
#ifndef MOE_CLI_ROUTE_H
#define MOE_CLI_ROUTE_H

#include "moe.h"
#include "report/route_stats.h"
#include "tokenizer/tokenizer.h"

/* Fills tt's layers with token t's kept slots in every MoE layer of the last
 * forward or decode step; returns the number of MoE layers. */
int cli_trace_fill(const moe_model *m, int t, moe__trace_tok *tt);
/* tt's piece: the bytes of token id (cut at MOE__TRACE_MAX_PIECE). */
void cli_trace_piece(const moe_tokenizer *tok, int id, moe__trace_tok *tt);
/* The trace's first line: {"moe_trace":1,"model":...,"experts_used":k}. */
void cli_trace_header(moe__sb *b, const char *model_dir, const moe_model_config *c, int k);

/* Writes route.json, report.md, heatmap.svg and genre_heatmap.svg into out.
 * lidx [a->L] is each MoE layer's model index; layer_sel the model layer
 * of the genre heatmap (-1: all side by side). Prints errors; returns 0 or 1. */
int cli_route_report(const moe__route_acc *a, const int *lidx, const char *model_dir, const char *split, int k,
                     int layer_sel, double flag_ratio, int64_t min_count, double seconds, const char *out);

#endif

/* The routing audit's statistics (src/report/route_stats.c) on hand-built
 * loads with hand-computed answers, the trace's write/read round trip with
 * awkward bytes and hostile lines, and the accumulators on a real tiny
 * model's forward checked against the layer's own counts. */
#include "report/route_stats.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

TEST(route_stats_cv_entropy_maxmean_by_hand) {
    /* x = (1,2,3,6): mean 3, squared deviations 4+1+0+9 = 14, population
     * variance 14/4 = 3.5, std 1.8708287, CV = 1.8708287/3 = 0.62360956;
     * max/mean = 6/3 = 2 */
    const double x[] = {1, 2, 3, 6};
    CHECK_CLOSE(moe__route_cv(x, 4), 0.62360956446232, 1e-12, 0);
    CHECK_CLOSE(moe__route_max_over_mean(x, 4), 2.0, 1e-15, 0);
    /* (1,1,2) -> p = (1/4, 1/4, 1/2): H = 2(1/4)ln4 + (1/2)ln2 = 1.5 ln2 =
     * 1.03972077; over ln3 = 1.09861229 gives 0.94639463 */
    const double y[] = {1, 1, 2};
    CHECK_CLOSE(moe__route_norm_entropy(y, 3), 0.94639463035719, 1e-12, 0);
    const double even[] = {5, 5, 5, 5}, one[] = {0, 0, 7, 0}, zero[] = {0, 0, 0};
    CHECK_CLOSE(moe__route_norm_entropy(even, 4), 1.0, 1e-15, 0);
    CHECK_CLOSE(moe__route_cv(even, 4), 0.0, 1e-15, 0);
    CHECK_CLOSE(moe__route_max_over_mean(even, 4), 1.0, 1e-15, 0);
    CHECK_CLOSE(moe__route_norm_entropy(one, 4), 0.0, 1e-15, 0);
    /* one expert takes all of E = 4: std = sqrt((3 (7/4)^2 + (21/4)^2)/4) =
     * (7/4) sqrt(3), so CV = sqrt(3); max/mean = E */
    CHECK_CLOSE(moe__route_cv(one, 4), sqrt(3.0), 1e-12, 0);
    CHECK_CLOSE(moe__route_max_over_mean(one, 4), 4.0, 1e-15, 0);
    CHECK(moe__route_cv(zero, 3) == 0 && moe__route_max_over_mean(zero, 3) == 0 &&
          moe__route_norm_entropy(zero, 3) == 0);
}

TEST(route_stats_js_divergence_by_hand) {
    /* disjoint supports: 1 bit, the maximum */
    const double a[] = {1, 0}, b[] = {0, 3};
    CHECK_CLOSE(moe__route_js(a, b, 2), 1.0, 1e-12, 0);
    /* p = (1/2, 1/2), q = (1, 0), m = (3/4, 1/4):
     * KL(p||m) = (1/2)log2(2/3) + (1/2)log2(2) = 0.20751875
     * KL(q||m) = log2(4/3) = 0.41503750; JS = half their sum = 0.31127812 */
    const double p[] = {1, 1}, q[] = {1, 0};
    CHECK_CLOSE(moe__route_js(p, q, 2), 0.3112781245, 1e-10, 0);
    CHECK_CLOSE(moe__route_js(q, p, 2), 0.3112781245, 1e-10, 0);
    /* counts, not shares: scaling either side changes nothing */
    const double p2[] = {7, 7}, q2[] = {0.5, 0};
    CHECK_CLOSE(moe__route_js(p2, q2, 2), 0.3112781245, 1e-10, 0);
    CHECK_CLOSE(moe__route_js(p, p2, 2), 0.0, 1e-15, 0);
    const double z[] = {0, 0};
    CHECK(isnan(moe__route_js(p, z, 2)));
}

/* Two genres, one layer, E = 4, one slot per token:
 *   genre 0: experts (0,1,2,3) get (30,10,10,10) = 60 slots
 *   genre 1: (10,30,30,30) = 100 slots
 * genre 0 on expert 0: share 30/60 = 0.5, rest 10/100 = 0.1, ratio 5;
 * genre 1 on experts 1..3: 0.3 against 10/60 = 1/6, ratio 1.8;
 * every other pair has a ratio below 1.
 * JS(g0, g1): m = (0.3, 7/30, 7/30, 7/30);
 *   KL(p0||m) = 0.5 log2(5/3) + 0.5 log2(5/7) = 0.3684828 - 0.2427134 = 0.1257694
 *   KL(p1||m) = 0.1 log2(1/3) + 0.9 log2(9/7) = -0.1584963 + 0.3263131 = 0.1678168
 *   JS = 0.1467931 bits */
/* Two genres, one layer, E = 4, one slot per token:
 *   genre 0: experts (0,1,2,3) get (30,10,10,10) = 60 slots
 *   genre 1: (10,30,30,30) = 100 slots
 * genre 0 on expert 0: share 30/60 = 0.5, rest 10/100 = 0.1, ratio 5;
 * genre 1 on experts 1..3: 0.3 against 10/60 = 1/6, ratio 1.8;
 * every other pair has a ratio below 1.
 * JS(g0, g1): m = (0.3, 7/30, 7/30, 7/30);
 *   KL(p0||m) = 0.5 log2(5/3) + 0.5 log2(5/7) = 0.3684828 - 0.2427134 = 0.1257694
 *   KL(p1||m) = 0.1 log2(1/3) + 0.9 log2(9/7) = -0.1584963 + 0.3263131 = 0.1678168
 *   JS = 0.1467931 bits */
TEST(route_stats_genres_flags_and_divergence) {
    moe__route_acc a;
    CHECK(moe__route_acc_init(&a, 2, 1, 4) == 0);
    const int c0[4] = {30, 10, 10, 10}, c1[4] = {10, 30, 30, 30};
    int grp[160], off[161], ids[160];
    float w[160];
    float ce[160];
    int n = 0;
    for (int g = 0; g < 2; g++)
        for (int e = 0; e < 4; e++)
            for (int i = 0; i < (g ? c1 : c0)[e]; i++)
                grp[n] = g, ids[n] = e, w[n] = 0.25f * (e + 1), ce[n] = g ? 3.0f : 1.0f, off[n] = n, n++;
    off[n] = n;
    CHECK(moe__route_acc_add(&a, 0, 160, grp, off, ids, w, NULL, 0.75) == 0);
    CHECK(moe__route_acc_add_loss(&a, 160, grp, ce) == 0);
    CHECK_EQ_INT(a.tokens[0], 60);
    CHECK_EQ_INT(a.tokens[1], 100);
    CHECK_EQ_INT(moe__route_count(&a, 0, 0, 0), 30);
    CHECK_EQ_INT(moe__route_count(&a, -1, 0, 1), 40);
    CHECK_CLOSE(a.mass[0 * 4 + 3], 10 * 1.0, 1e-12, 0);       /* genre 0, expert 3: 10 slots of weight 1 */
    CHECK_CLOSE(a.mass[1 * 4 + 1], 30 * 0.5, 1e-12, 0);       /* genre 1, expert 1: 30 slots of 0.5 */
    CHECK_CLOSE(a.ce[0] / a.ce_tokens[0], 1.0, 1e-12, 0);
    CHECK_CLOSE(a.ce[1] / a.ce_tokens[1], 3.0, 1e-12, 0);
    CHECK_CLOSE(a.ent[0] / a.ent_tokens[0], 0.75, 1e-12, 0);
    double x[4], y[4];
    for (int e = 0; e < 4; e++) x[e] = (double)moe__route_count(&a, 0, 0, e), y[e] = (double)moe__route_count(&a, 1, 0, e);
    CHECK_CLOSE(moe__route_js(x, y, 4), 0.14679310, 1e-7, 0);
    /* the whole layer: (40,40,40,40) is even */
    for (int e = 0; e < 4; e++) x[e] = (double)moe__route_count(&a, -1, 0, e);
    CHECK_CLOSE(moe__route_cv(x, 4), 0.0, 1e-15, 0);

    moe__route_flag f[8];
    int nf = moe__route_flags(&a, 2.0, 20, f, 8);
    CHECK_EQ_INT(nf, 1);
    if (nf >= 1) {
        CHECK(f[0].group == 0 && f[0].layer == 0 && f[0].expert == 0 && f[0].count == 30);
        CHECK_CLOSE(f[0].share, 0.5, 1e-12, 0);
        CHECK_CLOSE(f[0].rest_share, 0.1, 1e-12, 0);
        CHECK_CLOSE(f[0].ratio, 5.0, 1e-12, 0);
    }
    CHECK_EQ_INT(moe__route_flags(&a, 2.0, 31, f, 8), 0); /* 30 tokens is under the minimum */
    CHECK_EQ_INT(moe__route_flags(&a, 2.0, 30, f, 8), 1);  /* ... and exactly the minimum passes */
    CHECK_EQ_INT(moe__route_flags(&a, 5.0, 30, f, 8), 1);  /* so does exactly the ratio */
    /* ratio 1.8 passes 1.5: the three genre-1 experts follow, ties by expert id */
    nf = moe__route_flags(&a, 1.5, 20, f, 8);
    CHECK_EQ_INT(nf, 4);
    if (nf == 4) {
        CHECK(f[0].group == 0 && f[0].expert == 0);
        for (int i = 1; i < 4; i++) {
            CHECK(f[i].group == 1 && f[i].expert == i);
            CHECK_CLOSE(f[i].ratio, 1.8, 1e-12, 0);
        }
    }
    CHECK_EQ_INT(moe__route_flags(&a, 1.5, 20, f, 2), 4); /* total returned, two written */
    /* out-of-range ids leave the totals unchanged */
    int bad_ids[1] = {4}, g0[1] = {0}, o1[2] = {0, 1};
    float w1[1] = {1};
    CHECK(moe__route_acc_add(&a, 0, 1, g0, o1, bad_ids, w1, NULL, 0) == MOE_EINVAL);
    int g2[1] = {2}, ok_id[1] = {0};
    CHECK(moe__route_acc_add(&a, 0, 1, g2, o1, ok_id, w1, NULL, 0) == MOE_EINVAL);
    CHECK_EQ_INT(moe__route_count(&a, 0, 0, 0), 30);
    /* dropped slots (kept = 0) are not counted */
    const unsigned char kept[1] = {0};
    CHECK(moe__route_acc_add(&a, 0, 1, g0, o1, ok_id, w1, kept, 0) == 0);
    CHECK_EQ_INT(moe__route_count(&a, 0, 0, 0), 30);
    moe__route_acc_free(&a);
}

/* ---- the trace ------------------------------------------------------------ */

static int valid_utf8_json_line(const char *s, size_t n) {
    /* no raw control byte, and every byte >= 0x80 in a well-formed sequence */
    for (size_t i = 0; i < n; i++) {
        const unsigned char c = (unsigned char)s[i];
        if (c < 0x20 && !(c == '\n' && i == n - 1)) return 0;
        if (c < 0x80) continue;
        int len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
        if (!len || i + len > n) return 0;
        for (int j = 1; j < len; j++)
            if (((unsigned char)s[i + j] & 0xC0) != 0x80) return 0;
        i += len - 1;
    }
    return 1;
}

TEST(route_trace_roundtrip_awkward_bytes) {
    static const struct {
        const char *s;
        size_t n;
        int lossy; /* needs the "bytes" field */
    } pieces[] = {
        {"plain", 5, 0},
        {" say \"hi\" \\ back", 16, 0},
        {"\x01\x1f\t\n\r\x7f", 6, 0},         /* control bytes: \u escapes */
        {"a\0b", 3, 1},                        /* NUL */
        {"\xff\xfe", 2, 1},                    /* never valid in UTF-8 */
        {"\xe2\x82", 2, 1},                    /* truncated 3-byte sequence */
        {"\xc0\xaf", 2, 1},                    /* overlong '/' */
        {"\xed\xa0\x80", 3, 1},                /* a UTF-16 surrogate */
        {"\xf4\x90\x80\x80", 4, 1},            /* above U+10FFFF */
        {"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", 14, 0}, /* é € emoji: kept as text */
        {"", 0, 0},
    };
    static moe__trace_tok t, back;
    for (size_t i = 0; i < sizeof pieces / sizeof pieces[0]; i++) {
        memset(&t, 0, sizeof t);
        t.pos = 1000000000000LL + (long long)i, t.token = 4095 - (int)i;
        strcpy(t.src, i % 2 ? "gen" : "prompt");
        if (i % 3 == 0) strcpy(t.genre, "belles_lettres");
        memcpy(t.piece, pieces[i].s, pieces[i].n);
        t.piece_len = pieces[i].n;
        /* three layers, k = 2, 1, 3; awkward floats */
        const int ks[3] = {2, 1, 3};
        const float ws[6] = {0.1f, 1e-30f, 1.0f, 0.333333343f, 7.00000048f, 0};
        int s = 0;
        t.n_layers = 3;
        for (int l = 0; l < 3; l++) {
            t.layer[l] = 2 * l + 1;
            for (int j = 0; j < ks[l]; j++, s++) t.ids[s] = (s * 7) % 64, t.w[s] = ws[s];
            t.off[l + 1] = s;
        }
        moe__sb b = {0};
        moe__trace_write(&b, &t);
        CHECK(!b.oom && b.len > 0 && b.p[b.len - 1] == '\n');
        CHECK_MSG(valid_utf8_json_line(b.p, b.len), "piece %zu: the line is not clean UTF-8 JSON text", i);
        CHECK_MSG((strstr(b.p, "\"bytes\":") != NULL) == pieces[i].lossy, "piece %zu: bytes field", i);
        char err[256] = "";
        int rc = moe__trace_parse(b.p, b.len, &back, err, sizeof err);
        CHECK_MSG(rc == 0, "piece %zu: %s", i, err);
        CHECK(back.pos == t.pos && back.token == t.token && !strcmp(back.src, t.src) && !strcmp(back.genre, t.genre));
        CHECK_MSG(back.piece_len == t.piece_len && !memcmp(back.piece, t.piece, t.piece_len), "piece %zu differs", i);
        CHECK_EQ_INT(back.n_layers, 3);
        for (int l = 0; l < 3 && back.n_layers == 3; l++) {
            CHECK(back.layer[l] == t.layer[l] && back.off[l + 1] == t.off[l + 1]);
        }
        for (int j = 0; j < 6; j++) {
            CHECK_EQ_INT(back.ids[j], t.ids[j]);
            CHECK_MSG(memcmp(&back.w[j], &t.w[j], sizeof(float)) == 0, "weight %d: %.9g vs %.9g", j, back.w[j], t.w[j]);
        }
        moe__sb_free(&b);
    }
    /* the header line is recognised, not parsed as a token */
    const char *hdr = "{\"moe_trace\":1,\"model\":\"x\",\"layers\":4}";
    CHECK(moe__trace_parse(hdr, strlen(hdr), &back, NULL, 0) == 1);
}

TEST(route_trace_rejects_hostile_lines) {
    static moe__trace_tok t;
    static const char *bad[] = {
        "",
        "not json",
        "[1,2]",
        "{\"pos\":-1,\"token\":1,\"src\":\"gen\",\"piece\":\"a\",\"layers\":[]}",
        "{\"pos\":0.5,\"token\":1,\"src\":\"gen\",\"piece\":\"a\",\"layers\":[]}",
        "{\"pos\":0,\"token\":1,\"src\":\"gen\",\"piece\":7,\"layers\":[]}",
        "{\"pos\":0,\"token\":1,\"src\":\"gen\",\"piece\":\"a\",\"bytes\":\"abc\",\"layers\":[]}",
        "{\"pos\":0,\"token\":1,\"src\":\"gen\",\"piece\":\"a\",\"bytes\":\"zz\",\"layers\":[]}",
        "{\"pos\":0,\"token\":1,\"src\":\"a very long source name\",\"piece\":\"a\",\"layers\":[]}",
        "{\"pos\":0,\"token\":1,\"src\":\"gen\",\"piece\":\"a\",\"layers\":{}}",
        "{\"pos\":0,\"token\":1,\"src\":\"gen\",\"piece\":\"a\",\"layers\":[{\"layer\":0,\"experts\":[1,2],\"weights\":[0.5]}]}",
        "{\"pos\":0,\"token\":1,\"src\":\"gen\",\"piece\":\"a\",\"layers\":[{\"layer\":0,\"experts\":[1.5],\"weights\":[0.5]}]}",
        "{\"pos\":0,\"token\":1,\"src\":\"gen\",\"piece\":\"a\",\"layers\":[{\"layer\":0,\"experts\":[1],\"weights\":[\"x\"]}]}",
        "{\"pos\":0,\"token\":1,\"src\":\"gen\",\"piece\":\"a\",\"layers\":[{\"experts\":[1],\"weights\":[1]}]}",
    };
    char err[256];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = 0;
        int rc = moe__trace_parse(bad[i], strlen(bad[i]), &t, err, sizeof err);
        CHECK_MSG(rc < 0 && err[0], "line %zu accepted (rc %d)", i, rc);
    }
    /* more layers than the limit: an error, not an overflow */
    moe__sb b = {0};
    moe__sb_str(&b, "{\"pos\":0,\"token\":1,\"src\":\"gen\",\"piece\":\"a\",\"layers\":[");
    for (int l = 0; l <= MOE__TRACE_MAX_LAYERS; l++)
        moe__sb_printf(&b, "%s{\"layer\":%d,\"experts\":[1],\"weights\":[1]}", l ? "," : "", l);
    moe__sb_str(&b, "]}");
    CHECK(!b.oom && moe__trace_parse(b.p, b.len, &t, err, sizeof err) == MOE_ELIMIT);
    moe__sb_free(&b);
}

/* ---- on a real forward ---------------------------------------------------- */

static moe_model *tiny_model(int B, int T) {
    moe_model_config c;
    char msg[256];
    CHECK(moe_model_preset("tiny", &c) == 0);
    c.vocab_size = 97;
    c.num_hidden_layers = 3;
    for (int l = 0; l < 3; l++) c.is_moe_layer[l] = l != 1; /* a dense layer in the middle */
    int rc = 0;
    moe_model *m = moe_model_create(&c, B, T, 0, 1, &rc, msg, sizeof msg);
    CHECK_MSG(m != NULL, "%s", msg);
    if (m) CHECK(moe_model_init(m, 7) == 0);
    return m;
}

TEST(route_stats_tiny_model_counts_match_the_layers) {
    enum { B = 2, T = 16, N = B * T };
    moe_model *m = tiny_model(B, T);
    if (!m) return;
    const moe_model_config *c = moe_model_get_config(m);
    const int E = c->num_local_experts, K = c->num_experts_per_tok;
    int32_t tok[N], tg[N];
    int grp[N];
    for (int n = 0; n < N; n++) tok[n] = (n * 37 + 11) % 97, tg[n] = (n * 53 + 5) % 97, grp[n] = n < T ? 0 : 1;
    float loss;
    CHECK(moe_model_forward(m, tok, tg, B, T, &loss) == 0);
    const float *ce = moe_model_token_losses(m);
    CHECK(ce != NULL);
    float ce_mean;
    moe_model_last_losses(m, &ce_mean, NULL);
    moe__route_acc a;
    CHECK(moe__route_acc_init(&a, 2, 2, E) == 0);
    const int layers[2] = {0, 2};
    const int *off, *ids;
    const float *w;
    const unsigned char *kept;
    CHECK(moe_model_layer_routing(m, 1, &off, &ids, &w, &kept) == MOE_EINVAL); /* dense */
    CHECK(moe_model_layer_routing(m, 3, &off, &ids, &w, &kept) == MOE_EINVAL);
    for (int l = 0; l < 2; l++) {
        const int R = moe_model_layer_routing(m, layers[l], &off, &ids, &w, &kept);
        CHECK_EQ_INT(R, N * K);
        const moe_layer_stats *st = moe_model_layer_stats(m, layers[l]);
        CHECK(moe__route_acc_add(&a, l, N, grp, off, ids, w, kept, st->router_entropy) == 0);
        /* independent counts: the layer's own per-expert totals, and a naive
         * pass over the slots by genre */
        int64_t total = 0;
        double wsum = 0, mass = 0;
        for (int e = 0; e < E; e++) {
            total += moe__route_count(&a, -1, l, e);
            CHECK_EQ_INT(moe__route_count(&a, -1, l, e), st->expert_count[e]);
            int naive[2] = {0, 0};
            for (int n = 0; n < N; n++)
                for (int s = off[n]; s < off[n + 1]; s++) naive[grp[n]] += ids[s] == e;
            CHECK_EQ_INT(moe__route_count(&a, 0, l, e), naive[0]);
            CHECK_EQ_INT(moe__route_count(&a, 1, l, e), naive[1]);
            mass += a.mass[(size_t)l * E + e] + a.mass[((size_t)a.L + l) * E + e];
        }
        for (int s = 0; s < R; s++) wsum += w[s];
        CHECK_EQ_INT(total, (int64_t)N * K);
        CHECK_CLOSE(mass, wsum, 1e-9, 1e-9);
        CHECK_CLOSE(a.ent[l] / a.ent_tokens[l], st->router_entropy, 1e-7, 1e-6);
    }
    CHECK_EQ_INT(a.tokens[0], T);
    CHECK_EQ_INT(a.tokens[1], T);
    if (ce) {
        CHECK(moe__route_acc_add_loss(&a, N, grp, ce) == 0);
        CHECK_CLOSE((a.ce[0] + a.ce[1]) / N, ce_mean, 1e-6, 1e-6);
    }
    moe__route_acc_free(&a);
    CHECK(moe_model_forward(m, tok, NULL, B, T, NULL) == 0);
    CHECK(moe_model_token_losses(m) == NULL); /* no targets, no losses */
    moe_model_free(m);
}

/* moe eval/generate --experts-used: k changes the routing and the loss, and
 * 0 restores the trained k bit for bit. */
TEST(route_experts_used_override_changes_the_loss) {
    enum { B = 2, T = 16, N = B * T };
    moe_model *m = tiny_model(B, T);
    if (!m) return;
    const int E = moe_model_get_config(m)->num_local_experts, K = moe_model_get_config(m)->num_experts_per_tok;
    int32_t tok[N], tg[N];
    for (int n = 0; n < N; n++) tok[n] = (n * 29 + 3) % 97, tg[n] = (n * 31 + 17) % 97;
    float ce_k, ce_1, ce_e, ce_back;
    const int *off, *ids;
    const float *w;
    const unsigned char *kept;
    CHECK(moe_model_forward(m, tok, tg, B, T, NULL) == 0);
    moe_model_last_losses(m, &ce_k, NULL);
    CHECK(moe_model_set_experts_used(m, 1) == 0);
    CHECK(moe_model_forward(m, tok, tg, B, T, NULL) == 0);
    moe_model_last_losses(m, &ce_1, NULL);
    CHECK_EQ_INT(moe_model_layer_routing(m, 0, &off, &ids, &w, &kept), N);
    CHECK(moe_model_set_experts_used(m, E) == 0);
    CHECK(moe_model_forward(m, tok, tg, B, T, NULL) == 0);
    moe_model_last_losses(m, &ce_e, NULL);
    CHECK_EQ_INT(moe_model_layer_routing(m, 2, &off, &ids, &w, &kept), N * E);
    CHECK(moe_model_set_experts_used(m, E + 1) != 0);
    CHECK(moe_model_set_experts_used(m, 0) == 0);
    CHECK(moe_model_forward(m, tok, tg, B, T, NULL) == 0);
    moe_model_last_losses(m, &ce_back, NULL);
    CHECK_EQ_INT(moe_model_layer_routing(m, 0, &off, &ids, &w, &kept), N * K);
    CHECK_MSG(ce_1 != ce_k && ce_e != ce_k, "k = 1, %d, %d give %.9g %.9g %.9g", K, E, ce_1, ce_k, ce_e);
    CHECK(memcmp(&ce_back, &ce_k, sizeof ce_k) == 0);
    moe_model_free(m);
}

/* The heatmap: one cell per value, 0 white and vmax the darkest blue, labels
 * XML-escaped, bad sizes refused. */
TEST(route_heatmap_svg_cells_and_colours) {
    char dir[64], path[128], err[256];
    if (!moe_test_tmpdir(dir, "heatmap")) return;
    snprintf(path, sizeof path, "%s/h.svg", dir);
    const char *rows[2] = {"layer <0>", "layer 1"}, *cols[3] = {"0", "1", "2"};
    const double v[6] = {0, 0.5, 1, 0.25, 0.75, 1};
    CHECK(moe__heatmap_svg(path, "t & t", "expert", rows, cols, v, 2, 3, 0, 1.0, err, sizeof err) == 0);
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL);
    if (f) {
        static char buf[1 << 16];
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        buf[n] = 0;
        fclose(f);
        CHECK(strstr(buf, "layer &lt;0&gt;") && strstr(buf, "t &amp; t") && !strstr(buf, "layer <0>"));
        /* cell (0,0) is 0: white; (0,2) is vmax: #08306b */
        CHECK(strstr(buf, "fill=\"#ffffff\" stroke=\"#eee\"><title>layer &lt;0&gt;, 0: 0</title>") != NULL);
        CHECK(strstr(buf, "fill=\"#08306b\" stroke=\"#eee\"><title>layer &lt;0&gt;, 2: 1</title>") != NULL);
        int titled = 0;
        for (const char *p = buf; (p = strstr(p, "<title>")) != NULL; p++) titled++;
        CHECK_EQ_INT(titled, 6);
    }
    CHECK(moe__heatmap_svg(path, "t", "x", rows, cols, v, 0, 3, 0, 1.0, err, sizeof err) == MOE_EINVAL);
    CHECK(moe__heatmap_svg(path, "t", "x", rows, cols, v, 2, 3, 0, 0.0, err, sizeof err) == MOE_EINVAL);
    moe_test_rmdir(dir);
}

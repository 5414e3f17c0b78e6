/* Naive per-token MoE layer in double: the reference the fast path is checked
 * against, and the objective the finite-difference gradient checks perturb. */
#ifndef MOE_REF_LAYER_H
#define MOE_REF_LAYER_H

#include "moe.h"

/* Objective sum(y*dy) + aux + z (coefficients included) for params laid out as
 * moe_layer_param_offsets(). y [N][C], ids [N][K], w [N][K] are written when
 * not NULL. */
double ref_layer_objective(const moe_layer_config *c, const moe_layer_params *off, const double *p,
                           const double *x, int n, const double *dy, double *y, int *ids, double *w,
                           double *aux, double *z);

/* Smallest gap between consecutive sorted logits among each token's top K+1
 * (all E when K == E): routing is stable under perturbations below it. */
double ref_layer_margin(const moe_layer_config *c, const moe_layer_params *off, const double *p,
                        const double *x, int n);

/* Shared pieces of the double references (routing scheme tests):
 * the expert activation, CV^2 with the library's convention (population
 * variance, var / (mean^2 + 1e-10)), softplus, and indices lo..hi-1 of v
 * sorted descending with the lower index first on ties (ord [hi-lo]). */
double ref_act(moe_act a, double h1, double h3);
double ref_cv2(const double *v, int n);
double ref_softplus(double v);
void ref_sort_desc(const double *v, int lo, int hi, int *ord);

#endif

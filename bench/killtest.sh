#!/bin/sh
# The crash-safety target of docs/robustness.md: `moe train` SIGKILLed N times
# (default 100) at seeded random moments while it checkpoints every step, each
# time followed by a full check of the checkpoint (manifest hashes, model
# load, optimizer and loss-history step). Prints the count of corrupt
# checkpoints (the target is 0) and exits non-zero on any.
#   bench/killtest.sh [N]
set -e
cd "$(dirname "$0")/.."
make -s all build/moe_tests
MOE_KILLTEST_N="${1:-100}" ./build/moe_tests ckpt_kill_moe_train_while_checkpointing

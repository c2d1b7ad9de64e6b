#!/usr/bin/env bash
# The full results table (long: hours on 2 CPU cores; resumable, every stage is cached, so an
# interrupted run continues where it stopped when started again):
#   1. `vdd-ros tune` on stack_either and carry_four: the candidate settings of
#      config/tune.yaml scored on validation seeds (the ablation table), and the study of
#      config/tune_modes.yaml (the uniform-gating phase, on carry_four with 3 training seeds
#      and on stack_either with one); the defaults in config/train.yaml are chosen from them,
#      never from the test seeds;
#   2. `vdd-ros pipeline --seeds 3` on every task: each policy trained with 3 seeds and
#      evaluated on the same 50 test seeds, means with 95% intervals; results/summary.md.
# Extra arguments go to both commands (e.g. --results DIR).
set -eo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
for task in stack_either carry_four; do
  vdd-ros tune --task "$task" --quiet "$@"
done
vdd-ros tune --task stack_either --candidates config/tune_modes.yaml --quiet "$@"
vdd-ros tune --task carry_four --candidates config/tune_modes.yaml --set seeds=3 --quiet "$@"
status=0
for task in lift_carry pick_either stack_either carry_four; do
  vdd-ros pipeline --task "$task" --seeds 3 --quiet "$@" || status=$?
done
exit $status

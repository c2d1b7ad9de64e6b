#!/usr/bin/env bash
# The full results table (long: hours on 2 CPU cores; resumable, every stage is cached, so an
# interrupted run continues where it stopped when started again):
#   1. `vdd-ros tune` on stack_either and carry_four: the candidate settings of
#      config/tune.yaml scored on validation seeds (the ablation table), and the study of
#      config/tune_modes.yaml (keeping every mode: the std floors, on both tasks with 3
#      training seeds), and that of config/tune_anneal.yaml (the annealed warm-start floor,
#      likewise); the defaults in config/train.yaml are chosen from them, never from the
#      test seeds;
#   2. `vdd-ros pipeline --seeds 3` on every task: each policy trained with 3 seeds and
#      evaluated on the same 50 test seeds, means with 95% intervals; results/summary.md.
# Extra arguments go to both commands (e.g. --results DIR).
set -eo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
for task in stack_either carry_four; do
  vdd-ros tune --task "$task" --quiet "$@"
done
for study in tune_modes tune_anneal; do
  for task in stack_either carry_four; do
    vdd-ros tune --task "$task" --candidates "config/$study.yaml" --set seeds=3 --quiet "$@"
  done
done
status=0
for task in lift_carry pick_either stack_either carry_four; do
  vdd-ros pipeline --task "$task" --seeds 3 --quiet "$@" || status=$?
done
exit $status

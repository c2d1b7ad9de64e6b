#!/usr/bin/env bash
# Install everything (once) and run the main job: the pipeline on the default task (extra
# arguments go to `vdd-ros pipeline`, e.g. --task pick_either, --force, --set eval_episodes=20).
set -eo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
vdd-ros pipeline --task lift_carry "$@"

#!/usr/bin/env bash
# Install everything (once) and run the main job.
set -eo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
vdd-ros toy "$@"

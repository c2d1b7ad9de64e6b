#!/usr/bin/env bash
# Install everything (once), build, and run the whole test suite with colcon.
set -eo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
# Each run gets its own DDS domain and stays on this host.
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( RANDOM % 90 + 10 ))}"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_LOG_DIR="$ROOT/log/ros"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
status=0
colcon --log-base "$ROOT/log" test --base-paths "$ROOT" --build-base "$ROOT/build" \
  --install-base "$ROOT/install" --return-code-on-test-failure \
  --event-handlers console_direct+ ${1:+--pytest-args "$@"} || status=$?
colcon test-result --test-result-base "$ROOT/build" --verbose || status=$?
exit $status

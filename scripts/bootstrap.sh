#!/usr/bin/env bash
# Create or reuse .venv, install the pinned requirements, and build the package with colcon.
# Sourced by scripts/main.sh and scripts/test.sh; every step is skipped when already done.
set -eo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[vdd_ros] creating $VENV"
  "$PY" -m venv "$VENV"
fi
touch "$VENV/COLCON_IGNORE"   # colcon must not crawl the wheels' package.xml files

REQS=("$ROOT/requirements.txt" "$ROOT/requirements-ros.txt" "$ROOT/requirements-test.txt")
want="$(cat "${REQS[@]}" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  echo "[vdd_ros] installing pinned requirements into .venv"
  # (pip's notes about absent local package mirrors are filtered; real errors still show)
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
    -r "$ROOT/requirements.txt" -r "$ROOT/requirements-ros.txt" -r "$ROOT/requirements-test.txt" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
  echo "$want" > "$VENV/.requirements.sha256"
fi

# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$ROOT"
echo "[vdd_ros] colcon build"
mkdir -p "$ROOT/log"
colcon --log-base "$ROOT/log" build --base-paths "$ROOT" --build-base "$ROOT/build" \
  --install-base "$ROOT/install" --event-handlers console_cohesion- \
  summary+ > "$ROOT/log/colcon_build.txt" 2>&1 || { cat "$ROOT/log/colcon_build.txt"; exit 1; }

# `vdd-ros` on the venv's PATH runs the colcon-installed package.
cat > "$VENV/bin/vdd-ros" <<WRAP
#!/usr/bin/env bash
source "$ROOT/install/setup.bash"
exec "$ROOT/install/vdd_ros/lib/vdd_ros/vdd-ros" "\$@"
WRAP
chmod +x "$VENV/bin/vdd-ros"
# shellcheck disable=SC1091
source "$ROOT/install/setup.bash"
export PATH="$ROOT/install/vdd_ros/lib/vdd_ros:$PATH"

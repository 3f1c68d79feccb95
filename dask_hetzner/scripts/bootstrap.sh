#!/bin/bash
# dask-hetzner bootstrap: builds ~/.dask-hetzner/env with uv; safe to re-run.
# A template: dask_hetzner/environment.py (bootstrap_script) replaces the @INPUTS@ line with
# the inputs (REMOTE_DIR, DASK_USER, DASK_DIR, TLS_DIR, RUN_AS, ROLE, HASH, UV_VERSION, PYTHON_VERSION,
# INDEX_URL, PYTHON_DOWNLOADS_JSON_URL, PYTHON_PREFERENCE, REQUIREMENTS, APT_PACKAGES,
# SETUP_COMMANDS, LOCAL_WHEELS, REPORT_NAMES, PINS and the Python helpers FETCH_UV_PY, REPORT_PY, COMPARE_PY).
set -Eeuo pipefail
umask 022

# The inputs are only assigned in the generated script.
# shellcheck disable=SC2154
main() {
# @INPUTS@
BASE="$HOME/$REMOTE_DIR"
LOG="$BASE/bootstrap.log"
ENV_DIR="$BASE/env"
UV="$BASE/bin/uv"
MARKER="$BASE/bootstrap.done"
VERSIONS="$BASE/versions.json"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/dask-hetzner"

# The base directory also receives TLS keys: root only. (The cache may be shared: umask 022.)
(umask 077 && mkdir -p "$BASE" && touch "$LOG")
mkdir -p "$BASE/bin" "$CACHE"

# Everything (ours and the tools') goes to the log with a timestamp and to stderr; stdout
# (fd 3) carries only the final versions JSON for the caller.
exec 3>&1 4>&2
exec > >(
    while IFS= read -r line || [ -n "$line" ]; do
        printf -v ts '%(%Y-%m-%dT%H:%M:%S%z)T' -1
        printf '%s %s\n' "$ts" "$line" >>"$LOG"
        printf '%s\n' "$line" >&4
    done
) 2>&1
LOGGER=$!
trap 'echo "error: status $? at line $LINENO: $BASH_COMMAND"' ERR
trap 'finish $?' EXIT

# One bootstrap at a time per server (a retried bootstrap may overlap a slow one).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$BASE/bootstrap.lock"
    flock -w 1800 9 || { echo "error: another bootstrap holds $BASE/bootstrap.lock"; exit 1; }
fi

echo "bootstrap $ROLE ($HASH) on $(uname -n) $(uname -m)"
dask_user
if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$HASH" ] \
        && [ -x "$ENV_DIR/bin/python" ] && [ -s "$VERSIONS" ]; then
    echo "already bootstrapped with these inputs: nothing to do"
    cat "$VERSIONS" >&3
    exit 0
fi
rm -f "$MARKER"

# 0. system setup (apt_packages, setup_commands), as root, before the environment
if [ "${#APT_PACKAGES[@]}" -gt 0 ]; then
    echo "installing Debian packages: ${APT_PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}"
fi
if [ -n "$SETUP_COMMANDS" ]; then
    echo "running setup_commands"
    (cd "$HOME" && bash -Eeuo pipefail -c "$SETUP_COMMANDS") || {
        echo "error: a setup command failed (status $?)"; exit 1; }
fi

# 1. uv, at the pinned version, from the package index
if [ -x "$UV" ] && [ "$("$UV" --version 2>/dev/null | cut -d' ' -f2)" = "$UV_VERSION" ]; then
    echo "uv $UV_VERSION present"
else
    command -v python3 >/dev/null 2>&1 || { echo "error: python3 is needed to fetch uv"; exit 1; }
    python3 -c "$FETCH_UV_PY" "$UV_VERSION" "$(uname -m)" "$CACHE/uv-wheels" "$UV" "$INDEX_URL"
    found=$("$UV" --version | cut -d' ' -f2)
    [ "$found" = "$UV_VERSION" ] || { echo "error: $UV is uv $found, not $UV_VERSION"; exit 1; }
fi

INDEX_ARGS=()
if [ -n "$INDEX_URL" ]; then INDEX_ARGS=(--index-url "$INDEX_URL"); fi

# 2. a fresh virtual environment with the client's Python major.minor: the image's when it
# has it (Ubuntu 24.04: 3.12), else uv downloads a build (outbound IPv4 to GitHub, or the
# mirror hetzner.python-downloads-json-url names; hetzner.python-preference: uv's choice)
if [ -n "${PYTHON_DOWNLOADS_JSON_URL:-}" ]; then
    export UV_PYTHON_DOWNLOADS=automatic UV_PYTHON_DOWNLOADS_JSON_URL="$PYTHON_DOWNLOADS_JSON_URL"
fi
if [ -n "${PYTHON_PREFERENCE:-}" ]; then export UV_PYTHON_PREFERENCE="$PYTHON_PREFERENCE"; fi
cd "$BASE"
rm -rf -- "$ENV_DIR"
"$UV" venv --no-config --no-project --python "$PYTHON_VERSION" "$ENV_DIR"

# 3. the pinned requirements (hard links from uv's cache where the file system allows)
"$UV" pip install --no-config --python "$ENV_DIR/bin/python" --link-mode hardlink \
    "${INDEX_ARGS[@]}" "${REQUIREMENTS[@]}" "${LOCAL_WHEELS[@]}"

# 4. verify: the environment reports its versions, which must equal the pins
"$ENV_DIR/bin/python" -c "$REPORT_PY" "$REPORT_NAMES" >"$VERSIONS.tmp"
mv -f "$VERSIONS.tmp" "$VERSIONS"
"$ENV_DIR/bin/python" -c "$COMPARE_PY" "$VERSIONS" "$PINS"

# 5. done: same inputs next time means nothing to do
printf '%s\n' "$HASH" >"$MARKER.tmp"
mv -f "$MARKER.tmp" "$MARKER"
echo "bootstrap complete"
cat "$VERSIONS" >&3
}

# The dask processes run as $DASK_USER, never as root (docs/security.md): tasks run in them,
# and the API token (idle shutdown) stays in root's 0600 files. $DASK_USER may traverse root's
# home and $BASE (0711: no listing) to reach the environment (0755), reads the TLS files through
# its group ($TLS_DIR: root:$DASK_USER 2750) and owns $DASK_DIR (its home: work, spill, the
# scheduler file). $RUN_AS starts a command as $DASK_USER; without root (the simulator run
# by an ordinary user) there is nobody to drop: it runs the command as it is. (An empty
# $DASK_USER is for tests that run this script on their own machine: no user is made, and
# $RUN_AS refuses to run anything as root.)
dask_user() {
    mkdir -p "$HOME/$TLS_DIR" "$HOME/$DASK_DIR"
    if [ -n "$DASK_USER" ] && [ "$(id -u)" -eq 0 ]; then
        if ! id -u "$DASK_USER" >/dev/null 2>&1; then
            useradd --system --user-group --no-log-init --no-create-home \
                --home-dir "$HOME/$DASK_DIR" --shell /usr/sbin/nologin "$DASK_USER"
        fi
        chmod 0711 "$HOME" "$BASE"
        chown "$DASK_USER:$DASK_USER" "$HOME/$DASK_DIR"
        chmod 0700 "$HOME/$DASK_DIR"
        chown "root:$DASK_USER" "$HOME/$TLS_DIR"
        chmod 2750 "$HOME/$TLS_DIR"
    fi
    local tmp="$HOME/$RUN_AS.tmp.$$"
    cat >"$tmp" <<EOF_RUN_AS
#!/bin/sh
# Written by the dask-hetzner bootstrap: runs a command as $DASK_USER (never as root).
if [ "\$(id -u)" -ne 0 ]; then exec "\$@"; fi
if [ -z '$DASK_USER' ]; then echo "run-as-dask: no user to run as; refusing to run as root" >&2; exit 1; fi
export HOME='$HOME/$DASK_DIR' USER='$DASK_USER' LOGNAME='$DASK_USER'
exec setpriv --reuid='$DASK_USER' --regid='$DASK_USER' --init-groups --inh-caps=-all --no-new-privs -- "\$@"
EOF_RUN_AS
    chmod 0755 "$tmp"
    mv -f "$tmp" "$HOME/$RUN_AS"
}

finish() {
    local rc=$1
    trap - ERR EXIT
    if [ "$rc" -ne 0 ]; then echo "bootstrap FAILED with status $rc; log: $LOG"; fi
    # Close our ends of the logger's pipe and let it write the last lines before we exit.
    exec 1>&3 2>&4
    wait "$LOGGER" 2>/dev/null || true
    exit "$rc"
}

main "$@" </dev/null

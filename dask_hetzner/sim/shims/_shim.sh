# Sourced by every shim: shim_log appends one line ("UTC time, command, args")
# to ~/.sim/shims.log, the simulated server's record of what it was asked to do.
shim_log() {
    mkdir -p "$HOME/.sim" 2>/dev/null
    printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >>"$HOME/.sim/shims.log" 2>/dev/null
    return 0
}
# Where the server's /etc is its own (the sandbox's overlay, sandbox.sh), the system's own
# tool runs (useradd and friends): only that server's /etc (and /home) change. Without a
# sandbox, /etc is this machine's: the shim changes nothing.
real_if_own_etc() {
    grep -q '^simetc /etc overlay ' /proc/self/mounts 2>/dev/null || return 0
    for d in /usr/sbin /usr/bin /sbin /bin; do
        if [ -x "$d/$1" ]; then t=$d/$1; shift; exec "$t" "$@"; fi
    done
    return 0
}

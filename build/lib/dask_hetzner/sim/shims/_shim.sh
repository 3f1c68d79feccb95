# Sourced by every shim: shim_log appends one line ("UTC time, command, args")
# to ~/.sim/shims.log, the simulated server's record of what it was asked to do.
shim_log() {
    mkdir -p "$HOME/.sim" 2>/dev/null
    printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >>"$HOME/.sim/shims.log" 2>/dev/null
    return 0
}

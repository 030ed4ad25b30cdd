# The demo's commands, each echoed as it can be pasted into a shell (with
# `reflinkfs` on PATH and no REFLINKFS_POOL), then run as echoed. Source
# this file: scripts/demo does, and tests/mount/front_door.rs runs demo_pool and
# pastes what it echoes.
#
#   shown CMD ARGS...   prints "+ CMD ARGS", quoted for a shell, and runs it
#   demo_pool POOL      the demo's pool in POOL: a template, and an AppVM
#                       whose root is a snapshot of the template's

shown() {
    local line
    line=$(printf '%q ' "$@")
    echo "+ ${line% }"
    "$@"
}

demo_pool() {
    local pool=$1
    echo "Every command names the pool with --pool; to leave that out, set it once:"
    echo "  export REFLINKFS_POOL=$(printf '%q' "$pool")"
    shown reflinkfs pool init --pool "$pool"
    shown reflinkfs volume create vm-templates/fedora/root --size 10G --pool "$pool"
    shown reflinkfs volume create appvms/work/root --size 10G --snapshot-of vm-templates/fedora/root --pool "$pool"
    shown reflinkfs volume create appvms/work/private --size 2G --pool "$pool"
    shown reflinkfs volume create appvms/work/volatile --size 1G --volatile --pool "$pool"
    shown reflinkfs volume list --pool "$pool"
}

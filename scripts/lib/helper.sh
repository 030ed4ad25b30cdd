# The mount(8) helper for one run of the tests: installed pointing at the
# run's build, and at the end put back as it was before the run (removed
# when there was none), so that nothing is left pointing into a checkout.
# Source this file; a run calls helper_install BIN, and helper_restore at
# exit (from a trap, so that a failed run restores it too).
#
#   helper_install BIN   saves what is at $DESTDIR/usr/sbin/mount.reflinkfs
#                        (a copy, in a temporary file), then installs the
#                        helper for BIN there (mount-helper/install)
#   helper_restore       puts the saved helper back, or removes the one
#                        helper_install made; leaves one that changed
#                        since (another install) alone. Never fails, and
#                        does nothing a second time.

HELPER_PATH=
HELPER_SAVED=
HELPER_OURS=

helper_install() {
    HELPER_PATH=${DESTDIR:-}/usr/sbin/mount.reflinkfs
    HELPER_SAVED=none
    if [ -e "$HELPER_PATH" ] || [ -L "$HELPER_PATH" ]; then
        HELPER_SAVED=$(mktemp "${TMPDIR:-/tmp}/reflinkfs-helper-saved.XXXXXX")
        cp -a "$HELPER_PATH" "$HELPER_SAVED"
    fi
    DESTDIR=${DESTDIR:-} bash "$(dirname "${BASH_SOURCE[0]}")/../../mount-helper/install" "$1"
    HELPER_OURS=$(mktemp "${TMPDIR:-/tmp}/reflinkfs-helper-ours.XXXXXX")
    cp "$HELPER_PATH" "$HELPER_OURS"
}

# The binary a helper runs, for a person.
helper_target() {
    sed -n 's/^REFLINKFS=\${REFLINKFS:-\(.*\)}$/\1/p' "$1" 2>/dev/null
}

helper_restore() {
    [ -n "$HELPER_SAVED" ] || return 0
    if [ -z "$HELPER_OURS" ] || ! cmp -s "$HELPER_PATH" "$HELPER_OURS" 2>/dev/null; then
        # Not installed (the install failed), or replaced since.
        if [ -n "$HELPER_OURS" ] && [ -e "$HELPER_PATH" ]; then
            echo "left $HELPER_PATH as it is: another install replaced this run's (-> $(helper_target "$HELPER_PATH"))"
        fi
    elif [ "$HELPER_SAVED" = none ]; then
        if rm -f "$HELPER_PATH"; then
            echo "removed $HELPER_PATH (installed for this run; there was none before)"
        else
            echo "helper_restore: could not remove $HELPER_PATH" >&2
        fi
    elif cp -a "$HELPER_SAVED" "$HELPER_PATH.restore" && mv -f "$HELPER_PATH.restore" "$HELPER_PATH"; then
        echo "put back $HELPER_PATH as it was before this run (-> $(helper_target "$HELPER_PATH"))"
    else
        rm -f "$HELPER_PATH.restore"
        echo "helper_restore: could not put back $HELPER_PATH; the one before this run is in $HELPER_SAVED" >&2
        HELPER_SAVED=
    fi
    [ "$HELPER_SAVED" = none ] || [ -z "$HELPER_SAVED" ] || rm -f "$HELPER_SAVED"
    [ -z "$HELPER_OURS" ] || rm -f "$HELPER_OURS"
    HELPER_SAVED= HELPER_OURS=
    return 0
}

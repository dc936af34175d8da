# shellcheck shell=bash
# Copying a job's output from node-local scratch to its permanent folder so that the permanent
# folder is complete at every instant, also when the job is killed in the middle of a copy
# (PBS sends SIGKILL about 10 s after SIGTERM at the walltime). Sourced by jobs/common.sh, and
# by the copy processes it starts on the other nodes of a multi-node job.
#
# - every file goes to a temporary name (.sync-NAME) beside its destination, then is renamed;
# - the commit points go last: a training run's checkpoints/latest.json (after the two epoch
#   files it names), a dataset's manifest.json (after every shard);
# - a file already there with the same size and modification time is not copied again, so a
#   sync after the last checkpoint copies only what changed since (history, logs).

# kits_copy_file SRC DST: DST becomes a copy of SRC (temporary name, then rename). Returns 1 if
# SRC vanished or the copy failed.
kits_copy_file() {
    local src="$1" dst="$2" tmp
    if [[ -f "$dst" && ! "$src" -nt "$dst" && ! "$dst" -nt "$src" ]] &&
        [[ "$(stat -c %s "$src" 2>/dev/null)" == "$(stat -c %s "$dst")" ]]; then
        return 0
    fi
    # named after this process: a copy process killed mid-way leaves its own file, never one
    # that another copy renames into place
    tmp="$(dirname "$dst")/.sync-$BASHPID-$(basename "$dst")"
    # quiet: a file replaced meanwhile (a newer checkpoint) is the caller's to report or retry
    mkdir -p "$(dirname "$dst")" && cp -p "$src" "$tmp" 2>/dev/null && mv -f "$tmp" "$dst" && return 0
    rm -f "$tmp"
    return 1
}

# kits_json_string KEY FILE: the string value of "KEY" in a JSON file written by the suite.
kits_json_string() {
    grep -o "\"$1\": *\"[^\"]*\"" "$2" | head -n 1 | sed 's/.*: *"\(.*\)"/\1/'
}

# kits_json_int KEY FILE: the integer value of "KEY" (empty if absent).
kits_json_int() {
    grep -o "\"$1\": *[0-9][0-9]*" "$2" 2>/dev/null | head -n 1 | sed 's/.*: *//'
}

# kits_sync_dir SRC DST: copy the folder SRC into DST, commit points last (see above). Returns 1
# when something could not be copied (DST then still holds its previous complete state).
kits_sync_dir() {
    local src="$1" dst="$2" rel rc=0 snap="" weights="" optimizer="" old
    [[ -d "$src" ]] || return 0
    mkdir -p "$dst" || return 1
    if [[ -f "$src/checkpoints/latest.json" ]]; then
        mkdir -p "$dst/checkpoints" || return 1
        # a snapshot: training may write the next checkpoint while this one is being copied
        snap="$dst/checkpoints/.sync-$BASHPID-latest.json"
        cp -p "$src/checkpoints/latest.json" "$snap" || return 1
        weights="$(kits_json_string weights "$snap")"
        optimizer="$(kits_json_string optimizer "$snap")"
    fi
    while IFS= read -r -d '' rel; do
        case "$rel" in
        manifest.json | checkpoints/latest.json | checkpoints/epoch_*) continue ;;
        esac
        if ! kits_copy_file "$src/$rel" "$dst/$rel" && [[ -e "$src/$rel" ]]; then
            printf '[kits] WARNING: could not copy %s to %s\n' "$src/$rel" "$dst/$rel" >&2
            rc=1
        fi
    done < <(cd "$src" && find . -name '.*' ! -name . -prune -o -type f -printf '%P\0')
    if [[ -n "$snap" ]]; then
        if [[ -n "$weights" && -n "$optimizer" ]] &&
            kits_copy_file "$src/checkpoints/$weights" "$dst/checkpoints/$weights" &&
            kits_copy_file "$src/checkpoints/$optimizer" "$dst/checkpoints/$optimizer"; then
            mv -f "$snap" "$dst/checkpoints/latest.json" || rc=1
            for old in "$dst"/checkpoints/epoch_*; do
                [[ -e "$old" && "$old" != */"$weights" && "$old" != */"$optimizer" ]] && rm -f "$old"
            done
        else
            # a newer checkpoint replaced these files meanwhile: the next sync takes that one
            rm -f "$snap"
            rc=1
        fi
    fi
    if [[ -f "$src/manifest.json" ]] && ((rc == 0)); then
        kits_copy_file "$src/manifest.json" "$dst/manifest.json" || rc=1
    fi
    return "$rc"
}

# Background loop of a training job: every SYNC_INTERVAL seconds, a new checkpoint in the
# scratch run folder is copied to the permanent one (kits_sync_dir), so a job killed at any
# moment leaves its last checkpoint there.
KITS_SYNC_PID=""

kits_sync_loop_start() {
    local src="$1" dst="$2"
    (
        trap - EXIT TERM INT USR1
        while sleep "${SYNC_INTERVAL:-30}"; do
            [[ -f "$src/checkpoints/latest.json" ]] || continue
            cmp -s "$src/checkpoints/latest.json" "$dst/checkpoints/latest.json" && continue
            if kits_sync_dir "$src" "$dst"; then
                kits_log "checkpoint of epoch $(kits_json_int epoch "$dst/checkpoints/latest.json") copied to $dst"
            fi
        done
    ) &
    KITS_SYNC_PID=$!
}

kits_sync_loop_stop() {
    [[ -n "$KITS_SYNC_PID" ]] || return 0
    kill "$KITS_SYNC_PID" 2>/dev/null || true
    wait "$KITS_SYNC_PID" 2>/dev/null || true
    KITS_SYNC_PID=""
}

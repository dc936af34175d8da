# shellcheck shell=bash
# What a job learns from the site and the scheduler before it starts anything expensive: the
# site's modules, the MPI plugin of srun, the walltime's end (the deadline training must stop
# before), whether the GPUs it asked for are usable, and whether its chain was stopped by an
# earlier job's error. Sourced by jobs/common.sh (which defines kits_log and kits_die).

# --- site modules -----------------------------------------------------------------------------
# MODULES="openmpi/4.1.6" (space separated): `module add` them before anything runs, so that the
# host mpirun (multi-node jobs, or jobs without an image) is the site's build for its network.
kits_load_modules() {
    [[ -n "${MODULES:-}" ]] || return 0
    if ! type module >/dev/null 2>&1; then
        local init
        for init in /etc/profile.d/modules.sh "${MODULESHOME:-/nonexistent}/init/bash" \
            /usr/share/modules/init/bash /usr/share/lmod/lmod/init/bash; do
            # shellcheck disable=SC1090  # the site's own init script
            if [[ -f "$init" ]]; then source "$init" && break; fi
        done
    fi
    type module >/dev/null 2>&1 || kits_die "MODULES=$MODULES is set but this node has no 'module' command (environment modules / Lmod); unset MODULES"
    local -a mods
    read -ra mods <<<"$MODULES"
    local m
    for m in "${mods[@]}"; do
        module add "$m" || kits_die "module add $m failed (module avail ${m%%/*} lists what the site has)"
    done
    kits_log "modules: ${mods[*]}; mpirun is $(command -v "${MPIRUN:-mpirun}" || echo missing)"
}

# --- srun's MPI plugin ------------------------------------------------------------------------
# kits_choose_srun_mpi < "srun --mpi=list" output: pmix if SLURM has it (any pmix version),
# else pmi2, else "none" (the caller then starts the ranks with mpirun in the allocation).
kits_choose_srun_mpi() {
    local list
    list="$(cat)"
    if grep -qiE '(^|[^a-z_])pmix' <<<"$list"; then
        echo pmix
    elif grep -qiE '(^|[^a-z_])pmi2' <<<"$list"; then
        echo pmi2
    else
        echo none
    fi
}

# --- the deadline -----------------------------------------------------------------------------
# kits_duration_seconds TEXT: "[[D-]HH:]MM:SS" or plain seconds -> seconds (empty if neither).
kits_duration_seconds() {
    local t="$1" d=0 h=0 m=0 s=0
    if [[ "$t" =~ ^[0-9]+$ ]]; then
        echo "$t"
        return 0
    fi
    if [[ "$t" =~ ^([0-9]+)-(.*)$ ]]; then
        d=${BASH_REMATCH[1]}
        t=${BASH_REMATCH[2]}
    fi
    if [[ "$t" =~ ^([0-9]+):([0-9]+):([0-9]+)$ ]]; then
        h=${BASH_REMATCH[1]} m=${BASH_REMATCH[2]} s=${BASH_REMATCH[3]}
    elif [[ "$t" =~ ^([0-9]+):([0-9]+)$ ]]; then
        m=${BASH_REMATCH[1]} s=${BASH_REMATCH[2]}
    else
        return 0
    fi
    echo $((10#$d * 86400 + 10#$h * 3600 + 10#$m * 60 + 10#$s))
}

# kits_walltime_end: Unix time at which the scheduler ends this job (empty if unknown).
# PBS: PBS_WALLTIME, else Resource_List.walltime from qstat, counted from the job's start (this
# script starts within seconds of it); SLURM: the job's EndTime from squeue (or scontrol).
kits_walltime_end() {
    local walltime="" end=""
    case "$KITS_SCHED" in
    pbs)
        walltime="${PBS_WALLTIME:-}"
        if [[ -z "$walltime" ]] && command -v qstat >/dev/null 2>&1; then
            walltime="$(qstat -f "$JOB_ID" 2>/dev/null | sed -n 's/^ *Resource_List.walltime = //p' | head -n 1)"
        fi
        walltime="$(kits_duration_seconds "$walltime")"
        [[ -n "$walltime" ]] && echo $((KITS_T0 + walltime))
        ;;
    slurm)
        end="$(squeue -h -j "$JOB_ID" -o %e 2>/dev/null | head -n 1)"
        if [[ -z "$end" || "$end" == N/A || "$end" == Unknown ]]; then
            end="$(scontrol show job "$JOB_ID" 2>/dev/null | grep -o 'EndTime=[^ ]*' | cut -d= -f2)"
        fi
        [[ -n "$end" && "$end" != Unknown ]] && date -d "$end" +%s 2>/dev/null
        ;;
    esac
    return 0
}

# kits_deadline COPY_SECONDS: the --deadline for train.train (Unix time; empty: none): the
# walltime's end, or TIME_LIMIT seconds after the job started if that is earlier, less
# STOP_MARGIN and twice COPY_SECONDS (the time copying the run folder into scratch took: the
# copy back at the end is of the same folder).
kits_deadline() {
    local copy_seconds="$1" end limit
    end="$(kits_walltime_end)"
    if [[ -n "${TIME_LIMIT:-}" ]]; then
        kits_is_uint "$TIME_LIMIT" || kits_die "TIME_LIMIT=$TIME_LIMIT: give whole seconds"
        limit=$((KITS_T0 + TIME_LIMIT))
        if [[ -z "$end" ]] || ((limit < end)); then end=$limit; fi
    fi
    [[ -n "$end" ]] || return 0
    kits_is_uint "$STOP_MARGIN" || kits_die "STOP_MARGIN=$STOP_MARGIN: give whole seconds"
    echo $((end - STOP_MARGIN - 2 * copy_seconds))
}

# --- GPUs -------------------------------------------------------------------------------------
# REQUIRE_GPU=auto (default): a job given GPUs (GPUS > 0) must see them in TensorFlow; 1: always;
# 0: never (a CPU run on a GPU allocation, on purpose).
kits_gpu_required() {
    case "${REQUIRE_GPU:-auto}" in
    auto) ((GPUS > 0)) ;;
    1) return 0 ;;
    0) return 1 ;;
    *) kits_die "REQUIRE_GPU=$REQUIRE_GPU: use auto, 1 or 0" ;;
    esac
}

# Before any data is staged: stop (exit 2) when GPUs are required and TensorFlow sees none.
kits_check_gpus() {
    kits_gpu_required || return 0
    local out seen
    out="$("${KITS_PY[@]}" -m train.devices 2>&1)" || kits_die "python -m train.devices failed: $(tail -n 3 <<<"$out")"
    seen="$(sed -n 's/^KITS_GPUS //p' <<<"$out" | tail -n 1)"
    if [[ "${seen:-0}" == 0 ]]; then
        local why="run the GPU image: IMAGE=.../kits-suite.sif (containers/README.md)"
        [[ -n "$IMAGE" ]] && why="check that the node's driver supports the image's CUDA 12.5 (driver >= 555, nvidia-smi) and that singularity gets --nv"
        [[ -z "$IMAGE" ]] && why="the suite's .venv is for CPU jobs; $why"
        kits_die "the job asked for $GPUS GPU(s) (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<unset>}) but TensorFlow ($KITS_RUNTIME) sees none: $why. REQUIRE_GPU=0 runs on the CPU anyway"
    fi
    kits_log "TensorFlow sees $seen GPU(s)"
}

# --- chains -----------------------------------------------------------------------------------
# A training job that fails with an error (not a walltime or signal end) leaves this file in its
# run folder; the jobs chained after it (afterany) stop at once instead of failing the same way
# one after the other.
KITS_CHAIN_STOP=".kits-chain-stopped"

kits_check_chain() {
    local marker="$RUN_DIR/$KITS_CHAIN_STOP" submitted
    [[ -f "$marker" ]] || return 0
    submitted="$(kits_submit_time)"
    if [[ -n "$submitted" ]] && ((submitted >= $(stat -c %Y "$marker"))); then
        # submitted after the failure, so not a leftover of the stopped chain: a new attempt
        kits_log "removing $marker (this job was submitted after the failure it records)"
        rm -f "$marker"
        return 0
    fi
    kits_die "an earlier job of this run failed ($(head -n 1 "$marker")); the chain stops here. Fix the cause, then remove $marker and resubmit"
}

# kits_submit_time: Unix time this job was submitted (empty if the scheduler does not say).
kits_submit_time() {
    local t=""
    case "$KITS_SCHED" in
    pbs) command -v qstat >/dev/null 2>&1 && t="$(qstat -f "$JOB_ID" 2>/dev/null | sed -n 's/^ *qtime = //p' | head -n 1)" ;;
    slurm) t="$(squeue -h -j "$JOB_ID" -o %V 2>/dev/null | head -n 1)" ;;
    esac
    [[ -n "$t" ]] && date -d "$t" +%s 2>/dev/null
    return 0
}

# kits_mark_chain_stop RC: called at exit; a walltime/signal end (128+n, PBS 256+n) continues.
kits_mark_chain_stop() {
    local rc="$1"
    ((rc == 0 || (rc > 128 && rc < 160) || (rc > 256 && rc < 288))) && return 0
    [[ -n "${RUN_DIR:-}" && "${KITS_JOB_KIND:-}" == train ]] || return 0
    mkdir -p "$RUN_DIR" 2>/dev/null &&
        printf 'job %s exited with status %s on %s\n' "${JOB_ID:-?}" "$rc" "$(date '+%F %T')" >"$RUN_DIR/$KITS_CHAIN_STOP"
}

# shellcheck shell=bash
# Shared logic of the PBS Pro (*.pbs) and SLURM (*.slurm) job templates. Sourced, never run:
# the templates set their defaults, source this file and call one of kits_train, kits_evaluate,
# kits_preprocess. It works out the scheduler, ranks and GPUs, picks the launcher (Singularity
# image or the suite's .venv), checks the input before anything expensive starts, stages data
# into node-local scratch, and copies results back on any exit (trap), then cleans the scratch.
# Training: the job works out its deadline (walltime end), train.train stops before an epoch it
# cannot finish, and every checkpoint is copied to the permanent run folder as it is written
# (jobs/sync.sh), so a job killed at any moment leaves a complete, resumable checkpoint there.
#
# Every setting is an environment variable with a default; override at submission:
#   PBS:    qsub -v DATA=/storage/brno2/home/$USER/kits/slices128,EPOCHS=50 jobs/train_unet2d.pbs
#   SLURM:  sbatch --export=ALL,DATA=$HOME/kits/slices128,EPOCHS=50 jobs/train_unet2d.slurm
#
#   IMAGE       Singularity/Apptainer image (.sif) holding the suite (/opt/kits-suite). Empty:
#               run the suite from $VENV (no container; what the tests do).
#   SUITE_DIR   the suite checkout (templates default it to the submit directory)
#   VENV        Python environment used when IMAGE is empty (default $SUITE_DIR/.venv)
#   RANKS       MPI ranks. Default: PBS: lines of $PBS_NODEFILE when more than one (mpiprocs),
#               else one per GPU, else $NCPUS on CPU-only nodes; SLURM: $SLURM_NTASKS.
#   GPUS        GPUs per node (default: counted from CUDA_VISIBLE_DEVICES; 0 = CPU only)
#   THREADS_PER_RANK  CPU threads per rank (OMP/TF intra-op; default: cpus of the node / ranks)
#   STAGE_DIR   node-local scratch to stage into (PBS: $SCRATCHDIR; empty: work in place)
#   STAGE_DATA  1 (default) copies the dataset into STAGE_DIR; 0 reads it in place
#   STAGE_KITS  1 copies the raw KiTS19 folder into STAGE_DIR (preprocessing; default 1 when
#               staging), 0 reads it in place (evaluation default)
#   BIND        extra Singularity bind paths, comma separated (e.g. /storage,/auto)
#   SINGULARITY singularity or apptainer binary (default: whichever is on PATH)
#   LAUNCHER    SLURM only: srun (default) or mpirun
#   SRUN_MPI    srun's --mpi plugin (default auto: pmix if `srun --mpi=list` has it, else pmi2,
#               else the ranks are started with mpirun)
#   MODULES     site modules to `module add` first, space separated (e.g. Metacentrum:
#               MODULES=openmpi/4.1.6-gcc-10.2.1); needed where the host mpirun is used
#   MPIRUN      mpirun binary (default mpirun); MPI_ARGS extra mpirun options
#               (default "--mca pml ob1 --mca btl ^openib", as Horovod's docs suggest)
#   SRUN_ARGS   extra srun options
#   CHECKPOINT_EVERY  train: save the latest checkpoint every k epochs (default 1)
#   TIME_LIMIT  train: seconds from the job's start that training may use (default: the
#               walltime, read from PBS/SLURM); training stops before an epoch that would end
#               past it less STOP_MARGIN
#   STOP_MARGIN seconds kept free at the end for stopping and the last copy back (default 120;
#               twice the time copying the run folder into scratch took is kept on top)
#   SYNC_INTERVAL train: seconds between checks for a new checkpoint to copy to the permanent
#               run folder (default 30)
#   REQUIRE_GPU auto (default): a job given GPUs stops (exit 2) before staging if TensorFlow sees
#               none, and train.train gets --require-gpu; 0: run on the CPU anyway; 1: always
#   REQUEUE     SLURM: 1 requeues the job (scontrol requeue) when it ends at its time limit
#               before the last epoch (sites that allow requeueing); default 0 (use chain.sh)
#   NCCL_*      NCCL_DEBUG defaults to WARN. NCCL_IB_DISABLE=1 (no InfiniBand / IB errors),
#               NCCL_SOCKET_IFNAME=eth0 or ^lo,docker (choose the inter-node interface),
#               NCCL_P2P_DISABLE=1 (GPUs whose peer-to-peer hangs), NCCL_IB_HCA, NCCL_P2P_LEVEL,
#               NCCL_NET_GDR_LEVEL: exported to every rank only when you set them.
#
# Exit status: the command's own; 2 for bad input found by the checks (DATA unset, dataset
# failing verification, ranks not dividing the shards, GPUs asked for and not seen, ...); 3 if
# results could not be copied back (they are then left in the scratch folder, which is not
# cleaned); 143 (TERM), 138 (USR1), 130 (INT) after a signal. A training job ending with an
# error (not 0, not a signal) stops the jobs chained after it (see kits_check_chain).

set -euo pipefail

# MPI as root (containers, CI) needs OpenMPI's consent; harmless for normal users.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export TF_USE_LEGACY_KERAS=1 # Keras 2 through tf-keras (see ARCHITECTURE.md)
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export HDF5_USE_FILE_LOCKING="${HDF5_USE_FILE_LOCKING:-FALSE}" # HDF5 on NFS (/storage)
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
for _v in NCCL_IB_DISABLE NCCL_SOCKET_IFNAME NCCL_P2P_DISABLE NCCL_P2P_LEVEL NCCL_IB_HCA \
    NCCL_NET_GDR_LEVEL NCCL_DEBUG_SUBSYS; do
    if [[ -n "${!_v:-}" ]]; then export "${_v?}"; fi
done
unset _v

IMAGE="${IMAGE:-}"
BIND="${BIND:-}"
STAGE_DATA="${STAGE_DATA:-1}"
LAUNCHER="${LAUNCHER:-srun}"
MPIRUN="${MPIRUN:-mpirun}"
MPI_ARGS="${MPI_ARGS---mca pml ob1 --mca btl ^openib}"
SRUN_ARGS="${SRUN_ARGS:-}"
SRUN_MPI="${SRUN_MPI:-auto}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
STOP_MARGIN="${STOP_MARGIN:-120}"
SYNC_INTERVAL="${SYNC_INTERVAL:-30}"
REQUEUE="${REQUEUE:-0}"

KITS_STAGE_ROOT=""  # the folder this job made in STAGE_DIR (removed at the end)
KITS_COPY_BACK=()   # pairs "scratch_dir|final_dir" copied back at exit
KITS_CHILD=""       # PID of the running launcher (signals are forwarded to it)
KITS_PY=()          # how to run the suite's python (venv or singularity exec)
KITS_HOSTS=()       # distinct hosts of the job
KITS_MERGE=()       # pairs "scratch_dir|final_dir" also written on the other nodes (merged back)
KITS_T0="$(date +%s)" # the job's start (the walltime counts from about then)
KITS_JOB_KIND=""    # train, evaluate or preprocess

kits_log() { printf '[kits %s] %s\n' "$(date '+%F %T')" "$*"; }

# Bad input: clear message on stderr, exit 2 (the EXIT trap still cleans up).
kits_die() {
    printf '[kits] ERROR: %s\n' "$*" >&2
    exit 2
}

kits_abspath() {
    case "$1" in
    /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$SUBMIT_DIR" "$1" ;;
    esac
}

kits_is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

_kits_lib="$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=jobs/cluster.sh
source "$_kits_lib/cluster.sh"
# shellcheck source=jobs/sync.sh
source "$_kits_lib/sync.sh"
unset _kits_lib

# --- scheduler, resources ---------------------------------------------------------------------
kits_detect() {
    if [[ -n "${PBS_JOBID:-}" ]]; then
        KITS_SCHED=pbs
        SUBMIT_DIR="${PBS_O_WORKDIR:-$PWD}"
        JOB_ID="$PBS_JOBID"
        STAGE_DIR="${STAGE_DIR-${SCRATCHDIR:-}}"
        if [[ -n "${PBS_NODEFILE:-}" && -s "${PBS_NODEFILE}" ]]; then
            mapfile -t KITS_HOSTS < <(awk 'NF && !seen[$1]++ {print $1}' "$PBS_NODEFILE")
            KITS_NODEFILE_LINES=$(grep -c . "$PBS_NODEFILE")
        else
            KITS_HOSTS=("$(hostname)")
            KITS_NODEFILE_LINES=1
        fi
        KITS_NODE_CPUS="${NCPUS:-1}"
    elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
        KITS_SCHED=slurm
        SUBMIT_DIR="${SLURM_SUBMIT_DIR:-$PWD}"
        JOB_ID="$SLURM_JOB_ID"
        STAGE_DIR="${STAGE_DIR:-}"
        mapfile -t KITS_HOSTS < <(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" 2>/dev/null || hostname)
        KITS_NODE_CPUS="${SLURM_CPUS_ON_NODE:-1}"
    else
        KITS_SCHED=local
        SUBMIT_DIR="${SUBMIT_DIR:-$PWD}"
        JOB_ID="local-$$"
        STAGE_DIR="${STAGE_DIR:-}"
        KITS_HOSTS=(localhost)
        KITS_NODE_CPUS="$(nproc 2>/dev/null || echo 1)"
    fi
    SUITE_DIR="$(kits_abspath "${SUITE_DIR:-$SUBMIT_DIR}")"

    if [[ -z "${GPUS:-}" ]]; then
        GPUS=0
        local cvd="${CUDA_VISIBLE_DEVICES:-}"
        if [[ -n "$cvd" && "$cvd" != NoDevFiles && "$cvd" != -1 ]]; then
            local -a ids
            IFS=, read -ra ids <<<"$cvd"
            GPUS=${#ids[@]}
        elif [[ -z "${CUDA_VISIBLE_DEVICES+set}" ]] && command -v nvidia-smi >/dev/null 2>&1; then
            # no CUDA_VISIBLE_DEVICES from the scheduler: the GPUs this job's cgroup lets us see
            GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
        fi
    fi
    kits_is_uint "$GPUS" || kits_die "GPUS=$GPUS is not a number"

    if [[ -z "${RANKS:-}" ]]; then
        case "$KITS_SCHED" in
        pbs)
            if ((${#KITS_HOSTS[@]} > 1 || KITS_NODEFILE_LINES > 1)); then
                RANKS=$KITS_NODEFILE_LINES # select=...:mpiprocs=M lists each host M times
            elif ((GPUS > 0)); then
                RANKS=$GPUS
            else
                RANKS="${NCPUS:-1}"
            fi
            ;;
        slurm) RANKS="${SLURM_NTASKS:-${SLURM_NNODES:-1}}" ;;
        local) RANKS=$((GPUS > 0 ? GPUS : 1)) ;;
        esac
    fi
    if ! kits_is_uint "$RANKS" || ((RANKS < 1)); then
        kits_die "RANKS=$RANKS must be a positive integer"
    fi

    local n_hosts=${#KITS_HOSTS[@]}
    local per_node=$(((RANKS + n_hosts - 1) / n_hosts))
    if [[ -z "${THREADS_PER_RANK:-}" ]]; then
        THREADS_PER_RANK=$((KITS_NODE_CPUS / per_node))
        ((THREADS_PER_RANK >= 1)) || THREADS_PER_RANK=1
    fi
    export OMP_NUM_THREADS="$THREADS_PER_RANK" TF_NUM_INTRAOP_THREADS="$THREADS_PER_RANK"
}

# --- how to run python: container or venv -----------------------------------------------------
kits_setup_python() {
    if [[ -n "$IMAGE" ]]; then
        IMAGE="$(kits_abspath "$IMAGE")"
        local sing="${SINGULARITY:-}"
        if [[ -z "$sing" ]]; then
            sing="$(command -v singularity || command -v apptainer || true)"
        fi
        [[ -n "$sing" ]] || kits_die "IMAGE=$IMAGE is set but neither singularity nor apptainer is on PATH (module add singularity?); unset IMAGE to use $SUITE_DIR/.venv"
        [[ -f "$IMAGE" ]] || kits_die "IMAGE=$IMAGE: no such image file (build one: containers/build.sh)"
        KITS_PY=("$sing" exec)
        ((GPUS > 0)) && KITS_PY+=(--nv)
        local binds
        binds="$(kits_bind_list)"
        [[ -n "$binds" ]] && KITS_PY+=(--bind "$binds")
        KITS_PY+=("$IMAGE" python)
        KITS_RUNTIME="image $IMAGE ($sing)"
    else
        VENV="$(kits_abspath "${VENV:-$SUITE_DIR/.venv}")"
        [[ -x "$VENV/bin/python" ]] || kits_die "no IMAGE set and no Python environment at $VENV/bin/python: set IMAGE=/path/kits-suite.sif, or SUITE_DIR/VENV to a checkout with 'make setup' done (submit from the suite's folder)"
        [[ -d "$SUITE_DIR/train" && -d "$SUITE_DIR/preprocess" ]] || kits_die "SUITE_DIR=$SUITE_DIR does not hold the suite (train/, preprocess/)"
        export PYTHONPATH="$SUITE_DIR${PYTHONPATH:+:$PYTHONPATH}"
        export PATH="$VENV/bin:$PATH"
        KITS_PY=("$VENV/bin/python")
        KITS_RUNTIME="venv $VENV"
    fi
}

# Paths the container must see: the submit dir, scratch and every data/output location.
kits_bind_list() {
    local -a paths=()
    local p
    for p in "$SUBMIT_DIR" "${KITS_STAGE_ROOT:-}" "${DATA:-}" "${KITS:-}" "${RUN_DIR:-}" "${EVAL_DIR:-}"; do
        [[ -n "$p" ]] || continue
        p="$(kits_abspath "$p")"
        while [[ ! -e "$p" && "$p" != / ]]; do p="$(dirname "$p")"; done
        [[ "$p" != / ]] && paths+=("$p")
    done
    if [[ -n "$BIND" ]]; then
        local -a extra
        IFS=, read -ra extra <<<"$BIND"
        paths+=("${extra[@]}")
    fi
    ((${#paths[@]})) || return 0
    printf '%s\n' "${paths[@]}" | awk '!seen[$0]++' | paste -sd, -
}

# --- launching --------------------------------------------------------------------------------
# kits_parallel CMD...: the python command line under RANKS MPI ranks (one per GPU).
kits_parallel() {
    local -a mpi_extra=() srun_extra=() cmd=()
    read -ra mpi_extra <<<"$MPI_ARGS"
    read -ra srun_extra <<<"$SRUN_ARGS"
    local plugin="$SRUN_MPI"
    if [[ "$KITS_SCHED" == slurm && "$LAUNCHER" == srun && "$plugin" == auto ]]; then
        plugin="$(srun --mpi=list 2>&1 | kits_choose_srun_mpi)"
        kits_log "srun --mpi=list: using ${plugin/none/mpirun (no pmix or pmi2 plugin)}"
    fi
    if [[ "$KITS_SCHED" == slurm && "$LAUNCHER" == srun && "$plugin" != none ]]; then
        # pmix first: Debian's and Ubuntu's OpenMPI have no SLURM PMI2 support
        cmd=(srun --mpi="$plugin" --kill-on-bad-exit=1 --ntasks="$RANKS")
        # since SLURM 22.05 srun does not inherit the batch job's --cpus-per-task
        [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
        cmd+=("${srun_extra[@]}" "${KITS_PY[@]}" "$@")
    else
        local -a mpi=(-np "$RANKS" --bind-to none --map-by slot)
        if [[ "$KITS_SCHED" == pbs ]]; then
            if ((${#KITS_HOSTS[@]} > 1)); then
                mpi+=(--hostfile "$PBS_NODEFILE")
            else
                mpi+=(--host "${KITS_HOSTS[0]}:$RANKS")
            fi
        elif [[ "$KITS_SCHED" == local ]]; then
            mpi+=(--host "localhost:$RANKS")
        fi # inside a SLURM allocation mpirun reads the allocation itself
        if ((${#KITS_HOSTS[@]} > 1)); then # ranks on other nodes get the suite's settings too
            local v
            for v in $(compgen -e); do
                case "$v" in
                NCCL_* | HOROVOD_* | TF_* | OMP_NUM_THREADS | PYTHONPATH | PYTHONUNBUFFERED | PATH | LD_LIBRARY_PATH | HDF5_USE_FILE_LOCKING)
                    mpi+=(-x "$v")
                    ;;
                esac
            done
        fi
        mpi+=("${mpi_extra[@]}")
        if [[ -n "$IMAGE" && ${#KITS_HOSTS[@]} -eq 1 ]]; then
            # single node: the image's own mpirun (no host MPI needed, versions match)
            cmd=("${KITS_PY[@]:0:${#KITS_PY[@]}-1}" mpirun "${mpi[@]}" python "$@")
        else
            # host mpirun starting one process (or container) per rank; with IMAGE, the host's
            # OpenMPI must be compatible with the image's (4.1.x)
            cmd=("$MPIRUN" "${mpi[@]}" "${KITS_PY[@]}" "$@")
        fi
    fi
    kits_launch "${cmd[@]}"
}

# kits_on_other_nodes CMD...: CMD once on every host of the job but this one (multi-node).
kits_on_other_nodes() {
    ((${#KITS_HOSTS[@]} > 1)) || return 0
    local hosts
    hosts="$(IFS=,; printf '%s' "${KITS_HOSTS[*]:1}")"
    "$MPIRUN" -np $((${#KITS_HOSTS[@]} - 1)) --host "$hosts" --map-by node "$@"
}

# Run a command in the background and wait, so that a TERM (walltime) reaches the trap at once.
kits_launch() {
    kits_log "run: $*"
    "$@" &
    KITS_CHILD=$!
    local rc=0
    wait "$KITS_CHILD" || rc=$?
    KITS_CHILD=""
    return "$rc"
}

# --- staging and clean-up ---------------------------------------------------------------------
kits_stage_setup() {
    if [[ -n "$STAGE_DIR" ]]; then
        mkdir -p "$STAGE_DIR"
        KITS_STAGE_ROOT="$(mktemp -d "$STAGE_DIR/kits-job.XXXXXX")"
        kits_log "staging into $KITS_STAGE_ROOT"
        if [[ -n "$IMAGE" ]]; then kits_setup_python; fi # the container must see the scratch
    fi
}

# kits_stage_in VAR SRC NAME: copy folder SRC into scratch; VAR becomes the copy (SRC if no staging)
kits_stage_in() {
    local var="$1" src="$2" name="$3"
    if [[ -z "$KITS_STAGE_ROOT" ]]; then
        printf -v "$var" '%s' "$src"
        return 0
    fi
    local dst="$KITS_STAGE_ROOT/$name"
    kits_log "copying $src -> $dst ($(du -sh "$src" 2>/dev/null | cut -f1))"
    mkdir -p "$dst"
    cp -a "$src/." "$dst/"
    if ((${#KITS_HOSTS[@]} > 1)); then
        # Multi-node: scratch_local is per node, so every node gets its own copy (one copy
        # process per node). With scratch_shared or STAGE_DATA=0 this is not needed.
        kits_log "copying $src to the scratch of ${KITS_HOSTS[*]:1}"
        # shellcheck disable=SC2016  # $1/$2 are for the inner bash
        kits_on_other_nodes bash -c 'mkdir -p "$1" && cp -a "$2/." "$1/"' copy "$dst" "$src"
    fi
    printf -v "$var" '%s' "$dst"
}

# kits_stage_out VAR FINAL NAME: an output folder worked on in scratch and copied back to FINAL
# at exit (also on failure); FINAL's current content is copied in first (resume).
kits_stage_out() {
    local var="$1" final="$2" name="$3"
    mkdir -p "$final"
    if [[ -z "$KITS_STAGE_ROOT" ]]; then
        printf -v "$var" '%s' "$final"
        return 0
    fi
    local dst="$KITS_STAGE_ROOT/$name"
    mkdir -p "$dst"
    if [[ -n "$(ls -A "$final")" ]]; then
        kits_log "copying existing $final -> $dst"
        local t0=$SECONDS
        cp -a "$final/." "$dst/"
        KITS_COPY_SECONDS=$((SECONDS - t0))
    fi
    KITS_COPY_BACK+=("$dst|$final")
    printf -v "$var" '%s' "$dst"
}

kits_on_exit() {
    local rc=$?
    trap - EXIT
    set +e
    kits_sync_loop_stop
    kits_copy_back || { ((rc == 0)) && rc=3; }
    if [[ -n "$KITS_STAGE_ROOT" ]]; then
        if ((KITS_COPY_FAILED)); then
            kits_log "scratch kept for manual recovery: $KITS_STAGE_ROOT"
        else
            kits_on_other_nodes rm -rf "$KITS_STAGE_ROOT" || kits_log "could not clean the scratch of ${KITS_HOSTS[*]:1}"
            if [[ -n "${SCRATCHDIR:-}" && "$STAGE_DIR" == "$SCRATCHDIR" ]] && command -v clean_scratch >/dev/null 2>&1; then
                kits_log "clean_scratch"
                clean_scratch
            else
                rm -rf "$KITS_STAGE_ROOT"
            fi
        fi
    fi
    kits_mark_chain_stop "$rc"
    if ((rc == 0 || rc == 138 || rc == 143)); then kits_requeue; fi
    kits_log "job ${JOB_ID:-?} finished with exit code $rc"
    exit "$rc"
}

# Copy every output folder back to its permanent place (jobs/sync.sh: temporary names, commit
# points last); those the other nodes wrote too (multi-node preprocessing) first from there.
KITS_COPY_FAILED=0
kits_copy_back() {
    local pair src dst
    for pair in "${KITS_MERGE[@]}"; do
        src="${pair%%|*}"
        dst="${pair#*|}"
        kits_log "copying results back from ${KITS_HOSTS[*]:1}: $src -> $dst"
        # shellcheck disable=SC2016  # $1.. are for the inner bash
        kits_on_other_nodes bash -c 'source "$1" && kits_sync_dir "$2" "$3"' sync \
            "$SUITE_DIR/jobs/common.sh" "$src" "$dst" || KITS_COPY_FAILED=1
    done
    KITS_MERGE=()
    for pair in "${KITS_COPY_BACK[@]}"; do
        src="${pair%%|*}"
        dst="${pair#*|}"
        [[ -n "$(ls -A "$src" 2>/dev/null)" ]] || continue
        kits_log "copying results back: $src -> $dst"
        if ! kits_sync_dir "$src" "$dst"; then
            printf '[kits] ERROR: copying %s back to %s failed; the scratch folder is kept\n' "$src" "$dst" >&2
            KITS_COPY_FAILED=1
        fi
    done
    ((KITS_COPY_FAILED == 0))
}

# TERM at the walltime: PBS sends KILL about 10 s later, so only what fits in a few seconds:
# stop the ranks (KILL after 3 s), then the exit trap copies back what the last sync did not
# (the checkpoints are already in the permanent folder; see kits_sync_loop_start).
kits_on_signal() {
    kits_log "received SIG$1 (walltime or qdel/scancel): stopping, then copying results back"
    kits_sync_loop_stop
    if [[ -n "$KITS_CHILD" ]]; then
        kill -TERM "$KITS_CHILD" 2>/dev/null || true
        local i
        for ((i = 0; i < 30; i++)); do
            kill -0 "$KITS_CHILD" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$KITS_CHILD" 2>/dev/null || true
        wait "$KITS_CHILD" 2>/dev/null || true
    fi
    exit "$2"
}

# SLURM with REQUEUE=1: a training job that ended (deadline, USR1 or TERM) before its last
# epoch goes back to the queue, after its results are copied back.
kits_requeue() {
    [[ "$KITS_SCHED" == slurm && "$REQUEUE" == 1 && "$KITS_JOB_KIND" == train ]] || return 0
    local epochs_done
    epochs_done="$(kits_json_int epoch "$RUN_DIR/checkpoints/latest.json")"
    ((${epochs_done:-0} < EPOCHS)) || return 0
    kits_log "requeueing job $JOB_ID (epoch ${epochs_done:-0} of $EPOCHS done)"
    scontrol requeue "$JOB_ID" || kits_log "scontrol requeue $JOB_ID failed (requeueing not allowed here?)"
}

kits_begin() {
    trap kits_on_exit EXIT
    trap 'kits_on_signal TERM 143' TERM
    trap 'kits_on_signal INT 130' INT
    trap 'kits_on_signal USR1 138' USR1
    kits_detect
    kits_load_modules
    case "$LAUNCHER" in
    srun | mpirun) ;;
    *) kits_die "LAUNCHER=$LAUNCHER: use srun (SLURM only) or mpirun" ;;
    esac
    kits_setup_python
    kits_log "job $JOB_ID ($KITS_SCHED) on ${KITS_HOSTS[*]}: $1, $RANKS rank(s), $GPUS GPU(s)/node, $THREADS_PER_RANK thread(s)/rank, $KITS_RUNTIME"
}

# --- input checks (cheap, before staging or launching) ----------------------------------------
kits_require() {
    local name="$1" hint="$2"
    [[ -n "${!name:-}" ]] || kits_die "$name is not set: $hint"
}

# kits_check_dataset DIR: a dataset of this suite whose train split suits MODEL and RANKS.
kits_check_dataset() {
    local dir="$1" info kind n_shards
    [[ -d "$dir" ]] || kits_die "DATA=$dir: no such directory"
    [[ -f "$dir/manifest.json" ]] || kits_die "DATA=$dir is not a dataset of this suite (no manifest.json); make one with jobs/preprocess.pbs or jobs/preprocess.slurm"
    # stdout only (container runtimes may print notices on stderr); the marked line is the answer
    local err
    err="$(mktemp)"
    if ! info="$("${KITS_PY[@]}" -c 'import json, sys
m = json.load(open(sys.argv[1]))
print("KITS_MANIFEST", m["kind"], len(m["splits"]["train"]["shards"]))' "$dir/manifest.json" 2>"$err")"; then
        info="$(tail -n 1 "$err")"
        rm -f "$err"
        kits_die "DATA=$dir: unreadable manifest.json: $info"
    fi
    rm -f "$err"
    read -r _ kind n_shards <<<"$(grep '^KITS_MANIFEST ' <<<"$info" | tail -n 1)"
    [[ -n "$kind" && -n "$n_shards" ]] || kits_die "DATA=$dir: could not read manifest.json"
    if [[ -n "${MODEL:-}" ]]; then
        local want=slices
        [[ "$MODEL" == *3d* ]] && want=blocks
        [[ "$kind" == "$want" ]] || kits_die "MODEL=$MODEL needs a '$want' dataset but DATA=$dir holds '$kind' (preprocess.$([[ $want == blocks ]] && echo blocks || echo downsample) makes one)"
    fi
    ((n_shards >= 1)) || kits_die "DATA=$dir: the train split has no shards"
    if ((RANKS > n_shards)); then
        kits_die "$RANKS ranks but DATA=$dir has only $n_shards train shard(s): every rank needs its own shard. Use RANKS<=$n_shards (RANKS must divide $n_shards), or re-run preprocessing with SHARDS=a multiple of $RANKS"
    fi
    if ((n_shards % RANKS != 0)); then
        kits_die "$n_shards train shards cannot be split evenly over $RANKS ranks: RANKS must divide the shard count (e.g. $(kits_divisors "$n_shards")), or re-run preprocessing with SHARDS=a multiple of $RANKS"
    fi
    kits_log "DATA=$dir: $kind dataset, $n_shards train shard(s), $((n_shards / RANKS)) per rank"
}

kits_divisors() {
    local n="$1" d out=()
    for ((d = 1; d <= n; d++)); do ((n % d == 0)) && out+=("$d"); done
    local IFS=,
    printf '%s' "${out[*]}"
}

# kits_verify DIR: preprocess.verify (checksums, shapes, labels); bad dataset -> exit 2.
kits_verify() {
    local dir="$1" rc=0
    kits_log "verifying $dir"
    "${KITS_PY[@]}" -m preprocess.verify "$dir" || rc=$?
    case "$rc" in
    0) ;;
    1) kits_die "dataset $DATA failed verification (problems listed above): re-copy or re-create it" ;;
    2) kits_die "$DATA is not a dataset of this suite (see above)" ;;
    *) kits_die "python -m preprocess.verify $dir exited $rc" ;;
    esac
}

# --- the three jobs ---------------------------------------------------------------------------
kits_train() {
    KITS_JOB_KIND=train
    kits_begin "training $MODEL"
    RUN_DIR="$(kits_abspath "${RUN_DIR:-runs/$MODEL}")"
    kits_check_chain
    kits_require DATA "the preprocessed dataset folder, e.g. qsub -v DATA=/storage/brno2/home/\$USER/kits/slices128 ... or sbatch --export=ALL,DATA=..."
    DATA="$(kits_abspath "$DATA")"
    kits_is_uint "$EPOCHS" || kits_die "EPOCHS=$EPOCHS is not a number"
    kits_is_uint "$BATCH" || kits_die "BATCH=$BATCH is not a number"
    if ! kits_is_uint "$SYNC_INTERVAL" || ((SYNC_INTERVAL == 0)); then kits_die "SYNC_INTERVAL=$SYNC_INTERVAL: give whole seconds > 0"; fi
    kits_check_dataset "$DATA"

    # what resume looks for: the commit point of the last complete checkpoint
    local resume=() done_epochs
    if [[ -f "$RUN_DIR/checkpoints/latest.json" ]]; then
        done_epochs="$(kits_json_int epoch "$RUN_DIR/checkpoints/latest.json")"
        if ((${done_epochs:-0} >= EPOCHS)); then
            kits_log "$RUN_DIR has trained ${done_epochs} of $EPOCHS epochs: nothing to do"
            return 0
        fi
        resume=(--resume)
        kits_log "checkpoint of epoch ${done_epochs:-?} found in $RUN_DIR: resuming"
    fi
    local -a gpu_flag=()
    if kits_gpu_required; then
        kits_check_gpus
        gpu_flag=(--require-gpu)
    fi
    kits_stage_setup
    local data_dir="$DATA" run_dir
    [[ "$STAGE_DATA" == 1 ]] && kits_stage_in data_dir "$DATA" data
    kits_verify "$data_dir"
    KITS_COPY_SECONDS=0
    kits_stage_out run_dir "$RUN_DIR" run

    local -a extra=() limits=(--checkpoint-every "${CHECKPOINT_EVERY:-1}")
    read -ra extra <<<"$EXTRA_ARGS"
    local deadline
    deadline="$(kits_deadline "$KITS_COPY_SECONDS")"
    if [[ -n "$deadline" ]]; then
        ((deadline > $(date +%s))) || kits_die "the walltime (or TIME_LIMIT) leaves no time to train after STOP_MARGIN=$STOP_MARGIN s"
        limits+=(--deadline "$deadline")
        kits_log "training must stop by $(date -d "@$deadline" '+%F %T') ($((deadline - $(date +%s))) s from now)"
    fi
    # every new checkpoint goes to the permanent run folder while training runs
    [[ "$run_dir" != "$RUN_DIR" ]] && kits_sync_loop_start "$run_dir" "$RUN_DIR"
    local rc=0
    kits_parallel -m train.train --model "$MODEL" --data "$data_dir" --out "$run_dir" \
        --epochs "$EPOCHS" --batch-size "$BATCH" "${limits[@]}" "${gpu_flag[@]}" \
        "${resume[@]}" "${extra[@]}" || rc=$?
    kits_log "training exited with code $rc (run folder $RUN_DIR)"
    return "$rc"
}

kits_evaluate() {
    RANKS=1 # train.evaluate is one process (GPU if the job has one)
    KITS_JOB_KIND=evaluate
    kits_begin "evaluation"
    kits_require RUN_DIR "the training run folder (holding config.json and checkpoints/), e.g. RUN_DIR=runs/unet2d"
    kits_require KITS "the KiTS19 folder of case_XXXXX (imaging.nii.gz, segmentation.nii.gz)"
    RUN_DIR="$(kits_abspath "$RUN_DIR")"
    KITS="$(kits_abspath "$KITS")"
    EVAL_DIR="$(kits_abspath "${EVAL_DIR:-$RUN_DIR/eval}")"
    [[ -f "$RUN_DIR/config.json" ]] || kits_die "RUN_DIR=$RUN_DIR holds no config.json: not a training run folder"
    compgen -G "$RUN_DIR/checkpoints/*.weights.h5" >/dev/null || kits_die "RUN_DIR=$RUN_DIR has no checkpoints/*.weights.h5 yet"
    [[ -d "$KITS" ]] || kits_die "KITS=$KITS: no such directory"
    compgen -G "$KITS/case_[0-9][0-9][0-9][0-9][0-9]" >/dev/null || kits_die "KITS=$KITS holds no case_XXXXX folders"
    local -a data_arg=()
    if [[ -n "${DATA:-}" ]]; then
        DATA="$(kits_abspath "$DATA")"
        [[ -f "$DATA/manifest.json" ]] || kits_die "DATA=$DATA is not a dataset of this suite (no manifest.json)"
    fi
    kits_check_gpus

    kits_stage_setup
    local kits_dir="$KITS" eval_dir
    [[ "${STAGE_KITS:-0}" == 1 ]] && kits_stage_in kits_dir "$KITS" kits
    kits_stage_out eval_dir "$EVAL_DIR" eval
    [[ -n "${DATA:-}" ]] && data_arg=(--data "$DATA")

    local -a extra=()
    read -ra extra <<<"$EXTRA_ARGS"
    local rc=0
    kits_launch "${KITS_PY[@]}" -m train.evaluate --run "$RUN_DIR" --kits "$kits_dir" \
        "${data_arg[@]}" --out "$eval_dir" "${extra[@]}" || rc=$?
    kits_log "evaluation exited with code $rc (results in $EVAL_DIR)"
    return "$rc"
}

kits_preprocess() {
    MODE="${MODE:-downsample}"
    SHARDS="${SHARDS:-8}"
    KITS_JOB_KIND=preprocess
    kits_begin "preprocessing ($MODE)"
    kits_require KITS "the KiTS19 folder of case_XXXXX, e.g. qsub -v KITS=/storage/brno2/home/\$USER/kits19/data,DATA=... "
    kits_require DATA "the output dataset folder, e.g. DATA=/storage/brno2/home/\$USER/kits/slices128"
    [[ "$MODE" == downsample || "$MODE" == blocks ]] || kits_die "MODE=$MODE: use downsample (2D slices) or blocks (3D blocks)"
    if ! kits_is_uint "$SHARDS" || ((SHARDS < 1)); then
        kits_die "SHARDS=$SHARDS must be a positive integer"
    fi
    KITS="$(kits_abspath "$KITS")"
    DATA="$(kits_abspath "$DATA")"
    [[ -d "$KITS" ]] || kits_die "KITS=$KITS: no such directory"
    compgen -G "$KITS/case_[0-9][0-9][0-9][0-9][0-9]" >/dev/null || kits_die "KITS=$KITS holds no case_XXXXX folders"

    kits_stage_setup
    local kits_dir="$KITS" out_dir
    [[ "${STAGE_KITS:-1}" == 1 ]] && kits_stage_in kits_dir "$KITS" kits
    if [[ -n "$KITS_STAGE_ROOT" ]] && ((${#KITS_HOSTS[@]} > 1)); then
        # Several nodes: ranks claim cases in OUT/.work/claims and read each other's per-case
        # results there, so .work must be on storage every node shares. --out is one path for
        # all ranks: on this node a link to DATA itself (rank 0 makes DATA/.work and writes the
        # manifest there), on the others a scratch folder whose .work links to DATA/.work; the
        # shards those nodes write into their scratch are merged into DATA at the end.
        out_dir="$KITS_STAGE_ROOT/data"
        mkdir -p "$DATA"
        ln -s "$DATA" "$out_dir"
        # shellcheck disable=SC2016  # $1/$2 are for the inner bash
        kits_on_other_nodes bash -c 'mkdir -p "$1" && ln -sfn "$2" "$1/.work"' link "$out_dir" "$DATA/.work"
        KITS_MERGE+=("$out_dir|$DATA")
    else
        kits_stage_out out_dir "$DATA" data
    fi

    local -a extra=()
    read -ra extra <<<"$EXTRA_ARGS"
    local rc=0
    kits_parallel -m "preprocess.$MODE" --kits "$kits_dir" --out "$out_dir" --shards "$SHARDS" \
        "${extra[@]}" || rc=$?
    if ((rc == 0)) && ((${#KITS_MERGE[@]})); then
        kits_copy_back || rc=3
        ((rc == 0)) && { "${KITS_PY[@]}" -m preprocess.verify "$DATA" || rc=$?; }
        ((rc == 0)) && rm -rf "$DATA/.work"
    elif ((rc == 0)); then
        "${KITS_PY[@]}" -m preprocess.verify "$out_dir" || rc=$?
    fi
    kits_log "preprocessing exited with code $rc (dataset $DATA)"
    return "$rc"
}

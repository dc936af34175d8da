#!/usr/bin/env bash
# Submit N copies of a job template, each starting when the previous one has ended in any state
# (afterany), so a training longer than the walltime continues: every job resumes from
# RUN_DIR/checkpoints/latest.json. A job that ends with an error (not a walltime or signal end)
# leaves RUN_DIR/.kits-chain-stopped, and the jobs after it stop at once (jobs/README.md).
#
#   jobs/chain.sh N TEMPLATE [qsub or sbatch options...]
#   jobs/chain.sh 3 jobs/train_unet3d.pbs -v DATA=/storage/brno2/home/$USER/kits/blocks128
#   jobs/chain.sh 3 jobs/train_unet3d.slurm --export=ALL,DATA=$HOME/kits/blocks128
#   AFTER=12345 jobs/chain.sh 2 ...     # the first job also waits for job 12345
#
# *.pbs goes to qsub (-W depend=afterany:ID), *.slurm to sbatch (--dependency=afterany:ID).
# Prints the job ids, one a line.
set -euo pipefail

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
(($# >= 2)) || usage
n="$1"
template="$2"
shift 2
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "chain.sh: N must be a positive integer, got '$n'" >&2; exit 2; }
[[ -f "$template" ]] || { echo "chain.sh: no such job template: $template" >&2; exit 2; }

prev="${AFTER:-}"
for ((i = 1; i <= n; i++)); do
    case "$template" in
    *.pbs)
        dep=()
        [[ -n "$prev" ]] && dep=(-W "depend=afterany:$prev")
        id="$(qsub "${dep[@]}" "$@" "$template")"
        ;;
    *.slurm | *.sbatch | *.sh)
        dep=()
        [[ -n "$prev" ]] && dep=("--dependency=afterany:$prev")
        id="$(sbatch --parsable "${dep[@]}" "$@" "$template")"
        id="${id%%;*}" # "id;cluster" on federated clusters
        ;;
    *)
        echo "chain.sh: $template: expected a .pbs (qsub) or .slurm (sbatch) template" >&2
        exit 2
        ;;
    esac
    [[ -n "$id" ]] || { echo "chain.sh: submission $i returned no job id" >&2; exit 1; }
    echo "$id"
    prev="$id"
done

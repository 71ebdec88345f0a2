#!/usr/bin/env bash
# Thread scaling of lowband's kernels (issue 14 item 6): builds the extension in
# place and runs the bench suites at each thread count, printing each case's
# speedup over one thread.  Usage (from the repository root, any python3 with
# numpy, setuptools and a C compiler; torch optional):
#   bash benchmarks/scaling.sh [SIZE] [THREADS] [OUTDIR]
# e.g. bash benchmarks/scaling.sh 64Mi 1,2,4,8,16 /tmp/scaling
set -u
size=${1:-64Mi}
threads=${2:-1,2,4,8,16}
out=${3:-benchmarks/results}
py=${PYTHON:-python3}
mkdir -p "$out"
nproc
grep -m1 'model name' /proc/cpuinfo
grep -o -m1 -w 'avx512f\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
"$py" -c "import numpy, sys; print('python', sys.version.split()[0], 'numpy', numpy.__version__)"
"$py" setup.py -q build_ext --inplace >"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
export PYTHONPATH=python OPENBLAS_NUM_THREADS=1 PYTHONUNBUFFERED=1
for isa in ${ISAS:-native}; do
  if [ "$isa" = native ]; then unset LOWBAND_FORCE_ISA; else export LOWBAND_FORCE_ISA=$isa; fi
  "$py" -m lowband bench ${SUITES:-sparsify quantize feedback lowbit moe} --quick --reps "${REPS:-3}" \
      --size "$size" --threads "$threads" --json "$out/scaling_$isa.json" 2>&1 | tee "$out/scaling_$isa.txt"
done

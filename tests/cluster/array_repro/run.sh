#!/usr/bin/env bash
# Reproduces two failures of snakemake-executor-plugin-slurm 2.8 job arrays on any SLURM cluster:
#   ./run.sh e2big    # one array of 100 tasks: sbatch's --wrap argument passes 128 KiB -> E2BIG,
#                     # the plugin retries via a stdin script, and that script is broken (next case)
#   ./run.sh script   # 4 tasks with --slurm-pass-command-as-script: every task runs task 0's job,
#                     # tasks 1-3 never write their outputs (MissingOutputException after latency-wait)
#   ./run.sh first-fails  # 4 tasks, task 0 fails: its siblings are reported FAILED too, although their
#                     # own jobs ran (every task's outer snakemake checks the first task's outputs)
#   ./run.sh handoff  # 12 tasks, --jobs 6, arrays of 4, tasks of staggered length: hangs. When fewer jobs
#                     # than the array limit are handed over at once (slots freed one by one under --jobs),
#                     # the plugin "waits for more" but keeps them nowhere: Snakemake counts them as
#                     # running forever, and once they fill --jobs nothing is submitted again
#   ./run.sh ok       # 4 tasks, default submission: works
# Each case runs in its own folder under ./runs/ and prints which task wrote each output.
set -u
fail=0 jobs=100 stagger=0 limit=900
here=$(cd "$(dirname "$0")" && pwd)
case "${1:?usage: $0 e2big|script|first-fails|handoff|ok}" in
  e2big) tasks=100; extra=(--slurm-array-limit 100) ;;
  script) tasks=4; extra=(--slurm-array-limit 4 --slurm-pass-command-as-script) ;;
  first-fails) tasks=4; extra=(--slurm-array-limit 4); fail=1 ;;
  handoff) tasks=12; jobs=6; stagger=1; limit=240; extra=(--slurm-array-limit 4) ;;
  ok) tasks=4; extra=(--slurm-array-limit 4) ;;
  *) echo "unknown case $1" >&2; exit 2 ;;
esac
work="$here/runs/$1"
rm -rf "$work" && mkdir -p "$work"
cd "$work"
timeout "$limit" snakemake --snakefile "$here/Snakefile" --config tasks="$tasks" fail_first="$fail" stagger="$stagger" \
  --executor slurm --jobs "$jobs" \
  --slurm-array-jobs task "${extra[@]}" --latency-wait 1 --slurm-init-seconds-before-status-checks 5 \
  --default-resources mem_mb=500 runtime=10 --verbose >snakemake.log 2>&1
status=$?
echo "snakemake exit status: $status$([ $status = 124 ] && echo " (killed after $limit s: it hung)")"
grep -m3 -E "E2BIG|Argument list too long|exceeds argument-length|MissingOutputException" snakemake.log
wrap=$(grep -m1 -o -- "--slurm-jobstep-array-execs=[^\" ]*" snakemake.log | wc -c)
echo "size of --slurm-jobstep-array-execs in the first array call: $wrap characters"
echo "outputs written: $(ls out 2>/dev/null | wc -l) of $tasks"; head -n 4 out/* 2>/dev/null
jobid=$(grep -m1 -oE "Job [0-9]+ has been submitted with SLURM jobid [0-9]+" snakemake.log | grep -oE "[0-9]+$")
[ -n "$jobid" ] && sacct -j "$jobid" -X -n -o JobID,State 2>/dev/null

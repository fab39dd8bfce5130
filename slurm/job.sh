# shellcheck shell=bash disable=SC2006
# slurm/job.sh: the shell around every pipeline job.
#
# `python -m pipeline.slurm submit` copies this file into each rendered logs/<run>/slurm/<NNN>/<job>.sbatch right
# after the #SBATCH lines (so the kept script is exactly what ran), followed by the job's settings (the PIPELINE_*
# variables, the srun options, the wrapper and the stage command), its environment hook (pipeline_setup) and a call
# to job_start; the template's last line runs the stage with run_stage. What it does:
#
# - Signals from its first line. USR1 is the warning the job asked for (--signal=B:USR1@<slurm.signal_s>, sent to
#   this shell only). It is written to $PIPELINE_SIGNAL_DIR/warning and forwarded to the stage step once every
#   node's stage process has written ready.<node> (a Python process still importing torch would die of it); a
#   stage process that starts later finds the file (pipeline/preemption.py). SIGTERM (scancel, the time limit,
#   Slurm's own requeue) reaches the stage from Slurm directly; here it is only logged while the stage stops.
# - The requeue: a stage that saved its state after the warning leaves $PIPELINE_SIGNAL_DIR/requeue and exits;
#   once the whole step has ended this shell runs `scontrol requeue` (outside any container). A warning before
#   the stage started requeues at once.
# - The environment hook (slurm.setup/env, per stage too), SLURM_EXPORT_ENV=ALL so the step inherits what the
#   hook set up even under sbatch --export=NONE, and the rendezvous address of node 0 for multi-node torchrun.
# - monitor.py beside the stage (once per node; on other nodes or in a container through srun), stopped with USR2
#   when the stage ends, so that it writes its summary.
#
# Command substitutions below are `...`, not $(...): bash 5.2 parses $(...) while it reads a function definition,
# and a trap that runs during that parse breaks it ("trap: unexpected EOF while looking for matching `)'", exit 2;
# seen with a USR1 a few milliseconds into a job). Backquotes are parsed only when they run.
trap 'PIPELINE_EARLY_WARNING=1' USR1 # first line: a warning while the job starts is kept and acted on below
set -Eeuo pipefail
trap 'say "failed: $BASH_COMMAND (line $LINENO)"' ERR
export PYTHONUNBUFFERED=1
STAGE_PID="" MONITOR_PID="" WARNING_PENDING=0

say() { echo "`date -Is` [job.sh] $*" >&2; }

job_ref() { # what scontrol needs: <array job>_<task> for an array task, else the job id
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"; else echo "$SLURM_JOB_ID"; fi
}

on_warning() {
  say "USR1: the time limit or a preemption is near; the stage saves its state and asks for a requeue"
  : >"$PIPELINE_SIGNAL_DIR/warning"
  WARNING_PENDING=1
  forward_warning
}

forward_warning() { # to the stage step, once every node's stage process can take it
  [ "$WARNING_PENDING" = 1 ] && [ -n "$STAGE_PID" ] || return 0
  local ready
  ready=`find "$PIPELINE_SIGNAL_DIR" -maxdepth 1 -name 'ready.*' | wc -l`
  if [ "$ready" -ge "${SLURM_JOB_NUM_NODES:-1}" ]; then
    say "forwarding USR1 to the stage (srun pid $STAGE_PID)"
    kill -USR1 "$STAGE_PID" 2>/dev/null || true
    WARNING_PENDING=0
  fi
}

on_term() { say "SIGTERM (cancel, requeue or time limit): the stage stops without requeueing; waiting for it"; }

requeue() {
  say "requeueing job `job_ref`: $1"
  if ! scontrol requeue "`job_ref`"; then
    say "scontrol requeue `job_ref` failed; the job ends here (resubmit to resume)"
    exit 1
  fi
  exit 0 # the controller ends this attempt and queues the job again
}

start_monitor() { # telemetry beside the stage: one monitor per node, stopped when the stage ends
  [ "$PIPELINE_MONITOR" = 1 ] || return 0
  local mon=("${PIPELINE_WRAPPER[@]}" "$PIPELINE_PYTHON" "$PIPELINE_REPO/monitor.py" --run "$PIPELINE_RUN"
             --stage "$PIPELINE_STAGE" --logs-dir "$PIPELINE_LOGS_DIR" --interval "$PIPELINE_MONITOR_INTERVAL")
  if [ "${SLURM_NNODES:-1}" -gt 1 ] || [ "${#PIPELINE_SRUN_ARGS[@]}" -gt 0 ]; then # other nodes, a container
    srun --overlap --ntasks-per-node=1 "${PIPELINE_SRUN_ARGS[@]}" "${mon[@]}" &
  else
    "${mon[@]}" --pid "$STAGE_PID" &
  fi
  MONITOR_PID=$!
}

stop_monitor() { # USR2: srun forwards it to the monitor on every node; a TERM to srun would SIGKILL the step
  if [ -n "$MONITOR_PID" ]; then kill -USR2 "$MONITOR_PID" 2>/dev/null || true; wait "$MONITOR_PID" || true; fi
  MONITOR_PID=""
}

job_end() {
  stop_monitor
  rm -rf "${PIPELINE_SIGNAL_DIR:?}"
}

job_start() {
  PIPELINE_SIGNAL_DIR="$PIPELINE_LOGS_DIR/$PIPELINE_RUN/slurm/signals/`job_ref`"
  export PIPELINE_SIGNAL_DIR
  rm -rf "$PIPELINE_SIGNAL_DIR" # an earlier attempt's files
  mkdir -p "$PIPELINE_SIGNAL_DIR"
  trap on_warning USR1
  trap on_term TERM
  trap job_end EXIT
  say "job `job_ref`, attempt $((${SLURM_RESTART_COUNT:-0} + 1)), on `hostname`: $PIPELINE_STAGE${PIPELINE_UNIT:+ $PIPELINE_UNIT}"
  if [ "${PIPELINE_EARLY_WARNING:-0}" = 1 ]; then on_warning; fi
  set +u # activate scripts and module files read unset variables
  pipeline_setup
  set -u
  export SLURM_EXPORT_ENV=ALL # the step inherits this shell's environment, hook included, even under --export=NONE
  export PYTHONPATH="$PIPELINE_REPO${PYTHONPATH:+:$PYTHONPATH}"
  MASTER_ADDR=`scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1`
  MASTER_PORT=$((PIPELINE_RDZV_PORT + SLURM_JOB_ID % 1000)) # jobs side by side on node 0 get different ports
  export MASTER_ADDR MASTER_PORT
}

wait_stage() { # the stage's exit status; a pending warning is forwarded meanwhile
  local rc r2
  while :; do
    if [ "$WARNING_PENDING" = 1 ] && kill -0 "$STAGE_PID" 2>/dev/null; then
      sleep 1 &
      wait $! || true # poll: the stage is not ready for the signal yet
      forward_warning
      continue
    fi
    wait "$STAGE_PID" && rc=0 || rc=$?
    if [ "$rc" -gt 128 ]; then # a trapped signal interrupted wait, or the stage died of a signal
      kill -0 "$STAGE_PID" 2>/dev/null && continue
      wait "$STAGE_PID" 2>/dev/null && r2=0 || r2=$?
      [ "$r2" = 127 ] || rc=$r2 # 127: the status was collected above
    fi
    return "$rc"
  done
}

run_stage() { # run_stage CMD...: the stage step in the background (traps run while it works); exits with its status
  if [ -e "$PIPELINE_SIGNAL_DIR/warning" ]; then requeue "the warning came before the stage started"; fi
  "$@" &
  STAGE_PID=$!
  start_monitor
  local rc
  wait_stage && rc=0 || rc=$?
  stop_monitor
  say "stage $PIPELINE_STAGE${PIPELINE_UNIT:+ $PIPELINE_UNIT} exited with $rc"
  if [ -e "$PIPELINE_SIGNAL_DIR/requeue" ]; then requeue "the stage saved its state after the warning"; fi
  exit "$rc" # not return: the ERR trap is for the hook and this shell's own commands, the stage's status is said above
}

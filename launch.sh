#!/usr/bin/env bash
# Launch the trainer with the accelerate config that fits this machine (or this node of a cluster).
#
# usage: ./launch.sh [--strategy auto|single|ddp|zero1|zero2|zero3|zero2_offload|zero3_offload|fsdp] [--dry-run]
#                    [trainer options...]
#        ./launch.sh study [study options...]        # the reference study (python -m trainer.study)
#
#   --strategy   auto (default): one process on the CPU or the GPU when there are 0 or 1 GPUs, DDP over all
#                GPUs when there are several; single, ddp, a DeepSpeed ZeRO stage or fsdp (torch's FSDP2) when named.
#   --dry-run    print the command and exit.
# Every other argument goes to trainer/main.py unchanged.
#
# Environment (all optional):
#   GPUS            GPUs per node (default: counted with nvidia-smi; 0 without it)
#   NPROC_PER_NODE  processes per node (default: GPUS, or 1 on a CPU-only machine)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   several nodes (static rendezvous); under SLURM they
#                   default to SLURM_NNODES, SLURM_NODEID, the first host of SLURM_JOB_NODELIST, 29500. NODE_RANK
#                   lies in [0, NNODES); nodes other than 0 need MASTER_ADDR (node 0's address).
#   RENDEZVOUS_TIMEOUT  seconds a node other than 0 tries to reach MASTER_ADDR:MASTER_PORT (default 600, torch's)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds the launcher gives its processes to save after a preemption
#                   signal before it kills them (default here 110, torch's own 30; keep it below the warning
#                   time of SLURM's --signal=TERM@N).
# Several processes: the trainer's options are checked once before the workers start (one line, exit 2).
# Exit status: the trainer's (0 done, 2 bad input, 75 preempted after saving: run again with --resume auto), also
# when the signal reached this script and the launcher too (as SLURM delivers it), or 1.
set -euo pipefail
PREEMPTED=75  # trainer/config.py PREEMPTED_EXIT_CODE
# Stay in the caller's folder, so relative paths among the trainer's options (--data_dir, --save_dir,
# --config, --checkpoint) mean what the user typed; the repository's files are named by absolute path.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ "${1:-}" == "study" ]]; then
  shift
  PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec python -m trainer.study "$@"
fi

strategy=auto dry_run=0 args=()
while (($#)); do
  case "$1" in
    --strategy) (($# >= 2)) || { echo "error: --strategy needs a value" >&2; exit 2; }; strategy=$2; shift 2 ;;
    --strategy=*) strategy="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,25p' "$repo/launch.sh" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
case "$strategy" in
  auto|single|ddp|zero1|zero2|zero3|zero2_offload|zero3_offload|fsdp) ;;
  *) echo "error: --strategy $strategy is not one of auto, single, ddp, zero1, zero2, zero3, zero2_offload, zero3_offload, fsdp" >&2; exit 2 ;;
esac

if [[ -z "${GPUS:-}" ]]; then
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then GPUS=$SLURM_GPUS_ON_NODE
  elif command -v nvidia-smi >/dev/null 2>&1; then GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  else GPUS=0; fi
fi
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  NNODES=${NNODES:-${SLURM_NNODES:-1}}
  NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
  if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  fi
fi
# Bash arithmetic reads a word such as "abc" as a variable name ("unbound variable" under set -u): check first.
need_count() {  # NAME MIN: the variable must be a whole number >= MIN
  [[ "${!1}" =~ ^(0|[1-9][0-9]*)$ ]] && ((${!1} >= $2)) && return 0
  echo "error: $1 must be a whole number >= $2, got '${!1}'" >&2; exit 2
}
need_count GPUS 0
master_given=${MASTER_ADDR:+1} nproc_given=${NPROC_PER_NODE:+1}
NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0} MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-$((GPUS > 0 ? GPUS : 1))} RENDEZVOUS_TIMEOUT=${RENDEZVOUS_TIMEOUT:-600}
need_count NNODES 1; need_count NODE_RANK 0; need_count MASTER_PORT 1; need_count NPROC_PER_NODE 1
need_count RENDEZVOUS_TIMEOUT 1
# Checked here, in one line: a port above 65535 ends in Python's OverflowError, a NODE_RANK that no node 0 counts
# and a node other than 0 looking for node 0 on its own 127.0.0.1 both wait for a rendezvous that never comes.
((MASTER_PORT <= 65535)) || { echo "error: MASTER_PORT must lie in [1, 65535], got $MASTER_PORT" >&2; exit 2; }
if ((NODE_RANK >= NNODES)); then
  echo "error: NODE_RANK must lie in [0, NNODES - 1] = [0, $((NNODES - 1))], got $NODE_RANK" >&2; exit 2
fi
if ((NODE_RANK > 0)) && [[ -z "$master_given" ]]; then
  echo "error: node NODE_RANK=$NODE_RANK needs MASTER_ADDR, the address of node 0 (NODE_RANK=0)" >&2; exit 2
fi

if [[ "$strategy" == auto ]]; then
  if ((NNODES > 1 || NPROC_PER_NODE > 1)); then strategy=ddp; else strategy=single; fi
elif [[ "$strategy" == single ]]; then
  # One process in all: several nodes (each would train alone, into the same --save_dir) or an explicit
  # NPROC_PER_NODE above 1 contradict it. A node's GPU count alone does not: single uses one of them.
  if ((NNODES > 1)) || { [[ -n "$nproc_given" ]] && ((NPROC_PER_NODE > 1)); }; then
    echo "error: --strategy single runs one process, but NNODES=$NNODES x NPROC_PER_NODE=$NPROC_PER_NODE were" \
         "asked for; use --strategy ddp (or a ZeRO stage), or unset them" >&2
    exit 2
  fi
  NPROC_PER_NODE=1
fi
case "$strategy" in
  single) config=single_gpu.yaml; ((GPUS > 0)) || config="" ;;
  ddp) if ((NNODES > 1)); then config=multi_node.yaml; elif ((GPUS > 0)); then config=multi_gpu.yaml
       else config=cpu_multi.yaml; fi ;;
  *) config=$strategy.yaml ;;
esac

processes=$((NNODES * NPROC_PER_NODE)) direct=0
if [[ "$strategy" == single && -z "$config" ]]; then
  what="one process on the CPU (no GPU found)"
  cmd=(python "$repo/trainer/main.py") direct=1
else
  what="$strategy: $NNODES node(s) x $NPROC_PER_NODE process(es), $GPUS GPU(s) per node, config $config"
  # `accelerate launch` (trainer/accelerate_launch.py runs it), quiet where the trainer processes said why they
  # stopped; the rendezvous timeout reaches torch's static rendezvous (its "timeout", in seconds).
  cmd=(python "$repo/trainer/accelerate_launch.py" --config_file "$repo/accelerate_configs/$config"
       --num_processes "$processes" --num_machines "$NNODES" --machine_rank "$NODE_RANK"
       --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" --rdzv_conf "timeout=$RENDEZVOUS_TIMEOUT"
       "$repo/trainer/main.py")
  # accelerate's --multi_gpu launcher refuses a single process; one process of DDP is plain single.
  if [[ "$strategy" == ddp ]] && ((NNODES * NPROC_PER_NODE == 1)); then
    echo "error: --strategy ddp needs more than one process (set NPROC_PER_NODE or GPUS)" >&2; exit 2
  fi
  if ((GPUS == 0)) && [[ "$strategy" != single ]]; then
    args=(--device cpu "${args[@]}")
  fi
fi

echo "launch.sh: $what" >&2
# Shell-quoted, so the printed line is exactly the command that runs (arguments with spaces included).
line=$(printf '%q ' "${cmd[@]}" "${args[@]}")
echo "launch.sh: ${line% }" >&2
((dry_run)) && exit 0

# One process: the trainer itself receives the signals, exits 75 after saving and prints its own refusal.
((direct)) && exec "${cmd[@]}" "${args[@]}"
# Several: every refusal that needs no process group, once, in one process, before any worker starts
# (trainer/precheck.py); a refusal inside the workers would be printed by each and end in torch's traceback.
if ((processes > 1)); then
  status=0
  python "$repo/trainer/main.py" --check_launch "$processes" "$strategy" "${args[@]}" || status=$?
  ((status == 0)) || exit "$status"
fi

# Several: SLURM signals every process of the job step: this script, accelerate's launcher (torch's elastic
# agent) and the trainer processes; Ctrl-C in a terminal signals this script (see setsid below). The agent forwards the signal to its workers, SIGKILLs them after
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (torch's default, 30, can be shorter than a save) and then exits 1,
# as it does when a worker exits 75: it never reports 75. So this script stays alive (it traps the signals and
# passes them on, for a signal sent to it alone), waits for the launcher, and exits 75 when every trainer
# process of this node wrote 75 into TRAINER_EXIT_STATUS_DIR (trainer/main.py) on its way out.
TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}
if [[ ! "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" =~ ^[0-9]+$ ]]; then
  echo "error: TORCH_ELASTIC_SHUTDOWN_TIMEOUT must be a whole number of seconds," \
       "got '$TORCH_ELASTIC_SHUTDOWN_TIMEOUT'" >&2
  exit 2
fi
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# The agent handles SIGTERM, SIGINT, SIGHUP and SIGQUIT by default and dies of any other signal, leaving its
# workers to be killed half-way through a save: add the trainer's SIGUSR1 (and SIGUSR2, a common --preempt_signal).
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2}
TRAINER_EXIT_STATUS_DIR=$(mktemp -d)
export TRAINER_EXIT_STATUS_DIR
trap 'rm -rf "$TRAINER_EXIT_STATUS_DIR"' EXIT
child=""
forward() { if [[ -n "$child" ]]; then kill -s "$1" "$child" 2>/dev/null || true; fi; }
for sig in TERM INT HUP USR1 USR2; do trap "forward $sig" "$sig"; done
# In a session of its own, so Ctrl-C in a terminal (which signals the terminal's foreground process group) reaches
# this script alone and the agent gets it once, from forward(): a second signal while the agent shuts down makes
# it start again with SIGTERM, and the trainer processes would report SIGTERM for a Ctrl-C. (Under SLURM every
# process still gets the signal from SLURM as well: the trainer keeps the first one it receives.) setsid runs the
# launcher in place (its pid is $!) unless it must fork, and then --wait keeps $! alive until the launcher ends.
session=(); if command -v setsid >/dev/null; then session=(setsid --wait); fi
"${session[@]}" "${cmd[@]}" "${args[@]}" &
child=$!
# `wait` returns early (status > 128) when a trapped signal arrives; wait again until the launcher is gone.
# bash keeps an exited child's status, so the last `wait` returns the launcher's own.
while kill -0 "$child" 2>/dev/null; do wait "$child" || true; done
status=0
wait "$child" || status=$?
# Each trainer process left its status (75 preempted, 2 refused) and, for a refusal, its one line (trainer/main.py).
preempted=0 refused=0 lines=()
for file in "$TRAINER_EXIT_STATUS_DIR"/local_rank_*; do
  [[ -f "$file" ]] || continue
  code="" line=""
  { IFS= read -r code || true; IFS= read -r line || true; } < "$file"
  if [[ "$code" == "$PREEMPTED" ]]; then preempted=$((preempted + 1)); fi
  if [[ "$code" == 2 ]]; then
    refused=$((refused + 1))
    new=1; for seen in ${lines[@]+"${lines[@]}"}; do [[ "$seen" != "$line" ]] || new=0; done  # bash < 4.4: set -u
    if [[ -n "$line" ]] && ((new)); then lines+=("$line"); fi
  fi
done
# The processes printed no refusal themselves: each distinct line once, whatever the exit.
((${#lines[@]} == 0)) || printf '%s\n' ${lines[@]+"${lines[@]}"} >&2
if ((status != 0 && preempted == NPROC_PER_NODE)); then
  echo "launch.sh: all $NPROC_PER_NODE trainer processes of this node saved and stopped for preemption:" \
       "exit $PREEMPTED" >&2
  status=$PREEMPTED
elif ((status != 0 && refused == NPROC_PER_NODE)); then
  status=2
fi
exit "$status"
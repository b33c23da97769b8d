"""launch.sh: which accelerate config and process layout it picks for the GPUs, nodes and SLURM job it finds,
that it hands the trainer's arguments over unchanged, and that the accelerate configs are what it expects.

Every case runs the real script with PATH limited to a folder of our own: a few system tools, plus fake
`nvidia-smi` / `scontrol` (and, to see what would run, fake `python` / `accelerate` that record their
arguments), so a real nvidia-smi or SLURM on the test machine cannot leak in.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO

LAUNCH = str(REPO / "launch.sh")
CONFIGS = REPO / "accelerate_configs"
MAIN = str(REPO / "trainer" / "main.py")
STRATEGIES = ("zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")
# Trainer arguments that a shell could mangle: spaces, quotes, $, glob characters, an empty string.
TRAINER_ARGS = ["--model", "test_vit", "--save_dir", "my runs/exp 1", "--data_dir", "it's here", "--note=$HOME *",
                "--empty", ""]
# Variables that steer launch.sh; removed from the test's environment unless a case sets them.
STEERING = ("GPUS", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def write_script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    """A PATH folder with the tools launch.sh uses, and python/accelerate that record how they were called."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("bash", "dirname", "grep", "head", "sed", "mktemp", "rm"):
        (folder / tool).symlink_to(shutil.which(tool))
    for tool in ("python", "accelerate"):
        write_script(folder / tool, f'pwd > "{tmp_path}/called.cwd"\nprintf "%s\\0" "$0" "$@" > "{tmp_path}/called"\n')
    return folder


def fake_nvidia_smi(folder: Path, gpus: int) -> None:
    """`nvidia-smi -L` as it prints on a machine with `gpus` GPUs (with none it says so and exits 6)."""
    if gpus == 0:
        write_script(folder / "nvidia-smi", 'echo "No devices were found"\nexit 6\n')
    else:
        lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})\\n" for i in range(gpus))
        write_script(folder / "nvidia-smi", f'[ "$1" = "-L" ] || exit 1\nprintf "{lines}"\n')


def fake_scontrol(folder: Path, nodelist: str, hosts: list[str]) -> None:
    """`scontrol show hostnames NODELIST` expands the list, one host a line; anything else fails."""
    write_script(folder / "scontrol", f'[ "$1 $2 $3" = "show hostnames {nodelist}" ] || exit 1\n'
                                      f'printf "{"".join(h + chr(92) + "n" for h in hosts)}"\n')


def launch(fake_bin: Path, *args, env: dict | None = None, dry_run: bool = True, cwd=None):
    """Run launch.sh; returns (exit status, stderr lines, the command it printed, as an argument list)."""
    base = {k: v for k, v in os.environ.items() if k not in STEERING and not k.startswith("SLURM_")}
    base["PATH"] = str(fake_bin)
    base.update(env or {})
    result = subprocess.run([LAUNCH, *(["--dry-run"] if dry_run else []), *map(str, args)], env=base,
                            capture_output=True, text=True, timeout=30, cwd=cwd or fake_bin.parent)
    lines = result.stderr.splitlines()
    printed = [line for line in lines if line.startswith("launch.sh: ")]
    # The second line is the command, shell-quoted: splitting it must give back the exact arguments.
    command = shlex.split(printed[1][len("launch.sh: "):]) if len(printed) == 2 else None
    return result.returncode, lines, command


def option(command: list[str], name: str) -> str:
    assert command.count(name) == 1, f"{name} should appear once in {command}"
    return command[command.index(name) + 1]


ACCELERATE_LAUNCH = str(REPO / "trainer" / "accelerate_launch.py")  # `accelerate launch`, quiet where it explains


def accelerate_layout(command: list[str]) -> dict:
    """What an `accelerate launch ... trainer/main.py ARGS` command asks for, and the trainer's arguments."""
    assert command[:2] == ["python", ACCELERATE_LAUNCH], command
    main = command.index(MAIN)
    head = command[:main]
    return {"config": option(head, "--config_file"), "processes": int(option(head, "--num_processes")),
            "machines": int(option(head, "--num_machines")), "rank": int(option(head, "--machine_rank")),
            "ip": option(head, "--main_process_ip"), "port": int(option(head, "--main_process_port")),
            "trainer_args": command[main + 1:]}


# --- GPU counting --------------------------------------------------------------------------------

@pytest.mark.launches
def test_without_nvidia_smi_it_runs_one_process_on_the_cpu(fake_bin):
    rc, lines, command = launch(fake_bin, *TRAINER_ARGS)
    assert rc == 0
    assert command == ["python", MAIN, *TRAINER_ARGS]  # no accelerate, no --device added: the trainer decides
    assert "no GPU found" in lines[0]


@pytest.mark.launches
def test_nvidia_smi_listing_no_gpu_means_the_cpu(fake_bin):
    fake_nvidia_smi(fake_bin, 0)
    rc, _, command = launch(fake_bin, *TRAINER_ARGS)
    assert rc == 0
    assert command == ["python", MAIN, *TRAINER_ARGS]


@pytest.mark.launches
def test_one_gpu_runs_one_process_with_the_single_gpu_config(fake_bin):
    fake_nvidia_smi(fake_bin, 1)
    rc, _, command = launch(fake_bin, *TRAINER_ARGS)
    assert rc == 0
    layout = accelerate_layout(command)
    assert layout["config"] == str(CONFIGS / "single_gpu.yaml")
    assert (layout["processes"], layout["machines"], layout["rank"]) == (1, 1, 0)
    assert layout["trainer_args"] == TRAINER_ARGS  # on a GPU no --device cpu


@pytest.mark.launches
def test_four_gpus_run_ddp_over_all_of_them(fake_bin):
    fake_nvidia_smi(fake_bin, 4)
    rc, lines, command = launch(fake_bin, *TRAINER_ARGS)
    assert rc == 0
    layout = accelerate_layout(command)
    assert layout == {"config": str(CONFIGS / "multi_gpu.yaml"), "processes": 4, "machines": 1, "rank": 0,
                      "ip": "127.0.0.1", "port": 29500, "trainer_args": TRAINER_ARGS}
    assert "ddp: 1 node(s) x 4 process(es), 4 GPU(s) per node" in lines[0]


@pytest.mark.launches
def test_gpus_and_nproc_per_node_override_the_count(fake_bin):
    fake_nvidia_smi(fake_bin, 4)
    rc, _, command = launch(fake_bin, *TRAINER_ARGS, env={"GPUS": "8", "NPROC_PER_NODE": "2"})
    assert rc == 0
    assert accelerate_layout(command)["processes"] == 2
    assert accelerate_layout(command)["config"] == str(CONFIGS / "multi_gpu.yaml")


@pytest.mark.launches
def test_several_cpu_processes_use_the_cpu_config_and_device_cpu(fake_bin):
    rc, _, command = launch(fake_bin, *TRAINER_ARGS, env={"NPROC_PER_NODE": "2"})
    assert rc == 0
    layout = accelerate_layout(command)
    assert layout["config"] == str(CONFIGS / "cpu_multi.yaml") and layout["processes"] == 2
    # Without --device cpu (Accelerator(cpu=True)) the processes would each train alone (DistributedType.NO in each).
    assert layout["trainer_args"] == ["--device", "cpu", *TRAINER_ARGS]


# --- several nodes ---------------------------------------------------------------------------------

@pytest.mark.launches
def test_nodes_from_the_environment(fake_bin):
    fake_nvidia_smi(fake_bin, 8)
    env = {"NNODES": "3", "NODE_RANK": "2", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "23456"}
    rc, lines, command = launch(fake_bin, *TRAINER_ARGS, env=env)
    assert rc == 0
    assert accelerate_layout(command) == {
        "config": str(CONFIGS / "multi_node.yaml"), "processes": 24, "machines": 3, "rank": 2,
        "ip": "10.1.2.3", "port": 23456, "trainer_args": TRAINER_ARGS}
    assert "ddp: 3 node(s) x 8 process(es), 8 GPU(s) per node" in lines[0]


@pytest.mark.launches
def test_cpu_nodes_one_process_each(fake_bin):
    # The layout test_multinode.py runs for real over 127.0.0.1.
    env = {"NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "1", "GPUS": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29999"}
    rc, _, command = launch(fake_bin, *TRAINER_ARGS, env=env)
    assert rc == 0
    assert accelerate_layout(command) == {
        "config": str(CONFIGS / "multi_node.yaml"), "processes": 2, "machines": 2, "rank": 1,
        "ip": "127.0.0.1", "port": 29999, "trainer_args": ["--device", "cpu", *TRAINER_ARGS]}


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
         "SLURM_GPUS_ON_NODE": "4"}


@pytest.mark.launches
def test_slurm_job_fills_nodes_rank_master_and_gpus(fake_bin):
    fake_scontrol(fake_bin, "gpu[07-08]", ["gpu07", "gpu08"])
    fake_nvidia_smi(fake_bin, 8)  # the whole node's GPUs; the job was given 4 (SLURM_GPUS_ON_NODE wins)
    rc, lines, command = launch(fake_bin, *TRAINER_ARGS, env=SLURM)
    assert rc == 0, lines
    assert accelerate_layout(command) == {
        "config": str(CONFIGS / "multi_node.yaml"), "processes": 8, "machines": 2, "rank": 1,
        "ip": "gpu07", "port": 29500, "trainer_args": TRAINER_ARGS}


@pytest.mark.launches
def test_explicit_variables_override_slurm(fake_bin):
    fake_scontrol(fake_bin, "gpu[07-08]", ["gpu07", "gpu08"])
    env = dict(SLURM, NNODES="4", NODE_RANK="3", MASTER_ADDR="head.example", MASTER_PORT="31000", GPUS="2")
    rc, _, command = launch(fake_bin, *TRAINER_ARGS, env=env)
    assert rc == 0
    layout = accelerate_layout(command)
    assert (layout["processes"], layout["machines"], layout["rank"], layout["ip"], layout["port"]) == \
        (8, 4, 3, "head.example", 31000)


# --- strategies ------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", [*STRATEGIES, "fsdp"])
@pytest.mark.launches
def test_strategy_picks_its_config(fake_bin, strategy):
    fake_nvidia_smi(fake_bin, 2)
    rc, lines, command = launch(fake_bin, "--strategy", strategy, *TRAINER_ARGS)
    assert rc == 0
    layout = accelerate_layout(command)
    assert layout["config"] == str(CONFIGS / f"{strategy}.yaml") and Path(layout["config"]).is_file()
    assert layout["processes"] == 2 and layout["trainer_args"] == TRAINER_ARGS
    assert lines[0].startswith(f"launch.sh: {strategy}: ")


@pytest.mark.launches
def test_strategy_equals_form_and_deepspeed_on_cpu(fake_bin):
    rc, _, command = launch(fake_bin, "--strategy=zero3", *TRAINER_ARGS, env={"NPROC_PER_NODE": "2"})
    assert rc == 0
    layout = accelerate_layout(command)
    assert layout["config"] == str(CONFIGS / "zero3.yaml")
    assert layout["trainer_args"] == ["--device", "cpu", *TRAINER_ARGS]


@pytest.mark.parametrize("args", [["--strategy", "zero4"], ["--strategy=ZeRO2"], ["--strategy", ""], ["--strategy"]],
                         ids=["unknown", "wrong-case", "empty", "missing"])
@pytest.mark.launches
def test_bad_strategy_exits_2_with_one_line(fake_bin, args):
    rc, lines, _ = launch(fake_bin, "--model", "test_vit", *args)  # last, so "missing" has no value to take
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("error: --strategy"), lines


@pytest.mark.launches
def test_ddp_with_one_process_exits_2_with_one_line(fake_bin):
    rc, lines, _ = launch(fake_bin, "--strategy", "ddp")
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: --strategy ddp needs more than one"), lines


# --- what actually runs ----------------------------------------------------------------------------

@pytest.mark.parametrize("gpus", [0, 4])
@pytest.mark.launches
def test_the_printed_command_is_what_runs_in_the_callers_folder(fake_bin, tmp_path, gpus):
    fake_nvidia_smi(fake_bin, gpus)
    caller = tmp_path / "somewhere else"
    caller.mkdir()
    _, _, printed = launch(fake_bin, *TRAINER_ARGS, cwd=caller)
    rc, _, _ = launch(fake_bin, *TRAINER_ARGS, cwd=caller, dry_run=False)
    assert rc == 0
    called = (tmp_path / "called").read_bytes().split(b"\0")[:-1]
    # argv[0] is the fake's path; the rest must be exactly the printed command, spaces and quotes intact.
    assert Path(called[0].decode()).name == printed[0]
    assert [a.decode() for a in called[1:]] == printed[1:]
    assert printed[-len(TRAINER_ARGS):] == TRAINER_ARGS
    # Relative paths among the trainer's arguments (--save_dir "my runs/exp 1") mean the caller's folder.
    assert Path((tmp_path / "called.cwd").read_text().strip()).resolve() == caller.resolve()


# --- the accelerate configs ------------------------------------------------------------------------

ALL_CONFIGS = sorted(CONFIGS.glob("*.yaml"))


def walk_keys(value):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key
            yield from walk_keys(inner)


def test_every_strategy_and_topology_has_its_config():
    names = {p.stem for p in ALL_CONFIGS}
    assert names >= {"single_gpu", "multi_gpu", "multi_node", "cpu_multi", *STRATEGIES, "fsdp"}


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_comments_every_key(path):
    text = path.read_text()
    config = yaml.safe_load(text)
    assert isinstance(config, dict) and config["compute_environment"] == "LOCAL_MACHINE"
    uncommented = [line for line in text.splitlines()
                   if line.strip() and not line.lstrip().startswith("#") and not re.search(r"\s#", line)]
    assert uncommented == [], f"{path.name}: key lines without a comment"
    # The CPU configs must not use accelerate's --cpu mode: it starts a single process (its multi-CPU mode wants mpirun).
    assert config.get("use_cpu") is False


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deepspeed_configs_leave_batching_and_clipping_to_the_trainer(strategy):
    config = yaml.safe_load((CONFIGS / f"{strategy}.yaml").read_text())
    assert config["distributed_type"] == "DEEPSPEED"
    keys = set(walk_keys(config))
    # The trainer writes micro-batch, accumulation, global batch and clipping into the DeepSpeed config
    # from --batch_size / --micro_batch_size / --grad_clip; a value here could disagree with them.
    for forbidden in ("train_micro_batch_size_per_gpu", "train_micro_batch_size", "gradient_accumulation_steps",
                      "train_batch_size", "gradient_clipping", "deepspeed_config_file"):
        assert forbidden not in keys, f"{strategy}.yaml sets {forbidden}"
    ds = config["deepspeed_config"]
    assert ds["zero_stage"] == int(strategy[4])
    offload = strategy.endswith("_offload")
    assert ds["offload_optimizer_device"] == ("cpu" if offload else "none")
    assert ds["offload_param_device"] == ("cpu" if offload and ds["zero_stage"] == 3 else "none")
    # ZeRO-3 can write a whole model.safetensors only when it gathers the weights (else get_state_dict raises).
    assert ds["zero3_save_16bit_model"] is (ds["zero_stage"] == 3)


# --- refusals: one line, exit 2 ------------------------------------------------------------------

@pytest.mark.parametrize("env, args, message", [
    ({"MASTER_PORT": "70000"}, [], "MASTER_PORT must lie in [1, 65535], got 70000"),
    ({"NNODES": "2", "NODE_RANK": "5", "MASTER_ADDR": "h"}, [], "NODE_RANK must lie in [0, NNODES - 1] = [0, 1], got 5"),
    ({"NNODES": "2", "NODE_RANK": "1"}, [], "node NODE_RANK=1 needs MASTER_ADDR, the address of node 0"),
    ({"RENDEZVOUS_TIMEOUT": "0"}, [], "RENDEZVOUS_TIMEOUT must be a whole number >= 1, got '0'"),
    ({"NPROC_PER_NODE": "2"}, ["--strategy", "single"], "--strategy single runs one process, but NNODES=1 x "
                                                         "NPROC_PER_NODE=2 were asked for"),
    ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "h"}, ["--strategy", "single"],
     "--strategy single runs one process, but NNODES=2 x NPROC_PER_NODE=1 were asked for"),
    (SLURM, ["--strategy", "single"], "--strategy single runs one process, but NNODES=2 x NPROC_PER_NODE=4"),
], ids=["port", "rank", "master", "timeout", "single-nproc", "single-nodes", "single-slurm"])
@pytest.mark.launches
def test_node_settings_are_refused_in_one_line(fake_bin, env, args, message):
    fake_scontrol(fake_bin, "gpu[07-08]", ["gpu07", "gpu08"])
    rc, lines, _ = launch(fake_bin, *args, "--model", "test_vit", env=env)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines


@pytest.mark.launches
def test_single_on_a_multi_gpu_node_runs_one_process(fake_bin):
    fake_nvidia_smi(fake_bin, 8)
    rc, _, command = launch(fake_bin, "--strategy", "single", *TRAINER_ARGS)
    assert rc == 0
    layout = accelerate_layout(command)
    assert (layout["config"], layout["processes"]) == (str(CONFIGS / "single_gpu.yaml"), 1)


def fake_python(fake_bin: Path, check_status: int, workers: str = "", launcher_status: int = 1) -> None:
    """`python`: exits check_status for launch.sh's --check_launch; as the launcher, leaves the workers' status files
    (`workers`: shell lines writing into $TRAINER_EXIT_STATUS_DIR) and exits launcher_status."""
    refusal = 'echo "error: checked" >&2; ' if check_status else ""
    write_script(fake_bin / "python", f'if [ "$2" = "--check_launch" ]; then {refusal}exit {check_status}; fi\n'
                                      f': > "{fake_bin}/launched"\n{workers}\nexit {launcher_status}\n')


@pytest.mark.launches
def test_options_are_checked_once_before_any_worker_starts(fake_bin):
    fake_python(fake_bin, check_status=2)
    rc, lines, _ = launch(fake_bin, "--learning_rate", "-1", env={"NPROC_PER_NODE": "2"}, dry_run=False)
    assert rc == 2 and lines[2:] == ["error: checked"], lines
    assert not (fake_bin / "launched").exists()


REFUSED = 'printf "2\\nerror: --x is wrong\\n" > "$TRAINER_EXIT_STATUS_DIR/local_rank_{}"\n'


@pytest.mark.parametrize("ranks, status", [((0, 1), 2), ((1,), 1)], ids=["all", "one"])
@pytest.mark.launches
def test_workers_refusal_is_one_line_and_exit_2_when_every_worker_refused(fake_bin, ranks, status):
    fake_python(fake_bin, check_status=0, workers="".join(REFUSED.format(r) for r in ranks))
    rc, lines, _ = launch(fake_bin, env={"NPROC_PER_NODE": "2"}, dry_run=False)
    assert rc == status and lines[2:] == ["error: --x is wrong"], lines  # printed once, whatever the exit


# --- the same, with the real trainer and launcher (2 CPU processes) ----------------------------------------

def real_launch(tmp_path, *args, **env):
    import sys
    from conftest import TINY, child_env, free_port
    from trainer.synthetic import write_fake_cifar100
    if not (tmp_path / "data").exists():
        write_fake_cifar100(tmp_path / "data", num_train=16, num_test=8)
    steering = {k: v for k, v in child_env().items() if k not in STEERING and not k.startswith("SLURM_")}
    # The venv's python first on PATH: launch.sh runs `python`.
    steering["PATH"] = f"{Path(sys.executable).parent}:{steering.get('PATH', '')}"
    env = {**steering, "GPUS": "0", "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()), **env}
    argv = [*TINY, "--data_dir", tmp_path / "data", "--save_dir", tmp_path / "run", "--batch_size", "8", *args]
    return subprocess.run([LAUNCH, *map(str, argv)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)


def errors(result) -> list[str]:
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error")]


@pytest.mark.launches
def test_real_refusal_before_the_workers_is_one_line(tmp_path):
    result = real_launch(tmp_path, "--learning_rate", "-1")
    assert result.returncode == 2 and errors(result) == ["error: --learning_rate must be positive, got -1.0"]
    assert len(result.stderr.splitlines()) == 3  # launch.sh's two lines, then the refusal
    assert not (tmp_path / "run").exists()


@pytest.mark.launches
def test_real_refusal_inside_the_workers_is_one_line_and_exit_2(tmp_path):
    # accelerate's refusal of fp16 on the CPU needs the Accelerator: every worker makes it, none prints it.
    result = real_launch(tmp_path, "--mixed_precision", "fp16")
    assert result.returncode == 2, result.stderr[-3000:]
    assert errors(result) == ["error: --mixed_precision fp16 is not applied on cpu by accelerate (it would train in "
                              "fp32); use --mixed_precision bf16 or no"]


@pytest.mark.launches
def test_a_node_that_cannot_reach_the_master_says_which_settings_to_check(tmp_path):
    from conftest import free_port
    port = free_port()  # nothing listens there: node 0 was never started
    result = real_launch(tmp_path, NNODES="2", NODE_RANK="1", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(port), RENDEZVOUS_TIMEOUT="1")
    assert result.returncode == 1
    (line,) = errors(result)
    assert line.startswith(f"error: node NODE_RANK=1 of NNODES=2 could not reach the master node at "
                           f"MASTER_ADDR=127.0.0.1 MASTER_PORT={port}"), line


def test_a_refusing_worker_waits_for_the_other_workers_of_its_node(tmp_path, monkeypatch):
    """torch's agent stops the other workers as soon as one exits: a refusing worker leaves its line for launch.sh,
    then waits (seconds at most) until every worker of its node has left its status, so launch.sh can see that all
    refused. In this process, with a second worker that refuses 0.3 s later."""
    import threading
    import time
    from trainer.main import tell_launch_sh
    monkeypatch.setenv("TRAINER_EXIT_STATUS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    other = threading.Timer(0.3, lambda: (tmp_path / "local_rank_1").write_text("2\nerror: --x is wrong\n"))
    other.start()
    start = time.monotonic()
    assert tell_launch_sh(2, "error: --x is wrong")
    assert 0.3 <= time.monotonic() - start < 3
    assert (tmp_path / "local_rank_0").read_text() == "2\nerror: --x is wrong\n"
    other.join()
